"""The triton backend's one call for heads with a target each (compute_per_head: deep supervision, multi-token
and multi-task heads) against the float64 naive loop of tests/oracle.py, in Triton's interpreter on CPU tensors
(or on CUDA), like test_triton_interpret.py:

    TRITON_INTERPRET=1 python -m pytest tests/triton/test_triton_per_head.py -q

Shapes are tiny (the interpreter is slow); the interpreter's tile (PH_TILE) is small, so they still reach several
tiles per work item, several work items per head, and several class chunks per row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import assert_matches_reference, check_per_head, generator, naive_per_head
# pytestmark: the same skips and warning filters.
from test_triton_interpret import DEVICE, WIDE_C, compiled_without_interpreter, pytestmark  # noqa: F401

import auxfuse
from auxfuse.backends import triton as tb
from auxfuse.functional import _per_head_problems
from auxfuse.targets import target_positions

DTYPES = [torch.float32, torch.bfloat16]
# Forward: divisor pre-pass (grad-in-forward mean), main, finalize; backward: one scale of every gradient.
PER_HEAD_KERNELS = {"_per_head_denom_kernel", "_per_head_forward_kernel", "_per_head_finalize_kernel", "_scale_kernel"}


@pytest.fixture
def one_call(monkeypatch):
    """Every test here must take the one-call path: the per-head fallback (tb.compute) fails, and the names
    of the kernels launched are recorded (one launch per pass for all heads)."""
    launched = []
    run = tb._run

    def record(kernel, grid, args, traced, key=None):
        launched.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
        return run(kernel, grid, args, traced, key)

    def per_head_call(problem):
        raise AssertionError("the triton backend ran one call per head")

    monkeypatch.setattr(tb, "_run", record)
    monkeypatch.setattr(tb, "compute", per_head_call)
    return launched


def _randn(shape, g, dtype, scale=2.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _index(shape, C, g, ignore_every=0, ignore_index=-100):
    t = torch.randint(0, C, shape, generator=g)
    if ignore_every:
        t.view(-1)[::ignore_every] = ignore_index
    return t.to(DEVICE)


def _class_weight(C, g):
    return (torch.rand(C, generator=g) + 0.5).to(DEVICE)


PYRAMID = ((8, 8), (4, 4), (2, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("variant", ["plain", "smooth-weight"])
def test_deep_supervision_pyramid(one_call, dtype, reduction, variant):
    """2 x 5 classes at 8x8, 4x4 and 2x2, each with its own target (some ignored)."""
    g = generator(("ph-pyramid", str(dtype), reduction, variant))
    heads = [_randn((2, 5, *size), g, dtype) for size in PYRAMID]
    targets = [_index((2, *size), 5, g, ignore_every=7) for size in PYRAMID]
    options = dict(label_smoothing=0.1) if variant == "smooth-weight" else {}
    class_weight = _class_weight(5, g) if variant == "smooth-weight" else None
    check_per_head("triton", heads, targets, [1.0, 0.5, 0.25], reduction=reduction, call_weight=class_weight,
                   class_weights=None if class_weight is None else [class_weight] * 3, **options)
    assert set(one_call) <= PER_HEAD_KERNELS
    assert {name: one_call.count(name) for name in PER_HEAD_KERNELS} == {
        "_per_head_denom_kernel": reduction == "mean", "_per_head_forward_kernel": 1, "_per_head_finalize_kernel": 1,
        "_scale_kernel": 1}


@pytest.fixture
def positions_read(monkeypatch):
    """Per compute_per_head call, which heads read a resized target through their positions (not a copy)."""
    calls = []
    compute_per_head = tb.compute_per_head

    def record(problems):
        calls.append([problem.target_positions is not None for problem in problems])
        return compute_per_head(problems)

    monkeypatch.setattr(tb, "compute_per_head", record)
    return calls


def _resized(mask, head, mode):
    """The oracle's target of `head`: the class-index mask resized by F.interpolate."""
    return F.interpolate(mask[:, None].float(), size=head.shape[2:], mode=mode)[:, 0].long()


RESIZE_PYRAMID = ((8, 8), (5, 5), (3, 3), (2, 2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_target_resize(one_call, positions_read, mode, reduction):
    """One 8x8 mask (void label 255) mapped onto a 4-scale pyramid as F.interpolate would: the 8x8 head reads it
    as it is, the others through their positions in the kernel (reduction none: two 5x5 heads)."""
    g = generator(("ph-resize", mode, reduction))
    sizes = RESIZE_PYRAMID if reduction != "none" else RESIZE_PYRAMID[1:2] * 2
    heads = [_randn((2, 5, *size), g, torch.float32) for size in sizes]
    mask = _index((2, 8, 8), 5, g, ignore_every=7, ignore_index=255)
    mask[:, :2] = 255
    check_per_head("triton", heads, [_resized(mask, h, mode) for h in heads], [1.0, 0.5, 0.25, 0.125][:len(heads)],
                   call_target=mask, target_resize=mode, ignore_index=255, reduction=reduction, label_smoothing=0.1)
    assert positions_read == [[size != (8, 8) for size in sizes]]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("dims", [1, 3])
def test_target_resize_1d_and_3d(one_call, positions_read, dims, mode):
    """A 1-D sequence mask read by a shorter and a longer head; a 3-D volume mask read by two smaller heads."""
    g = generator(("ph-resize-dims", dims, mode))
    if dims == 1:
        mask, sizes = _index((2, 9), 4, g, ignore_every=5), ((4,), (13,))
    else:
        mask, sizes = _index((2, 4, 6, 6), 4, g, ignore_every=7), ((2, 3, 3), (3, 4, 5))
    heads = [_randn((2, 4, *size), g, torch.float32) for size in sizes]
    check_per_head("triton", heads, [_resized(mask, h, mode) for h in heads], [1.0, 0.5], call_target=mask,
                   target_resize=mode)
    assert positions_read == [[True, True]]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_target_resize_invalid_class_index(mode):
    """An out-of-range class index at a position that heads read: NaN loss, `invalid` counts every row that reads
    it, the front end raises on CPU (compute_per_head is called directly for the rest, as in
    test_invalid_class_index). At a position no head reads it changes nothing."""
    g = generator(("ph-resize-invalid", mode))
    sizes = ((4, 4), (2, 2))  # none at full resolution: some positions are never read
    heads = [_randn((2, 5, *size), g, torch.float32).requires_grad_(True) for size in sizes]
    mask = _index((2, 8, 8), 5, g)
    positions = [target_positions((8, 8), size, mode) for size in sizes]
    read = set(torch.cat(positions).tolist())

    def compute_per_head(bad_position):
        bad = mask.clone()
        bad.view(2, -1)[1, bad_position] = 5
        _, problems = _per_head_problems(heads, bad, [1.0, 0.5], aux_weight=0.4, main=None, weight=None,
                                         ignore_index=-100, label_smoothing=0.0, reduction="mean", target_resize=mode,
                                         want_details=True)
        assert all(problem.target_positions is not None for _, problem, _ in problems)
        return bad, tb.compute_per_head([problem for _, problem, _ in problems])

    bad_position = int(positions[1][-1])  # read by the 2x2 head (and by the 4x4 head where it reads it too)
    bad, result = compute_per_head(bad_position)
    readers = [int((p == bad_position).sum()) for p in positions]
    assert torch.isnan(result.loss) and int(result.invalid) == sum(readers)
    assert [bool(torch.isnan(loss)) for loss in result.head_losses] == [n > 0 for n in readers]
    (grad,) = torch.autograd.grad(result.loss, heads[1])
    reads_bad = (positions[1] == bad_position).view(2, 2)
    assert torch.isnan(grad[1][:, reads_bad]).all() and not torch.isnan(grad[1][:, ~reads_bad]).any()
    assert not torch.isnan(grad[0]).any()
    with pytest.raises(ValueError, match="outside"):
        auxfuse.multi_head_cross_entropy(heads, bad, target_resize=mode, backend="triton")

    unread = min(set(range(64)) - read)
    bad, result = compute_per_head(unread)
    assert int(result.invalid) == 0 and torch.isfinite(result.loss) and torch.isfinite(result.head_losses).all()
    check_per_head("triton", heads, [_resized(bad, h, mode) for h in heads], [1.0, 0.5], call_target=bad,
                   target_resize=mode)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_multi_token(one_call, reduction, dtype):
    """3 heads x 6 rows x 37 classes, targets shifted by 0, 1, 2 (the tail ignored), smoothing."""
    g = generator(("ph-multi-token", reduction, str(dtype)))
    labels = _index((6,), 37, g)
    labels[2] = -100
    targets = auxfuse.shifted_targets(labels, 3)
    heads = [_randn((6, 37), g, dtype) for _ in targets]
    check_per_head("triton", heads, targets, [1.0, 0.3, 0.1], reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_token_sequence_layout(one_call, reduction):
    """The same heads as (N, V, T) sequences: the class dimension strided by T; ignore_index 0 is a class."""
    g = generator(("ph-multi-token-seq", reduction))
    labels = _index((2, 5), 9, g)
    targets = auxfuse.shifted_targets(labels, 3, ignore_index=0)
    heads = [_randn((2, 9, 5), g, torch.float32) for _ in targets]
    check_per_head("triton", heads, targets, [1.0, 0.5, 0.25], reduction=reduction, ignore_index=0,
                   label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_task(one_call, dtype, reduction):
    """Rows 5; 37, 11 and 3 classes; class weights per head, one head without; smoothing."""
    g = generator(("ph-multi-task", str(dtype), reduction))
    classes = (37, 11, 3)
    heads = [_randn((5, C), g, dtype) for C in classes]
    targets = [_index((5,), C, g) for C in classes]
    class_weights = [_class_weight(37, g), None, _class_weight(3, g)]
    check_per_head("triton", heads, targets, [1.0, 0.5, 0.25], class_weights=class_weights, reduction=reduction,
                   label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_wide_and_narrow_heads(one_call, reduction):
    """A head over several class chunks (WIDE_C) next to a 3-class head: one tile shape for both."""
    g = generator(("ph-wide", reduction))
    heads = [_randn((3, WIDE_C), g, torch.float32), _randn((3, 3), g, torch.float32)]
    targets = [_index((3,), WIDE_C, g), _index((3,), 3, g)]
    check_per_head("triton", heads, targets, [1.0, 0.5], class_weights=[_class_weight(WIDE_C, g), None],
                   reduction=reduction, label_smoothing=0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_probability_targets(one_call, reduction, dtype):
    """A probability target per head, class weights on one; and a class-index head in the same call."""
    g = generator(("ph-prob", reduction, str(dtype)))
    heads = [_randn((4, 6, 3), g, dtype) for _ in range(3)]
    targets = [torch.softmax(torch.randn(4, 6, 3, generator=g) * 3, 1).to(dtype).to(DEVICE) for _ in range(2)]
    targets.append(_index((4, 3), 6, g, ignore_every=5))
    check_per_head("triton", heads, targets, [1.0, 0.5, 0.25], class_weights=[_class_weight(6, g), None, None],
                   reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vectorized_rows(monkeypatch, dtype, reduction):
    """Class-contiguous heads with C a multiple of 16 bytes (LM vocabularies) take the 16-byte path (VEC > 0),
    against the oracle; a head sliced out of a wider tensor (rows not 16-byte aligned) turns it off."""
    g = generator(("ph-vec", str(dtype), reduction))
    vecs = []
    run = tb._run

    def record(kernel, grid, args, traced, key=None):
        if "VEC" in args:
            vecs.append(args["VEC"])
        return run(kernel, grid, args, traced, key)

    monkeypatch.setattr(tb, "_run", record)
    C = 2 * tb.WIDE_BLOCK_C + 16  # several class chunks, the last one partly masked
    labels = _index((5,), C, g)
    heads = [_randn((5, C), g, dtype) for _ in range(2)]
    options = dict(class_weights=[_class_weight(C, g), None], reduction=reduction, label_smoothing=0.1)
    targets = auxfuse.shifted_targets(labels, 2)
    check_per_head("triton", heads, targets, [1.0, 0.5], **options)
    assert vecs == [16 // heads[0].element_size()]
    # (check_per_head clones its heads, which makes a sliced one contiguous: the decision is checked alone.)
    sliced = _randn((5, C + 3), g, dtype)[:, 3:]
    rows, targets = [h.reshape(5, C, 1) for h in (heads[0], sliced)], [t.reshape(5, 1) for t in targets]
    assert tb._vector_width(rows[:1], targets[:1], [None]) == vecs[0]
    assert tb._vector_width(rows, targets, [None, None]) == 0


def test_channels_last_and_no_grad(one_call):
    """A channels_last head (class stride 1) gets a class-innermost gradient; without grad nothing is saved."""
    g = generator("ph-channels-last")
    heads = [_randn((2, 5, 4, 4), g, torch.float32).to(memory_format=torch.channels_last),
             _randn((2, 5, 2, 2), g, torch.float32)]
    targets = [_index((2, 4, 4), 5, g), _index((2, 2, 2), 5, g)]
    check_per_head("triton", heads, targets, [1.0, 0.5])
    one_call.clear()
    with torch.no_grad():
        out = auxfuse.multi_head_cross_entropy(heads, targets, [1.0, 0.5], backend="triton", return_details=True)
    assert_matches_reference(out.loss, naive_per_head(heads, targets, [1.0, 0.5]), torch.float32)
    assert out.loss.grad_fn is None
    assert one_call == ["_per_head_forward_kernel", "_per_head_finalize_kernel"]


def test_all_ignored_head(one_call):
    """A head whose targets are all ignored: its mean is NaN (as in PyTorch), its gradient 0, its count 0."""
    g = generator("ph-all-ignored")
    heads = [_randn((4, 5), g, torch.float32), _randn((3, 5), g, torch.float32)]
    targets = [_index((4,), 5, g), torch.full((3,), -100, device=DEVICE)]
    ours = [h.clone().requires_grad_(True) for h in heads]
    out = auxfuse.multi_head_cross_entropy(ours, targets, [1.0, 0.5], backend="triton", return_details=True)
    assert torch.isnan(out.loss) and torch.isnan(out.head_losses[1]) and out.count.tolist() == [4, 0]
    out.loss.backward()
    assert torch.equal(ours[1].grad, torch.zeros_like(heads[1]))
    check_per_head("triton", heads, targets, [1.0, 0.5], reduction="sum")


def test_invalid_class_index():
    """A class index outside [0, C) that is not ignore_index is never read: its head's loss and the total are
    NaN, and `invalid` counts it (the front end raises on CPU before any backend runs, so compute_per_head is
    called directly)."""
    g = generator("ph-invalid")
    heads = [_randn((4, 5), g, torch.float32).requires_grad_(True), _randn((2, 7, 3), g, torch.float32)]
    targets = [_index((4,), 5, g), _index((2, 3), 7, g)]
    targets[0][1], targets[1][1, 2] = 5, -3
    _, problems = _per_head_problems(heads, targets, [1.0, 0.5], aux_weight=0.4, main=None, weight=None,
                                     ignore_index=-100, label_smoothing=0.0, reduction="mean", target_resize=None,
                                     want_details=True)
    result = tb.compute_per_head([problem for _, problem, _ in problems])
    assert torch.isnan(result.loss) and int(result.invalid) == 2
    assert torch.isnan(result.head_losses).all() and result.count.tolist() == [4, 6]
    (grad,) = torch.autograd.grad(result.loss, heads[0])
    assert torch.isnan(grad[1]).all() and not torch.isnan(grad[[0, 2, 3]]).any()
    with pytest.raises(ValueError, match="outside"):
        auxfuse.multi_head_cross_entropy(heads, targets, backend="triton")


def test_unequal_heads_share_the_grid():
    """A 128x128 head and a 16x16 head: work items of about equal size, not one program per head."""
    heads = [torch.empty(1, 5, 128 * 128), torch.empty(1, 5, 16 * 16)]
    targets = [torch.empty(1, 128 * 128, dtype=torch.long), torch.empty(1, 16 * 16, dtype=torch.long)]
    plan = tb._per_head_plan(heads, targets, [None, None], [None, None], 0.0, tb.MEAN, False, True)
    items = [plan["items"][3 * i: 3 * i + 3] for i in range(plan["P"])]
    sizes = {h: {rows for head, _, rows in items if head == h} for h in (0, 1)}
    assert len([i for i in items if i[0] == 0]) > 1 and max(sizes[1]) <= max(sizes[0])
    assert all(rows == max(sizes[0]) for head, _, rows in items[:-2] if head == 0)  # equal, but the tail
    covered = {h: sum(rows for head, _, rows in items if head == h) for h in (0, 1)}
    assert covered == {0: 128 * 128, 1: 16 * 16}
    assert plan["Q"] >= 2  # the divisor pre-pass: at least one item per head


def test_deterministic(one_call):
    """The same inputs give bitwise the same loss and gradients (fixed-order partial sums, no atomics)."""
    g = generator("ph-deterministic")
    heads = [_randn((2, 5, *size), g, torch.float32) for size in PYRAMID]
    targets = [_index((2, *size), 5, g, ignore_every=3) for size in PYRAMID]

    def run():
        ours = [h.clone().requires_grad_(True) for h in heads]
        loss = auxfuse.multi_head_cross_entropy(ours, targets, [1.0, 0.5, 0.25], backend="triton",
                                                label_smoothing=0.1)
        return [loss.detach(), *torch.autograd.grad(loss, ours)]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def _compile_case(reduction):
    g = generator(("ph-compile", reduction))
    if reduction == "none":  # multi-token heads: one shape
        heads = [_randn((6, 11), g, torch.float32) for _ in range(2)]
        targets = auxfuse.shifted_targets(_index((6,), 11, g), 2)
    else:  # deep supervision
        heads = [_randn((2, 5, *size), g, torch.float32) for size in PYRAMID[:2]]
        targets = [_index((2, *size), 5, g, ignore_every=3) for size in PYRAMID[:2]]
    return heads, targets


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(one_call, reduction):
    """torch.compile(fullgraph=True) traces the one call as the opaque op auxfuse::triton_per_head_forward
    (forward and backward; aot_eager on CPU, Inductor on a GPU), against the float64 naive loop."""
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    heads, targets = _compile_case(reduction)
    ours = [h.clone().requires_grad_(True) for h in heads]
    ref_in = [h.detach().double().requires_grad_(True) for h in heads]
    weights, options = [1.0, 0.5], dict(label_smoothing=0.1, reduction=reduction)

    def fn(a, b, ta, tb_):
        out = auxfuse.multi_head_cross_entropy((a, b), [ta, tb_], weights, backend="triton", return_details=True,
                                               **options)
        return out.loss, out.count

    torch._dynamo.reset()
    loss, count = torch.compile(fn, fullgraph=True, backend=backend)(*ours, *targets)
    ref = naive_per_head(ref_in, targets, weights, **options)
    assert_matches_reference(loss, ref, torch.float32)
    assert count.tolist() == [int((t != -100).sum()) for t in targets]
    grad_output = torch.rand(ref.shape, generator=generator("ph-compile-grad"), dtype=torch.float64) + 0.5
    got = torch.autograd.grad(loss, ours, grad_output.to(loss))
    want = torch.autograd.grad(ref, ref_in, grad_output)
    for h, (a, b) in enumerate(zip(got, want)):
        assert_matches_reference(a, b, torch.float32, heads[h].shape[1], msg=f"head {h} gradient")
    assert "_per_head_forward_kernel" in one_call


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_torch_compile_target_resize(one_call, positions_read, mode):
    """torch.compile(fullgraph=True) of a resized target: the traced op reads it through the heads' positions."""
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    g = generator(("ph-compile-resize", mode))
    heads = [_randn((2, 5, *size), g, torch.float32).requires_grad_(True) for size in RESIZE_PYRAMID[1:3]]
    mask = _index((2, 8, 8), 5, g, ignore_every=3)
    ref_in = [h.detach().double().requires_grad_(True) for h in heads]

    def fn(a, b, mask):
        return auxfuse.multi_head_cross_entropy((a, b), mask, [1.0, 0.5], backend="triton", target_resize=mode)

    torch._dynamo.reset()
    loss = torch.compile(fn, fullgraph=True, backend=backend)(*heads, mask)
    ref = naive_per_head(ref_in, [_resized(mask, h, mode) for h in heads], [1.0, 0.5])
    assert_matches_reference(loss, ref, torch.float32)
    for h, (a, b) in enumerate(zip(torch.autograd.grad(loss, heads), torch.autograd.grad(ref, ref_in))):
        assert_matches_reference(a, b, torch.float32, 5, msg=f"head {h} gradient")
    assert positions_read == [[True, True]]


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(grad):
    """The op's schema, fake kernel and autograd registration (torch.library.opcheck); the second head reads the
    first one's target through its positions."""
    heads, targets = _compile_case("mean")
    heads = [h.requires_grad_(grad) for h in heads]
    full = targets[0].reshape(2, -1)
    torch.library.opcheck(torch.ops.auxfuse.triton_per_head_forward.default,
                          (heads, [full, full], [None, target_positions((8, 8), (4, 4))],
                           [None, _class_weight(5, generator(1))], [1.0, 0.5], -100, 0.1, tb.MEAN, True, grad))


# --- Compiling the per-head kernels for a Hopper GPU without one (see test_triton_interpret.compile_sm90) ------

def compile_per_head_sm90() -> list[dict]:
    """The per-head launches of a few calls (host code run on CPU tensors, launches recorded, not run),
    compiled to sm_90 cubin. Needs TRITON_INTERPRET unset."""
    from test_triton_interpret import compile_launches

    assert not tb.INTERPRET
    launches = []
    case = None

    def record(kernel, grid, args, traced, key=None):
        launches.append((case, kernel, (), dict(args)))

    def index(N, C, S=1):
        return torch.zeros(N, S, dtype=torch.long)

    cases = {  # heads, targets, target positions, class weights, head weights, ignore_index, smoothing, reduction,
        # details, grad; the pyramid's second head reads the first one's target through its positions
        "pyramid": ([torch.zeros(2, 5, 64, dtype=torch.float16), torch.zeros(2, 5, 16, dtype=torch.float16)],
                    [index(2, 5, 64)] * 2, [None, torch.arange(16) * 4], [torch.ones(5), None], [1.0, 0.5], 255,
                    0.1, tb.MEAN, True, True),
        "mixed-none": ([torch.zeros(4, 21, 8, dtype=torch.bfloat16) for _ in range(3)],
                       [torch.zeros(4, 21, 8, dtype=torch.bfloat16), index(4, 21, 8), index(4, 21, 8)],
                       [None] * 3, [None, torch.ones(21), None], [1.0, 0.3, 0.3], -100, 0.0, tb.NONE, True, True),
        "lm": ([torch.zeros(2, 128256, 1, dtype=torch.bfloat16) for _ in range(2)], [index(2, 128256)] * 2,
               [None, None], [None, None], [1.0, 0.5], -100, 0.0, tb.SUM, False, True),
        "no-grad": ([torch.zeros(8, 1000, 1), torch.zeros(8, 10, 1)], [index(8, 1000), index(8, 10)],
                    [None, None], [None, None], [1.0, 0.3], -100, 0.0, tb.MEAN, True, False),
    }
    original = tb._run
    tb._run = record
    try:
        for case, args in cases.items():
            tb._per_head_impl(*args)
    finally:
        tb._run = original
    return compile_launches(launches)


def test_per_head_kernels_compile_for_sm90():
    """The interpreter runs Python, not the compiler: every per-head kernel variant compiles for Hopper, without
    register spills in its loops, and class-contiguous rows use 16-byte memory instructions."""
    records = compiled_without_interpreter("test_triton_per_head", "compile_per_head_sm90")
    names = [r["kernel"] for r in records]
    assert set(names) == PER_HEAD_KERNELS - {"_scale_kernel"} and names.count("_per_head_forward_kernel") == 4
    for r in records:
        assert max((loop["local"] for loop in r["loops"]), default=0) <= 1, f"spills: {r}"
    if any(r["loops"] for r in records):  # cuobjdump found: LM rows (VEC) stream in 16-byte loads and stores
        (lm,) = [r for r in records if r["case"] == "lm" and r["kernel"] == "_per_head_forward_kernel"]
        assert lm["constexprs"]["VEC"] == 8
        assert max(loop["loads128"] for loop in lm["loops"]) >= 2, lm
        assert max(loop["stores128"] for loop in lm["loops"]) >= 2, lm
