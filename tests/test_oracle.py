"""The oracle's own promises: its tolerance for fp32 inputs is one that PyTorch's fp32 naive sum meets against
the float64 naive sum (so no backend is held to more than PyTorch gives), yet it catches a real error; and its
generators depend on the base seed and the draw site only."""

import itertools

import pytest
import torch

from oracle import assert_matches_reference, generator, naive_loss, random_grad_output

SHAPES = [(5, 15), (3, 423), (2, 1000), (1, 4099), (300, 257), (2, 6, 185), (2, 1000, 21), (2, 32000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_pytorch_meets_the_fp32_tolerance(shape):
    g = generator(shape)
    C = shape[1]
    x = torch.randn(shape, generator=g) * 4
    target = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    weight = torch.rand(C, generator=g) + 0.2
    for reduction, smoothing, class_weight in itertools.product(("mean", "sum", "none"), (0.0, 0.1), (None, weight)):
        results = []
        for dtype in (torch.float32, torch.float64):
            xi = x.to(dtype).requires_grad_(True)
            cw = None if class_weight is None else class_weight.to(dtype)
            loss = naive_loss([xi, xi * 0.5], target, [1.0, 0.4], weight=cw, reduction=reduction,
                              label_smoothing=smoothing)
            (grad,) = torch.autograd.grad(loss, xi, random_grad_output(loss).to(dtype))
            results.append((loss, grad))
        (loss32, grad32), (loss64, grad64) = results
        assert_matches_reference(loss32, loss64, torch.float32, msg=f"{reduction} {smoothing} loss")
        assert_matches_reference(grad32, grad64, torch.float32, C, msg=f"{reduction} {smoothing} gradient")


def test_fp32_tolerance_catches_an_error():
    """One gradient element off by 1e-4 of the gradient's scale (about 1 here) fails: the tolerance is not
    vacuous."""
    g = generator(1)
    x = torch.randn(64, 1000, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randint(0, 1000, (64,), generator=g)
    (grad,) = torch.autograd.grad(naive_loss([x], target, [1.0], reduction="sum"), x)
    wrong = grad.clone()
    wrong[3, 7] += 1e-4 * grad.abs().max()
    assert_matches_reference(grad.float(), grad, torch.float32, 1000)
    with pytest.raises(AssertionError):
        assert_matches_reference(wrong.float(), grad, torch.float32, 1000)


def test_generators_depend_on_the_site_only():
    a = torch.rand(4, generator=generator(3))
    torch.rand(100)  # the global generator's state does not matter
    assert torch.equal(torch.rand(4, generator=generator(3)), a)
    assert not torch.equal(torch.rand(4, generator=generator(4)), a)
