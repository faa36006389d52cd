"""The test oracle: the naive weighted sum of torch.nn.functional.cross_entropy, and one comparison used by
every backend's tests (loss, every gradient, per-head details)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import auxfuse


def naive_loss(heads: Sequence[torch.Tensor], target, weights: Sequence[float], **options) -> torch.Tensor:
    """sum_h w_h * F.cross_entropy(head_h, target, **options): what users write by hand."""
    return sum(w * F.cross_entropy(x, target, **options) for w, x in zip(weights, heads))


def _tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=2e-2, atol=2e-3)  # fp16 / bf16 inputs against an fp32 computation, at element precision


def check_backend(
    backend: str,
    heads: Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float],
    grad_output: str = "random",
    **options,
) -> Optional[auxfuse.MultiHeadLossOutput]:
    """Assert that `backend` equals the naive sum (computed in fp32 / fp64 from the same values) in loss,
    every head's gradient, and the per-head details. `heads` are leaf tensors (requires_grad set here)."""
    dtype = heads[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ours_in = [h.detach().clone().requires_grad_(True) for h in heads]
    ref_in = [h.detach().to(acc).requires_grad_(True) for h in heads]
    ref_target = target.to(acc) if target.is_floating_point() else target
    out = auxfuse.multi_head_cross_entropy(
        list(ours_in), target, list(weights), backend=backend, return_details=True, **options
    )
    ref_options = dict(options)
    if options.get("weight") is not None:
        ref_options["weight"] = options["weight"].to(acc)
    ref = naive_loss(ref_in, ref_target, weights, **ref_options)
    tol = _tolerance(dtype)
    assert out.loss.dtype == acc
    torch.testing.assert_close(out.loss, ref.detach(), equal_nan=True, **tol)
    if grad_output == "random":
        g = torch.rand_like(ref) + 0.5
    else:
        g = torch.full_like(ref, float(grad_output))
    ours_grads = torch.autograd.grad(out.loss, ours_in, g.to(out.loss.dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    for h, (a, b) in enumerate(zip(ours_grads, ref_grads)):
        assert a.dtype == dtype and a.shape == b.shape, f"head {h}"
        torch.testing.assert_close(a.to(acc), b, equal_nan=True, msg=lambda m: f"head {h} gradient: {m}", **tol)
    # Per-head details against each head alone.
    reduction = options.get("reduction", "mean")
    for h, x in enumerate(ref_in):
        single = F.cross_entropy(x.detach(), ref_target, **{**ref_options, "reduction": "mean" if reduction == "none" else reduction})
        torch.testing.assert_close(out.head_losses[h], single, equal_nan=True, **tol)
        class_dim = 1 if x.dim() > 1 else 0
        if target.is_floating_point():
            hits = (x.argmax(class_dim) == ref_target.argmax(class_dim)).sum()
        else:
            hits = ((x.argmax(class_dim) == target) & (target != options.get("ignore_index", -100))).sum()
        assert int(out.head_correct[h]) == int(hits), f"head {h}: {int(out.head_correct[h])} hits, expected {int(hits)}"
    assert int(out.count) == (
        target.numel() // heads[0].shape[1 if heads[0].dim() > 1 else 0] if target.is_floating_point()
        else int((target != options.get("ignore_index", -100)).sum())
    )
    # Every class index passed here is valid (the invalid ones have tests of their own).
    assert out.invalid_targets.dtype == torch.int64 and out.invalid_targets.device == out.loss.device
    assert out.invalid_targets.shape == () and int(out.invalid_targets) == 0
    return out
