"""The CUDA kernels' source run on CPU threads (tests/cuda_emulation): no GPU needed.

csrc/cuda/multihead_ce.cu is compiled as C++ against a small CUDA shim (a thread per CUDA thread, barriers for
__syncthreads and warp shuffles) behind ops of its own, torch.ops.auxfuse_emu.*, with the CUDA backend's
own host logic and lowered grid caps (3 forward, 2 backward blocks), so small problems also run the
grid-stride loops and a last block that sums several partials. This checks the kernels' indexing
(alignment prologues, vector bodies, tails, strides), their reductions and last-block epilogue, the ticket
reset, and every option against a float64 computation. It does not check GPU-only behaviour (memory model,
ex2/lg2 approximations, speed): tests/test_cuda.py does, on a GPU.

Marked slow: it builds a C++ extension (about a minute) and emulated blocks of 512 threads are slow.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from oracle import assert_matches_reference, generator

pytestmark = pytest.mark.slow

REDUCTION = {"none": 0, "mean": 1, "sum": 2}
THREAD, WARP, BLOCK = 0, 1, 2


GRAD_IN_FORWARD, SAVE_LSE = 1, 2


def run_emulated(emu, heads, target, weights, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", grad_output=None, grad_mode=SAVE_LSE):
    """Forward and backward through the emulated kernels, laid out as auxfuse's front end does; the
    backward of grad_mode 1 as csrc/autograd.cpp does it (scale_grad_ for mean / sum, a multiply for none)."""
    N, C = heads[0].shape[:2]
    rows = [h.reshape(N, C, -1) for h in heads]
    prob = target.is_floating_point()
    t = target.reshape(N, C, -1) if prob else target.reshape(N, -1)
    cw = None if weight is None else weight.float().contiguous()
    red = REDUCTION[reduction]
    loss, head_losses, head_correct, count, denom, saved, _ = emu.multihead_ce_forward(
        rows, t, cw, list(weights), ignore_index, label_smoothing, red, grad_mode)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    g = grad_output.reshape(N, -1) if reduction == "none" else grad_output
    if grad_mode == SAVE_LSE:
        grads = emu.multihead_ce_backward(g, rows, t, cw, list(weights), ignore_index, label_smoothing, red, saved,
                                          denom)
    elif reduction == "none":
        grads = saved * g.unsqueeze(1).to(saved.dtype)
    else:
        grads = saved
        emu.multihead_ce_scale_grad_(grads, g)
    grads = [grads[h].reshape(heads[h].shape) for h in range(len(heads))]
    loss = loss.reshape(target.shape if not prob else (N, *heads[0].shape[2:])) if reduction == "none" else loss
    return loss, head_losses, head_correct, count, grads


def reference(heads, target, weights, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
              grad_output=None):
    """The naive sum in float64 from the same (rounded) values."""
    xs = [h.detach().double().requires_grad_(True) for h in heads]
    t = target.double() if target.is_floating_point() else target
    w = None if weight is None else weight.double()
    options = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if target.is_floating_point():
        options.pop("ignore_index")
    loss = sum(wh * F.cross_entropy(x, t, reduction=reduction, **options) for wh, x in zip(weights, xs))
    g = torch.ones_like(loss) if grad_output is None else grad_output.double()
    grads = torch.autograd.grad(loss, xs, g)
    head_losses = torch.stack([F.cross_entropy(x.detach(), t, reduction="mean" if reduction == "none" else reduction,
                                               **options) for x in xs])
    if target.is_floating_point():
        hits = [int((x.argmax(1) == t.argmax(1)).sum()) for x in xs]
        count = target.numel() // heads[0].shape[1]
    else:
        valid = target != ignore_index
        hits = [int(((x.argmax(1) == target) & valid).sum()) for x in xs]
        count = int(valid.sum())
    return loss.detach(), head_losses, hits, count, grads


def check(emu, heads, target, weights, **options):
    """Both grad modes against the float64 naive sum; returns grad_mode 2's results."""
    check_mode(emu, heads, target, weights, grad_mode=GRAD_IN_FORWARD, **options)
    return check_mode(emu, heads, target, weights, grad_mode=SAVE_LSE, **options)


def check_mode(emu, heads, target, weights, grad_mode, **options):
    dtype = heads[0].dtype
    if target.is_floating_point():
        target = target.to(dtype)  # probability targets have the heads' dtype
    g = None
    if options.get("reduction", "mean") == "none":
        g = torch.rand(target.shape if not target.is_floating_point()
                       else (target.shape[0], *target.shape[2:]), generator=generator("grad_output")) + 0.5
    else:
        g = torch.tensor(1.7)
    loss, head_losses, hits, count, grads = run_emulated(emu, heads, target, weights, grad_output=g,
                                                         grad_mode=grad_mode, **options)
    r_loss, r_head_losses, r_hits, r_count, r_grads = reference(heads, target, weights, grad_output=g, **options)
    assert_matches_reference(loss, r_loss, dtype, msg="loss")
    assert_matches_reference(head_losses, r_head_losses, dtype, msg="head losses")
    assert head_correct_list(hits) == r_hits, f"hits {head_correct_list(hits)} != {r_hits}"
    assert int(count) == r_count
    for h, (a, b) in enumerate(zip(grads, r_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        assert_matches_reference(a, b, dtype, heads[0].shape[1], msg=f"head {h}")
    return loss, grads


def head_correct_list(t):
    return [int(v) for v in t]


def make(shape, num_heads, dtype, seed=0, scale=3.0):
    g = generator(seed)
    return [(torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(num_heads)]


def make_target(shape, kind, seed=1, ignore_index=-100):
    g = generator(seed)
    N, C, rest = shape[0], shape[1], tuple(shape[2:])
    if kind == "prob":
        return torch.softmax(torch.randn((N, C, *rest), generator=g), 1)
    t = torch.randint(0, C, (N, *rest), generator=g)
    if kind == "ignore":
        t = torch.where(torch.rand(t.shape, generator=g) < 0.3, torch.full_like(t, ignore_index), t)
    return t


W16 = [1.0, 0.3, 0.3, 0.7, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5]
OPTIONS = list(itertools.product(["mean", "sum", "none"], [0.0, 0.1], [False, True], ["index", "ignore", "prob"]))


def _options(C, reduction, eps, use_weight, kind):
    opts = dict(reduction=reduction, label_smoothing=eps)
    if use_weight:
        opts["weight"] = torch.rand(C, generator=generator(3)) + 0.5
    if kind == "ignore":
        opts["ignore_index"] = 1
    return opts


# Every option on the cheap kernels (thread and warp per row); spatial and classifier layouts.
SWEEP_SHAPES = [((7, 10), torch.float32, THREAD), ((2, 5, 3, 4), torch.float16, THREAD),
                ((5, 100), torch.bfloat16, WARP), ((2, 40, 3, 3), torch.float32, WARP)]


@pytest.mark.parametrize("shape,dtype,mapping", SWEEP_SHAPES, ids=["thread", "spatial", "warp", "warp-cl"])
@pytest.mark.parametrize("reduction,eps,use_weight,kind", OPTIONS, ids=["-".join(map(str, o)) for o in OPTIONS])
def test_option_sweep(emu, shape, dtype, mapping, reduction, eps, use_weight, kind):
    heads = make(shape, 2, dtype)
    if len(shape) == 4 and mapping == WARP:
        heads = [h.contiguous(memory_format=torch.channels_last) for h in heads]
    N, C = shape[:2]
    rows = heads[0].reshape(N, C, -1)
    assert emu.mapping(C, rows.stride(1)) == mapping
    opts = _options(C, reduction, eps, use_weight, kind)
    target = make_target(shape, kind, ignore_index=opts.get("ignore_index", -100))
    check(emu, heads, target, [1.0, 0.4], **opts)


BLOCK_OPTIONS = [("mean", 0.0, False, "index"), ("none", 0.1, True, "ignore"), ("sum", 0.1, True, "prob")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("C", [2049, 5003])
@pytest.mark.parametrize("reduction,eps,use_weight,kind", BLOCK_OPTIONS, ids=["-".join(map(str, o)) for o in BLOCK_OPTIONS])
def test_block_per_row(emu, dtype, C, reduction, eps, use_weight, kind):
    """Odd C: every row starts at a different 16-byte misalignment (prologue, vector body, tail); 7 rows on
    3 blocks: the grid-stride loop."""
    shape = (7, C)
    assert emu.mapping(C, 1) == BLOCK
    heads = make(shape, 2, dtype)
    opts = _options(C, reduction, eps, use_weight, kind)
    check(emu, heads, make_target(shape, kind, ignore_index=opts.get("ignore_index", -100)), [1.0, 0.3], **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C", [33, 423, 2048])
def test_warp_per_row_many_rows(emu, dtype, C):
    """30 rows on 3 blocks of 4 warps: the grid-stride loop of the warp kernel; odd C: misaligned rows."""
    shape = (30, C)
    heads = make(shape, 3, dtype)
    check(emu, heads, make_target(shape, "ignore"), [1.0, 0.3, 0.3], label_smoothing=0.05)
    check(emu, heads, make_target(shape, "index"), [1.0, 0.3, 0.3], reduction="none")


def test_thread_per_row_many_rows(emu):
    """1000 spatial rows on 3 blocks of 256 threads."""
    shape = (2, 21, 20, 25)
    heads = make(shape, 2, torch.float16)
    check(emu, heads, make_target(shape, "ignore"), [1.0, 0.5])
    check(emu, heads, make_target(shape, "index"), [1.0, 0.5], reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["row_strided", "class_strided", "misaligned", "transposed", "spatial_sliced"])
@pytest.mark.parametrize("C", [12, 100, 3000])
def test_non_contiguous(emu, kind, C):
    N = 5
    g = generator(5)
    if kind == "row_strided":
        heads = [torch.randn(2 * N, C, generator=g).bfloat16()[::2] for _ in range(2)]
    elif kind == "class_strided":
        heads = [torch.randn(N, 2 * C, generator=g).bfloat16()[:, ::2] for _ in range(2)]
    elif kind == "misaligned":  # input rows and gradient rows at different 16-byte offsets: the scalar fallback
        heads = [torch.randn(N, C + 1, generator=g).bfloat16()[:, 1:] for _ in range(2)]
    elif kind == "transposed":
        heads = [torch.randn(C, N, generator=g).bfloat16().t() for _ in range(2)]
    else:
        heads = [torch.randn(N, C, 4, 6, generator=g).bfloat16()[..., ::2] for _ in range(2)]
    target = make_target(heads[0].shape, "ignore")
    check(emu, heads, target, [1.0, 0.3], label_smoothing=0.1, reduction="none")
    check(emu, heads, target, [1.0, 0.3])


def test_sixteen_heads(emu):
    heads = make((6, 64), 16, torch.float32)
    check(emu, heads, make_target((6, 64), "ignore"), W16)
    check(emu, heads, make_target((6, 64), "prob"), W16, reduction="sum", label_smoothing=0.2)


@pytest.mark.parametrize("shape", [(8, 100), (4, 3000), (2, 7, 3, 3)], ids=["warp", "block", "thread"])
@pytest.mark.parametrize("grad_mode", [GRAD_IN_FORWARD, SAVE_LSE], ids=["gif", "lse"])
def test_invalid_targets(emu, shape, grad_mode):
    heads = make(shape, 2, torch.float32)
    target = make_target(shape, "index")
    target.view(-1)[1] = shape[1] + 5
    target.view(-1)[2] = -3
    loss, _, _, count, grads = run_emulated(emu, heads, target, [1.0, 0.3], grad_mode=grad_mode)
    assert torch.isnan(loss) and int(count) == target.numel()
    rows, _, _, _, grads = run_emulated(emu, heads, target, [1.0, 0.3], reduction="none", grad_mode=grad_mode)
    flat = rows.reshape(-1)
    assert torch.isnan(flat[1]) and torch.isnan(flat[2])
    assert torch.isfinite(flat[3:]).all() and torch.isfinite(flat[:1]).all()


@pytest.mark.parametrize("shape,num_heads", [((8, 100), 2), ((8, 100), 16), ((4, 3000), 2), ((2, 7, 3, 3), 2)],
                         ids=["warp", "warp-16-heads", "block", "thread"])
@pytest.mark.parametrize("grad_mode", [0, GRAD_IN_FORWARD, SAVE_LSE], ids=["nograd", "gif", "lse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_invalid_count(emu, shape, num_heads, grad_mode, reduction):
    """The `invalid` output counts the rows whose class index is outside [0, C) (not ignore_index), summed over
    the blocks like `count` (the bad rows sit in different blocks of the warp and block mappings), with the
    pre-pass of grad_mode 1 + mean too; 0 for valid and probability targets."""
    N, C = shape[:2]
    rows = [h.reshape(N, C, -1) for h in make(shape, num_heads, torch.float32)]
    weights = W16[:num_heads]

    def forward(target):
        out = emu.multihead_ce_forward(rows, target, None, weights, -100, 0.1, REDUCTION[reduction], grad_mode)
        return int(out[3]), int(out[6])

    target = make_target(shape, "ignore").reshape(N, -1)
    counted = int((target != -100).sum())
    assert forward(target) == (counted, 0)
    flat = target.view(-1)
    flat[0], flat[1], flat[2], flat[-1] = -100, C, -3, 10**12  # one ignored, three invalid
    counted = int((target != -100).sum())
    assert forward(target) == (counted, 3)
    assert forward(make_target(shape, "prob").reshape(N, C, -1)) == (N * target.shape[1], 0)


@pytest.mark.parametrize("shape", [(8, 100), (4, 3000), (2, 7, 3, 3)], ids=["warp", "block", "thread"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_mode", [GRAD_IN_FORWARD, SAVE_LSE], ids=["gif", "lse"])
def test_all_ignored(emu, shape, reduction, grad_mode):
    heads = make(shape, 2, torch.float32)
    target = torch.full((shape[0], *shape[2:]), -100)
    loss, head_losses, hits, count, grads = run_emulated(emu, heads, target, [1.0, 0.3], reduction=reduction,
                                                         grad_mode=grad_mode)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
    assert int(count) == 0 and sum(head_correct_list(hits)) == 0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("shape", [(6, 100), (3, 3000), (2, 9, 4)], ids=["warp", "block", "thread"])
def test_masked_and_extreme_logits(emu, shape):
    """-inf logits (a masked vocabulary, a chunk entirely masked), large margins."""
    heads = make(shape, 2, torch.float32, scale=1.0)
    target = make_target(shape, "index")
    C = shape[1]
    for h in heads:
        h[:, : C // 3] = float("-inf")  # whole leading chunks masked
        h.scatter_(1, target.unsqueeze(1), 25.0)
    check(emu, heads, target, [1.0, 0.5])
    check(emu, heads, target, [1.0, 0.5], reduction="none")


def test_nan_logit_makes_the_row_nan(emu):
    heads = make((4, 100), 1, torch.float32)
    heads[0][2, 50] = float("nan")
    rows, *_ = run_emulated(emu, heads, make_target((4, 100), "index"), [1.0], reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


@pytest.mark.parametrize("shape", [(30, 423), (5, 3001), (2, 21, 20, 25)], ids=["warp", "block", "thread"])
@pytest.mark.parametrize("grad_mode", [GRAD_IN_FORWARD, SAVE_LSE], ids=["gif", "lse"])
def test_repeatable(emu, shape, grad_mode):
    heads = make(shape, 2, torch.bfloat16)
    target = make_target(shape, "ignore")
    a = run_emulated(emu, heads, target, [1.0, 0.3], label_smoothing=0.1, grad_mode=grad_mode)
    b = run_emulated(emu, heads, target, [1.0, 0.3], label_smoothing=0.1, grad_mode=grad_mode)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    for x, y in zip(a[4], b[4]):
        assert torch.equal(x, y)


def test_empty_and_no_grad_mode(emu):
    heads = [torch.randn(0, 10, 1)]
    target = torch.zeros(0, 1, dtype=torch.long)
    loss, head_losses, head_correct, count, denom, lse, _ = emu.multihead_ce_forward(heads, target, None, [1.0], -100,
                                                                                  0.0, 1, 2)
    assert torch.isnan(loss) and int(count) == 0 and lse.shape == (1, 0, 1)
    heads = make((5, 50), 2, torch.float32)
    rows = [h.reshape(5, 50, 1) for h in heads]
    t = make_target((5, 50), "index").reshape(5, 1)
    with_lse = emu.multihead_ce_forward(rows, t, None, [1.0, 0.3], -100, 0.0, 1, 2)
    without = emu.multihead_ce_forward(rows, t, None, [1.0, 0.3], -100, 0.0, 1, 0)
    with_grad = emu.multihead_ce_forward(rows, t, None, [1.0, 0.3], -100, 0.0, 1, 1)
    assert torch.equal(with_lse[0], without[0]) and without[5].numel() == 0
    assert torch.equal(with_grad[0], without[0]) and with_grad[5].shape == (2, 5, 50, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_scale_grad(emu, dtype):
    """grad_mode 1's backward: nothing at all when grad_output is 1, else one multiply per element (vector body
    and scalar tail: 1001 elements; 3 blocks of 256 threads: the grid-stride loop)."""
    g = torch.randn(1001, generator=generator(7)).to(dtype)
    before = g.clone()
    emu.multihead_ce_scale_grad_(g, torch.tensor(1.0))
    assert torch.equal(g, before)
    emu.multihead_ce_scale_grad_(g, torch.tensor(2.5))
    assert torch.equal(g, (before.float() * 2.5).to(dtype))
    emu.multihead_ce_scale_grad_(g, torch.tensor(1.0, dtype=torch.float64))  # any dtype, read as float32
    assert torch.equal(g, (before.float() * 2.5).to(dtype))


@pytest.mark.parametrize("shape", [(8, 100), (9, 3000), (2, 7, 3, 3)], ids=["warp", "block", "thread"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_unit_grad_output(emu, shape, reduction):
    """loss.backward(): scale_grad_ leaves the forward's gradient as it is, which equals grad_mode 2's; the
    pre-pass's denominator is the forward's (class weights: a float sum in a different grid)."""
    heads = make(shape, 2, torch.float32)
    target = make_target(shape, "ignore")
    weight = torch.rand(shape[1], generator=generator(3)) + 0.5
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    fused = run_emulated(emu, heads, target, [1.0, 0.3], grad_mode=GRAD_IN_FORWARD, **options)
    saved = run_emulated(emu, heads, target, [1.0, 0.3], grad_mode=SAVE_LSE, **options)
    torch.testing.assert_close(fused[0], saved[0], rtol=1e-6, atol=0)
    for a, b in zip(fused[4], saved[4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    check_mode(emu, heads, target, [1.0, 0.3], grad_mode=GRAD_IN_FORWARD, **options)


HEAD_LAYOUTS = {  # name: (shape, make the heads of that layout from contiguous ones)
    "classifier": ((7, 300), lambda h: h),
    "nchw": ((2, 40, 3, 5), lambda h: h),
    "channels_last": ((2, 40, 3, 5), lambda h: h.to(memory_format=torch.channels_last)),
    # classes innermost but H and W swapped in memory: (N, C, S) needs a copy
    "no-view": ((2, 40, 3, 5), lambda h: h.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)),
}


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("grad_mode", [GRAD_IN_FORWARD, SAVE_LSE], ids=["gif", "lse"])
def test_heads_as_they_are(emu, grad_mode, layout):
    """(N, C, d1, ..., dk) heads and (N, d1, ..., dk) targets: the host code reads them as (N, C, S); the same
    results as the (N, C, S) views, gradients in the heads' shape."""
    shape, arrange = HEAD_LAYOUTS[layout]
    heads = [arrange(h) for h in make(shape, 2, torch.bfloat16)]
    target = make_target(shape, "ignore")
    N, C = shape[:2]
    rows_heads, rows_target = [h.reshape(N, C, -1) for h in heads], target.reshape(N, -1)
    args = (None, [1.0, 0.3], -100, 0.1, 1, grad_mode)
    given = emu.multihead_ce_forward(heads, target, *args)
    rows = emu.multihead_ce_forward(rows_heads, rows_target, *args)
    for a, b in zip(given[:5], rows[:5]):
        assert torch.equal(a, b)
    if grad_mode == GRAD_IN_FORWARD:
        assert given[5].shape == (2, *shape) and torch.equal(given[5], rows[5].view(given[5].shape))
    else:
        grad_loss = torch.tensor(1.5)
        a = emu.multihead_ce_backward(grad_loss, heads, target, None, [1.0, 0.3], -100, 0.1, 1, given[5], given[4])
        b = emu.multihead_ce_backward(grad_loss, rows_heads, rows_target, None, [1.0, 0.3], -100, 0.1, 1, rows[5],
                                      rows[4])
        assert a.shape == (2, *shape) and torch.equal(a, b.view(a.shape))
