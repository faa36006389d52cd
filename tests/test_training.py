"""auxfuse where users train: torch.compile, autocast + GradScaler, channels_last and strided heads, CUDA graphs,
and the example scripts. Distributed training is in tests/test_distributed.py.

Every CPU test runs on each backend that can run here (`torch` always, `cpu` once the extension is built);
GPU tests (marked `gpu`) on each CUDA backend that can run, and skip without a GPU.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import auxfuse
from auxfuse.backends import BACKENDS
from oracle import assert_matches_naive, assert_matches_reference, generator, naive_loss, to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = auxfuse.available_backends()
HAS_CUDA = torch.cuda.is_available()


def _backend_params(names, need_cuda=False):
    params = []
    for name in names:
        reason = AVAILABLE[name] or ("no CUDA device is visible" if need_cuda and not HAS_CUDA else None)
        marks = [pytest.mark.skipif(reason is not None, reason=f"backend {name!r}: {reason}")]
        if need_cuda:
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


CPU_BACKENDS = _backend_params(("cpu", "torch"))
CPU_BACKEND_NAMES = [name for name in ("cpu", "torch") if AVAILABLE[name] is None]
GPU_BACKENDS = _backend_params(("cuda", "triton", "torch"), need_cuda=True)

# An Inception-v3-like output: MultiHeadLoss's preset weighs it logits 1, aux_logits 0.4.
AuxOutputs = collections.namedtuple("AuxOutputs", ["logits", "aux_logits"])
WEIGHTS = {"logits": 1.0, "aux_logits": 0.4}


class TinyAuxNet(nn.Module):
    """A small CNN with an auxiliary classifier on its first stage, returning (logits, aux_logits) in training
    and the logits alone in eval, as torchvision's Inception v3 does. No BatchNorm: its batch statistics would
    make a sharded batch (DDP) differ from the whole one."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        h = self.stem(x)
        logits = self.head(self.stage(h))
        return AuxOutputs(logits, self.aux(h)) if self.training else logits


def naive_criterion(outputs, target, **options):
    """What users write by hand: the weighted sum of F.cross_entropy over the heads."""
    return sum(w * F.cross_entropy(getattr(outputs, name), target, **options) for name, w in WEIGHTS.items())


def naive_fp32(outputs, target, **options):
    """The naive sum computed in fp32 from the same fp16 / bf16 values, through the model: the twin whose
    parameter gradients (compared norm-wise) and training steps ours must match. Losses and head gradients are
    compared with the float64 oracle (tests/oracle.py)."""
    with torch.autocast(outputs.logits.device.type, enabled=False):
        return naive_criterion(AuxOutputs(*(h.float() for h in outputs)), target, **options)


def _batch(n=6, num_classes=10, size=12, seed=0, ignore=True):
    g = generator(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    target = torch.randint(0, num_classes, (n,), generator=g)
    if ignore:
        target[1] = -100
    return images, target


def _assert_grads_close(ours, theirs, rel=1e-5):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a is not None and b is not None
        assert (a.float() - b.float()).norm() <= rel * b.float().norm() + 1e-7, (a, b)


@pytest.fixture
def spy(monkeypatch):
    """spy(name) -> list that receives every Problem the backend `name` computes."""

    def install(name):
        backend, seen = BACKENDS[name], []
        original = backend.compute

        def compute(problem):
            seen.append(problem)
            return original(problem)

        monkeypatch.setattr(backend, "compute", compute)
        return seen

    return install


# --------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_training_step_matches_eager(backend):
    """A training step (model + MultiHeadLoss, with details) compiles as one graph (fullgraph=True raises on any
    graph break) and gives eager's loss, per-head details and parameter gradients."""
    torch._dynamo.reset()
    model = TinyAuxNet().train()
    criterion = auxfuse.MultiHeadLoss(backend=backend, label_smoothing=0.1)
    params = list(model.parameters())
    images, target = _batch()

    def step(images, target):
        return criterion(model(images), target, return_details=True)

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(images, target)
    got_grads = torch.autograd.grad(got.loss, params)
    want = step(images, target)
    want_grads = torch.autograd.grad(want.loss, params)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.head_losses, want.head_losses, rtol=1e-5, atol=1e-6)
    assert got.head_correct.tolist() == want.head_correct.tolist() and int(got.count) == int(want.count) == 5
    assert int(got.invalid_targets) == int(want.invalid_targets) == 0
    _assert_grads_close(got_grads, want_grads)
    # And eager itself is the naive sum.
    torch.testing.assert_close(want.loss, naive_criterion(model(images), target, label_smoothing=0.1))


_OPCHECK_CASES = {
    # name: (N, C, S, channels_last, class_weight, label_smoothing, reduction, prob_target)
    "classifier_mean": (5, 7, 1, False, False, 0.0, 1, False),
    "classifier_sum_weight_smoothing": (4, 6, 1, False, True, 0.1, 2, False),
    "segmentation_none_channels_last": (2, 5, 12, True, False, 0.0, 0, False),
    "probabilities_mean": (3, 4, 1, False, False, 0.2, 1, True),
}


@pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason=f"backend 'cpu': {AVAILABLE['cpu']}")
@pytest.mark.parametrize("case", sorted(_OPCHECK_CASES))
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_multihead_ce_forward_cpu(case, requires_grad):
    """torch.library.opcheck on the fused op with CPU tensors: schema, fake kernel, autograd registration and
    AOT dispatch (what torch.compile relies on)."""
    from auxfuse.backends.native import GRAD_IN_FORWARD, NO_GRAD

    N, C, S, channels_last, with_weight, smoothing, reduction, prob_target = _OPCHECK_CASES[case]
    g = generator(0)

    def head():
        if channels_last:  # (N, C, S) with the class dimension innermost, as a channels_last head reshapes
            return torch.randn(N, S, C, generator=g).transpose(1, 2).requires_grad_(requires_grad)
        return torch.randn(N, C, S, generator=g).requires_grad_(requires_grad)

    heads = [head(), head()]
    if prob_target:
        target = torch.softmax(torch.randn(N, C, S, generator=g), 1)
    else:
        target = torch.randint(0, C, (N, S), generator=g)
        target[0, 0] = -100
    class_weight = torch.rand(C, generator=g) + 0.5 if with_weight else None
    grad_mode = GRAD_IN_FORWARD if requires_grad else NO_GRAD
    args = (heads, target, class_weight, [1.0, 0.4], -100, smoothing, reduction, grad_mode)
    torch.library.opcheck(torch.ops.auxfuse.multihead_ce_forward.default, args)


# ------------------------------------------------------------------------------------------ AMP (autocast)


def _autocast_matches_naive(backend, device, amp_dtype, spy, naive_tol):
    """Under autocast the model's fp16 / bf16 logits reach the backend as they are (same storage, no cast copy);
    the loss is fp32 and equals the fp32 oracle from the same logits in loss, head and parameter gradients; and
    it equals the naive sum computed under the same autocast (within `naive_tol`: CPU autocast runs
    cross_entropy in fp32, CUDA autocast in part in the low precision)."""
    model = TinyAuxNet().to(device).train()
    params = list(model.parameters())
    images, target = (t.to(device) for t in _batch())
    seen = spy(backend)
    with torch.autocast(device.type, dtype=amp_dtype):
        outputs = model(images)
        loss = auxfuse.MultiHeadLoss(backend=backend)(outputs, target)
        under_autocast = naive_criterion(outputs, target)
    assert outputs.logits.dtype == outputs.aux_logits.dtype == amp_dtype
    (problem,) = seen
    assert problem.dtype == amp_dtype
    assert [h.data_ptr() for h in problem.heads] == [outputs.logits.data_ptr(), outputs.aux_logits.data_ptr()]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, under_autocast.float(), **naive_tol)
    # The loss and the head gradients (in the heads' dtype) against the float64 naive sum from the same logits;
    # then the same low-precision backward through the model as the fp32 naive sum's.
    assert_matches_naive(loss, list(outputs), target, [WEIGHTS[name] for name in outputs._fields])
    ref = naive_fp32(outputs, target)
    ours = torch.autograd.grad(loss, params, retain_graph=True)
    _assert_grads_close(ours, torch.autograd.grad(ref, params), rel=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_bf16_cpu_heads_are_consumed_uncast(backend, spy):
    _autocast_matches_naive(backend, torch.device("cpu"), torch.bfloat16, spy, dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_cuda_heads_are_consumed_uncast(backend, amp_dtype, spy):
    _autocast_matches_naive(backend, torch.device("cuda"), amp_dtype, spy, dict(rtol=5e-3, atol=1e-3))


def _grad_scaler(device_type: str, scale: float):
    """torch.amp.GradScaler for this device, or None where this torch has none for it."""
    try:
        scaler = torch.amp.GradScaler(device_type, init_scale=scale, growth_interval=1)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch
        return None
    return scaler if scaler.is_enabled() else None


def _scaled_training_matches_naive(backend, device, amp_dtype, steps=3, scale=2.0**10):
    """Train two copies of TinyAuxNet under autocast with a GradScaler (or a constant loss scale where this
    torch has no scaler for the device): one with MultiHeadLoss, one with the naive sum. The loss is scaled,
    so the loss's grad_output is the scale, not 1. Every step's unscaled gradients and final parameters match
    (the naive sum in fp32 from the same logits, as the fp16 / bf16 oracle)."""
    models = [TinyAuxNet().to(device).train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    criteria = [auxfuse.MultiHeadLoss(backend=backend), naive_fp32]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    scalers = [_grad_scaler(device.type, scale) for _ in models]
    for step in range(steps):
        images, target = (t.to(device) for t in _batch(seed=step))
        grads, losses = [], []
        for model, criterion, optimizer, scaler in zip(models, criteria, optimizers, scalers):
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = criterion(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss * scale).backward()
            if scaler:
                scaler.unscale_(optimizer)
            else:
                for p in model.parameters():
                    p.grad /= scale
            grads.append([p.grad.clone() for p in model.parameters()])
            losses.append(loss.detach().float())
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        _assert_grads_close(grads[0], grads[1], rel=2e-2)
    if scalers[0]:
        assert scalers[0].get_scale() == scalers[1].get_scale() > scale  # no inf / nan step was skipped
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_training_bf16_cpu_matches_naive(backend):
    _scaled_training_matches_naive(backend, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_scaler_training_cuda_matches_naive(backend, amp_dtype):
    _scaled_training_matches_naive(backend, torch.device("cuda"), amp_dtype)


# --------------------------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_captures_forward_backward_and_replays(backend):
    """A whole training step's forward and backward, the loss included, captured in one torch.cuda.CUDAGraph:
    replaying it on new data copied into the static inputs gives eager's loss and gradients (no host sync in
    the loss, so capture does not fail)."""
    model = TinyAuxNet().cuda().train()
    criterion = auxfuse.MultiHeadLoss(backend=backend, label_smoothing=0.1)
    params = list(model.parameters())
    static_images, static_target = (t.cuda() for t in _batch(seed=0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (lazy inits, allocator) outside the capture
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            criterion(model(static_images), static_target).backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = criterion(model(static_images), static_target)
        static_loss.backward()
    for seed in (1, 2):
        images, target = (t.cuda() for t in _batch(seed=seed))
        static_images.copy_(images)
        static_target.copy_(target)
        graph.replay()
        torch.cuda.synchronize()
        want = naive_criterion(model(images), target, label_smoothing=0.1)
        want_grads = torch.autograd.grad(want, params)
        torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-6)
        _assert_grads_close([p.grad for p in params], want_grads, rel=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_training_step_cuda(backend):
    torch._dynamo.reset()
    model = TinyAuxNet().cuda().train()
    criterion = auxfuse.MultiHeadLoss(backend=backend)
    images, target = (t.cuda() for t in _batch())
    compiled = torch.compile(lambda x, t: criterion(model(x), t), fullgraph=True)
    got = compiled(images, target)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    want = naive_criterion(model(images), target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got_grads, torch.autograd.grad(want, list(model.parameters())), rel=1e-4)


# ------------------------------------------------------------------------- channels_last and strided heads


def _check_layouts(backend, make_heads, bases, target, **options):
    """MultiHeadLoss on heads derived (as views) from leaf `bases` equals the naive sum on the same views, in
    loss and in the gradients of the bases; the heads are not written to."""
    heads = make_heads(*bases)
    before = [h.detach().clone() for h in heads]
    weights = [1.0, 0.4][: len(heads)]
    loss = auxfuse.multi_head_cross_entropy(list(heads), target, weights, backend=backend, **options)
    ref_bases = [to_reference(b).requires_grad_(True) for b in bases]
    ref = naive_loss(make_heads(*ref_bases), target, weights, **{k: to_reference(v) for k, v in options.items()})
    assert_matches_reference(loss, ref, torch.float32, msg="loss")
    g = torch.rand(ref.shape, generator=generator("grad_output"), dtype=ref.dtype) + 0.5  # not 1
    for a, b in zip(torch.autograd.grad(loss, bases, g.float()), torch.autograd.grad(ref, ref_bases, g)):
        assert_matches_reference(a, b, torch.float32, heads[0].shape[1], msg="gradient")
    for h, b in zip(heads, before):
        assert torch.equal(h.detach(), b)
    return heads


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_segmentation_heads(backend, reduction, spy):
    """Segmentation heads from a channels_last model ((N, C, H, W) with the class dimension innermost) next to a
    contiguous one: the loss reads them through their strides (no wrong answer, no copy of the channels_last
    head on the torch backend)."""
    g = generator(0)
    out = torch.randn(2, 5, 6, 7, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    aux = torch.randn(2, 5, 6, 7, generator=g).requires_grad_()
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[:, 0] = 255
    seen = spy(backend)
    heads = _check_layouts(backend, lambda o, a: (o, a), (out, aux), target, ignore_index=255, reduction=reduction)
    assert heads[0].is_contiguous(memory_format=torch.channels_last) and not heads[0].is_contiguous()
    if backend == "torch":
        assert seen[0].heads[0].data_ptr() == out.data_ptr() and seen[0].heads[0].stride(1) == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_classifier_heads(backend):
    """Heads that are slices and transposes (strides other than (C, 1)), with smoothing and class weights."""
    g = generator(1)
    wide = torch.randn(8, 12, generator=g).requires_grad_()  # wide[:, ::2]: strides (12, 2)
    tall = torch.randn(6, 8, generator=g).requires_grad_()  # tall.t(): strides (1, 8)
    target = torch.randint(0, 6, (8,), generator=g)
    heads = _check_layouts(backend, lambda w, t: (w[:, ::2], t.t()), (wide, tall), target,
                           label_smoothing=0.1, weight=torch.rand(6, generator=g) + 0.5)
    assert not heads[0].is_contiguous() and not heads[1].is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_model_trains(backend):
    """A whole channels_last segmentation-style model (conv heads, bilinear upsampling) trains with
    MultiHeadLoss exactly as with the naive sum."""
    body = nn.Conv2d(3, 8, 3, padding=1)
    out_head, aux_head = nn.Conv2d(8, 4, 1), nn.Conv2d(3, 4, 1)
    modules = nn.ModuleList([body, out_head, aux_head]).to(memory_format=torch.channels_last)
    g = generator(2)
    images = torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[0, :3] = 255

    def outputs():
        up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
        return {"out": up(out_head(torch.relu(body(images)))), "aux": up(aux_head(images))}

    o = outputs()
    assert o["out"].is_contiguous(memory_format=torch.channels_last)
    loss = auxfuse.MultiHeadLoss(ignore_index=255, backend=backend)(o, target)
    assert_matches_naive(loss, [o["out"], o["aux"]], target, [1.0, 0.5], ignore_index=255)
    ref = (F.cross_entropy(o["out"], target, ignore_index=255)
           + 0.5 * F.cross_entropy(o["aux"], target, ignore_index=255))
    params = list(modules.parameters())
    _assert_grads_close(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(ref, params))


# ----------------------------------------------------------------------------------------- example scripts


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch, image_size, extra", [
    ("googlenet", 32, ["--amp"]),  # GoogLeNetOutputs in training, three heads; bf16 autocast on CPU
    ("resnet18", 32, []),  # a plain Tensor: MultiHeadLoss is nn.CrossEntropyLoss
    pytest.param("inception_v3", 299, [], marks=pytest.mark.slow),  # InceptionOutputs; needs 299 x 299
])
def test_train_imagenet_example_dummy_data(arch, image_size, extra, capsys):
    _load_example("train_imagenet").main([
        "-a", arch, "--dummy", "--dummy-size", "8", "4", "--num-classes", "10", "--image-size", str(image_size),
        "-b", "2", "--epochs", "1", "--max-steps", "2", "-j", "0", "--device", "cpu", "--seed", "0", "--lr", "0.01",
        *extra,
    ])
    out = capsys.readouterr().out
    assert f"=> creating model '{arch}'" in out
    assert "Epoch: [0][2/2]" in out and "Test: [2/2]" in out and " * best Acc@1" in out


def test_train_imagenet_example_image_folder_cli(tmp_path):
    """The script as a user runs it, on an ImageFolder tree (train/ and val/, one folder per class)."""
    from PIL import Image

    g = generator(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog", "fox"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_imagenet.py"), str(tmp_path), "-a", "googlenet",
         "--image-size", "32", "-b", "4", "--epochs", "1", "-j", "0", "--device", "cpu", "-p", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3 classes, 32x32 images)" in result.stdout
    assert "Epoch: [0][3/3]" in result.stdout and "Test: [2/2]" in result.stdout


def test_train_imagenet_example_differs_from_plain_script_in_two_places():
    """The script is the plain nn.CrossEntropyLoss one except for the criterion and main_logits in accuracy,
    each marked with a comment."""
    import ast

    source = open(os.path.join(ROOT, "examples", "train_imagenet.py")).read()
    uses = sorted(node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id == "auxfuse")
    assert uses == ["MultiHeadLoss", "main_logits"]
    assert source.count("# auxfuse (") == 2 and "CrossEntropyLoss(" not in source


@pytest.mark.parametrize("model", [
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "deeplabv3_resnet50",
])
def test_train_segmentation_example_synthetic(model, capsys):
    _load_example("train_segmentation").main([
        "--model", model, "--synthetic", "--synthetic-size", "2", "2", "--image-size", "32", "--num-classes", "4",
        "-b", "2", "--epochs", "1", "-j", "0", "--device", "cpu", "-p", "1",
    ])
    out = capsys.readouterr().out
    assert "aux head weight 0.5" in out and "Epoch: [0][1/1]" in out and "mean IoU" in out


def test_segmentation_synthetic_masks_have_void_borders():
    dataset = _load_example("train_segmentation").SyntheticShapes(4, 32, 5, seed=0)
    image, mask = dataset[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert (mask == 255).any() and (mask == 0).any() and ((mask > 0) & (mask < 5)).any()
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert torch.equal(dataset[0][1], mask)  # deterministic per index


def test_train_segmentation_example_voc_layout(tmp_path, capsys):
    """The --data-path route, on a tiny Pascal VOC 2012 tree (JPEG images, palette PNG masks with 255 borders)."""
    from PIL import Image

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    g = generator(0)
    names = [f"2007_{i:06d}" for i in range(6)]
    for i, name in enumerate(names):
        h, w = 36 + 4 * i, 44
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = torch.zeros(h, w, dtype=torch.uint8)
        mask[8:20, 10:30] = 1 + i % 3
        mask[7, 9:31] = 255
        png = Image.fromarray(mask.numpy())
        png.putpalette([c for i in range(256) for c in (i, 255 - i, (37 * i) % 256)])  # L -> P, indices kept
        png.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:4]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[4:]) + "\n")
    _load_example("train_segmentation").main([
        "--model", "deeplabv3_mobilenet_v3_large", "--data-path", str(tmp_path), "--image-size", "32",
        "--num-classes", "4", "-b", "2", "--epochs", "1", "-j", "0", "--device", "cpu", "-p", "1",
    ])
    out = capsys.readouterr().out
    assert "4 training images of 32x32" in out and "Epoch: [0][2/2]" in out and "mean IoU" in out
