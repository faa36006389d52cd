"""One target per head (issue #18): deep supervision, multi-token prediction and multi-task heads against the
float64 naive loop `sum_h w_h * F.cross_entropy(head_h, target_h, ...)`, on every backend that runs here;
target_resize against F.interpolate; shifted_targets; the weight presets; and every error naming its head."""

import collections
import itertools

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from auxfuse.backends import native
from oracle import assert_matches_reference, check_per_head, generator, naive_per_head

AVAILABLE = auxfuse.available_backends()
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(AVAILABLE[name] is not None, reason=str(AVAILABLE[name])))
            for name in ("cpu", "torch")]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _pyramid(dtype, g, sizes=((16, 12), (8, 6), (4, 3), (2, 2)), classes=5, batch=2):
    heads = [(torch.randn(batch, classes, *size, generator=g) * 3).to(dtype) for size in sizes]
    targets = []
    for size in sizes:
        t = torch.randint(0, classes, (batch, *size), generator=g)
        t.view(-1)[::7] = -100
        targets.append(t)
    return heads, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_supervision_pyramid(backend, dtype, reduction):
    """Heads at four resolutions, each with its own mask; smoothing and class weights; nnU-Net's weights."""
    g = generator(("pyramid", str(dtype), reduction))
    heads, targets = _pyramid(dtype, g)
    weights = auxfuse.nnunet_deep_supervision_weights(len(heads))
    for smoothing, class_weight in itertools.product((0.0, 0.1), (None, torch.rand(5, generator=g) + 0.5)):
        check_per_head(backend, heads, targets, weights, reduction=reduction, label_smoothing=smoothing,
                       class_weights=None if class_weight is None else [class_weight] * len(heads),
                       call_weight=class_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["rows", "sequence"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_token_heads(backend, layout, reduction):
    """Head k predicts the token k steps further: shifted labels, the tail ignored, each head's mean over its
    own counted tokens; logits as (N * T, V) rows or (N, V, T) sequences."""
    g = generator(("multi-token", layout, reduction))
    N, T, V = 3, 11, 37
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 2] = -100  # padding in the labels too
    targets = auxfuse.shifted_targets(labels, [0, 1, 2, 3])
    if layout == "rows":
        heads = [torch.randn(N * T, V, generator=g) * 2 for _ in targets]
        targets = [t.reshape(-1) for t in targets]
    else:
        heads = [torch.randn(N, V, T, generator=g) * 2 for _ in targets]
    weights = auxfuse.deepseek_mtp_weights(3)
    check_per_head(backend, heads, targets, weights, reduction=reduction, label_smoothing=0.05)
    # The heads of a list are named by position: a mapping from those names works too.
    check_per_head(backend, heads, targets, weights, call_target={str(k): t for k, t in enumerate(targets)},
                   reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_multi_task_heads(backend, dtype):
    """Different class counts, targets and row counts; a class weight per head (None allowed); a probability
    target on one head."""
    g = generator(("multi-task", str(dtype)))
    heads = [(torch.randn(n, c, generator=g) * 2).to(dtype) for n, c in ((12, 100), (12, 10), (7, 3))]
    targets = [torch.randint(0, 100, (12,), generator=g), torch.randint(0, 10, (12,), generator=g),
               torch.softmax(torch.randn(7, 3, generator=g), 1).to(dtype)]
    class_weights = [torch.rand(100, generator=g) + 0.5, None, torch.rand(3, generator=g) + 0.5]
    for reduction in ("mean", "sum"):
        check_per_head(backend, heads, targets, [1.0, 0.5, 0.25], class_weights=class_weights,
                       reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_outputs_take_targets_by_name(backend):
    """A dict output with a mapping of targets (any order) and of class weights; None outputs are no heads."""
    g = generator("named")
    out, aux = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    t_out, t_aux = torch.randint(0, 6, (4, 5, 5), generator=g), torch.randint(0, 6, (4, 3, 3), generator=g)
    w_aux = torch.rand(6, generator=g) + 0.5
    result = auxfuse.multi_head_cross_entropy({"out": out, "aux": aux}, {"aux": t_aux, "out": t_out},
                                              weight={"out": None, "aux": w_aux}, backend=backend)
    ref = naive_per_head([out, aux], [t_out, t_aux], [1.0, 0.5], [None, w_aux])
    assert_matches_reference(result, ref, torch.float32)
    Outputs = collections.namedtuple("Outputs", ["logits", "aux_logits2", "aux_logits1"])
    outputs = Outputs(out, None, aux)
    result = auxfuse.multi_head_cross_entropy(outputs, [t_out, t_aux], backend=backend)
    assert_matches_reference(result, naive_per_head([out, aux], [t_out, t_aux], [1.0, 0.3]), torch.float32)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_resize_target_equals_interpolate(mode):
    """Down- and upsampling, odd ratios, 1-D to 3-D: exactly F.interpolate's indices."""
    g = generator(("resize", mode))
    for full, sizes in (((37,), [(18,), (5,), (1,), (74,)]), ((13, 29), [(6, 14), (3, 7), (13, 10), (26, 3)]),
                        ((9, 10, 11), [(4, 5, 5), (2, 3, 1)]), ((128, 128), [(64, 64), (32, 32), (16, 16)])):
        target = torch.randint(0, 1000, (2, *full), generator=g)
        for size in sizes:
            want = F.interpolate(target[:, None].float(), size=size, mode=mode)[:, 0].long()
            assert torch.equal(auxfuse.resize_target(target, size, mode), want), (full, size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_target_resize_deep_supervision(backend, mode):
    """One full-resolution mask (void label 255 included) for every scale: the naive loop on masks made by
    F.interpolate; MultiHeadLoss with the same option."""
    g = generator(("target_resize", mode))
    heads, _ = _pyramid(torch.float32, g, sizes=((24, 20), (12, 10), (6, 5), (3, 3)))
    mask = torch.randint(0, 5, (2, 24, 20), generator=g)
    mask[:, :3] = 255
    targets = [F.interpolate(mask[:, None].float(), size=h.shape[2:], mode=mode)[:, 0].long() for h in heads]
    weights = auxfuse.nnunet_deep_supervision_weights(4)
    check_per_head(backend, heads, targets, weights, call_target=mask, target_resize=mode, ignore_index=255)
    criterion = auxfuse.MultiHeadLoss(weights, target_resize=mode, ignore_index=255, backend=backend)
    assert_matches_reference(criterion(heads, mask), naive_per_head(heads, targets, weights, ignore_index=255),
                             torch.float32)


def test_shifted_targets():
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    zero, one, three = auxfuse.shifted_targets(labels, [0, 1, 3], ignore_index=-1)
    assert zero is labels
    assert one.tolist() == [[2, 3, 4, 5, -1], [7, 8, 9, 10, -1]]
    assert three.tolist() == [[4, 5, -1, -1, -1], [9, 10, -1, -1, -1]]
    assert [t.shape for t in auxfuse.shifted_targets(labels, 2)] == [labels.shape] * 2
    with pytest.raises(ValueError, match="shift 5 of head 1 leaves no target in a sequence of length 5"):
        auxfuse.shifted_targets(labels, [0, 5])
    with pytest.raises(ValueError, match="shift -1 of head 0 must be a non-negative int"):
        auxfuse.shifted_targets(labels, [-1])


def test_weight_presets():
    assert auxfuse.nnunet_deep_supervision_weights(1) == [1.0]
    weights = auxfuse.nnunet_deep_supervision_weights(5)
    assert weights[-1] == 0.0 and abs(sum(weights) - 1.0) < 1e-12
    assert all(a == pytest.approx(2 * b) for a, b in zip(weights[:3], weights[1:4]))
    assert auxfuse.medusa_head_weights(3) == pytest.approx([1.0, 0.2, 0.16, 0.128])
    assert auxfuse.medusa_head_weights(2, main_weight=None) == pytest.approx([0.2, 0.16])
    assert auxfuse.deepseek_mtp_weights(2, lam=0.1) == pytest.approx([1.0, 0.05, 0.05])


def test_per_head_class_weight_buffers_follow_the_module():
    """MultiHeadLoss keeps per-head class weights as buffers: state_dict and .to() see them."""
    weights = [torch.ones(3), None]
    criterion = auxfuse.MultiHeadLoss(weight=weights)
    assert "weight_0" in criterion.state_dict() and criterion.class_weight[1] is None
    assert criterion.to(torch.float64).class_weight[0].dtype == torch.float64
    named = auxfuse.MultiHeadLoss(weight={"out": torch.ones(3), "aux": torch.ones(4)})
    assert set(named.class_weight) == {"out", "aux"}


def test_gradcheck_fp64_per_head():
    g = generator("gradcheck")
    heads = [torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)]
    targets = [torch.randint(0, 4, (3, 3, 2), generator=g), torch.randint(0, 5, (3,), generator=g)]
    targets[0][0, 0, 0] = -100

    def fn(a, b):
        return auxfuse.multi_head_cross_entropy([a, b], targets, [1.0, 0.4], label_smoothing=0.1)

    assert torch.autograd.gradcheck(fn, heads)


def test_compile_fullgraph_per_head():
    """The per-head path traces as one graph, resize included (no host sync, no graph break)."""
    g = generator("compile")
    heads = [torch.randn(2, 3, 8, 8, generator=g, requires_grad=True),
             torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)]
    mask = torch.randint(0, 3, (2, 8, 8), generator=g)

    def fn(a, b, t):
        return auxfuse.multi_head_cross_entropy((a, b), t, (1.0, 0.5), target_resize="nearest", backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*heads, mask), fn(*heads, mask)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, heads), torch.autograd.grad(want, heads)):
        torch.testing.assert_close(a, b)


ERRORS = [
    ("too few targets", lambda h, t: auxfuse.multi_head_cross_entropy(h, t[:1]),
     r"1 targets for 2 heads \['0', '1'\]; give one per head"),
    ("a mapping missing a head", lambda h, t: auxfuse.multi_head_cross_entropy({"out": h[0], "aux": h[1]},
                                                                              {"out": t[0]}),
     "targets has no entry for head 'aux'"),
    ("a mapping naming no head", lambda h, t: auxfuse.multi_head_cross_entropy(
        {"out": h[0], "aux": h[1]}, {"out": t[0], "aux": t[1], "aux2": t[1]}),
     "targets names 'aux2', which is not a head"),
    ("a target that does not fit its head", lambda h, t: auxfuse.multi_head_cross_entropy(
        {"out": h[0], "aux": h[1]}, {"out": t[0], "aux": t[0]}),
     r"head 'aux': target has shape \(2, 6, 6\)"),
    ("one class weight for different class counts", lambda h, t: auxfuse.multi_head_cross_entropy(
        (h[0], torch.randn(2, 4, 3, 3)), t, weight=torch.ones(5)),
     "one class weight tensor for heads of different class counts"),
    ("reduction none over different shapes", lambda h, t: auxfuse.multi_head_cross_entropy(h, t, reduction="none"),
     "reduction='none' sums the heads' per-element losses, but their shapes differ"),
    ("resizing probabilities", lambda h, t: auxfuse.multi_head_cross_entropy(
        h, torch.rand(2, 5, 6, 6), target_resize="nearest"), "target_resize maps one class-index target"),
    ("an unknown resize mode", lambda h, t: auxfuse.multi_head_cross_entropy(h, t[0], target_resize="bilinear"),
     r"target_resize='bilinear'; use one of \('nearest', 'nearest-exact'\)"),
    ("heads of different dtypes", lambda h, t: auxfuse.multi_head_cross_entropy((h[0], h[1].double()), t),
     "head '1' has dtype torch.float64 but head '0' has torch.float32"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_head(case):
    _, call, message = case
    g = generator("errors")
    heads = [torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 5, 3, 3, generator=g)]
    targets = [torch.randint(0, 5, (2, 6, 6), generator=g), torch.randint(0, 5, (2, 3, 3), generator=g)]
    with pytest.raises(ValueError, match=message):
        call(heads, targets)


def test_shared_target_with_per_head_class_weights():
    """A Tensor target shared by every head, the class weights per head."""
    g = generator("shared")
    heads = [torch.randn(6, 4, generator=g) for _ in range(2)]
    target = torch.randint(0, 4, (6,), generator=g)
    class_weights = [torch.rand(4, generator=g) + 0.5, None]
    check_per_head("torch", heads, [target, target], [1.0, 0.3], class_weights=class_weights, call_target=target)


def test_deep_supervision_example(tmp_path, capsys):
    """examples/train_deep_supervision.py trains (the weighted scales' loss falls) and draws its picture."""
    from test_training import _load_example

    example = _load_example("train_deep_supervision")
    plot = tmp_path / "scales.png"
    history = example.main(["--epochs", "2", "--image-size", "16", "--train-size", "64", "--val-size", "16",
                            "-b", "8", "--width", "4", "--lr", "0.05", "--no-progress", "--plot", str(plot)])
    first, last = history["scale_losses"][0], history["scale_losses"][-1]
    assert len(first) == 4 and sum(last[:3]) < sum(first[:3])
    assert all(0.0 <= a <= 1.0 for a in history["val_pixel_accuracy"])
    assert plot.stat().st_size > 10_000
    assert "held-out pixel accuracy" in capsys.readouterr().out


def test_explain_backend_per_head():
    g = generator("explain")
    heads = {"out": torch.randn(2, 3, 4, 4, generator=g), "aux": torch.randn(2, 3, 2, 2, generator=g)}
    info = auxfuse.explain_backend(heads, torch.randint(0, 3, (2, 4, 4), generator=g), target_resize="nearest")
    assert set(info["per_head"]) == {"out", "aux"}
    assert all(head["chosen"] in ("cpu", "torch") for head in info["per_head"].values())
    forced = auxfuse.explain_backend(heads, [torch.zeros(2, 4, 4, dtype=torch.long),
                                             torch.zeros(2, 2, 2, dtype=torch.long)], backend="torch")
    assert forced == {"per_head": {"out": {"chosen": "torch", "rejected": {}},
                                   "aux": {"chosen": "torch", "rejected": {}}}}
    with pytest.raises(TypeError, match="unexpected arguments"):
        auxfuse.explain_backend(heads, [torch.zeros(2, 4, 4, dtype=torch.long)], colour="red")


def test_a_list_of_numbers_is_no_per_head_target():
    with pytest.raises(TypeError, match=r"target must be a Tensor, not list of int \(or one Tensor per head"):
        auxfuse.multi_head_cross_entropy((torch.randn(2, 3), torch.randn(2, 3)), [0, 1])
    with pytest.raises(TypeError, match=r"not dict of float"):
        auxfuse.multi_head_cross_entropy({"out": torch.randn(2, 3)}, {"out": 1.0})


# ---------------------------------------------------------------------------------------------------------
# The fused per-head op (torch.ops.auxfuse.multihead_ce_per_head_forward): one call for all heads.

needs_cpu_kernel = pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason=str(AVAILABLE["cpu"]))


@needs_cpu_kernel
def test_per_head_targets_take_one_call(monkeypatch):
    """Every head picks the cpu backend: the front end calls the fused op once, never the one-head path."""
    calls = []
    fused = native._PER_HEAD_FORWARD

    def counting(*args):
        calls.append(len(args[0]))
        return fused(*args)

    monkeypatch.setattr(native, "_PER_HEAD_FORWARD", counting)
    monkeypatch.setattr(type(auxfuse.backends.BACKENDS["cpu"]), "compute",
                        lambda self, problem: pytest.fail("one call per head"))
    g = generator("one call")
    heads, targets = _pyramid(torch.float32, g)
    check_per_head("cpu", heads, targets, [1.0, 0.5, 0.25, 0.0])
    assert calls == [4]


@needs_cpu_kernel
def test_per_head_op_balances_a_large_and_a_small_head():
    """A 64 x 64 head beside an 8 x 8 head and a classifier: blocks of every size from one queue; bitwise the
    same result with one thread as with two (the block partition does not depend on the thread count)."""
    g = generator("large and small")
    heads = [torch.randn(2, 21, 64, 64, generator=g) * 4, torch.randn(2, 21, 8, 8, generator=g),
             torch.randn(24, 300, generator=g)]
    targets = [torch.randint(0, 21, (2, 64, 64), generator=g), torch.randint(0, 21, (2, 8, 8), generator=g),
               torch.randint(0, 300, (24,), generator=g)]
    targets[0][0, :5] = -100
    check_per_head("cpu", heads, targets, [1.0, 0.5, 0.3], label_smoothing=0.1)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            inputs = [h.clone().requires_grad_(True) for h in heads]
            loss = auxfuse.multi_head_cross_entropy(inputs, targets, [1.0, 0.5, 0.3], backend="cpu")
            results.append((loss.detach(), torch.autograd.grad(loss, inputs)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@needs_cpu_kernel
def test_per_head_op_none_over_heads_of_other_layouts():
    """reduction='none' sums rows of heads that the kernel takes by different paths (a channels_last head: rows
    contiguous along the classes; a contiguous one: strided classes) and target kinds (probabilities)."""
    g = generator("none layouts")
    a = torch.randn(2, 6, 5, 4, generator=g).to(memory_format=torch.channels_last)
    b = torch.randn(2, 6, 5, 4, generator=g)
    c = torch.randn(2, 3, 5, 4, generator=g)
    targets = [torch.randint(0, 6, (2, 5, 4), generator=g), torch.randint(0, 6, (2, 5, 4), generator=g),
               torch.softmax(torch.randn(2, 3, 5, 4, generator=g), 1)]
    targets[1][1, 2] = -100
    check_per_head("cpu", [a, b, c], targets, [1.0, 0.4, 0.2], reduction="none", label_smoothing=0.05)


@needs_cpu_kernel
def test_per_head_op_invalid_class_index_names_the_head():
    g = generator("invalid")
    heads = {"out": torch.randn(2, 4, 3, 3, generator=g), "aux": torch.randn(2, 4, 2, 2, generator=g)}
    targets = {"out": torch.randint(0, 4, (2, 3, 3), generator=g), "aux": torch.randint(0, 4, (2, 2, 2), generator=g)}
    targets["aux"][1, 1, 0] = 7
    with pytest.raises(ValueError, match=r"head 'aux': target value 7 is outside \[0, 4\)"):
        auxfuse.multi_head_cross_entropy(heads, targets, backend="cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("grad_mode", [0, 1])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_per_head_op_opcheck(grad_mode, reduction):
    """The op's schema, fake kernel and autograd registration agree with its CPU kernel."""
    g = generator(("opcheck", grad_mode, reduction))
    same_rows = reduction == 0
    heads = [torch.randn(3, 5, 2, 2, generator=g, requires_grad=True),
             torch.randn(3, 7, 2, 2, generator=g, requires_grad=True) if same_rows
             else torch.randn(4, 7, generator=g, requires_grad=True)]
    targets = [torch.randint(0, 5, (3, 2, 2), generator=g),
               torch.randint(0, 7, (3, 2, 2) if same_rows else (4,), generator=g)]
    class_weights = [None, torch.rand(7, generator=g) + 0.5]
    torch.library.opcheck(torch.ops.auxfuse.multihead_ce_per_head_forward,
                          (heads, targets, [None, None], class_weights, [1.0, 0.3], -100, 0.1, reduction, grad_mode))
    # Head 0 reading a full-resolution (3, 4, 6) target through target_resize's positions.
    mask = torch.randint(0, 5, (3, 4, 6), generator=g)
    positions = auxfuse.target_positions((4, 6), (2, 2))
    torch.library.opcheck(torch.ops.auxfuse.multihead_ce_per_head_forward,
                          (heads, [mask, targets[1]], [positions, None], class_weights, [1.0, 0.3], -100, 0.1,
                           reduction, grad_mode))


@needs_cpu_kernel
def test_target_resize_reads_the_full_target_in_one_call(monkeypatch):
    """target_resize on cpu: one call of the fused op with the full-resolution mask and each smaller head's
    positions (no downsampled copy). A class index only the full-resolution head reads names that head, and
    does not matter without it."""
    calls = []
    fused = native._PER_HEAD_FORWARD

    def recording(heads, targets, positions, *args):
        calls.append((targets, positions))
        return fused(heads, targets, positions, *args)

    monkeypatch.setattr(native, "_PER_HEAD_FORWARD", recording)
    g = generator("resize one call")
    sizes = {"full": (12, 10), "half": (6, 5), "third": (3, 3)}  # "nearest" reads rows 0, 2, .. and 0, 4, 8
    heads = {name: torch.randn(2, 5, *size, generator=g) for name, size in sizes.items()}
    mask = torch.randint(0, 5, (2, 12, 10), generator=g)
    targets = [F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long() for size in sizes.values()]
    check_per_head("cpu", list(heads.values()), targets, [1.0, 0.5, 0.25], call_target=mask, target_resize="nearest")
    assert len(calls) == 1
    (got_targets, got_positions), = calls
    assert all(t.data_ptr() == mask.data_ptr() for t in got_targets)
    assert got_positions[0] is None and all(p is not None for p in got_positions[1:])
    mask[1, 1, 1] = 9  # an odd row: read by the full-resolution head only
    with pytest.raises(ValueError, match=r"head 'full': target value 9 is outside \[0, 5\)"):
        auxfuse.multi_head_cross_entropy(heads, mask, [1.0, 0.5, 0.25], target_resize="nearest", backend="cpu")
    smaller = {name: heads[name] for name in ("half", "third")}
    loss = auxfuse.multi_head_cross_entropy(smaller, mask, [0.5, 0.25], target_resize="nearest", backend="cpu")
    assert_matches_reference(loss, naive_per_head(list(smaller.values()), targets[1:], [0.5, 0.25]), torch.float32)


@needs_cpu_kernel
def test_per_head_op_rejects_a_position_outside_the_target():
    g = generator("bad position")
    head, mask = torch.randn(2, 3, 2, 2, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    positions = torch.tensor([0, 5, 16, 3])
    with pytest.raises(ValueError, match=r"head 0: target position 16 of spatial element 2 is outside the target's 16"):
        torch.ops.auxfuse.multihead_ce_per_head_forward([head], [mask], [positions], [None], [1.0], -100, 0.0, 1, 0)
    with pytest.raises(RuntimeError, match=r"head 0: target_positions must be a contiguous int64 \(4,\)"):
        torch.ops.auxfuse.multihead_ce_per_head_forward([head], [mask], [positions[:3]], [None], [1.0], -100, 0.0, 1, 0)


@needs_cpu_kernel
def test_compile_fullgraph_per_head_cpu():
    """torch.compile(fullgraph=True) traces the fused per-head op (its fake kernel) with a gradient."""
    g = generator("compile cpu")
    heads = [torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randn(5, 11, generator=g,
                                                                                    requires_grad=True)]
    targets = [torch.randint(0, 3, (2, 8, 8), generator=g), torch.randint(0, 11, (5,), generator=g)]

    def fn(a, b):
        return auxfuse.multi_head_cross_entropy((a, b), targets, (1.0, 0.5), backend="cpu", label_smoothing=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*heads)
    ref_in = [h.detach().double().requires_grad_(True) for h in heads]
    want = naive_per_head(ref_in, targets, (1.0, 0.5), label_smoothing=0.1)
    assert_matches_reference(got, want, torch.float32)
    for a, b, h in zip(torch.autograd.grad(got, heads), torch.autograd.grad(want, ref_in), heads):
        assert_matches_reference(a, b, torch.float32, h.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_wrt_probability_targets_per_head(backend, reduction):
    """Probability targets that require grad (a teacher's soft labels being trained) get their gradient: every
    head's target, with label smoothing and class weights, against the float64 naive loop."""
    g = generator(("target grad", backend, reduction))
    heads = [torch.randn(6, 9, generator=g, requires_grad=True), torch.randn(6, 4, 3, generator=g,
                                                                             requires_grad=True)]
    targets = [torch.softmax(torch.randn(6, 9, generator=g), 1).requires_grad_(True),
               torch.softmax(torch.randn(6, 4, 3, generator=g), 1).requires_grad_(True)]
    class_weights = [None, torch.rand(4, generator=g) + 0.5]
    options = dict(reduction=reduction, label_smoothing=0.1)
    ours = auxfuse.multi_head_cross_entropy(heads, targets, [1.0, 0.4], weight=class_weights, backend=backend,
                                            **options)
    ref_in = [x.detach().double().requires_grad_(True) for x in heads + targets]
    ref = sum(w * F.cross_entropy(x, t, weight=None if cw is None else cw.double(), **options)  # targets attached
              for w, x, t, cw in zip([1.0, 0.4], ref_in[:2], ref_in[2:], class_weights))
    assert_matches_reference(ours, ref, torch.float32)
    for a, b, x in zip(torch.autograd.grad(ours, heads + targets), torch.autograd.grad(ref, ref_in), heads * 2):
        assert_matches_reference(a, b, torch.float32, x.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_target_resize_of_an_empty_batch(backend, reduction):
    """No rows at all: as the naive loop, 0 for sum and NaN for mean, with empty gradients."""
    g = generator(("empty resize", reduction))
    heads = [torch.randn(0, 3, *size, generator=g).requires_grad_(True) for size in ((4, 4), (2, 2))]
    mask = torch.zeros(0, 4, 4, dtype=torch.long)
    loss = auxfuse.multi_head_cross_entropy(heads, mask, [1.0, 0.5], target_resize="nearest", backend=backend,
                                            reduction=reduction)
    want = naive_per_head(heads, [mask, mask[:, ::2, ::2]], [1.0, 0.5], reduction=reduction)
    assert torch.equal(loss.isnan(), want.isnan()) and (reduction == "mean" or float(loss.detach()) == 0.0)
    assert [g.shape for g in torch.autograd.grad(loss, heads)] == [h.shape for h in heads]
