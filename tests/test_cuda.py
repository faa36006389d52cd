"""The `cuda` backend (csrc/cuda/multihead_ce.cu) against the oracle, on a CUDA device.

Skipped without a CUDA device. With a device but without the CUDA kernels (extension not built, or built
without CUDA), `test_cuda_backend_is_available` fails with the reason and every other test is skipped, so a
broken build never passes silently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from oracle import assert_matches_reference, check_backend, check_per_head, generator, naive_loss, to_reference


if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
CUDA_REASON = auxfuse.available_backends()["cuda"]
needs_cuda_backend = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unavailable: {CUDA_REASON}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def test_cuda_backend_is_available():
    assert CUDA_REASON is None, f"the cuda backend cannot run on this CUDA machine: {CUDA_REASON}"


def _gen(seed: int) -> torch.Generator:
    return generator(seed, DEV)


def make_heads(shape, num_heads, dtype, seed=0, scale=3.0, channels_last=False):
    g = _gen(seed)
    heads = []
    for _ in range(num_heads):
        x = (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        heads.append(x)
    return heads


def make_target(shape, num_classes, kind, seed=1, ignore_index=-100, dtype=torch.float32):
    """kind: index | ignore (about a quarter of the rows ignored) | prob (rows of a softmax)."""
    g = _gen(seed)
    n, rest = shape[0], tuple(shape[2:])
    if kind == "prob":
        logits = torch.randn((n, num_classes, *rest), generator=g, device=DEV)
        return torch.softmax(logits, dim=1).to(dtype)
    target = torch.randint(0, num_classes, (n, *rest), generator=g, device=DEV)
    if kind == "ignore":
        drop = torch.rand(target.shape, generator=g, device=DEV) < 0.25
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return target


def mhce(heads, target, weights, **options):
    return auxfuse.multi_head_cross_entropy(list(heads), target, list(weights), backend="cuda", **options)


WEIGHTS = [1.0, 0.3, 0.3, 0.7, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5]

# (id, logits shape, number of heads, dtype, channels_last): every shape class of the kernels.
BASE_CASES = [
    ("3x423-fp32-warp", (3, 423), 3, torch.float32, False),
    ("5x1000-bf16-warp", (5, 1000), 2, torch.bfloat16, False),
    ("5x1000-fp16-warp", (5, 1000), 3, torch.float16, False),
    ("7x10-fp32-thread", (7, 10), 2, torch.float32, False),
    ("4x50257-bf16-block", (4, 50257), 2, torch.bfloat16, False),
    ("2x131072-bf16-block", (2, 131072), 2, torch.bfloat16, False),
    # fp32 at C >= 16K is left to bf16 / fp16 above: there the oracle's fp32 tolerance (atol 1e-6 on each
    # gradient element) is below the rounding noise of any fp32 implementation (the torch backend fails it too).
    ("3x4099-fp32-block", (3, 4099), 2, torch.float32, False),
    ("3x2049-fp16-block", (3, 2049), 3, torch.float16, False),
    ("2x21x7x9-fp16-spatial", (2, 21, 7, 9), 2, torch.float16, False),
    ("2x5x3x4-fp32-spatial", (2, 5, 3, 4), 3, torch.float32, False),
    ("2x21x8x8-fp32-channels_last", (2, 21, 8, 8), 2, torch.float32, True),
    ("2x40x5x5-bf16-channels_last", (2, 40, 5, 5), 2, torch.bfloat16, True),
]
OPTIONS = list(
    itertools.product(
        ["mean", "sum", "none"],  # reduction
        [0.0, 0.1],  # label_smoothing
        [False, True],  # class weight
        ["index", "ignore", "prob"],  # target kind
    )
)


@needs_cuda_backend
@pytest.mark.parametrize("case", BASE_CASES, ids=[c[0] for c in BASE_CASES])
@pytest.mark.parametrize("reduction,smoothing,use_weight,kind", OPTIONS, ids=["-".join(map(str, o)) for o in OPTIONS])
def test_matches_oracle(case, reduction, smoothing, use_weight, kind):
    _, shape, num_heads, dtype, channels_last = case
    C = shape[1]
    heads = make_heads(shape, num_heads, dtype, channels_last=channels_last)
    options = dict(reduction=reduction, label_smoothing=smoothing)
    if use_weight:
        options["weight"] = torch.rand(C, generator=_gen(7), device=DEV) + 0.5
    if kind == "ignore":
        options["ignore_index"] = 2 if C > 2 else -100
    target = make_target(shape, C, kind, ignore_index=options.get("ignore_index", -100), dtype=dtype)
    check_backend("cuda", heads, target, WEIGHTS[:num_heads], **options)


@needs_cuda_backend
@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("shape,dtype", [((6, 1000), torch.float32), ((4, 3000), torch.bfloat16),
                                         ((2, 11, 4, 5), torch.float16)], ids=["warp", "block", "spatial"])
def test_head_counts(num_heads, shape, dtype):
    heads = make_heads(shape, num_heads, dtype, seed=num_heads)
    target = make_target(shape, shape[1], "ignore")
    check_backend("cuda", heads, target, WEIGHTS[:num_heads])
    check_backend("cuda", heads, target, WEIGHTS[:num_heads], reduction="none", label_smoothing=0.05)


@needs_cuda_backend
def test_more_than_16_heads_is_refused_with_a_reason():
    heads = make_heads((4, 10), 17, torch.float32)
    target = make_target((4, 10), 10, "index")
    with pytest.raises(ValueError, match="at most 16 heads"):
        mhce(heads, target, [1.0] * 17)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_confident_and_masked_logits(dtype):
    """Large margins (p - 1 at the target must survive bf16) and -inf logits away from the target."""
    N, C = 64, 1000
    target = make_target((N, C), C, "index")
    target = torch.where((target >= 500) & (target < 520), torch.zeros_like(target), target)
    heads = make_heads((N, C), 2, torch.float32, scale=1.0)
    for h in heads:
        h[:, 500:520] = float("-inf")  # masked vocabulary entries, never at the target
        h[: N // 2].scatter_(1, target[: N // 2].unsqueeze(1), 30.0)  # half the rows: the target wins by a lot
        h[0, :7] = float("-inf")  # a row whose first chunk is all -inf
    target[0] = 9
    heads = [h.to(dtype) for h in heads]
    check_backend("cuda", heads, target, [1.0, 0.4])
    check_backend("cuda", heads, target, [1.0, 0.4], reduction="sum")


# ---------------------------------------------------------------------------------------------------------
# Non-contiguous logits: views of leaf tensors (check_backend's clone would make them contiguous).
# ---------------------------------------------------------------------------------------------------------

def _views(kind, N, C, dtype, seed):
    g = _gen(seed)
    if kind == "row_strided":  # every other row of a (2N, C) tensor
        base = torch.randn(2 * N, C, generator=g, device=DEV).to(dtype)
        return base, lambda b: b[::2]
    if kind == "class_strided":  # every other class of a (N, 2C) tensor
        base = torch.randn(N, 2 * C, generator=g, device=DEV).to(dtype)
        return base, lambda b: b[:, ::2]
    if kind == "misaligned":  # rows start one element after a 16-byte boundary; gradients are contiguous
        base = torch.randn(N, C + 1, generator=g, device=DEV).to(dtype)
        return base, lambda b: b[:, 1:]
    if kind == "transposed":  # (N, C) view of a (C, N) tensor: classes strided, rows contiguous
        base = torch.randn(C, N, generator=g, device=DEV).to(dtype)
        return base, lambda b: b.t()
    if kind == "spatial_sliced":  # (N, C, H, W) with a strided W
        base = torch.randn(N, C, 6, 10, generator=g, device=DEV).to(dtype)
        return base, lambda b: b[..., ::2]
    raise ValueError(kind)


@needs_cuda_backend
@pytest.mark.parametrize("kind", ["row_strided", "class_strided", "misaligned", "transposed", "spatial_sliced"])
@pytest.mark.parametrize("C", [10, 423, 3001])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_logits(kind, C, dtype, reduction):
    N = 6
    weights = [1.0, 0.3]
    bases, views = [], None
    for seed in range(2):
        base, views = _views(kind, N, C, dtype, seed)
        bases.append(base.requires_grad_(True))
    heads = [views(b) for b in bases]
    assert not heads[0].is_contiguous()
    target = make_target(heads[0].shape, C, "ignore")
    options = dict(reduction=reduction, label_smoothing=0.1)
    out = mhce(heads, target, weights, **options)
    ref_bases = [to_reference(b).requires_grad_(True) for b in bases]
    ref = naive_loss([views(b) for b in ref_bases], target, weights, **options)
    assert_matches_reference(out, ref, dtype, msg="loss")
    g = torch.rand(ref.shape, generator=_gen(99), device=DEV, dtype=ref.dtype) + 0.5
    ours = torch.autograd.grad(out, bases, g.float())
    theirs = torch.autograd.grad(ref, ref_bases, g)
    for a, b in zip(ours, theirs):
        assert_matches_reference(a, b, dtype, C, msg="gradient")


@needs_cuda_backend
def test_unbatched_input():
    heads = [torch.randn(37, device=DEV) for _ in range(2)]
    target = torch.tensor(5, device=DEV)
    check_backend("cuda", heads, target, [1.0, 0.5])


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------

@needs_cuda_backend
@pytest.mark.parametrize("shape", [(8, 100), (4, 3000), (2, 7, 3, 3)], ids=["warp", "block", "spatial"])
@pytest.mark.parametrize("bad_value", [-5, 10_000])
def test_invalid_target_gives_nan_without_crashing(shape, bad_value):
    heads = [h.requires_grad_(True) for h in make_heads(shape, 2, torch.float32)]
    target = make_target(shape, shape[1], "index")
    target.view(-1)[1] = bad_value
    loss = mhce(heads, target, [1.0, 0.3])
    grads = torch.autograd.grad(loss, heads)
    torch.cuda.synchronize()  # a device-side fault would surface here
    assert torch.isnan(loss).item()
    assert all(g.shape == h.shape for g, h in zip(grads, heads))
    # the device-side count, read when asked
    out = mhce(heads, target, [1.0, 0.3], return_details=True)
    assert int(out.invalid_targets) == 1 and out.invalid_targets.device == loss.device
    with pytest.raises(ValueError, match=r"1 class index was outside \[0, C\)"):
        out.raise_if_invalid_targets()
    # reduction none: only the bad row is NaN
    rows = mhce(heads, target, [1.0, 0.3], reduction="none")
    torch.cuda.synchronize()
    assert torch.isnan(rows.view(-1)[1]).item()
    assert torch.isfinite(rows.view(-1)[torch.arange(rows.numel(), device=DEV) != 1]).all().item()


@needs_cuda_backend
@pytest.mark.parametrize("shape", [(8, 100), (4, 3000), (2, 7, 3, 3)], ids=["warp", "block", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(shape, reduction):
    heads = [h.requires_grad_(True) for h in make_heads(shape, 2, torch.float32)]
    target = torch.full((shape[0], *shape[2:]), -100, device=DEV, dtype=torch.long)
    out = mhce(heads, target, [1.0, 0.3], reduction=reduction, return_details=True)
    ref = naive_loss([to_reference(h) for h in heads], target, [1.0, 0.3], reduction=reduction)
    assert_matches_reference(out.loss, ref, torch.float32)
    if reduction == "mean":
        assert torch.isnan(out.loss).item()
    assert int(out.count) == 0 and int(out.head_correct.sum()) == 0
    grads = torch.autograd.grad(out.loss, heads, torch.ones_like(out.loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@needs_cuda_backend
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("C", [10, 1000, 5000, 1], ids=["thread", "warp", "block", "one-class"])
def test_empty_batch_op(reduction, C):
    """N = 0 at the op: no launch, PyTorch's values (mean NaN, sum 0), empty gradients."""
    heads = [torch.randn(0, C, 1, device=DEV) for _ in range(2)]
    target = torch.zeros(0, 1, dtype=torch.long, device=DEV)
    loss, head_losses, head_correct, count, denom, lse, _ = torch.ops.auxfuse.multihead_ce_forward(
        heads, target, None, [1.0, 0.3], -100, 0.0, reduction, 2)
    torch.cuda.synchronize()
    assert lse.shape == (2, 0, 1) and int(count) == 0 and int(head_correct.sum()) == 0
    if reduction == 1:
        assert torch.isnan(loss).item() and torch.isnan(head_losses).all().item()
    elif reduction == 2:
        assert float(loss) == 0.0 and torch.equal(head_losses, torch.zeros_like(head_losses))
    else:
        assert loss.shape == (0, 1)
    grad_loss = torch.ones((0, 1) if reduction == 0 else (), device=DEV)
    grads = torch.ops.auxfuse.multihead_ce_backward(grad_loss, heads, target, None, [1.0, 0.3], -100, 0.0,
                                                    reduction, lse, denom)
    torch.cuda.synchronize()
    assert grads.shape == (2, 0, C, 1)


@needs_cuda_backend
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    heads = [torch.randn(0, 10, device=DEV, requires_grad=True) for _ in range(2)]
    target = torch.zeros(0, dtype=torch.long, device=DEV)
    out = mhce(heads, target, [1.0, 0.3], reduction=reduction, return_details=True)
    ref = naive_loss([to_reference(h) for h in heads], target, [1.0, 0.3], reduction=reduction)
    assert_matches_reference(out.loss, ref, torch.float32)
    assert int(out.count) == 0
    grads = torch.autograd.grad(out.loss, heads, torch.ones_like(out.loss), allow_unused=True)
    assert all(g is None or g.shape == (0, 10) for g in grads)


@needs_cuda_backend
def test_no_grad_forward_matches():
    heads = make_heads((5, 1000), 3, torch.bfloat16)
    target = make_target((5, 1000), 1000, "ignore")
    with_grad = mhce([h.requires_grad_(True) for h in heads], target, WEIGHTS[:3])
    with torch.no_grad():
        without = mhce([h.detach() for h in heads], target, WEIGHTS[:3])
    assert torch.equal(with_grad.detach(), without)


@needs_cuda_backend
def test_none_reduction_with_expanded_grad_output():
    """loss.sum().backward() hands the op an expanded (zero-stride) grad_output."""
    heads = [h.requires_grad_(True) for h in make_heads((3, 5, 4, 4), 2, torch.float32)]
    target = make_target((3, 5, 4, 4), 5, "ignore")
    grads = torch.autograd.grad(mhce(heads, target, [1.0, 0.5], reduction="none").sum(), heads)
    ref_heads = [to_reference(h).requires_grad_(True) for h in heads]
    ref_grads = torch.autograd.grad(naive_loss(ref_heads, target, [1.0, 0.5], reduction="none").sum(), ref_heads)
    for a, b in zip(grads, ref_grads):
        assert_matches_reference(a, b, torch.float32, 5)


@needs_cuda_backend
@pytest.mark.slow
def test_int64_offsets():
    """One head with more than 2^31 logits: rows past the 2^31-th element must be read and written right."""
    N, C = 16_400, 131_072
    assert N * C > 2**31
    x = torch.randn(N, C, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, C, (N,), device=DEV)
    rows = mhce([x], target, [1.0], reduction="none")
    tail = slice(N - 8, N)
    xt = to_reference(x[tail]).requires_grad_(True)
    ref_rows = F.cross_entropy(xt, target[tail], reduction="none")
    torch.testing.assert_close(rows[tail].double(), ref_rows.detach(), rtol=1e-4, atol=1e-4)
    g = torch.zeros_like(rows)
    g[tail] = 1.0
    (grad,) = torch.autograd.grad(rows, [x], g)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), [xt])
    assert_matches_reference(grad[tail], ref_grad, torch.bfloat16, C)
    assert torch.count_nonzero(grad[: N - 8]) == 0
    del grad, x


# ---------------------------------------------------------------------------------------------------------
# Determinism, streams, CUDA graphs, torch.compile, opcheck, launches
# ---------------------------------------------------------------------------------------------------------

DETERMINISM_CASES = [((64, 50257), torch.bfloat16, 2), ((4, 21, 64, 64), torch.float16, 2),
                     ((256, 1000), torch.float32, 3)]


@needs_cuda_backend
@pytest.mark.parametrize("shape,dtype,num_heads", DETERMINISM_CASES, ids=["block", "spatial", "warp"])
def test_bitwise_deterministic(shape, dtype, num_heads):
    heads = [h.requires_grad_(True) for h in make_heads(shape, num_heads, dtype)]
    target = make_target(shape, shape[1], "ignore")
    runs = []
    for _ in range(3):
        out = mhce(heads, target, WEIGHTS[:num_heads], label_smoothing=0.1, return_details=True)
        grads = torch.autograd.grad(out.loss, heads)
        runs.append((out.loss, out.head_losses, out.head_correct, out.count, *grads))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "results differ between identical runs"


@needs_cuda_backend
def test_side_streams():
    """Each stream gets its own ticket counter: concurrent launches on two streams stay correct."""
    shape, H = (512, 1000), 3
    heads = make_heads(shape, H, torch.float32)
    target = make_target(shape, shape[1], "index")
    expected = mhce(heads, target, WEIGHTS[:H])
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results = []
    for i in range(20):
        with torch.cuda.stream(streams[i % 2]):
            results.append(mhce(heads, target, WEIGHTS[:H]))
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for r in results:
        assert torch.equal(r, expected)


def _captured(step):
    """`step` captured in a CUDA graph after three warm-up runs on a side stream (as capture requires): the
    graph and the outputs it writes at every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def _assert_replay_equals_eager(graph, static, step, replay):
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static, eager):
        assert torch.equal(a, b), f"replay {replay} differs from the eager run"


@needs_cuda_backend
@pytest.mark.parametrize("shape", [(256, 1000), (2, 21, 16, 16), (4, 50257)], ids=["warp", "spatial", "block"])
@pytest.mark.parametrize("grad_mode", ["lse", "forward"])
def test_cuda_graph_capture_and_replay(monkeypatch, shape, grad_mode):
    """Both grad modes capture (no host sync) and replay; grad_output changes value between replays (1.0
    is grad_mode 1's early exit, read on the device)."""
    from auxfuse.backends import native

    monkeypatch.setattr(native, "CUDA_GRAD", grad_mode)
    H = 3
    heads = [h.requires_grad_(True) for h in make_heads(shape, H, torch.float32)]
    target = make_target(shape, shape[1], "ignore")
    grad_out = torch.tensor(1.5, device=DEV)

    def step():
        loss = mhce(heads, target, WEIGHTS[:H], label_smoothing=0.1)
        return (loss, *torch.autograd.grad(loss, heads, grad_out))

    graph, static = _captured(step)
    for seed in range(3):
        with torch.no_grad():
            for h, new in zip(heads, make_heads(shape, H, torch.float32, seed=100 + seed)):
                h.copy_(new)
            target.copy_(make_target(shape, shape[1], "ignore", seed=200 + seed))
            grad_out.fill_(1.0 if seed == 1 else 1.5)
        _assert_replay_equals_eager(graph, static, step, seed)


@needs_cuda_backend
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    heads = [h.requires_grad_(True) for h in make_heads((16, 1000), 3, torch.bfloat16)]
    target = make_target((16, 1000), 1000, "ignore")

    def loss_fn(a, b, c, t):
        return auxfuse.multi_head_cross_entropy((a, b, c), t, (1.0, 0.3, 0.3), backend="cuda", label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(*heads, target)
    got_grads = torch.autograd.grad(got, heads)
    want = loss_fn(*heads, target)
    want_grads = torch.autograd.grad(want, heads)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cuda_backend
@pytest.mark.parametrize("shape,kind", [((6, 423), "ignore"), ((2, 5, 3, 4), "prob")], ids=["index", "prob"])
def test_opcheck(shape, kind):
    heads = [h.requires_grad_(True) for h in make_heads(shape, 2, torch.float32)]
    target = make_target(shape, shape[1], kind)
    N, C = shape[0], shape[1]
    rows = [h.reshape(N, C, -1) for h in heads]
    tgt = target.reshape(N, C, -1) if kind == "prob" else target.reshape(N, -1)
    weight = torch.rand(C, device=DEV) + 0.5
    for reduction in (0, 1, 2):
        fwd_args = (rows, tgt, weight, [1.0, 0.3], -100, 0.1, reduction, 2)
        torch.library.opcheck(torch.ops.auxfuse.multihead_ce_forward.default, fwd_args)
        _, _, _, _, denom, lse, _ = torch.ops.auxfuse.multihead_ce_forward(*fwd_args)
        grad_loss = torch.rand((N, rows[0].shape[2]) if reduction == 0 else (), device=DEV)
        detached = [r.detach() for r in rows]
        bwd_args = (grad_loss, detached, tgt, weight, [1.0, 0.3], -100, 0.1, reduction, lse, denom)
        torch.library.opcheck(torch.ops.auxfuse.multihead_ce_backward.default, bwd_args)


@needs_cuda_backend
@pytest.mark.parametrize("shape,dtype,channels_last", [((2, 21, 24, 20), torch.float16, False),
                                                       ((2, 40, 6, 5), torch.bfloat16, True),
                                                       ((9, 3001), torch.bfloat16, False),
                                                       ((33, 1000), torch.float32, False)],
                         ids=["seg-thread", "seg-warp-cl", "lm-block", "classifier-warp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_matches_saved_lse(monkeypatch, shape, dtype, channels_last, reduction):
    """grad_mode 1 (gradient in the forward, pre-pass for mean, scale_grad_ in backward) against grad_mode 2
    through MultiHeadLoss: grad_output 1 (the kernel's early exit), 2.5, and a kept graph run twice."""
    from auxfuse.backends import native

    heads = make_heads(shape, 2, dtype, channels_last=channels_last)
    target = make_target(shape, shape[1], "ignore")
    weight = torch.rand(shape[1], device=DEV) + 0.5
    results = {}
    for mode in ("forward", "lse"):
        monkeypatch.setattr(native, "CUDA_GRAD", mode)
        xs = [h.clone().requires_grad_(True) for h in heads]
        loss = mhce(xs, target, [1.0, 0.4], weight=weight, label_smoothing=0.1, reduction=reduction)
        once = torch.autograd.grad(loss, xs, retain_graph=True)
        again = torch.autograd.grad(loss, xs, torch.tensor(2.5, device=DEV), retain_graph=True)
        last = torch.autograd.grad(loss, xs, torch.tensor(2.5, device=DEV))
        for a, b in zip(again, last):
            assert torch.equal(a, b)
        fresh = [h.clone().requires_grad_(True) for h in heads]
        unit = torch.autograd.grad(mhce(fresh, target, [1.0, 0.4], weight=weight, label_smoothing=0.1,
                                        reduction=reduction), fresh)
        results[mode] = (loss.detach(), once, last, unit)
    torch.testing.assert_close(results["forward"][0], results["lse"][0], rtol=1e-5, atol=1e-6)
    for i in (1, 2, 3):  # the two modes agree to the oracle's tolerance for this dtype
        for a, b in zip(results["forward"][i], results["lse"][i]):
            assert_matches_reference(a, b.double(), dtype, shape[1])


@needs_cuda_backend
def test_grad_in_forward_launches():
    """A segmentation shape takes grad_mode 1 by the auto rule: pre-pass + forward, and in backward one
    scale kernel that returns at once for grad_output 1: three auxfuse kernels and nothing else."""
    from auxfuse.backends import native

    shape = (4, 21, 256, 256)  # 2 fp16 heads: 22 MB of logits
    heads = [h.requires_grad_(True) for h in make_heads(shape, 2, torch.float16)]
    target = make_target(shape, 21, "ignore", ignore_index=255)
    if native.CUDA_GRAD == "auto":
        problem, _ = auxfuse.functional.build_problem(
            auxfuse.outputs.collect_heads(heads, [1.0, 0.5]), target, weight=None, ignore_index=255,
            label_smoothing=0.0, reduction="mean", want_details=False)
        assert native.cuda_grad_mode(problem) == native.GRAD_IN_FORWARD
    ours, others = _device_kernels(lambda: mhce(heads, target, [1.0, 0.5], ignore_index=255), heads)
    assert len(ours) == 3, f"expected pre-pass + forward + scale auxfuse kernels, got {ours}"
    assert not others, f"unexpected device work besides the auxfuse kernels: {others}"


def _device_kernels(loss_fn, heads):
    """(auxfuse kernels, other device work) of one forward + backward with grad_output 1, after a warm-up (the
    stream's ticket counter is allocated once)."""
    grad_out = torch.tensor(1.0, device=DEV)

    def step():
        return torch.autograd.grad(loss_fn(), heads, grad_out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "auxfuse" in n], [n for n in names if "auxfuse" not in n]


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_launches_for_forward_and_backward(dtype):
    """GoogLeNet shape: forward + backward of 3 heads is one auxfuse kernel each and nothing else on the
    device (no memset, no copy, no reduction kernel)."""
    shape = (256, 1000)
    heads = [h.requires_grad_(True) for h in make_heads(shape, 3, dtype)]
    target = make_target(shape, 1000, "index")
    ours, others = _device_kernels(lambda: mhce(heads, target, [1.0, 0.3, 0.3]), heads)
    assert len(ours) == 2, f"expected 1 forward + 1 backward auxfuse kernel, got {ours}"
    assert not others, f"unexpected device work besides the auxfuse kernels: {others}"


# ------------------------------------------------------------------------------------------------
# One target per head (multihead_ce_per_head_forward): one launch for all heads
# ------------------------------------------------------------------------------------------------

def _per_head_pyramid(dtype, sizes=((64, 48), (32, 24), (16, 12), (8, 6)), classes=5, batch=2, seed="cuda-pyr"):
    g = generator(seed)
    heads = [(torch.randn(batch, classes, *size, generator=g) * 3).to(dtype).to(DEV) for size in sizes]
    targets = []
    for size in sizes:
        t = torch.randint(0, classes, (batch, *size), generator=g)
        t.view(-1)[::7] = -100
        targets.append(t.to(DEV))
    return heads, targets


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_head_deep_supervision(dtype, reduction):
    heads, targets = _per_head_pyramid(dtype)
    weight = (torch.rand(5, generator=generator("cuda-pyr-w")) + 0.5).to(DEV)
    for smoothing, class_weight in itertools.product((0.0, 0.1), (None, weight)):
        check_per_head("cuda", heads, targets, [1.0, 0.5, 0.25, 0.125], reduction=reduction,
                       label_smoothing=smoothing, class_weights=None if class_weight is None else [class_weight] * 4,
                       call_weight=class_weight)


@needs_cuda_backend
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_head_multi_token(reduction):
    g = generator(("cuda-mtp", reduction))
    N, T, V = 4, 33, 50257
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 2] = -100
    targets = [t.reshape(-1).to(DEV) for t in auxfuse.shifted_targets(labels, [0, 1, 2])]
    heads = [(torch.randn(N * T, V, generator=g) * 2).bfloat16().to(DEV) for _ in targets]
    check_per_head("cuda", heads, targets, [1.0, 0.5, 0.5], reduction=reduction, label_smoothing=0.05)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_head_multi_task(dtype):
    g = generator(("cuda-multi-task", str(dtype)))
    heads = [(torch.randn(n, c, generator=g) * 2).to(dtype).to(DEV) for n, c in ((256, 1000), (256, 37), (97, 3))]
    targets = [torch.randint(0, 1000, (256,), generator=g).to(DEV), torch.randint(0, 37, (256,), generator=g).to(DEV),
               torch.softmax(torch.randn(97, 3, generator=g), 1).to(dtype).to(DEV)]
    class_weights = [(torch.rand(1000, generator=g) + 0.5).to(DEV), None, (torch.rand(3, generator=g) + 0.5).to(DEV)]
    for reduction in ("mean", "sum"):
        check_per_head("cuda", heads, targets, [1.0, 0.5, 0.25], class_weights=class_weights, reduction=reduction,
                       label_smoothing=0.1)


@needs_cuda_backend
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_per_head_target_resize_reads_the_full_mask(mode):
    """target_resize: every scale reads the one full-resolution mask through its positions (no copy per head)."""
    heads, _ = _per_head_pyramid(torch.float32)
    g = generator(("cuda-resize", mode))
    mask = torch.randint(0, 5, (2, 64, 48), generator=g)
    mask[:, :4] = 255
    targets = [F.interpolate(mask[:, None].float(), size=h.shape[2:], mode=mode)[:, 0].long().to(DEV) for h in heads]
    check_per_head("cuda", heads, targets, [1.0, 0.5, 0.25, 0.125], call_target=mask.to(DEV), target_resize=mode,
                   ignore_index=255, label_smoothing=0.1)


@needs_cuda_backend
def test_per_head_invalid_target_is_nan_and_counted():
    heads, targets = _per_head_pyramid(torch.float32)
    targets[2].view(-1)[3] = 7  # 5 classes
    out = auxfuse.multi_head_cross_entropy(heads, targets, [1.0, 0.5, 0.25, 0.125], backend="cuda",
                                           return_details=True)
    assert torch.isnan(out.loss) and int(out.invalid_targets) == 1


@needs_cuda_backend
def test_per_head_bitwise_deterministic_and_launches():
    """Bitwise the same on every run; mean with gradients is the pre-pass and one per-head kernel for all heads."""
    heads, targets = _per_head_pyramid(torch.bfloat16)
    heads = [h.requires_grad_(True) for h in heads]
    weights = [1.0, 0.5, 0.25, 0.125]

    def loss_fn():
        return auxfuse.multi_head_cross_entropy(heads, targets, weights, backend="cuda", label_smoothing=0.1)

    runs = []
    for _ in range(3):
        loss = loss_fn()
        runs.append((loss, *torch.autograd.grad(loss, heads)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "results differ between identical runs"
    ours, _ = _device_kernels(loss_fn, heads)
    per_head = [n for n in ours if "per_head" in n]
    assert len(per_head) == 2, f"expected the pre-pass and one per-head kernel, got {ours}"


@needs_cuda_backend
def test_per_head_cuda_graph_capture_and_replay():
    """The head table is a host-to-device copy of a pinned buffer: captured, it is read again at every replay
    (the launcher keeps the buffer)."""
    heads, targets = _per_head_pyramid(torch.float32)
    heads = [h.requires_grad_(True) for h in heads]
    weights = [1.0, 0.5, 0.25, 0.125]

    def step():
        loss = auxfuse.multi_head_cross_entropy(heads, targets, weights, backend="cuda", label_smoothing=0.1)
        return (loss, *torch.autograd.grad(loss, heads))

    graph, static = _captured(step)
    for seed in range(3):
        new_heads, new_targets = _per_head_pyramid(torch.float32, seed=("cuda-pyr-replay", seed))
        with torch.no_grad():
            for h, new in zip(heads, new_heads):
                h.copy_(new)
            for t, new in zip(targets, new_targets):
                t.copy_(new)
        _assert_replay_equals_eager(graph, static, step, seed)
