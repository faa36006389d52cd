"""The `triton` backend against the oracle (the naive sum of F.cross_entropy).

Run with the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before triton is
imported, so this is a process of its own):

    TRITON_INTERPRET=1 python -m pytest tests/triton -q

Without TRITON_INTERPRET the same tests run on CUDA tensors when a GPU is visible, and skip otherwise.
Block sizes differ between the two (auxfuse.backends.triton picks small ones under the interpreter), so the
"wide" cases below take C from those sizes: always three class chunks per row.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from oracle import (assert_matches_naive, assert_matches_reference, check_backend, check_per_head, generator,
                    naive_loss, to_reference)

import auxfuse
from auxfuse.backends import triton as tb
from auxfuse.functional import build_problem
from auxfuse.outputs import collect_heads

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if tb.unavailable_reason() is not None:
    DEVICE = None
elif INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

pytestmark = [
    pytest.mark.triton_interpret,
    # The kernels compute masked lanes on safe values and form 0 / 0 with tl.where: any numpy overflow or
    # invalid-value warning from the interpreter is a bug (it used to warn intermittently on garbage lanes).
    pytest.mark.filterwarnings("error::RuntimeWarning"),
    pytest.mark.skipif(
        DEVICE is None or (INTERPRET != tb.INTERPRET),
        reason="needs TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device, and triton: "
        f"{tb.unavailable_reason()}",
    ),
]

NARROW_C = 7
WIDE_C = 2 * max(tb.NARROW_MAX_C, tb.WIDE_BLOCK_C) + 44  # three class chunks, the last one partly masked
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]  # in the order of their codes 0, 1, 2


def _heads(num, shape, dtype, scale=1.0, layout="contiguous", seed=0):
    g = generator(seed)
    out = []
    for h in range(num):
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "sliced":  # a view into a wider tensor: row stride != C
            wide = torch.randn((shape[0], shape[1] + 3) + tuple(shape[2:]), generator=g).to(dtype)
            x = wide[:, 2 : 2 + shape[1]]
        elif layout == "transposed":  # (N, C) as the transpose of a (C, N) tensor: class stride N
            x = torch.randn(tuple(reversed(shape)), generator=g).to(dtype).t()
        elif layout == "mixed":  # each head its own strides
            x = [x, x.t().contiguous().t(), torch.cat([x, x], 1)[:, shape[1] :]][h % 3]
        out.append(x.to(DEVICE))
    return out


def _index_target(shape, C, ignore_frac=0.0, ignore_index=-100, seed=1):
    g = generator(seed)
    t = torch.randint(0, C, shape, generator=g)
    if ignore_frac:
        t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return t.to(DEVICE)


def _prob_target(shape, dtype, seed=2):
    g = generator(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 3, 1).to(dtype).to(DEVICE)


def _class_weight(C, seed=3):
    g = generator(seed)
    return (torch.rand(C, generator=g) + 0.25).to(DEVICE)


WEIGHTS = [1.0, 0.3, 0.4, 0.25, 0.6, 0.7, 0.8, 0.9]
VARIANTS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "weight": dict(weight="w"),
    "all": dict(label_smoothing=0.2, weight="w", ignore_index=3),
}


def _options(variant, C, reduction):
    opts = dict(VARIANTS[variant], reduction=reduction)
    if opts.get("weight") == "w":
        opts["weight"] = _class_weight(C)
    return opts


# Every option in fp32; fp16 / bf16 with a subset (the dtype only changes loads, stores and tolerance).
INDEX_CASES = [(v, torch.float32) for v in VARIANTS] + [
    ("plain", torch.float16), ("all", torch.float16), ("smooth", torch.bfloat16), ("all", torch.bfloat16)]
PROB_CASES = [("plain", torch.float32), ("weight", torch.float32), ("smooth", torch.float16),
              ("weight", torch.bfloat16)]


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant, dtype", INDEX_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in INDEX_CASES])
def test_class_index_targets(variant, dtype, reduction, C):
    N = 6
    heads = _heads(3, (N, C), dtype)
    target = _index_target((N,), C)
    if variant == "all":
        target[1] = 3  # ignore_index=3 is also a class: it must be ignored, not predicted
    check_backend("triton", heads, target, WEIGHTS[:3], **_options(variant, C, reduction))


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant, dtype", PROB_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in PROB_CASES])
def test_probability_targets(variant, dtype, reduction, C):
    N = 5
    heads = _heads(2, (N, C), dtype)
    target = _prob_target((N, C), dtype)
    check_backend("triton", heads, target, WEIGHTS[:2], **_options(variant, C, reduction))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_spatial_heads(prob, reduction, C, layout):
    """Segmentation heads (N, C, H, W): the class dimension is strided (by H*W, or 1 for channels_last)."""
    shape = (2, C, 3, 5) if C == NARROW_C else (2, C, 2, 2)
    dtype = torch.float32
    heads = _heads(2, shape, dtype, layout=layout)
    if layout == "channels_last":
        assert heads[0].stride(1) == 1
    if prob:
        target = _prob_target(shape, dtype)
        opts = dict(label_smoothing=0.1, weight=_class_weight(C))
    else:
        target = _index_target((shape[0],) + shape[2:], C, ignore_frac=0.3)
        opts = dict(label_smoothing=0.1, weight=_class_weight(C), ignore_index=-100)
    check_backend("triton", heads, target, [1.0, 0.5], reduction=reduction, **opts)


def test_spatial_many_rows_per_program():
    """A spatial size above one program's rows: several programs per sample, tail rows masked."""
    shape = (2, 5, 9, 31)
    heads = _heads(2, shape, torch.bfloat16)
    target = _index_target((2, 9, 31), 5, ignore_frac=0.2)
    check_backend("triton", heads, target, [1.0, 0.5], label_smoothing=0.05)
    check_backend("triton", _heads(2, shape, torch.float16, layout="channels_last"), target, [1.0, 0.5],
                  reduction="none")
    mixed = [_heads(1, shape, torch.float32, layout="channels_last")[0], _heads(1, shape, torch.float32)[0]]
    assert mixed[0].stride(1) == 1 and mixed[1].stride(1) != 1  # each head read with its own strides
    check_backend("triton", mixed, target, [1.0, 0.5], weight=_class_weight(5))


@pytest.mark.parametrize("layout", ["sliced", "transposed", "mixed"])
@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
def test_non_contiguous_heads(layout, C):
    heads = _heads(3, (5, C), torch.float32, layout=layout)
    if layout == "mixed":
        assert len({h.stride() for h in heads}) == 3
    target = _index_target((5,), C)
    check_backend("triton", heads, target, WEIGHTS[:3], label_smoothing=0.1)
    check_backend("triton", heads, _prob_target((5, C), torch.float32), WEIGHTS[:3], reduction="none")


def test_non_contiguous_targets():
    heads = _heads(2, (4, 6, 3), torch.float32)
    index = _index_target((3, 4), 6).t()  # (4, 3) with strides (1, 4)
    check_backend("triton", heads, index, [1.0, 0.4], reduction="none")
    prob = _prob_target((4, 3, 6), torch.float32).permute(0, 2, 1)  # (4, 6, 3), class stride 1
    check_backend("triton", heads, prob, [1.0, 0.4])


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, tb.MAX_HEADS])
def test_head_counts(num_heads):
    heads = _heads(num_heads, (4, 11), torch.float32, seed=num_heads)
    target = _index_target((4,), 11, ignore_frac=0.25)
    check_backend("triton", heads, target, WEIGHTS[:num_heads], label_smoothing=0.1)


def test_unbatched_input():
    heads = _heads(2, (9,), torch.float32)
    check_backend("triton", heads, torch.tensor(4, device=DEVICE), [1.0, 0.3])
    check_backend("triton", heads, _prob_target((1, 9), torch.float32)[0], [1.0, 0.3], label_smoothing=0.1)


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
def test_confident_bf16(C):
    """Large logits in bf16: p - 1 at the target must be formed in fp32 (Liger-Kernel's case)."""
    heads = _heads(2, (6, C), torch.bfloat16, scale=40.0)
    target = torch.stack([h.float().argmax(1) for h in heads])[0].cpu()
    target[::2] = _index_target((6,), C)[::2].cpu()
    check_backend("triton", heads, target.to(DEVICE), [1.0, 0.3], label_smoothing=0.1)


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
def test_ties_take_the_first_maximum(C):
    """head_correct uses the first maximum, also when equal maxima fall in different class chunks."""
    g = generator(5)
    heads = [torch.randint(0, 3, (8, C), generator=g).float().to(DEVICE) for _ in range(2)]
    first = heads[0].argmax(1)
    target = first.clone()
    last = C - 1 - heads[0].flip(1).argmax(1)  # the last maximum
    target[::2] = last[::2]
    out = check_backend("triton", heads, target, [1.0, 0.3])
    expected = int((first == target).sum())
    assert int(out.head_correct[0]) == expected
    soft = torch.zeros(8, C, device=DEVICE)
    soft[:, 0] = 0.5
    soft[:, C - 1] = 0.5  # a tie in the target: its first maximum (class 0)
    check_backend("triton", heads, soft, [1.0, 0.3])


def _problem(heads, target, weights, **options):
    collected = collect_heads(list(heads), list(weights))
    problem, _ = build_problem(
        collected, target,
        weight=options.get("weight"), ignore_index=options.get("ignore_index", -100),
        label_smoothing=options.get("label_smoothing", 0.0), reduction=options.get("reduction", "mean"),
        want_details=True,
    )
    return problem


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
def test_invalid_target_gives_nan_not_out_of_bounds(C):
    """A class index outside [0, C) is never read: its row's loss is NaN (CPU callers get a ValueError earlier,
    so the backend is called directly here)."""
    heads = [h.requires_grad_() for h in _heads(2, (4, C), torch.float32)]
    good = _index_target((4,), C)
    for bad_value in (C, -5, 10**12):
        target = good.clone()
        target[2] = bad_value
        with pytest.raises(ValueError) if DEVICE == "cpu" else contextlib.nullcontext():
            auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.3], backend="triton")
        problem = _problem(heads, good, [1.0, 0.3], reduction="none")
        problem.input_target = target
        result = tb.compute(problem)
        assert int(result.invalid) == 1 and int(result.count) == 4
        rows = result.loss.reshape(4)
        assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
        assert torch.isnan(result.head_losses).all()
        grads = torch.autograd.grad(result.loss.sum(), heads)
        for g in grads:
            assert torch.isfinite(g[[0, 1, 3]]).all() and torch.isnan(g[2]).all()
        for reduction in ("mean", "sum"):
            problem = _problem(heads, good, [1.0, 0.3], reduction=reduction)
            problem.input_target = target
            result = tb.compute(problem)
            assert torch.isnan(result.loss) and int(result.invalid) == 1


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
@pytest.mark.parametrize("mode", ["nograd", "forward", "lse", "op"])
@pytest.mark.parametrize("want_details", [False, True], ids=["no-hits", "hits"])
def test_invalid_count(C, mode, want_details, monkeypatch):
    """`invalid` counts the rows whose class index is outside [0, C) and not ignore_index, summed over the
    programs by the finalize kernel (bad rows in different programs), in every grad mode and through the op,
    with and without the hits columns; probability targets count none."""
    monkeypatch.setattr(tb, "FORCED_GRAD", None if mode in ("nograd", "op") else mode)
    heads = [h.requires_grad_(mode != "nograd") for h in _heads(2, (3, C, 4), torch.float32)]

    def counts(target):
        problem = _problem(heads, target if target.is_floating_point() else _index_target((3, 4), C), [1.0, 0.3],
                           reduction="sum")
        problem.input_target = target
        problem.want_details = want_details
        if mode == "op":
            out = torch.ops.auxfuse.triton_multihead_ce_forward(problem.heads, problem.target, None, [1.0, 0.3],
                                                                -100, 0.0, 2, want_details, True)
            return int(out[3]), int(out[4])
        result = tb.compute(problem)
        return int(result.count), int(result.invalid)

    target = _index_target((3, 4), C)
    assert counts(target) == (12, 0)
    flat = target.view(-1)
    flat[0], flat[5], flat[6], flat[11] = -100, C, -1, 10**12  # one ignored, three invalid
    assert counts(target) == (11, 3)
    assert counts(_prob_target((3, C, 4), torch.float32)) == (12, 0)


@pytest.mark.parametrize("C", [NARROW_C, WIDE_C], ids=["narrow", "wide"])
def test_all_ignored(C):
    heads = [h.requires_grad_() for h in _heads(2, (3, C), torch.float32)]
    target = torch.full((3,), -100, device=DEVICE)
    out = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.3], backend="triton", return_details=True)
    ref = torch.nn.functional.cross_entropy(heads[0].detach(), target)
    assert torch.isnan(out.loss) and torch.isnan(ref)
    assert int(out.count) == 0 and out.head_correct.tolist() == [0, 0]
    for g in torch.autograd.grad(out.loss, heads):
        assert (g == 0).all()
    check_backend("triton", heads, target, [1.0, 0.3], reduction="sum")
    check_backend("triton", heads, target, [1.0, 0.3], reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    """N == 0 through the op (auxfuse.functional cannot reshape an empty batch yet: reshape(0, -1))."""
    red = REDUCTIONS.index(reduction)
    heads = [torch.zeros(0, 5, 1, device=DEVICE).requires_grad_() for _ in range(2)]
    target = torch.zeros((0, 1), dtype=torch.long, device=DEVICE)
    loss, head_losses, correct, count, invalid, denom, lse, coef = torch.ops.auxfuse.triton_multihead_ce_forward(
        heads, target, None, [1.0, 0.3], -100, 0.1, red, True, True)
    ref = sum(w * torch.nn.functional.cross_entropy(to_reference(h[..., 0]), target[:, 0], reduction=reduction)
              for w, h in zip([1.0, 0.3], heads))
    assert_matches_reference(loss.reshape(ref.shape), ref, torch.float32)
    assert int(count) == 0 and int(invalid) == 0 and correct.tolist() == [0, 0] and lse.shape == (2, 0, 1)
    grads = torch.autograd.grad(loss.sum(), heads)
    assert all(g.shape == (0, 5, 1) for g in grads)


# --- Grad modes: the gradient written in the forward vs from the saved log-sum-exp ------------------------------


@pytest.fixture(params=["lse", "forward"])
def forced_grad(request, monkeypatch):
    """Every eager call of the test in one grad mode (as AUXFUSE_TRITON_GRAD does)."""
    monkeypatch.setattr(tb, "FORCED_GRAD", request.param)
    return request.param


def _mode(heads, target, **options):
    return tb.grad_mode(_problem([h.requires_grad_() for h in heads], target, [1.0] * len(heads), **options))


def test_grad_mode_rule(monkeypatch):
    """Gradient in the forward for wide or spatial shapes with mean / sum; lse for classifiers, 'none', no_grad."""
    monkeypatch.setattr(tb, "FORCED_GRAD", None)
    narrow, wide = _heads(2, (4, NARROW_C), torch.float32), _heads(2, (4, WIDE_C), torch.float32)
    spatial = _heads(2, (2, NARROW_C, 3, 5), torch.float32)
    index, wide_index, spatial_index = _index_target((4,), NARROW_C), _index_target((4,), WIDE_C), \
        _index_target((2, 3, 5), NARROW_C)
    assert _mode(narrow, index) == tb.SAVE_LSE
    for reduction in ("mean", "sum"):
        assert _mode(wide, wide_index, reduction=reduction) == tb.GRAD_IN_FORWARD
        assert _mode(spatial, spatial_index, reduction=reduction) == tb.GRAD_IN_FORWARD
    assert _mode(wide, wide_index, reduction="none") == tb.SAVE_LSE
    assert _mode(spatial, _prob_target((2, NARROW_C, 3, 5), torch.float32)) == tb.GRAD_IN_FORWARD
    with torch.no_grad():
        assert _mode(wide, wide_index) == tb.NO_GRAD
    monkeypatch.setattr(tb, "FORCED_GRAD", "forward")
    assert _mode(narrow, index) == tb.GRAD_IN_FORWARD
    assert _mode(narrow, index, reduction="none") == tb.SAVE_LSE  # forward needs mean / sum
    monkeypatch.setattr(tb, "FORCED_GRAD", "lse")
    assert _mode(wide, wide_index) == tb.SAVE_LSE


# (layout, shape): a classifier and a wide classifier, spatial NCHW / channels_last, spatial with wide C.
MODE_SHAPES = {
    "narrow": (5, NARROW_C),
    "wide": (4, WIDE_C),
    "spatial": (2, NARROW_C, 3, 5),
    "spatial-channels_last": (2, NARROW_C, 3, 5),
    "spatial-wide": (2, WIDE_C, 1, 2),
}
MODE_CASES = [  # (shape, target, dtype, options)
    ("narrow", "index", torch.float32, dict(label_smoothing=0.1, weight="w", ignore_index=2)),
    ("wide", "index", torch.bfloat16, dict(label_smoothing=0.2, weight="w", ignore_index=3)),
    ("wide", "prob", torch.float16, dict(weight="w")),
    ("spatial", "index", torch.float16, dict(weight="w", ignore_index=-100)),
    ("spatial", "prob", torch.float32, dict(label_smoothing=0.1)),
    ("spatial-channels_last", "index", torch.bfloat16, dict(label_smoothing=0.1, ignore_index=-100)),
    ("spatial-channels_last", "prob", torch.float32, dict(weight="w", label_smoothing=0.05)),
    ("spatial-wide", "index", torch.float32, dict(weight="w", label_smoothing=0.1, ignore_index=-100)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", MODE_CASES, ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}" for c in MODE_CASES])
def test_grad_modes_against_oracle(case, reduction, forced_grad):
    """Both grad modes on every kind of shape, target and option, against the naive F.cross_entropy sum,
    with grad_output exactly 1 (the in-place scale returns at once) and 2.5."""
    shape_name, target_kind, dtype, options = case
    shape = MODE_SHAPES[shape_name]
    layout = "channels_last" if shape_name.endswith("channels_last") else "contiguous"
    heads = _heads(3, shape, dtype, layout=layout)
    C = shape[1]
    options = dict(options, reduction=reduction)
    if options.get("weight") == "w":
        options["weight"] = _class_weight(C)
    if target_kind == "prob":
        target = _prob_target(shape, dtype)
        options.pop("ignore_index", None)
    else:
        target = _index_target((shape[0],) + shape[2:], C, ignore_frac=0.3,
                               ignore_index=options.get("ignore_index", -100))
    assert _mode(heads, target, **options) == (tb.GRAD_IN_FORWARD if forced_grad == "forward" else tb.SAVE_LSE)
    for grad_output in ("1.0", "2.5"):
        check_backend("triton", heads, target, WEIGHTS[:3], grad_output=grad_output, **options)


def _grad_in_forward_loss(scale=1.0, **options):
    heads = [h.requires_grad_() for h in _heads(2, (2, NARROW_C, 3, 5), torch.bfloat16)]
    target = _index_target((2, 3, 5), NARROW_C, ignore_frac=0.2)
    assert _mode(heads, target, **options) == tb.GRAD_IN_FORWARD
    loss = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.4], backend="triton", label_smoothing=0.1,
                                            **options)
    ref_heads = [to_reference(h).requires_grad_() for h in heads]
    ref = naive_loss(ref_heads, target, [1.0, 0.4], label_smoothing=0.1, **options)
    return heads, loss, torch.autograd.grad(ref * scale, ref_heads)


def _saved_buffer(loss):
    (buffer,) = loss.grad_fn.saved_tensors
    return buffer


def test_grad_in_forward_in_place_and_retain_graph(monkeypatch):
    """A freed graph: the saved gradient buffer itself is handed out (scaled in place). A kept graph
    (retain_graph=True): the buffer is left as it is, so a second backward gives the same gradients."""
    monkeypatch.setattr(tb, "FORCED_GRAD", None)
    heads, loss, ref_grads = _grad_in_forward_loss(scale=2.5)
    buffer = _saved_buffer(loss)
    before = buffer.clone()
    first = torch.autograd.grad(loss * 2.5, heads, retain_graph=True)
    assert torch.equal(buffer, before)  # not scaled in place: the graph is kept
    second = torch.autograd.grad(loss * 2.5, heads, retain_graph=True)
    for a, b, r in zip(first, second, ref_grads):
        assert torch.equal(a, b)
        assert_matches_reference(a, r, torch.bfloat16, NARROW_C)
        assert a.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    last = torch.autograd.grad(loss * 2.5, heads)  # the graph is freed: in place, the buffer handed out
    for a, b in zip(first, last):
        assert torch.equal(a, b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        assert b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, heads)


def test_grad_in_forward_unit_grad_output_leaves_buffer(monkeypatch):
    """loss.backward(): grad_output is exactly 1, the scale kernel returns at once, the heads get the buffer."""
    monkeypatch.setattr(tb, "FORCED_GRAD", None)
    heads, loss, ref_grads = _grad_in_forward_loss(reduction="sum")
    buffer = _saved_buffer(loss)
    before = buffer.clone()
    loss.backward()
    for h, r in zip(heads, ref_grads):
        assert h.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert_matches_reference(h.grad, r, torch.bfloat16, NARROW_C)
    assert torch.equal(buffer, before)


def test_grad_in_forward_traced_backward_is_out_of_place(monkeypatch):
    """While a dispatch mode records the backward (as make_fx or compiled autograd do), grad_output's value is
    not known: the backward writes grads * grad_output to a new buffer, never into the saved one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tb, "FORCED_GRAD", None)
    heads, loss, ref_grads = _grad_in_forward_loss(scale=2.5)
    buffer = _saved_buffer(loss)
    before = buffer.clone()
    scaled = loss * 2.5
    with Passthrough():
        grads = torch.autograd.grad(scaled, heads)
    assert torch.equal(buffer, before)
    for a, r in zip(grads, ref_grads):
        assert a.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        assert_matches_reference(a, r, torch.bfloat16, NARROW_C)


@pytest.mark.parametrize("shape", [(3, WIDE_C), (2, NARROW_C, 3, 5)], ids=["wide", "spatial"])
def test_grad_in_forward_all_ignored(shape, forced_grad):
    """Every target ignored: mean -> NaN loss and zero gradients (what PyTorch gives), sum -> 0."""
    heads = [h.requires_grad_() for h in _heads(2, shape, torch.float32)]
    target = torch.full((shape[0],) + shape[2:], -100, device=DEVICE)
    out = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.3], backend="triton", return_details=True,
                                           weight=_class_weight(shape[1]), label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(heads[0].detach(), target)
    assert torch.isnan(out.loss) and torch.isnan(ref) and torch.isnan(out.head_losses).all()
    assert int(out.count) == 0
    for g in torch.autograd.grad(out.loss * 2.0, heads):
        assert (g == 0).all()
    check_backend("triton", heads, target, [1.0, 0.3], reduction="sum", label_smoothing=0.1)


def test_eager_call_fills_nothing(monkeypatch):
    """The eager path allocates with torch.empty (every element written by a kernel) and tells autograd not to
    zero-fill the outputs that have no gradient: no fill / zero op in a forward + backward, either mode."""
    for mode in ("lse", "forward"):
        monkeypatch.setattr(tb, "FORCED_GRAD", mode)
        heads = [h.requires_grad_() for h in _heads(3, (4, 11), torch.float32)]
        target = _index_target((4,), 11)
        grad_output = torch.tensor(1.5, device=DEVICE)
        problem = _problem(heads, target, WEIGHTS[:3])  # the backend alone (the CPU target check uses any())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = tb.compute(problem)
            torch.autograd.grad(out.loss, heads, grad_output)
        names = {e.name for e in prof.events()}
        fills = sorted(n for n in names if n.startswith(("aten::fill", "aten::zero", "aten::ones", "aten::full")))
        assert fills == [], (mode, fills)
        assert "auxfuse::triton_multihead_ce_forward" not in names  # the eager path skips the op


@pytest.mark.parametrize("shape, layout", [((4, 11), "contiguous"), ((2, 11, 3, 2), "contiguous"),
                                           ((2, 11, 3, 2), "channels_last"), ((2, 11, 5), "contiguous")],
                         ids=["classifier", "nchw", "channels_last", "spatial-1d"])
def test_eager_graph_has_no_view_nodes(forced_grad, shape, layout):
    """Eager calls hand the heads to the autograd Function as they are: its inputs are the heads themselves (no
    reshape node per head in forward and in backward), and each gradient comes back in its head's shape."""
    heads = [h.requires_grad_() for h in _heads(2, shape, torch.float32, layout=layout)]
    target = _index_target((shape[0], *shape[2:]), shape[1])
    loss = auxfuse.multi_head_cross_entropy(tuple(heads), target, (1.0, 0.4), backend="triton")
    inputs = [fn for fn, _ in loss.grad_fn.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in inputs] == ["AccumulateGrad"] * 2
    assert [fn.variable for fn in inputs] == heads
    for a in torch.autograd.grad(loss, heads, retain_graph=True):
        assert a.shape == shape
    assert_matches_naive(loss, heads, target, (1.0, 0.4), grad_output="1")


def test_traced_forward_goes_through_the_op():
    """Under make_fx (a dispatch mode: values unknown) the backend calls the triton_op (lse mode), not the eager
    autograd.Function, so the graph holds one op node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(a, b, t):
        return tb.compute(_problem([a, b], t, [1.0, 0.3])).loss

    heads = _heads(2, (4, WIDE_C), torch.float32)
    with _interpreter_keeps_op_whole():
        graph = make_fx(fn, tracing_mode="fake")(*heads, _index_target((4,), WIDE_C))
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count("auxfuse.triton_multihead_ce_forward.default") == 1, targets


def _benchmark_module(name: str):
    """A script of benchmarks/ (run on the GPU machine), imported to check it here."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_benchmark_script_runs():
    """benchmarks/triton_bench.py (run on the GPU machine) on tiny CPU shapes, and its host-overhead mode."""
    triton_bench = _benchmark_module("triton_bench")

    if DEVICE != "cpu":
        pytest.skip("the CPU check of the script (the GPU run is the script itself)")
    results = triton_bench.run({"tiny": (2, 4, 40, torch.float32)}, device="cpu", verbose=False)
    row = results["tiny"]
    assert row["max_abs_grad_diff"] < 1e-5 and row["max_abs_loss_diff"] < 1e-5
    for column in ("triton_lse_fwd_bwd_ms", "triton_forward_fwd_bwd_ms", "copy_floor_ms", "pct_of_floor"):
        assert row[column] > 0
    overhead = triton_bench.host_overhead(H=2, N=8, C=40, calls=3, verbose=False)
    assert overhead["eager, lse mode"]["launches"] == ["_forward_kernel", "_finalize_kernel", "_backward_kernel"]
    assert overhead["eager, grad-in-forward"]["launches"] == [
        "_denom_kernel", "_forward_kernel", "_finalize_kernel", "_scale_kernel"]


@pytest.mark.parametrize("provider, first_launch", [("auxfuse-triton-gif", "_denom_kernel"),
                                                     ("auxfuse-triton-lse", "_forward_kernel")])
def test_gpu_bench_forced_grad_providers(provider, first_launch):
    """benchmarks/gpu_bench.py's providers behind its grad-mode table: the triton path with one grad mode
    forced (the gradient in the forward starts with the divisor's pre-pass), the same loss and gradient as
    the naive sum, and the rule's own setting back afterwards."""
    gpu_bench = _benchmark_module("gpu_bench")

    if DEVICE != "cpu":
        pytest.skip("the CPU check of the providers (the GPU run is the benchmark itself)")
    shape = gpu_bench.SMOKE_SHAPES[0]
    loss_fn, _ = gpu_bench.make_provider(provider, shape)
    heads = [h.requires_grad_(True) for h in _heads(shape.heads, shape.logits, torch.float32)]
    target = _index_target(shape.logits[:1], shape.logits[1])
    launches, run = [], tb._run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tb, "_run", lambda kernel, *a, **k: (launches.append(getattr(kernel, "fn", kernel).__name__),
                                                           run(kernel, *a, **k)))
        loss = loss_fn(heads, target)
        grads = torch.autograd.grad(loss, heads)
    assert launches[0] == first_launch and tb.FORCED_GRAD is None
    ref_heads = [to_reference(h).requires_grad_(True) for h in heads]
    ref = gpu_bench.naive_sum(ref_heads, target, shape.weights)
    assert_matches_reference(loss, ref, torch.float32, msg="loss")
    for a, b in zip(grads, torch.autograd.grad(ref, ref_heads)):
        assert_matches_reference(a, b, torch.float32, shape.logits[1], msg="gradient")


def test_no_grad_and_no_details():
    heads = _heads(3, (5, 9), torch.float16)
    target = _index_target((5,), 9)
    with torch.no_grad():
        loss = auxfuse.multi_head_cross_entropy(heads, target, WEIGHTS[:3], backend="triton")
    ref = sum(w * torch.nn.functional.cross_entropy(to_reference(h), target) for w, h in zip(WEIGHTS, heads))
    assert_matches_reference(loss, ref, torch.float16)


def test_deterministic():
    for C in (NARROW_C, WIDE_C):
        heads = [h.requires_grad_() for h in _heads(3, (7, C), torch.bfloat16)]
        target = _index_target((7,), C, ignore_frac=0.2)
        runs = []
        for _ in range(2):
            out = auxfuse.multi_head_cross_entropy(heads, target, WEIGHTS[:3], backend="triton", label_smoothing=0.1,
                                                   return_details=True)
            runs.append((out.loss, out.head_losses, *torch.autograd.grad(out.loss, heads)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_not_supported_reasons():
    def reasons(heads, target, **options):
        return tb.not_supported_reasons(_problem(heads, target, [1.0] * len(heads), **options))

    target = _index_target((4,), 5)
    assert reasons(_heads(2, (4, 5), torch.float32), target) == []
    assert any("float64" in r for r in reasons(_heads(1, (4, 5), torch.float64), target))
    assert any("at most" in r for r in reasons(_heads(tb.MAX_HEADS + 1, (4, 5), torch.float32), target))
    prob = _prob_target((4, 5), torch.float32).requires_grad_()
    assert reasons(_heads(1, (4, 5), torch.float32), prob) == []  # their gradient: test_triton_prob_grad.py
    weight = _class_weight(5).requires_grad_()
    assert any("class weights" in r for r in reasons(_heads(1, (4, 5), torch.float32), target, weight=weight))
    assert tb.unavailable_reason() is None
    assert auxfuse.available_backends()["triton"] is None


def _op_args(C=9, prob=False, reduction=1, device=None):
    device = device or DEVICE
    heads = [h.reshape(4, C, 1).requires_grad_() for h in _heads(2, (4, C), torch.float32)]
    target = _prob_target((4, C, 1), torch.float32) if prob else _index_target((4, 1), C, ignore_frac=0.25)
    return (heads, target, _class_weight(C), [1.0, 0.3], -100, 0.1, reduction, True, True)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=REDUCTIONS)
def test_opcheck(prob, reduction):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of the forward op.

    Under the interpreter the AOT dispatch check keeps the op whole (see _interpreter_keeps_op_whole)."""
    with _interpreter_keeps_op_whole():
        torch.library.opcheck(torch.ops.auxfuse.triton_multihead_ce_forward.default,
                              _op_args(prob=prob, reduction=reduction))


def _interpreter_keeps_op_whole():
    """In the interpreter wrap_triton returns the interpreted kernel (no HOP to trace), so a traced graph would
    lose the launches if torch decomposed the triton_op: keep the op whole there. This still checks Dynamo,
    AOTAutograd, the fake kernel and the autograd registration, not the decomposition into
    triton_kernel_wrapper nodes (that needs the compiled kernels, i.e. a GPU, where it is not patched)."""
    if DEVICE == "cpu":
        return torch._functorch.config.patch(decompose_custom_triton_ops=False)
    return contextlib.nullcontext()


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the triton_op (forward and backward).

    On CPU (interpreter) with the aot_eager backend and the op kept whole; on a GPU with Inductor, which
    inlines the decomposed Triton kernels."""
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    config = _interpreter_keeps_op_whole()
    heads = [h.requires_grad_() for h in _heads(3, (6, 12), torch.float32)]
    target = _index_target((6,), 12, ignore_frac=0.2)

    def fn(a, b, c, t):
        out = auxfuse.multi_head_cross_entropy((a, b, c), t, (1.0, 0.3, 0.3), backend="triton", label_smoothing=0.1,
                                               return_details=True)
        return out.loss, out.head_correct

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with config:
        loss, correct = compiled(*heads, target)
    ref_loss, ref_correct = fn(*heads, target)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(correct, ref_correct)
    grads = torch.autograd.grad(loss, heads)
    ref_grads = torch.autograd.grad(ref_loss, heads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)

    # An out-of-range class index through the traced op: no check while tracing (no graph break), a NaN loss,
    # and the device-side count in the details.
    def invalid(a, b, c, t):
        out = auxfuse.multi_head_cross_entropy((a, b, c), t, (1.0, 0.3, 0.3), backend="triton", return_details=True)
        return out.loss, out.invalid_targets

    bad = target.clone()
    bad[[1, 4]] = torch.tensor([12, -7])
    torch._dynamo.reset()
    with config:
        loss, count = torch.compile(invalid, fullgraph=True, backend=backend)(*heads, bad)
    assert torch.isnan(loss) and int(count) == 2


# --- Compiling the kernels for a Hopper GPU without one ---------------------------------------------------------

_TRITON_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}


def compile_sm90() -> list[dict]:
    """Compile every kernel launch of a few representative calls, with every autotune config, to sm_90 cubin,
    and read the machine code.

    Runs the host code of both grad modes on CPU tensors with the backend's launcher (tb._run) recording the
    launches instead of running them, then compiles each recorded launch as Triton's JIT would: ints equal to
    1 specialized to constexprs, and 16-byte aligned pointers and ints divisible by 16 marked so (the facts
    the compiler needs to vectorize). Needs TRITON_INTERPRET unset (the interpreter does not compile).
    Returns one record per compiled kernel: its name, case, num_warps and constexprs, and what its streaming
    loops hold (tests/sass.py; empty when cuobjdump is missing)."""
    assert not tb.INTERPRET
    launches = []
    case = None

    def record(kernel, grid, args, traced, key=None):
        launches.append((case, kernel, (), dict(args)))

    def lm(dtype=torch.bfloat16, H=2, N=2, C=128256, **kw):
        heads = [torch.zeros(N, C, 1, dtype=dtype) for _ in range(H)]
        return heads, torch.zeros(N, 1, dtype=torch.long), None, [1.0] * H, -100, 0.0, 1, False, True

    cases = {
        "lm": lm(),  # LM vocabulary: the wide path, every BLOCK_C config
        "googlenet": (  # 3 heads, C=1000, fp32, class weights, smoothing, details
            [torch.zeros(256, 1000, 1) for _ in range(3)], torch.zeros(256, 1, dtype=torch.long),
            torch.ones(1000), [1.0, 0.3, 0.3], -100, 0.1, 1, True, True,
        ),
        "seg-prob-none": (  # segmentation NCHW, fp16, probability targets, reduction none
            [torch.zeros(2, 21, 4096, dtype=torch.float16) for _ in range(2)],
            torch.zeros(2, 21, 4096, dtype=torch.float16), torch.ones(21), [1.0, 0.5], 255, 0.1, 0, True, True,
        ),
        "seg-prob-mean": (  # NCHW, bf16, probability targets, mean (grad-in-forward divides by N x S)
            [torch.zeros(2, 21, 4096, dtype=torch.bfloat16) for _ in range(2)],
            torch.zeros(2, 21, 4096, dtype=torch.bfloat16), None, [1.0, 0.5], -100, 0.0, 1, False, True,
        ),
        "seg": (  # segmentation NCHW as benchmarked: fp16, class indices, mean; 128 rows per program
            [torch.zeros(1, 21, 264 * 128, dtype=torch.float16) for _ in range(2)],
            torch.zeros(1, 264 * 128, dtype=torch.long), None, [1.0, 0.5], 255, 0.0, 1, False, True,
        ),
        "channels-last": (  # bf16, eight heads, sum
            [torch.zeros(2, 4096, 21, dtype=torch.bfloat16).permute(0, 2, 1) for _ in range(tb.MAX_HEADS)],
            torch.zeros(2, 4096, dtype=torch.long), None, [1.0] * tb.MAX_HEADS, 255, 0.0, 2, False, True,
        ),
    }
    original = tb._run
    tb._run = record
    try:
        for case, args in cases.items():
            out = torch.ops.auxfuse.triton_multihead_ce_forward(*args)
            heads, target, cw, hw, ii, eps, red = args[:7]
            grad = torch.ones_like(out[0])
            torch.ops.auxfuse.triton_multihead_ce_backward(grad, heads, target, cw, hw, ii, eps, red, out[6], out[7],
                                                           out[5])
            # The eager path's launches (None in the unused head slots), both grad modes.
            out = tb._forward_impl(*args[:8], tb.SAVE_LSE, traced=False)
            tb._backward_impl(grad, heads, target, cw, hw, ii, eps, red, out[6], out[7], out[5], traced=False,
                              one_buffer=True)
            if red != 0:  # grad-in-forward: divisor pre-pass (mean), forward with GRAD, scale kernel both ways
                out = tb._forward_impl(*args[:8], tb.GRAD_IN_FORWARD, traced=False)
                for in_place in (True, False):
                    tb.scale_gradients(out[8], torch.ones(()), in_place)
    finally:
        tb._run = original
    return compile_launches(launches)


def compile_launches(launches) -> list[dict]:
    """Compile recorded launches (case, kernel, args, kwargs), with every autotune config, to sm_90 cubin as
    Triton's JIT would, and read their machine code (see compile_sm90; also used by test_triton_per_head.py)."""
    import tempfile

    import sass
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    records = []
    cuobjdump = sass.find_tool("cuobjdump")
    scratch = tempfile.TemporaryDirectory(prefix="auxfuse-sm90-")  # removed on cleanup() or when collected
    cubin = os.path.join(scratch.name, "kernel.cubin")
    for case, kernel, args, kwargs in launches:
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        configs = kernel.configs if isinstance(kernel, Autotuner) else [
            triton.Config({}, num_warps=kwargs.get("num_warps", 4))]  # a fixed launch: its own num_warps
        for config in configs:
            values = {**dict(zip(fn.arg_names, args)), **kwargs, **config.kwargs}
            signature, constexprs, attrs = {}, {}, {}
            for index, param in enumerate(fn.params):
                value = values[param.name]
                if param.is_constexpr or value is None or (
                        isinstance(value, int) and not isinstance(value, bool) and value == 1):
                    signature[param.name], constexprs[param.name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    signature[param.name] = _TRITON_TYPES[value.dtype]
                    if value.data_ptr() % 16 == 0:  # what the JIT tells the compiler: 16-byte aligned
                        attrs[(index,)] = [["tt.divisibility", 16]]
                elif isinstance(value, int):
                    signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                    if value % 16 == 0:  # divisible by 16, as the JIT specializes it
                        attrs[(index,)] = [["tt.divisibility", 16]]
                elif isinstance(value, float):
                    signature[param.name] = "fp32"
                else:
                    raise TypeError(f"{fn.__name__}: argument {param.name} = {value!r}")
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
            assert compiled.asm["cubin"]
            record = dict(kernel=fn.__name__, case=case, num_warps=config.num_warps, loops=[],
                          constexprs={k: v for k, v in constexprs.items() if isinstance(v, (bool, int, float))})
            if cuobjdump is not None:
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                (loops,) = sass.functions(cubin, cuobjdump).values()
                record["loops"] = [dict(loads=loop.global_loads, stores=loop.global_stores,
                                        local=loop.local_accesses, loads128=loop.count(r"LDG\.E(\.E[LF])?\.128"),
                                        evict_last128=loop.count(r"LDG\.E\.EL\.128"),
                                        evict_first128=loop.count(r"LDG\.E\.EF\.128"),
                                        stores128=loop.count(r"STG\.E\.128")) for loop in loops if loop.streams]
            records.append(record)
    scratch.cleanup()
    return records


def compiled_without_interpreter(module: str, function: str) -> list[dict]:
    """`module.function()`'s compile records (compile_sm90, compile_per_head_sm90), from a process without
    TRITON_INTERPRET (the interpreter does not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["AUXFUSE_TRITON_REGISTER"] = "1"  # define the ops even without a GPU
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env["PYTHONPATH"] = os.pathsep.join([root, here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    code = f"import json, {module} as t; print(json.dumps(t.{function}()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sm90_kernels():
    return compiled_without_interpreter("test_triton_interpret", "compile_sm90")


def test_kernels_compile_for_sm90(sm90_kernels):
    """The interpreter runs Python, not the compiler: every kernel variant compiles for Hopper (no GPU needed;
    Triton ships ptxas)."""
    names = [r["kernel"] for r in sm90_kernels]
    for kernel in ("_forward_kernel", "_backward_kernel", "_finalize_kernel", "_denom_kernel", "_scale_kernel"):
        assert kernel in names
    assert names.count("_forward_kernel") >= 8  # both grad modes, every wide config


def test_kernels_machine_code(sm90_kernels):
    """What the compiled kernels' speed rests on (tests/sass.py reads their sm_90 machine code):
    - LM rows (the wide path, C divisible by 16) and NCHW segmentation tiles (read along the spatial axis)
      stream with 16-byte loads; in grad-in-forward mode the first pass loads with evict-last and the second
      with evict-first, so the data stays in L2 between them, and the gradient goes out in 16-byte stores;
      the lse backward and the scale kernel likewise;
    - no register spill in any loop that streams memory (at most one local access per iteration)."""
    if not any(r["loops"] for r in sm90_kernels):
        pytest.skip("no cuobjdump (CUDA_HOME/bin or Triton's copy) to read the machine code with")

    def most(record, fact):
        return max((loop[fact] for loop in record["loops"]), default=0)

    streamed = [r for r in sm90_kernels if r["case"] in ("lm", "seg")]
    assert {r["case"] for r in streamed} == {"lm", "seg"}
    for r in streamed:
        what = f"{r['case']}: {r['kernel']} {r['constexprs']} num_warps={r['num_warps']}"
        if r["kernel"] == "_forward_kernel" and r["constexprs"].get("GRAD"):
            assert most(r, "evict_last128") >= 2 and most(r, "evict_first128") >= 2, what
            assert most(r, "stores128") >= 2, what
        elif r["kernel"] == "_forward_kernel":
            assert most(r, "loads128") >= 2, what
        elif r["kernel"] == "_backward_kernel":
            assert most(r, "loads128") >= 2 and most(r, "stores128") >= 2, what
    for r in sm90_kernels:
        if r["kernel"] == "_scale_kernel":
            assert most(r, "loads128") >= 1 and most(r, "stores128") >= 1, r
        assert most(r, "local") <= 1, f"{r['kernel']} ({r['case']}, {r['constexprs']}): spills in {r['loops']}"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_head_targets(reduction):
    """One target per head (deep supervision, multi-task): each head's own shape, class count and target, on
    the triton backend, against the float64 naive loop."""
    g = generator(("per-head", reduction))
    heads = [torch.randn(shape, generator=g).to(DEVICE) for shape in ((2, NARROW_C, 4, 3), (2, NARROW_C, 2, 2),
                                                                     (5, WIDE_C))]
    targets = [_index_target((2, 4, 3), NARROW_C, ignore_frac=0.2, seed=11),
               _index_target((2, 2, 2), NARROW_C, seed=12), _index_target((5,), WIDE_C, seed=13)]
    check_per_head("triton", heads, targets, [1.0, 0.5, 0.25], reduction=reduction, label_smoothing=0.1,
                   class_weights=[_class_weight(NARROW_C), None, _class_weight(WIDE_C)])
