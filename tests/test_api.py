"""The public API on real torchvision outputs, the presets, the output types and every error message."""

import collections
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import auxfuse
from oracle import assert_matches_reference, to_reference
from auxfuse.outputs import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ce64(x, target, **options):
    """F.cross_entropy in float64 from the same values: the oracle's naive sum is built from these."""
    return F.cross_entropy(to_reference(x), target, **options)


def assert_close64(actual, expected):
    assert_matches_reference(actual, expected, torch.float32)


def _assert_same_loss_and_param_grads(model, outputs, target, naive, **criterion_options):
    """On one train-mode output: the criterion equals `naive`, in the loss and every parameter's gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = auxfuse.MultiHeadLoss(**criterion_options)(outputs, target)
    ref = naive(outputs, target)
    assert_matches_reference(loss, naive(torch.utils._pytree.tree_map(to_reference, outputs), target), torch.float32)
    ours = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    theirs = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    compared = 0
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            # Deep backbones amplify fp32 rounding elementwise; the gradient as a whole must agree.
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9
            compared += 1
    assert compared > 10
    return loss


def test_googlenet_train_outputs_match_naive_sum():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10).train()
    outputs = model(torch.randn(3, 3, 32, 32))
    assert type(outputs).__name__ == "GoogLeNetOutputs"
    target = torch.randint(0, 10, (3,))
    _assert_same_loss_and_param_grads(
        model, outputs, target,
        lambda o, t: F.cross_entropy(o.logits, t) + 0.3 * F.cross_entropy(o.aux_logits1, t)
        + 0.3 * F.cross_entropy(o.aux_logits2, t),
    )
    # Every aux head's parameters receive gradients (no unused-parameter surprise in DDP).
    loss = auxfuse.MultiHeadLoss()(outputs, target)
    loss.backward()
    assert model.aux1.fc2.weight.grad.abs().sum() > 0 and model.aux2.fc2.weight.grad.abs().sum() > 0


def test_inception_v3_train_outputs_match_naive_sum():
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=7).train()
    outputs = model(torch.randn(2, 3, 299, 299))
    assert type(outputs).__name__ == "InceptionOutputs"
    target = torch.tensor([1, 6])
    _assert_same_loss_and_param_grads(
        model, outputs, target, lambda o, t: F.cross_entropy(o.logits, t) + 0.4 * F.cross_entropy(o.aux_logits, t)
    )


def test_segmentation_dict_outputs_with_ignore_index_255():
    model = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=True
    ).train()
    outputs = model(torch.randn(2, 3, 48, 48))
    assert set(outputs) == {"out", "aux"}
    target = torch.randint(0, 5, (2, 48, 48))
    target[:, :8] = 255  # void border, as in VOC
    _assert_same_loss_and_param_grads(
        model, outputs, target,
        lambda o, t: F.cross_entropy(o["out"], t, ignore_index=255) + 0.5 * F.cross_entropy(o["aux"], t, ignore_index=255),
        ignore_index=255,
    )


def test_eval_mode_tensor_is_plain_cross_entropy():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor)
    target = torch.tensor([3, 4])
    assert_close64(auxfuse.MultiHeadLoss()(logits, target), ce64(logits, target))
    # Weights written for the training-time output still work on the eval-time Tensor: the main head's weight.
    assert_close64(
        auxfuse.MultiHeadLoss({"logits": 2.0, "aux_logits1": 0.3, "aux_logits2": 0.3})(logits, target),
        2.0 * ce64(logits, target),
    )
    assert auxfuse.main_logits(logits) is logits


def test_none_fields_are_skipped():
    outputs = torchvision.models.GoogLeNetOutputs(torch.randn(4, 6), None, None)
    target = torch.randint(0, 6, (4,))
    assert_close64(auxfuse.multi_head_cross_entropy(outputs, target), ce64(outputs.logits, target))
    aux_only_one = torchvision.models.GoogLeNetOutputs(torch.randn(4, 6), None, torch.randn(4, 6))
    assert_close64(
        auxfuse.multi_head_cross_entropy(aux_only_one, target),
        ce64(aux_only_one.logits, target) + 0.3 * ce64(aux_only_one.aux_logits1, target),
    )


@pytest.mark.parametrize("fields, expected", [(tuple(sorted(k)), v) for k, v in PRESETS.items()])
def test_presets_by_field_names(fields, expected):
    x = {name: torch.randn(3, 4) for name in fields}
    target = torch.tensor([0, 1, 3])
    namedtuple = collections.namedtuple("Out", fields)(**x)
    ref = sum(expected[n] * ce64(x[n], target) for n in fields)
    for outputs in (namedtuple, x):
        assert_close64(auxfuse.multi_head_cross_entropy(outputs, target), ref)


def test_generic_outputs_use_aux_weight_and_main():
    a, b, c = (torch.randn(5, 3) for _ in range(3))
    t = torch.randint(0, 3, (5,))
    ce = lambda x: ce64(x, t)  # noqa: E731
    assert_close64(auxfuse.multi_head_cross_entropy((a, b, c), t), ce(a) + 0.3 * ce(b) + 0.3 * ce(c))
    assert_close64(auxfuse.multi_head_cross_entropy([a, b], t, aux_weight=0.4), ce(a) + 0.4 * ce(b))
    assert_close64(auxfuse.multi_head_cross_entropy((a, b), t, main=1), 0.3 * ce(a) + ce(b))
    assert_close64(auxfuse.multi_head_cross_entropy({"p": a, "q": b}, t, {"p": 0.5, "q": 2.0}),
                               0.5 * ce(a) + 2.0 * ce(b))
    assert_close64(auxfuse.multi_head_cross_entropy({"p": a, "q": b}, t, main="q"), 0.3 * ce(a) + ce(b))
    assert auxfuse.main_logits({"p": a, "q": b}, main="q") is b
    assert auxfuse.main_logits({"aux": a, "out": b}) is b
    assert auxfuse.main_logits((a, b)) is a


def test_return_details():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    out = auxfuse.multi_head_cross_entropy({"out": a, "aux": b}, t, return_details=True)
    assert isinstance(out, auxfuse.MultiHeadLossOutput)
    assert_close64(out.head_losses, torch.stack([ce64(a, t), ce64(b, t)]))
    valid = t != -100
    assert out.head_correct.tolist() == [int(((x.argmax(1) == t) & valid).sum()) for x in (a, b)]
    assert int(out.count) == 5
    assert int(out.invalid_targets) == 0 and out.invalid_targets.dtype == torch.int64
    out.raise_if_invalid_targets()  # nothing to report
    assert not out.head_losses.requires_grad
    # a tuple of the four fields design.md promises; invalid_targets is an attribute, kept by pickle
    loss, head_losses, head_correct, count = out
    assert len(out) == 4 and out._fields == ("loss", "head_losses", "head_correct", "count")
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is auxfuse.MultiHeadLossOutput and int(again.invalid_targets) == 0


def test_raise_if_invalid_targets_reads_the_count():
    """What a CUDA / Triton call with an out-of-range class index returns (CPU calls raise before that)."""
    nan = torch.tensor(float("nan"))
    for invalid, words in ((1, r"1 class index was outside \[0, C\)"), (3, r"3 class indices were outside")):
        out = auxfuse.MultiHeadLossOutput(nan, nan.expand(2), torch.zeros(2, dtype=torch.long), torch.tensor(4),
                                          invalid_targets=torch.tensor(invalid))
        with pytest.raises(ValueError, match=words + r".*the loss is NaN; pass check_targets=True"):
            out.raise_if_invalid_targets()


def test_module_moves_class_weight_and_has_repr():
    criterion = auxfuse.MultiHeadLoss(weight=torch.ones(3), label_smoothing=0.1)
    assert "weight" in dict(criterion.named_buffers())
    criterion = criterion.to(torch.float64)
    assert criterion.weight.dtype == torch.float64
    assert "reduction='mean'" in repr(criterion)


def test_available_backends_and_explain():
    available = auxfuse.available_backends()
    assert set(available) == {"cuda", "triton", "cpu", "torch"}
    assert available["torch"] is None
    assert all(reason is None or isinstance(reason, str) and reason for reason in available.values())
    info = auxfuse.explain_backend((torch.randn(2, 3), torch.randn(2, 3)), torch.tensor([0, 1]))
    assert info["chosen"] in ("cpu", "torch")
    if info["chosen"] == "torch":
        assert info["rejected"]["cpu"]


def test_backend_torch_forced_and_unknown_backend():
    x, t = torch.randn(2, 3), torch.tensor([0, 2])
    assert_close64(auxfuse.multi_head_cross_entropy(x, t, backend="torch"), ce64(x, t))
    with pytest.raises(ValueError, match="unknown backend 'fast'.*choose one of"):
        auxfuse.multi_head_cross_entropy(x, t, backend="fast")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this input: .*"):
        auxfuse.multi_head_cross_entropy(x, t, backend="cuda")


def test_works_without_compiled_extension():
    code = (
        "import sys; sys.modules['auxfuse._C'] = None\n"
        "import torch, torch.nn.functional as F, auxfuse\n"
        "b = auxfuse.available_backends(); assert b['torch'] is None and 'auxfuse._C' in b['cpu'], b\n"
        "x, t = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])\n"
        "loss = auxfuse.multi_head_cross_entropy((x, x * 2), t); loss.backward()\n"
        "assert torch.allclose(loss, F.cross_entropy(x, t) + 0.3 * F.cross_entropy(x * 2, t))\n"
        "assert auxfuse.explain_backend(x, t)['chosen'] == 'torch'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cuda_grad_mode_rule(monkeypatch):
    """Which grad_mode the cuda backend asks for (the rule in auxfuse/backends/native.py), from shapes alone."""
    from auxfuse.backends import native
    from auxfuse.backends.problem import Problem

    def problem(shape, dtype, num_heads=2, reduction="mean"):
        heads = [torch.empty(shape, dtype=dtype, device="meta") for _ in range(num_heads)]
        return Problem(inputs=heads, names=[str(h) for h in range(num_heads)], head_weights=[1.0] * num_heads,
                       input_target=torch.empty((shape[0], shape[2]), dtype=torch.long, device="meta"),
                       prob_target=False, class_weight=None, ignore_index=-100, label_smoothing=0.0,
                       reduction=reduction, needs_grad=True, want_details=False)

    segmentation = problem((8, 21, 512 * 512), torch.float16)
    googlenet = problem((256, 1000, 1), torch.float32, num_heads=3)
    lm = problem((8192, 128256, 1), torch.bfloat16)
    monkeypatch.setattr(native, "CUDA_GRAD", "auto")
    assert native.cuda_grad_mode(segmentation) == native.GRAD_IN_FORWARD
    assert native.cuda_grad_mode(problem((8, 21, 512 * 512), torch.float16, reduction="sum")) == native.GRAD_IN_FORWARD
    assert native.cuda_grad_mode(googlenet) == native.SAVE_LSE
    assert native.cuda_grad_mode(lm) == native.SAVE_LSE
    assert native.cuda_grad_mode(problem((8, 21, 512 * 512), torch.float16, reduction="none")) == native.SAVE_LSE
    monkeypatch.setattr(native, "CUDA_GRAD", "forward")
    assert native.cuda_grad_mode(lm) == native.GRAD_IN_FORWARD
    assert native.cuda_grad_mode(googlenet) == native.GRAD_IN_FORWARD
    monkeypatch.setattr(native, "CUDA_GRAD", "lse")
    assert native.cuda_grad_mode(segmentation) == native.SAVE_LSE
    monkeypatch.setattr(native, "CUDA_GRAD", "fast")
    with pytest.raises(ValueError, match="AUXFUSE_CUDA_GRAD"):
        native.cuda_grad_mode(segmentation)
