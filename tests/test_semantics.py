"""Design §2 for every backend that runs on this machine's CPU: equal to the naive weighted sum of
F.cross_entropy in the loss, every head's gradient and the details, for every option."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import auxfuse
from oracle import BASE_SEED, assert_matches_reference, check_backend, generator, to_reference

CPU_BACKENDS = [name for name in ("torch", "cpu") if auxfuse.available_backends()[name] is None]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [  # (logits shape, class-index target shape)
    ((3, 423), (3,)),
    ((17, 5), (17,)),
    ((7,), ()),
    ((2, 6, 5, 4), (2, 5, 4)),
    ((2, 3, 7), (2, 7)),
]


def _make(shape, target_shape, dtype, num_heads, prob, seed, ignore_some=True):
    g = generator(seed)
    heads = [(torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(num_heads)]
    C = shape[1] if len(shape) > 1 else shape[0]
    if prob:
        class_dim = 1 if len(shape) > 1 else 0
        target = torch.softmax(torch.randn(shape, generator=g) * 2, dim=class_dim).to(dtype)
    else:
        target = torch.randint(0, C, target_shape, generator=g)
        if ignore_some and target.numel() > 1:
            target.view(-1)[:: 3] = -100
    return heads, target, C


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, target_shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_every_option(backend, shape, target_shape, reduction, prob):
    for seed, (dtype, smoothing, class_weight) in enumerate(
        itertools.product(DTYPES, [0.0, 0.15], [False, True])
    ):
        heads, target, C = _make(shape, target_shape, dtype, 3, prob, seed)
        weight = torch.rand(C, generator=generator(seed)) + 0.1 if class_weight else None
        check_backend(backend, heads, target, [1.0, 0.3, 0.7], reduction=reduction,
                      label_smoothing=smoothing, weight=weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_heads", [1, 2, 5, 16])
def test_head_counts(backend, num_heads):
    heads, target, _ = _make((9, 11), (9,), torch.float32, num_heads, False, num_heads)
    check_backend(backend, heads, target, [0.1 * (i + 1) for i in range(num_heads)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_ignore_index_and_all_ignored(backend, reduction):
    heads, target, _ = _make((6, 4), (6,), torch.float32, 2, False, 0, ignore_some=False)
    target[1] = 255
    check_backend(backend, heads, target, [1.0, 0.5], ignore_index=255, reduction=reduction, label_smoothing=0.1)
    all_ignored = torch.full((6,), 255)
    out = check_backend(backend, heads, all_ignored, [1.0, 0.5], ignore_index=255, reduction=reduction)
    assert int(out.count) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    for reduction in ("mean", "sum", "none"):
        heads = [torch.randn(0, 5), torch.randn(0, 5)]
        check_backend(backend, heads, torch.zeros(0, dtype=torch.long), [1.0, 0.4], reduction=reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_and_non_contiguous_heads(backend):
    g = generator(3)
    base = torch.randn(2, 5, 6, 7, generator=g)
    channels_last = base.to(memory_format=torch.channels_last)
    transposed = torch.randn(2, 5, 7, 6, generator=g).transpose(2, 3)  # neither layout
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    check_backend(backend, [channels_last, channels_last * 0.5], target, [1.0, 0.5])
    check_backend(backend, [base, transposed], target, [1.0, 0.5], label_smoothing=0.2)
    wide = torch.randn(8, 30, generator=g)[:, ::3]  # (8, 10) with class stride 3
    check_backend(backend, [wide, wide.t().contiguous().t()], torch.randint(0, 10, (8,), generator=g), [1.0, 0.3])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_confident_bf16_predictions(backend):
    # p at the true class rounds to 1 in bf16: the gradient p - 1 must come from fp32, not from bf16 rounding.
    x = torch.full((4, 50), -20.0)
    target = torch.arange(4)
    x[torch.arange(4), target] = 20.0
    check_backend(backend, [x.bfloat16(), (x * 0.5).bfloat16()], target, [1.0, 0.3])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_and_masked_logits(backend):
    x = torch.randn(5, 8) * 1e4
    x[:, 0] = float("-inf")  # a masked class, never the target
    target = torch.tensor([1, 2, 3, 4, 5])
    check_backend(backend, [x, x.flip(1).contiguous()], target, [1.0, 0.3])


# The examples follow AUXFUSE_TEST_SEED (no example database: a run never replays another run's examples).
@seed(BASE_SEED)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.integers(1, 6),
    classes=st.integers(1, 40),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    num_heads=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    class_weight=st.booleans(),
    prob=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_inputs_match_naive(batch, classes, spatial, num_heads, dtype, reduction, smoothing,
                                   class_weight, prob, seed):
    shape, target_shape = (batch, classes, *spatial), (batch, *spatial)
    heads, target, C = _make(shape, target_shape, dtype, num_heads, prob, seed)
    g = generator(seed + 1)
    weight = torch.rand(C, generator=g) if class_weight else None
    head_weights = (torch.rand(num_heads, generator=g) * 2).tolist()
    for backend in CPU_BACKENDS:
        check_backend(backend, heads, target, head_weights, reduction=reduction, label_smoothing=smoothing,
                      weight=weight)


def test_gradients_wrt_probability_targets_and_class_weights():
    g = generator(4)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    target = torch.softmax(torch.randn(4, 6, generator=g), 1).requires_grad_(True)
    weight = (torch.rand(6, generator=g) + 0.5).requires_grad_(True)
    loss = auxfuse.multi_head_cross_entropy((x, x * 2), target, weight=weight, label_smoothing=0.1)
    inputs64 = [to_reference(t).requires_grad_(True) for t in (x, target, weight)]
    x64, target64, weight64 = inputs64
    ref = sum(w * torch.nn.functional.cross_entropy(h, target64, weight=weight64, label_smoothing=0.1)
              for w, h in ((1.0, x64), (0.3, x64 * 2)))
    assert_matches_reference(loss, ref, torch.float32, msg="loss")
    ours = torch.autograd.grad(loss, (x, target, weight))
    theirs = torch.autograd.grad(ref, inputs64)
    for name, a, b in zip(("logits", "target", "class weight"), ours, theirs):
        assert_matches_reference(a, b, torch.float32, 6, msg=name)
