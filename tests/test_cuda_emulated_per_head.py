"""The CUDA per-head op (multihead_ce_per_head_forward: one target and class weight per head, one launch for all
heads) run on CPU threads by the emulation (tests/cuda_emulation): no GPU needed.

Every head has its own N, C, S, target and class weights: deep-supervision pyramids (heads at 8x8, 4x4, 2x2),
multi-token heads (same shape, own targets), multi-task heads (37 / 11 / 3 classes). The emulated op's loss,
head_losses, head_correct, count and grad_mode 1's gradients (weight and the head's mean divisor folded in) are
compared with the float64 naive loop (oracle.naive_per_head) and its autograd gradient for grad_output 1 (ones
for none). The emulation's grid is capped at 3 blocks (2 "SMs" for a block per row with gradients), so the
work items of several heads share blocks and the last block sums several columns of partials.

Marked slow: it builds the emulation (about a minute, shared with test_cuda_emulated.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import auxfuse

from oracle import assert_matches_reference, generator, naive_per_head, to_reference

pytestmark = pytest.mark.slow

REDUCTION = {"none": 0, "mean": 1, "sum": 2}
THREAD, WARP, BLOCK = 0, 1, 2
NO_GRAD, GRAD_IN_FORWARD = 0, 1


def run(emu, heads, targets, weights, *, class_weights=None, ignore_index=-100, label_smoothing=0.0,
        reduction="mean", grad_mode=GRAD_IN_FORWARD, target_positions=None):
    """The emulated op on the heads and targets as given (the op views them as (N, C, S) itself)."""
    class_weights = class_weights or [None] * len(heads)
    cws = [None if w is None else w.float().contiguous() for w in class_weights]
    positions = target_positions or [None] * len(heads)
    return emu.multihead_ce_per_head_forward(list(heads), list(targets), positions, cws, list(weights), ignore_index,
                                             label_smoothing, REDUCTION[reduction], grad_mode)


def reference(heads, targets, weights, *, class_weights=None, ignore_index=-100, label_smoothing=0.0,
              reduction="mean"):
    """float64 naive loop: loss, its gradient for grad_output 1 (ones for none), and per head the loss (mean for
    none), the hits and the counted rows."""
    class_weights = class_weights or [None] * len(heads)
    xs = [to_reference(h).requires_grad_(True) for h in heads]
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    loss = naive_per_head(xs, targets, weights, class_weights, reduction=reduction, **options)
    grads = torch.autograd.grad(loss, xs, torch.ones_like(loss))
    head_losses, hits, counts = [], [], []
    for x, t, cw in zip(xs, targets, class_weights):
        head_losses.append(F.cross_entropy(x.detach(), to_reference(t), weight=to_reference(cw),
                                           reduction="mean" if reduction == "none" else reduction, **options))
        if t.is_floating_point():
            hits.append(int((x.argmax(1) == t.argmax(1)).sum()))
            counts.append(t.numel() // t.shape[1])
        else:
            counted = t != ignore_index
            hits.append(int(((x.argmax(1) == t) & counted).sum()))
            counts.append(int(counted.sum()))
    return loss.detach(), torch.stack(head_losses), hits, counts, grads


def check(emu, heads, targets, weights, grad_mode=GRAD_IN_FORWARD, **options):
    """The emulated op against the naive loop; returns its outputs."""
    out = run(emu, heads, targets, weights, grad_mode=grad_mode, **options)
    loss, head_losses, head_correct, count, denom, grads, invalid = out
    r_loss, r_head_losses, r_hits, r_counts, r_grads = reference(heads, targets, weights, **options)
    dtype, H = heads[0].dtype, len(heads)
    if options.get("reduction") == "none":  # the op's none loss is (N, S)
        r_loss = r_loss.reshape(heads[0].shape[0], -1)
    assert loss.dtype == torch.float32 and loss.shape == r_loss.shape
    assert_matches_reference(loss, r_loss, dtype, msg="loss")
    assert head_losses.shape == (H,) and head_correct.shape == (H,) and count.shape == (H,) and denom.shape == (H,)
    assert_matches_reference(head_losses, r_head_losses, dtype, msg="head losses")
    assert [int(v) for v in head_correct] == r_hits
    assert [int(v) for v in count] == r_counts
    assert invalid.shape == () and int(invalid) == 0
    if grad_mode == NO_GRAD:
        assert grads == []
        return out
    assert len(grads) == H
    for h, (a, b) in enumerate(zip(grads, r_grads)):
        assert a.dtype == dtype and a.shape == heads[h].shape, f"head {h}"
        assert_matches_reference(a, b, dtype, heads[h].shape[1], msg=f"head {h} gradient")
    return out


def randn(shape, dtype, key, scale=3.0):
    return (torch.randn(shape, generator=generator(key)) * scale).to(dtype)


def index_target(shape, key, ignore_index=None, fraction=0.3):
    """Class indices for logits `shape` (N, C, d...), a `fraction` of them ignore_index when given."""
    g = generator(key)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if ignore_index is not None:
        t = torch.where(torch.rand(t.shape, generator=g) < fraction, torch.full_like(t, ignore_index), t)
    return t


def prob_target(shape, dtype, key):
    return torch.softmax(torch.randn(shape, generator=generator(key)) * 2, 1).to(dtype)


def class_weight(C, key):
    return torch.rand(C, generator=generator(key)) + 0.5


DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
GRAD_MODES = [NO_GRAD, GRAD_IN_FORWARD]
GRAD_IDS = ["nograd", "grad"]


# ------------------------------------------------------------------------------------------------
# The three kinds of per-head targets
# ------------------------------------------------------------------------------------------------

def pyramid(dtype, ignore_index=None):
    """Deep supervision: 2 x 5 classes at 8x8, 4x4, 2x2 (NCHW: class-strided, a thread per row), each head with
    its own target."""
    heads = [randn((2, 5, s, s), dtype, f"pyramid-{s}") for s in (8, 4, 2)]
    targets = [index_target(h.shape, f"pyramid-target-{h.shape[-1]}", ignore_index) for h in heads]
    return heads, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=GRAD_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_deep_supervision_pyramid(emu, dtype, grad_mode, reduction, eps):
    heads, targets = pyramid(dtype, ignore_index=-100)
    assert emu.mapping(5, heads[0].reshape(2, 5, -1).stride(1)) == THREAD
    check(emu, heads, targets, [1.0, 0.5, 0.25], grad_mode=grad_mode, reduction=reduction, label_smoothing=eps)


def test_pyramid_channels_last_and_class_weights(emu):
    """One head channels_last (classes contiguous), the others NCHW: still a thread per row for the launch; each
    gradient laid out like its head."""
    heads, targets = pyramid(torch.float32, ignore_index=-100)
    heads[1] = heads[1].contiguous(memory_format=torch.channels_last)
    cws = [class_weight(5, "pyr-w0"), None, class_weight(5, "pyr-w2")]
    out = check(emu, heads, targets, [1.0, 0.5, 0.25], class_weights=cws, label_smoothing=0.1)
    grads = out[5]
    assert grads[1].is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous()


def test_pyramid_none_needs_equal_rows(emu):
    heads, targets = pyramid(torch.float32)
    with pytest.raises(RuntimeError, match="reduction none sums the heads' rows: head 1"):
        run(emu, heads, targets, [1.0, 0.5, 0.25], reduction="none")


def multi_token(dtype, ignore_index):
    """3 heads x 6 rows x 37 classes (a warp per row), each with its own (shifted) targets."""
    heads = [randn((6, 37), dtype, f"token-{h}") for h in range(3)]
    targets = [index_target((6, 37), f"token-target-{h}", ignore_index) for h in range(3)]
    return heads, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=GRAD_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_multi_token(emu, dtype, grad_mode, reduction, eps):
    heads, targets = multi_token(dtype, ignore_index=3)
    assert emu.mapping(37, 1) == WARP
    check(emu, heads, targets, [1.0, 0.5, 0.3], grad_mode=grad_mode, reduction=reduction, label_smoothing=eps,
          ignore_index=3)


def multi_task(dtype):
    """5 rows, 37 / 11 / 3 classes, class weights on the first and last head, one ignored row in each head."""
    heads = [randn((5, C), dtype, f"task-{C}") for C in (37, 11, 3)]
    targets = [index_target(h.shape, f"task-target-{h.shape[1]}") for h in heads]
    for h, t in enumerate(targets):
        t[(2 * h + 1) % 5] = -100
    cws = [class_weight(37, "task-w37"), None, class_weight(3, "task-w3")]
    return heads, targets, cws


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=GRAD_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_multi_task(emu, dtype, grad_mode, reduction, eps):
    heads, targets, cws = multi_task(dtype)
    check(emu, heads, targets, [1.0, 0.7, 0.4], class_weights=cws, grad_mode=grad_mode, reduction=reduction,
          label_smoothing=eps)


# ------------------------------------------------------------------------------------------------
# Mappings, targets, sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction,eps", [("mean", 0.0), ("none", 0.1), ("sum", 0.1)])
def test_wide_head_block_per_row(emu, dtype, reduction, eps):
    """C = 2501 next to a 40-class head: a block per row for the launch (odd C: misaligned rows, vector body,
    tails); 3 rows, 2 blocks with gradients: the item loop."""
    heads = [randn((3, 2501), dtype, "wide"), randn((3, 40), dtype, "narrow")]
    assert emu.mapping(2501, 1) == BLOCK
    targets = [index_target((3, 2501), "wide-target"), index_target((3, 40), "narrow-target", -100, 0.3)]
    cws = [None, class_weight(40, "narrow-w")]
    for grad_mode in GRAD_MODES:
        check(emu, heads, targets, [1.0, 0.3], class_weights=cws, grad_mode=grad_mode, reduction=reduction,
              label_smoothing=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_probability_targets(emu, dtype, reduction, eps):
    """Soft targets (mixup) per head, one head with class weights; and a call mixing probability and index
    targets."""
    heads = [randn((4, 7, 3), dtype, "prob-a"), randn((4, 12, 3), dtype, "prob-b")]
    targets = [prob_target(h.shape, dtype, f"prob-target-{i}") for i, h in enumerate(heads)]
    cws = [None, class_weight(12, "prob-w")]
    for grad_mode in GRAD_MODES:
        check(emu, heads, targets, [1.0, 0.6], class_weights=cws, grad_mode=grad_mode, reduction=reduction,
              label_smoothing=eps)
    mixed = [targets[0], index_target(heads[1].shape, "prob-mixed", -100)]
    check(emu, heads, mixed, [1.0, 0.6], class_weights=cws, reduction=reduction, label_smoothing=eps)


def test_big_and_small_heads_share_the_grid(emu):
    """A 64x64 head and a 4x4 head (3 classes, NCHW): 4096 + 16 rows on 3 blocks of 256 threads, the items of
    both heads spread over the blocks; mean with gradients (the denominators' pre-pass)."""
    heads = [randn((1, 3, 64, 64), torch.float32, "big"), randn((1, 3, 4, 4), torch.float32, "small")]
    targets = [index_target(h.shape, f"big-small-{h.shape[-1]}", -100) for h in heads]
    spans, grid, items = emu.per_head_plan([4096, 16], [3, 3], False, THREAD)
    assert (spans, grid) == (2, 3) and items >= 2 * grid  # every block takes several items of the big head
    check(emu, heads, targets, [1.0, 0.4], label_smoothing=0.05)
    check(emu, heads, targets, [1.0, 0.4], reduction="sum")


def test_work_plan_balances_logits(emu):
    """Items hold about the same number of logits: a 128x128 head and a 16x16 head get items in proportion
    to their rows, and never more than 4 items per block before items grow past one row per group."""
    spans, grid, items = emu.per_head_plan([128 * 128, 16 * 16], [5, 5], False, THREAD)
    assert spans == 2 and grid == 3 and items <= 4 * 3 + 2
    spans, grid, items = emu.per_head_plan([6, 6, 6], [37, 37, 37], True, WARP)  # none: one span of every head
    assert (spans, grid, items) == (1, 2, 2)
    spans, grid, items = emu.per_head_plan([0, 5], [10, 10], False, WARP)  # a head without rows has no items
    assert (spans, grid, items) == (1, 2, 2)


def test_many_heads(emu):
    """20 heads (more than the shared-target op's 16): the table is on the device, partials per head."""
    heads = [randn((3, 4 + h), torch.float32, f"many-{h}") for h in range(20)]
    targets = [index_target(x.shape, f"many-target-{h}", -100) for h, x in enumerate(heads)]
    weights = [0.1 * (h + 1) for h in range(20)]
    check(emu, heads, targets, weights, label_smoothing=0.1)
    check(emu, heads, targets, weights, reduction="none")


def test_confident_bf16(emu):
    """Large margins in bf16: p - 1 at the target is formed in fp32 before rounding."""
    heads = [randn((6, 40), torch.float32, f"conf-{h}", scale=1.0) for h in range(2)]
    targets = [index_target((6, 40), f"conf-target-{h}") for h in range(2)]
    for h, t in zip(heads, targets):
        h.scatter_(1, t.unsqueeze(1), 20.0)
    check(emu, [h.bfloat16() for h in heads], targets, [1.0, 0.5])


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["thread", "warp", "block"])
@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=GRAD_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_invalid_class_index(emu, kind, grad_mode, reduction):
    """A class index outside [0, C) (not ignore_index) is never read: that row's loss and gradient are NaN, the
    loss is NaN, `invalid` counts it (over heads and blocks), the other head's rows stay finite."""
    C = {"thread": 5, "warp": 37, "block": 2100}[kind]
    shape = (4, C, 2) if kind == "thread" else (4, C)
    heads = [randn(shape, torch.float32, f"bad-{kind}-{h}") for h in range(2)]
    targets = [index_target(shape, f"bad-target-{kind}-{h}") for h in range(2)]
    targets[0].view(-1)[1] = C + 5
    targets[1].view(-1)[2] = -3
    targets[1].view(-1)[0] = 10**12
    loss, head_losses, _, count, _, grads, invalid = run(emu, heads, targets, [1.0, 0.5], reduction=reduction,
                                                         grad_mode=grad_mode)
    assert int(invalid) == 3
    assert [int(c) for c in count] == [targets[0].numel(), targets[1].numel()]
    assert torch.isnan(head_losses).all()
    if reduction == "none":
        rows = loss.reshape(-1)
        assert torch.isnan(rows[[0, 1, 2]]).all() and torch.isfinite(rows[3:]).all()
    else:
        assert torch.isnan(loss)
    if grad_mode == GRAD_IN_FORWARD:
        g0 = grads[0].movedim(1, -1).reshape(-1, C)
        assert torch.isnan(g0[1]).all() and torch.isfinite(g0[[0] + list(range(2, g0.shape[0]))]).all()


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_target_resize_positions(emu, mode, reduction):
    """target_resize: each smaller head reads one full-resolution mask through its positions (no downsampled
    copy), against the naive loop on F.interpolate's masks; the full-resolution head reads it as it is."""
    sizes = ((12, 10), (6, 5), (3, 3))
    heads = [randn((2, 5, *size), torch.float32, f"resize-{size}") for size in sizes]
    mask = index_target((2, 5, 12, 10), "resize-mask", ignore_index=-100)
    targets = [F.interpolate(mask[:, None].float(), size=size, mode=mode)[:, 0].long() for size in sizes]
    positions = [auxfuse.target_positions((12, 10), size, mode) for size in sizes]
    out = run(emu, heads, [mask] * 3, [1.0, 0.5, 0.25], reduction=reduction, target_positions=positions)
    want = check(emu, heads, targets, [1.0, 0.5, 0.25], reduction=reduction)
    for a, b in zip(out[:5] + (out[6],), want[:5] + (want[6],)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(out[5], want[5]))


def test_target_position_outside_the_target_is_an_invalid_row(emu):
    """A position outside the full-resolution target is never read: on CUDA (no host sync) its row counts as an
    invalid target, NaN, like a class index outside [0, C)."""
    heads = [randn((2, 3, 2, 2), torch.float32, "bad-position")]
    mask = index_target((2, 3, 4, 4), "bad-position-mask")
    loss, _, _, count, _, grads, invalid = run(emu, heads, [mask], [1.0],
                                               target_positions=[torch.tensor([0, 5, 16, -1])])
    assert int(invalid) == 4 and int(count[0]) == 8 and torch.isnan(loss)
    assert torch.isnan(grads[0][:, :, 1]).all() and torch.isfinite(grads[0][:, :, 0]).all()


def test_all_ignored_and_empty_heads(emu):
    """A head whose rows are all ignored, a head with no rows: their mean is NaN (0 / 0, as in PyTorch), their
    gradient 0, and the other heads are unaffected; sum gives 0."""
    heads = [randn((4, 10), torch.float32, "ign-a"), randn((4, 10), torch.float32, "ign-b"),
             randn((0, 10), torch.float32, "ign-c")]
    targets = [index_target((4, 10), "ign-ta"), torch.full((4,), -100), torch.zeros(0, dtype=torch.long)]
    loss, head_losses, head_correct, count, denom, grads, _ = run(emu, heads, targets, [1.0, 0.5, 0.5])
    assert torch.isnan(loss) and torch.isnan(head_losses[1:]).all() and torch.isfinite(head_losses[0])
    assert [int(c) for c in count] == [4, 0, 0] and int(head_correct[1]) == 0
    assert torch.equal(grads[1], torch.zeros_like(grads[1])) and grads[2].shape == (0, 10)
    check(emu, heads[:1], targets[:1], [1.0])
    loss, head_losses, *_ = run(emu, heads, targets, [1.0, 0.5, 0.5], reduction="sum")
    assert torch.isfinite(loss) and float(head_losses[1]) == 0.0 and float(head_losses[2]) == 0.0


def test_no_rows_at_all(emu):
    heads = [torch.zeros(0, 10), torch.zeros(0, 4, 3)]
    targets = [torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)]
    loss, head_losses, head_correct, count, denom, grads, invalid = run(emu, heads, targets, [1.0, 0.5])
    assert torch.isnan(loss) and torch.isnan(head_losses).all() and int(count.sum()) == 0 and int(invalid) == 0
    assert [g.shape for g in grads] == [h.shape for h in heads]
    loss, *_ = run(emu, heads, targets, [1.0, 0.5], reduction="sum")
    assert float(loss) == 0.0


@pytest.mark.parametrize("kind", ["pyramid", "multi_task", "wide"])
def test_repeatable(emu, kind):
    """Bitwise the same results on every call: fixed item order, fixed-order partial sums, no float atomics."""
    if kind == "pyramid":
        heads, targets = pyramid(torch.bfloat16, ignore_index=-100)
        cws = None
    elif kind == "multi_task":
        heads, targets, cws = multi_task(torch.bfloat16)
    else:
        heads = [randn((3, 2501), torch.bfloat16, "rep-wide"), randn((3, 40), torch.bfloat16, "rep-narrow")]
        targets = [index_target(h.shape, f"rep-target-{i}") for i, h in enumerate(heads)]
        cws = None
    a = run(emu, heads, targets, [1.0, 0.5, 0.25][: len(heads)], class_weights=cws, label_smoothing=0.1)
    b = run(emu, heads, targets, [1.0, 0.5, 0.25][: len(heads)], class_weights=cws, label_smoothing=0.1)
    for x, y in zip(a[:5], b[:5]):
        assert torch.equal(x, y)
    for x, y in zip(a[5], b[5]):
        assert torch.equal(x, y)


def test_argument_checks(emu):
    heads, targets = multi_token(torch.float32, ignore_index=None)
    with pytest.raises(RuntimeError, match="grad_mode 0 or 1"):
        run(emu, heads, targets, [1.0, 0.5, 0.3], grad_mode=2)
    with pytest.raises(RuntimeError, match="as many targets"):
        run(emu, heads, targets[:2], [1.0, 0.5, 0.3])
    with pytest.raises(RuntimeError, match="class-index targets must be int64"):
        run(emu, heads, [targets[0], targets[1][:3], targets[2]], [1.0, 0.5, 0.3])
    with pytest.raises(RuntimeError, match="class_weight must be a contiguous"):
        run(emu, heads, targets, [1.0, 0.5, 0.3], class_weights=[None, None, torch.ones(5)])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_strided_heads_and_targets(emu, reduction):
    """Multi-token targets as shifted slices of one token tensor (row-strided), a transposed head (class-strided:
    a thread per row for the launch), a row-sliced head: each head and target read with its own strides."""
    N, T, C = 6, 3, 37
    tokens = torch.randint(0, C, (N, T + 2), generator=generator("tokens"))
    tokens[1, 2] = -100
    targets = [tokens[:, h:h + 1].squeeze(1) for h in range(T)]  # strides (T + 2,)
    heads = [randn((N, C), torch.float32, "strided-0"),
             randn((C, N), torch.float32, "strided-1").t(),
             randn((2 * N, C), torch.float32, "strided-2")[::2]]
    assert not targets[0].is_contiguous() and heads[1].stride(1) != 1
    out = check(emu, heads, targets, [1.0, 0.5, 0.3], reduction=reduction, label_smoothing=0.1)
    assert out[5][1].shape == (N, C)


def test_fp16(emu):
    heads, targets, cws = multi_task(torch.float16)
    check(emu, heads, targets, [1.0, 0.7, 0.4], class_weights=cws, label_smoothing=0.1)
    heads, targets = pyramid(torch.float16, ignore_index=-100)
    check(emu, heads, targets, [1.0, 0.5, 0.25], reduction="sum")


def test_cuda_limits_name_the_head(emu):
    heads, targets = multi_token(torch.float64, ignore_index=None)
    with pytest.raises(RuntimeError, match=r"auxfuse: head 0: the CUDA kernels take float32, float16 or bfloat16"):
        run(emu, heads, targets, [1.0, 0.5, 0.3])


def test_same_outputs_and_layouts_as_the_cpu_op(emu):
    """The CPU kernel of the same op (csrc/cpu) gives the same results, shapes and gradient strides (the fake
    kernel's), on heads of every layout: NCHW, channels_last, (N, C) rows, a probability target."""
    from auxfuse.backends import native

    if native._LOAD_ERROR is not None or not native._has_kernel("CPU", "multihead_ce_per_head_forward"):
        pytest.skip("auxfuse._C with the CPU per-head kernel is not built")
    heads, targets = pyramid(torch.float32, ignore_index=-100)
    heads[1] = heads[1].contiguous(memory_format=torch.channels_last)
    heads.append(randn((2, 5, 7), torch.float32, "cpu-prob"))
    targets.append(prob_target((2, 5, 7), torch.float32, "cpu-prob-target"))
    cws = [class_weight(5, "cpu-w0"), None, None, class_weight(5, "cpu-w3")]
    args = ([None] * 4, [None if w is None else w.contiguous() for w in cws], [1.0, 0.5, 0.25, 0.3], -100, 0.1, 1, 1)
    ours = emu.multihead_ce_per_head_forward(heads, targets, *args)
    cpu = torch.ops.auxfuse.multihead_ce_per_head_forward(heads, targets, *args)
    for a, b in zip(ours[:5] + ours[6:], cpu[:5] + cpu[6:]):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[5], cpu[5]):
        assert a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
