"""The fused C++ CPU kernel (csrc/cpu/multihead_ce.cpp) against the naive sum of F.cross_entropy: every option,
layout and dtype, both of its ops under torch.library.opcheck, gradcheck in fp64, bitwise determinism across
runs and thread counts, and invalid targets."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from oracle import assert_matches_reference, check_backend, generator, naive_loss, random_grad_output, to_reference

pytestmark = pytest.mark.skipif(
    auxfuse.available_backends()["cpu"] is not None, reason=f"no CPU kernel: {auxfuse.available_backends()['cpu']}"
)

OPS = torch.ops.auxfuse
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["classifier", "spatial", "channels_last", "strided_classes", "transposed", "strided_spatial",
           "few_classes", "few_classes_transposed"]


def _logits(layout, dtype, g, scale=3.0):
    """One head in `layout`: the kernel's row path (classifier, channels_last, strided class dim) or its
    spatial-tile path (spatial, strided spatial dim; and classifiers of at most 24 classes, rows in the vector
    lanes: few_classes). Odd sizes everywhere."""
    rand = lambda *shape: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    if layout == "classifier":
        return rand(3, 423)
    if layout == "spatial":
        return rand(2, 6, 5, 37)  # S = 185: full 16-lane vectors plus a tail
    if layout == "channels_last":
        return rand(2, 19, 5, 7).contiguous(memory_format=torch.channels_last)
    if layout == "strided_classes":
        return rand(5, 2 * 67)[:, ::2]  # class stride 2
    if layout == "transposed":
        return rand(41, 6).t()  # (6, 41) with class stride 6, row stride 1
    if layout == "strided_spatial":
        return rand(2, 5, 3, 2 * 9)[..., ::2]  # (N, C, S) view with spatial stride 2
    if layout == "few_classes":
        return rand(37, 11)  # rows in lanes: two full vectors of rows and a tail
    if layout == "few_classes_transposed":
        return rand(13, 40).t()  # (40, 13) with class stride 40, row stride 1
    raise AssertionError(layout)


STRIDED = {  # layouts whose views oracle.check_backend's clone() would make contiguous: (base shape, view)
    "strided_classes": ((5, 2 * 67), lambda b: b[:, ::2]),
    "strided_spatial": ((2, 5, 3, 2 * 9), lambda b: b[..., ::2]),
}


def _check_strided_view(layout, dtype, num_heads, g, target_fn, weights, **options):
    """check_backend's loss and gradient comparison for heads that are strided views of leaf tensors."""
    shape, view = STRIDED[layout]
    bases = [(torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_(True) for _ in range(num_heads)]
    ref_bases = [to_reference(b).requires_grad_(True) for b in bases]
    heads = [view(b) for b in bases]
    target = target_fn(heads[0])
    out = auxfuse.multi_head_cross_entropy(heads, target, weights, backend="cpu", return_details=True, **options)
    ref_options = {k: to_reference(v) for k, v in options.items()}
    ref = naive_loss([view(b) for b in ref_bases], to_reference(target), weights, **ref_options)
    assert_matches_reference(out.loss, ref, dtype, msg="loss")
    grad_output = random_grad_output(ref)
    ours = torch.autograd.grad(out.loss, bases, grad_output.to(out.loss.dtype))
    theirs = torch.autograd.grad(ref, ref_bases, grad_output)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        assert_matches_reference(a, b, dtype, heads[0].shape[1], msg="gradient")


def _target(x, prob, g, ignore_index=-100):
    C = x.shape[1]
    if prob:
        return torch.softmax(torch.randn(x.shape, generator=g) * 2, dim=1).to(x.dtype)
    target = torch.randint(0, C, (x.shape[0],) + tuple(x.shape[2:]), generator=g)
    target.view(-1)[1::4] = ignore_index
    return target


def test_layouts_reach_both_kernel_paths():
    """The layouts above really are what the kernel sees (a view, not a copy, with the intended strides)."""
    g = generator(0)
    expect = {  # (class stride == 1, S > 1)
        "classifier": (True, False), "spatial": (False, True), "channels_last": (True, True),
        "strided_classes": (False, False), "transposed": (False, False), "strided_spatial": (False, True),
        "few_classes": (True, False), "few_classes_transposed": (False, False),
    }
    for layout, (unit_class_stride, spatial) in expect.items():
        x = _logits(layout, torch.float32, g)
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        assert rows.data_ptr() == x.data_ptr(), layout
        assert (rows.stride(1) == 1) == unit_class_stride and (rows.shape[2] > 1) == spatial, layout
    assert _logits("strided_spatial", torch.float32, g).reshape(2, 5, -1).stride(2) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_every_option(layout, reduction, prob):
    """dtype x label smoothing x class weight, 1..4 heads, random grad_output, ignore_index -100 and a custom one."""
    for seed, (dtype, smoothing, class_weight) in enumerate(itertools.product(DTYPES, [0.0, 0.2], [False, True])):
        g = generator(seed)
        num_heads = 1 + seed % 4
        ignore_index = -100 if seed % 2 or prob else 3  # a valid class index can be the ignored one
        C = _logits(layout, dtype, g).shape[1]
        weight = torch.rand(C, generator=g) + 0.2 if class_weight else None
        weights = [1.0, 0.3, 0.7, 0.45][:num_heads]
        options = dict(reduction=reduction, label_smoothing=smoothing, weight=weight, ignore_index=ignore_index)
        if layout in STRIDED:
            _check_strided_view(layout, dtype, num_heads, g, lambda x: _target(x, prob, g, ignore_index), weights,
                                **options)
        else:
            heads = [_logits(layout, dtype, g) for _ in range(num_heads)]
            check_backend("cpu", heads, _target(heads[0], prob, g, ignore_index), weights, **options)


@pytest.mark.parametrize("shape", [(4, 1), (5, 15), (3, 16), (2, 64), (3, 65), (2, 1000), (1, 4099), (17, 3),
                                   (33, 24), (40, 25), (1, 7)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vector_tails(shape, reduction):
    """Class counts around the vector width and the unrolled loops."""
    g = generator(shape[1])
    heads = [torch.randn(shape, generator=g) * 4 for _ in range(2)]
    target = torch.randint(0, shape[1], shape[:1], generator=g)
    check_backend("cpu", heads, target, [1.0, 0.4], reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("spatial", [(1, 1), (3, 5), (16, 1), (17, 1), (300, 1), (257, 3), (2049, 1), (45, 91)])
def test_spatial_tiles(spatial):
    """Spatial sizes around the vector width (16 lanes) and the tile width (up to 2048 positions)."""
    g = generator(sum(spatial))
    heads = [torch.randn((2, 21) + spatial, generator=g) for _ in range(2)]
    target = torch.randint(0, 21, (2,) + spatial, generator=g)
    target.view(-1)[::7] = -100
    check_backend("cpu", heads, target, [1.0, 0.5], label_smoothing=0.1, weight=torch.rand(21, generator=g) + 0.1)


@pytest.mark.parametrize("prob", [False, True])
def test_spatial_many_classes(prob):
    """The spatial path keeps a vector of rows' C logits in a C x 16 buffer: C = 1000 (ImageNet classes per
    pixel) with a spatial tail, every reduction. Against the naive sum in fp64: here PyTorch's own fp32 gradient
    is off by up to 1.2e-5 (reduction none, smoothing), the kernel's by 2.5e-7."""
    g = generator(5)
    heads = [torch.randn(2, 1000, 3, 7, generator=g) * 3 for _ in range(3)]
    target = _target(heads[0], prob, g)
    for reduction in ("mean", "sum", "none"):
        ours_in = [h.clone().requires_grad_(True) for h in heads]
        ref_in = [h.double().requires_grad_(True) for h in heads]
        options = dict(label_smoothing=0.1, reduction=reduction)
        loss = auxfuse.multi_head_cross_entropy(ours_in, target, [1.0, 0.3, 0.3], backend="cpu", **options)
        ref = naive_loss(ref_in, target.double() if prob else target, [1.0, 0.3, 0.3], **options)
        assert_matches_reference(loss, ref, torch.float32, msg=reduction)
        grad_output = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
        for a, b in zip(torch.autograd.grad(loss, ours_in, grad_output.float()),
                        torch.autograd.grad(ref, ref_in, grad_output)):
            assert_matches_reference(a, b, torch.float32, 1000, msg=reduction)


def test_many_blocks_and_heads():
    """Enough rows for many blocks on every thread; eight heads."""
    g = generator(1)
    heads = [torch.randn(300, 257, generator=g) for _ in range(8)]
    target = torch.randint(0, 257, (300,), generator=g)
    check_backend("cpu", heads, target, [0.1 * (i + 1) for i in range(8)])
    heads = [torch.randn(3, 7, 91, 45, generator=g) for _ in range(3)]
    check_backend("cpu", heads, torch.randint(0, 7, (3, 91, 45), generator=g), [1.0, 0.3, 0.3])


@pytest.mark.parametrize("grad_output", ["1", "random"])
def test_grad_output(grad_output):
    g = generator(2)
    heads = [torch.randn(6, 33, generator=g) for _ in range(3)]
    for reduction in ("mean", "sum", "none"):
        check_backend("cpu", heads, torch.randint(0, 33, (6,), generator=g), [1.0, 0.3, 0.3],
                      grad_output=grad_output, reduction=reduction)


@pytest.mark.parametrize("layout", ["classifier", "spatial"])
def test_confident_bf16_keeps_p_minus_1(layout):
    """A confident prediction: p_y = 1 - 1e-4 rounds to 1.0 in bf16, so a kernel that forms p in bf16 before
    subtracting 1 returns 0 at the true class. The gradient there must be -(1 - p_y) to bf16 precision."""
    g = generator(3)
    C = 1000 if layout == "classifier" else 40
    shape = (8, C) if layout == "classifier" else (2, C, 4, 5)
    margin = 16.0 if layout == "classifier" else 12.5
    x = torch.randn(shape, generator=g) * 0.1
    target = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    x.scatter_(1, target.unsqueeze(1), margin, reduce="add")
    heads = [x.to(torch.bfloat16).requires_grad_(True)]
    loss = auxfuse.multi_head_cross_entropy(heads, target, [1.0], reduction="sum", backend="cpu")
    (grad,) = torch.autograd.grad(loss, heads)
    ref_in = to_reference(heads[0]).requires_grad_(True)
    (ref,) = torch.autograd.grad(F.cross_entropy(ref_in, target, reduction="sum"), ref_in)
    at_target = lambda t: t.gather(1, target.unsqueeze(1))  # noqa: E731
    assert (at_target(ref) < -1e-5).all() and (at_target(ref) > -1e-3).all()  # the regime described above
    torch.testing.assert_close(at_target(grad).double(), at_target(ref), rtol=1e-2, atol=0)
    check_backend("cpu", heads, target, [1.0], reduction="sum")


def test_large_logits():
    """Shift invariance: with label smoothing and probability targets the loss needs sum_c w_c x_c, which cancels
    against C * lse unless taken relative to the max (offset 1e5: every sum is ~1e7 in fp32)."""
    g = generator(4)
    for offset, scale in ((1e5, 1.0), (1e4, 1.0), (0.0, 60.0), (-3e4, 20.0)):
        weight = torch.rand(300, generator=g) + 0.5
        heads = [torch.randn(5, 300, generator=g) * scale + offset for _ in range(2)]
        check_backend("cpu", heads, torch.randint(0, 300, (5,), generator=g), [1.0, 0.4], label_smoothing=0.1,
                      weight=weight)
        prob = torch.softmax(torch.randn(5, 300, generator=g), 1)
        check_backend("cpu", heads, prob, [1.0, 0.4], label_smoothing=0.1, weight=weight)
        heads = [torch.randn(2, 9, 20, generator=g) * scale + offset for _ in range(2)]
        check_backend("cpu", heads, torch.randint(0, 9, (2, 20), generator=g), [1.0, 0.4], label_smoothing=0.2)
        check_backend("cpu", heads, torch.softmax(torch.randn(2, 9, 20, generator=g), 1), [1.0, 0.4],
                      label_smoothing=0.2)


def test_ties_count_first_maximum():
    """head_correct uses argmax's first maximum: integer logits with many ties."""
    g = generator(5)
    for shape in ((64, 37), (4, 5, 6, 7)):
        heads = [torch.randint(0, 3, shape, generator=g).float() for _ in range(2)]
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
        out = check_backend("cpu", heads, target, [1.0, 0.3])
        assert int(out.head_correct.sum()) > 0
        prob = torch.softmax(torch.randint(0, 2, shape, generator=g).float(), 1)  # tied target maxima too
        check_backend("cpu", heads, prob, [1.0, 0.3])


def test_a_nan_logit_is_the_argmax_of_its_row():
    """head_correct counts torch.argmax's hits: a NaN is the maximum (the first NaN of a row); among equal maxima
    the first. Shared-target and per-head calls (both read rows through the same hit test)."""
    nan = float("nan")
    x = torch.zeros(5, 6)
    x[0, 2] = nan          # target 2: the NaN, a hit
    x[1, 1] = x[1, 3] = nan  # target 3: a NaN, but not the first
    x[2, 4] = nan          # target 0: a maximum of the others, not the NaN
    x[3, 5] = 1.0          # target 5: the maximum
    # row 4: all equal, target 1: not the first maximum
    target = torch.tensor([2, 3, 0, 5, 1])
    hits = int((x.argmax(1) == target).sum())
    assert hits == 2
    out = auxfuse.multi_head_cross_entropy(x, target, backend="cpu", return_details=True)
    assert int(out.head_correct[0]) == hits
    out = auxfuse.multi_head_cross_entropy([x, x[:, :5]], [target, target.clamp(max=4)], backend="cpu",
                                           return_details=True)
    assert out.head_correct.tolist() == [hits, int((x[:, :5].argmax(1) == target.clamp(max=4)).sum())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("classes", [70, 423])
def test_row_path_rows_with_nan_or_inf_logits(classes, dtype):
    """The row path's pass 1 takes the max ignoring NaN and scans a row again for the true max only when its sum
    of exponentials comes out NaN (row_pass1): a NaN in the first 64 classes or in the tail, a +inf, a row of -inf,
    a NaN as the target, a NaN beside a target that holds the others' max, a single -inf: loss (NaN rows),
    gradients and argmax hits as the naive loop's, for both heads of a shared target."""
    nan, inf = float("nan"), float("inf")
    g = generator(("nan rows", classes))
    x = torch.randn(9, classes, generator=g)
    target = torch.randint(0, classes, (9,), generator=g)
    x[0, 3] = nan
    x[1, classes - 2] = nan
    x[2, 5] = inf
    x[3] = -inf
    x[4, 7], target[4] = nan, 7
    x[5, 9], x[5, 11], target[5] = x[5].max() + 1, nan, 9
    x[6, 1] = -inf
    x[7, 2], x[7, classes - 1], target[7] = inf, nan, 2
    for reduction in ("none", "sum"):
        check_backend("cpu", [x.to(dtype), x.flip(0).to(dtype)], target, [1.0, 0.3], reduction=reduction)


def test_nan_logit_poisons_its_row_only():
    g = generator(6)
    for shape in ((6, 50), (2, 7, 3, 5)):
        heads = [torch.randn(shape, generator=g) for _ in range(2)]
        heads[0].view(-1)[3] = float("nan")
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
        out = check_backend("cpu", heads, target, [1.0, 0.3], reduction="none")
        assert out.loss.isnan().sum() == 1


def test_empty_and_all_ignored():
    """N == 0, and every target ignored: the mean is NaN and the gradients zero, as in PyTorch."""
    for reduction in ("mean", "sum", "none"):
        check_backend("cpu", [torch.randn(0, 5), torch.randn(0, 5)], torch.zeros(0, dtype=torch.long), [1.0, 0.3],
                      reduction=reduction)
        check_backend("cpu", [torch.randn(0, 4, 3, 3)], torch.zeros(0, 3, 3, dtype=torch.long), [1.0],
                      reduction=reduction)
        target = torch.full((4,), -100)
        out = check_backend("cpu", [torch.randn(4, 6), torch.randn(4, 6)], target, [1.0, 0.3], reduction=reduction)
        assert int(out.count) == 0
        check_backend("cpu", [torch.randn(2, 6, 4, 4)], torch.full((2, 4, 4), -100), [1.0], reduction=reduction)
    heads = [torch.randn(4, 6, requires_grad=True)]
    loss = auxfuse.multi_head_cross_entropy(heads, torch.full((4,), -100), backend="cpu")
    loss.backward()
    assert loss.isnan() and torch.equal(heads[0].grad, torch.zeros(4, 6))


@pytest.mark.parametrize("case", ["classifier", "classifier_row_path", "spatial", "channels_last", "prob",
                                  "smooth_weight_none"])
def test_gradcheck_fp64(case):
    g = generator(7)
    options, shape = {}, (3, 7)  # rows in vector lanes (at most 24 classes)
    if case == "classifier_row_path":
        shape = (3, 30)
    elif case == "spatial":
        shape = (2, 4, 3, 2)
    elif case == "channels_last":
        shape = (2, 5, 2, 3)
    x = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    if case == "channels_last":
        x = [h.contiguous(memory_format=torch.channels_last) for h in x]
    x = [h.requires_grad_(True) for h in x]
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    if case == "prob":
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1)
        options = dict(label_smoothing=0.1, weight=torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
    if case == "smooth_weight_none":
        target[0] = -100
        options = dict(label_smoothing=0.2, weight=torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5,
                       reduction="none")

    def fn(*heads):
        return auxfuse.multi_head_cross_entropy(list(heads), target, [1.0, 0.4], backend="cpu", **options)

    assert torch.autograd.gradcheck(fn, x)


def _op_args(shape, dtype=torch.float32, prob=False, weight=False, channels_last=False, seed=0):
    g = generator(seed)
    N, C, S = shape
    heads = []
    for _ in range(2):
        x = torch.randn(N, S, C, generator=g).transpose(1, 2) if channels_last else torch.randn(N, C, S, generator=g)
        heads.append(x.to(dtype).requires_grad_(True))
    if prob:
        target = torch.softmax(torch.randn(N, C, S, generator=g), 1).to(dtype)
    else:
        target = torch.randint(0, C, (N, S), generator=g)
        target[0, 0] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cw = torch.rand(C, generator=g, dtype=acc) + 0.5 if weight else None
    return heads, target, cw


OPCHECK_UTILS = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
OPCHECK_CASES = [
    dict(shape=(5, 9, 1)),
    dict(shape=(5, 9, 1), prob=True, weight=True),
    dict(shape=(2, 5, 6), weight=True),
    dict(shape=(2, 5, 6), channels_last=True),
    dict(shape=(3, 4, 5), dtype=torch.bfloat16, prob=True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_opcheck_forward(case):
    heads, target, cw = _op_args(**case)
    for grad_mode, reduction in ((0, 1), (0, 0), (1, 1), (1, 2), (1, 0), (2, 2), (2, 0)):
        # grad_mode 0 is what Python calls when no head needs a gradient.
        args_heads = [h.detach() for h in heads] if grad_mode == 0 else heads
        torch.library.opcheck(OPS.multihead_ce_forward.default,
                              (args_heads, target, cw, [1.0, 0.3], -100, 0.1, reduction, grad_mode),
                              test_utils=OPCHECK_UTILS)


def test_opcheck_aot_dispatch_grad_in_forward_scalar_loss():
    # make_fx tracing is not torch.compile: the backward must not read grad_output's value there either.
    heads, target, cw = _op_args(shape=(5, 9, 1))
    torch.library.opcheck(OPS.multihead_ce_forward.default, (heads, target, cw, [1.0, 0.3], -100, 0.1, 1, 1),
                          test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_opcheck_backward(case):
    heads, target, cw = _op_args(**case)
    heads = [h.detach() for h in heads]
    for reduction in (0, 1, 2):
        _, _, _, _, denom, lse, _ = OPS.multihead_ce_forward(heads, target, cw, [1.0, 0.3], -100, 0.1, reduction, 2)
        N, _, S = heads[0].shape
        grad_loss = torch.rand(N, S) + 0.5 if reduction == 0 else torch.tensor(0.7)
        torch.library.opcheck(OPS.multihead_ce_backward.default,
                              (grad_loss.to(lse.dtype), heads, target, cw, [1.0, 0.3], -100, 0.1, reduction, lse, denom))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_backward_op_equals_gradient_in_forward(case):
    """The lse-based backward op (CUDA's production path) and the gradient computed in the forward (grad_mode 1)
    agree, and both equal autograd through the naive sum."""
    heads, target, cw = _op_args(**case, seed=1)
    heads = [h.detach() for h in heads]
    dtype = heads[0].dtype
    for reduction in (0, 1, 2):
        args = (target, cw, [1.0, 0.3], -100, 0.1, reduction)
        _, _, _, _, denom, grads, _ = OPS.multihead_ce_forward(heads, *args, 1)
        _, _, _, _, denom2, lse, _ = OPS.multihead_ce_forward(heads, *args, 2)
        N, C, S = heads[0].shape
        grad_loss = torch.rand(N, S, generator=generator(reduction)) + 0.5 if reduction == 0 else torch.tensor(0.7)
        from_lse = OPS.multihead_ce_backward(grad_loss, heads, *args, lse, denom2)
        assert from_lse.shape == grads.shape and from_lse.stride() == grads.stride() and from_lse.dtype == dtype
        ref_in = [to_reference(h).requires_grad_(True) for h in heads]
        red = ("none", "mean", "sum")[reduction]
        ref = naive_loss(ref_in, to_reference(target), [1.0, 0.3], weight=to_reference(cw), reduction=red,
                         label_smoothing=0.1)
        ref_grads = torch.stack(torch.autograd.grad(ref, ref_in, to_reference(grad_loss)))
        scaled = to_reference(grads) * to_reference(grad_loss.unsqueeze(1) if reduction == 0 else grad_loss)
        assert_matches_reference(scaled, ref_grads, dtype, C, msg=f"grad_mode 1, {red}")
        assert_matches_reference(from_lse, ref_grads, dtype, C, msg=f"grad_mode 2, {red}")


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_autograd_of_both_grad_modes(case):
    """csrc/autograd.cpp through torch.ops with heads that need gradients: grad_mode 1 (the CPU path) and
    grad_mode 2 (the CUDA path, run here with the CPU ops) give autograd through the naive sum, for a random
    grad_output and grad_output 1, with and without a kept graph."""
    heads, target, cw = _op_args(**case, seed=2)
    dtype = heads[0].dtype
    N, C, S = heads[0].shape
    for reduction, grad_mode in itertools.product((0, 1, 2), (1, 2)):
        ref_in = [to_reference(h).requires_grad_(True) for h in heads]
        ref = naive_loss(ref_in, to_reference(target), [1.0, 0.3], weight=to_reference(cw),
                         reduction=("none", "mean", "sum")[reduction], label_smoothing=0.1)
        for grad_loss in (random_grad_output(ref), torch.ones_like(ref)):
            ref_grads = torch.autograd.grad(ref, ref_in, grad_loss, retain_graph=True)
            ours_in = [h.detach().clone().requires_grad_(True) for h in heads]
            loss = OPS.multihead_ce_forward(ours_in, target, cw, [1.0, 0.3], -100, 0.1, reduction, grad_mode)[0]
            assert "MultiheadCrossEntropy" in loss.grad_fn.name()
            ours_grad_loss = grad_loss.reshape(loss.shape).to(loss.dtype)
            kept = torch.autograd.grad(loss, ours_in, ours_grad_loss, retain_graph=True)
            freed = torch.autograd.grad(loss, ours_in, ours_grad_loss)
            for k, f, r in zip(kept, freed, ref_grads):
                assert k.dtype == dtype and k.shape == (N, C, S)
                assert_matches_reference(k, r, dtype, C, msg="kept graph")
                assert_matches_reference(f, r, dtype, C, msg="freed graph")


def _snapshot(heads, target, **options):
    heads = [h.detach().clone().requires_grad_(True) for h in heads]
    out = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.3, 0.3], backend="cpu", return_details=True,
                                           **options)
    out.loss.sum().backward()
    return [out.loss, out.head_losses, out.head_correct, out.count] + [h.grad for h in heads]


@pytest.mark.parametrize("layout", ["classifier", "few_classes", "spatial", "channels_last"])
def test_bitwise_deterministic_across_runs_and_threads(layout):
    g = generator(8)
    if layout in ("classifier", "few_classes"):
        N, C = (512, 1000) if layout == "classifier" else (9000, 10)  # few classes: several tiles of rows
        heads = [torch.randn(N, C, generator=g) * 3 for _ in range(3)]
        target = torch.randint(0, C, (N,), generator=g)
    else:
        heads = [torch.randn(4, 21, 48, 40, generator=g) * 3 for _ in range(3)]
        if layout == "channels_last":
            heads = [h.contiguous(memory_format=torch.channels_last) for h in heads]
        target = torch.randint(0, 21, (4, 48, 40), generator=g)
    target.view(-1)[::5] = -100
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            for reduction in ("mean", "none"):
                results.append((n, reduction, _snapshot(heads, target, reduction=reduction, label_smoothing=0.1)))
    finally:
        torch.set_num_threads(threads)
    for n, reduction, tensors in results:
        first = next(r for _, red, r in results if red == reduction)
        for a, b in zip(first, tensors):
            assert torch.equal(a, b), f"{layout} reduction={reduction} threads={n}"


@pytest.mark.parametrize("shape", [(64, 333, 1), (3, 21, 77)])
def test_bitwise_deterministic_at_any_address(shape):
    """No alignment-dependent code path: the same values at differently aligned addresses give the same bits."""
    g = generator(9)
    numel = shape[0] * shape[1] * shape[2]
    values = [torch.randn(numel, generator=g) for _ in range(3)]
    target = torch.randint(0, shape[1], (shape[0], shape[2]), generator=g)
    results = []
    for offset in (0, 1, 3, 16):
        heads = []
        for v in values:
            buffer = torch.zeros(numel + 16)
            buffer[offset:offset + numel] = v
            heads.append(buffer[offset:offset + numel].view(shape))
        assert heads[0].data_ptr() % 64 == (offset * 4) % 64
        for grad_mode in (1, 2):
            results.append(OPS.multihead_ce_forward(heads, target, None, [1.0, 0.3, 0.3], -100, 0.1, 1, grad_mode))
    for other in results[2:]:
        first = results[0] if other[5].dim() == 4 else results[1]
        for a, b in zip(first, other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["classifier", "spatial"])
@pytest.mark.parametrize("bad", [-1, 7, 10**12])
def test_invalid_target_raises_before_writing(layout, bad):
    g = generator(10)
    shape = (4, 7) if layout == "classifier" else (4, 7, 3, 3)
    heads = [torch.randn(shape, generator=g) for _ in range(2)]
    rows = [h.reshape(4, 7, -1) for h in heads]
    target = torch.randint(0, 7, (4, rows[0].shape[2]), generator=g)
    target[2, -1] = bad
    before = [h.clone() for h in heads]
    for grad_mode in (0, 1, 2):
        with pytest.raises(ValueError, match=f"target value {bad} "):
            OPS.multihead_ce_forward(rows, target, None, [1.0, 0.3], -100, 0.0, 1, grad_mode)
    lse = torch.zeros(2, 4, rows[0].shape[2])
    with pytest.raises(ValueError, match=f"target value {bad} "):
        OPS.multihead_ce_backward(torch.tensor(1.0), rows, target, None, [1.0, 0.3], -100, 0.0, 1, lse,
                                  torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(heads, before))
    with pytest.raises(ValueError, match=str(bad)):  # the public API says the same
        auxfuse.multi_head_cross_entropy(heads, target.view((4,) + shape[2:]), backend="cpu")


def test_many_targets_parallel_scan():
    """Over 1M targets the target pre-pass runs in parallel blocks: count and mean divisor still exact, and the
    first invalid target (in block order) is the one reported."""
    g = generator(11)
    S = 1_100_000
    heads = [torch.randn(1, 3, S, generator=g)]
    target = torch.randint(0, 3, (1, S), generator=g)
    target[0, ::7] = -100
    weight = torch.tensor([0.5, 1.0, 2.0])
    out = OPS.multihead_ce_forward(heads, target, weight, [1.0], -100, 0.0, 1, 0)
    counted = target != -100
    assert int(out[3]) == int(counted.sum())
    assert float(out[4]) == pytest.approx(float(weight[target[counted]].double().sum()), rel=1e-6)
    target[0, S - 5], target[0, 1_050_000] = 3, 9
    with pytest.raises(ValueError, match=r"target value 9 is outside .*\(flattened position 1050000\)"):
        OPS.multihead_ce_forward(heads, target, weight, [1.0], -100, 0.0, 1, 0)


def test_auto_picks_cpu():
    heads = [torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)]
    target = torch.randint(0, 10, (4,))
    assert auxfuse.explain_backend(heads, target)["chosen"] == "cpu"
    assert auxfuse.explain_backend([h.detach().double() for h in heads], target)["chosen"] == "cpu"
    assert auxfuse.explain_backend([torch.randn(2, 3, 4, 4).bfloat16()], torch.zeros(2, 4, 4).long())["chosen"] == "cpu"
    loss = auxfuse.multi_head_cross_entropy(heads, target)
    assert "MultiheadCrossEntropy" in loss.grad_fn.name()  # csrc/autograd.cpp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scale_grad_op(dtype):
    """grad_mode 1's backward op: in place, nothing when grad_output is 1; schema and fake kernel (opcheck)."""
    grads = torch.randn(2, 5, 7, 3).to(dtype)
    before = grads.clone()
    OPS.multihead_ce_scale_grad_(grads, torch.tensor(1.0))
    assert torch.equal(grads, before)
    OPS.multihead_ce_scale_grad_(grads, torch.tensor(0.5))
    assert torch.equal(grads, before * 0.5)
    torch.library.opcheck(OPS.multihead_ce_scale_grad_.default, (grads, torch.tensor(3.0)))


def _heads_of_layout(layout, g):
    """Two heads of one layout with 11 classes, and the (N, d1, ..., dk) shape of their class-index target."""
    if layout == "classifier":
        return [torch.randn(6, 11, generator=g) for _ in range(2)], (6,)
    if layout == "spatial-1d":
        return [torch.randn(2, 11, 5, generator=g) for _ in range(2)], (2, 5)
    if layout == "nchw":
        return [torch.randn(2, 11, 3, 4, generator=g) for _ in range(2)], (2, 3, 4)
    if layout == "channels_last":
        return [torch.randn(2, 11, 3, 4, generator=g).to(memory_format=torch.channels_last) for _ in range(2)], (2, 3, 4)
    if layout == "volumetric":
        return [torch.randn(2, 11, 2, 3, 2, generator=g) for _ in range(2)], (2, 2, 3, 2)
    assert layout == "no-view"  # classes innermost but H and W swapped in memory: (N, C, S) needs a copy
    return [torch.randn(2, 4, 3, 11, generator=g).permute(0, 3, 2, 1) for _ in range(2)], (2, 3, 4)


HEAD_LAYOUTS = ["classifier", "spatial-1d", "nchw", "channels_last", "volumetric", "no-view"]


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("grad_mode", [1, 2], ids=["grad_in_forward", "save_lse"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_heads_as_they_are(layout, grad_mode, reduction):
    """(N, C, d1, ..., dk) heads and (N, d1, ..., dk) targets reach the op as they are: the same results as
    their (N, C, S) views, gradients handed to each head in its own shape, and opcheck (schema, fake kernel,
    autograd) on that form."""
    g = generator(4)
    heads, index_shape = _heads_of_layout(layout, g)
    heads = [h.requires_grad_(True) for h in heads]
    N, C = heads[0].shape[:2]
    target = torch.randint(0, C, index_shape, generator=g)
    target.view(-1)[1] = -100
    args = (target, None, [1.0, 0.4], -100, 0.1, reduction, grad_mode)
    given = OPS.multihead_ce_forward(heads, *args)
    rows = OPS.multihead_ce_forward([h.reshape(N, C, -1) for h in heads], target.reshape(N, -1), *args[1:])
    for a, b in zip(given[:5], rows[:5]):
        assert torch.equal(a, b)
    grad_loss = torch.rand(given[0].shape, generator=g) + 0.5
    given_grads = torch.autograd.grad(given[0], heads, grad_loss)
    rows_grads = torch.autograd.grad(rows[0], heads, grad_loss)
    for a, b in zip(given_grads, rows_grads):
        assert a.shape == heads[0].shape and torch.equal(a, b)
    torch.library.opcheck(OPS.multihead_ce_forward.default, (heads, *args))


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_probability_targets_as_they_are(layout):
    """(N, C, d1, ..., dk) probability targets are read as (N, C, S) too."""
    g = generator(5)
    heads, _ = _heads_of_layout(layout, g)
    N, C = heads[0].shape[:2]
    target = torch.softmax(torch.randn(heads[0].shape, generator=g), 1)
    args = (None, [1.0, 0.4], -100, 0.0, 1, 1)
    given = OPS.multihead_ce_forward(heads, target, *args)
    rows = OPS.multihead_ce_forward([h.reshape(N, C, -1) for h in heads], target.reshape(N, C, -1), *args)
    for a, b in zip(given[:5], rows[:5]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_loss_has_no_view_nodes(layout):
    """MultiHeadLoss: the fused node's inputs are the heads themselves (no reshape node per head in forward and
    in backward), for classifier and spatial heads alike."""
    heads, index_shape = _heads_of_layout(layout, generator(6))
    heads = [h.requires_grad_(True) for h in heads]
    target = torch.randint(0, heads[0].shape[1], index_shape)
    loss = auxfuse.MultiHeadLoss(weights=(1.0, 0.3), backend="cpu")(tuple(heads), target)
    inputs = [fn for fn, _ in loss.grad_fn.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in inputs] == ["AccumulateGrad"] * 2
    assert [fn.variable for fn in inputs] == heads
