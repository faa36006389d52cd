"""The test oracle: the naive weighted sum of torch.nn.functional.cross_entropy computed in float64, the
tolerances every backend is held to, the seeded random generators every test draws from, and one comparison
used by every backend's tests (loss, every gradient, per-head details).

Seeds: every draw comes from ``generator(k)`` (a generator of its own, seeded from the draw site's number k
and the base seed), and the global generator is seeded per test from the test's id and the base seed
(tests/conftest.py), so a test sees the same numbers whatever ran before it. The base seed is the environment
variable ``AUXFUSE_TEST_SEED`` (default 0); the suite must pass for any value.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import auxfuse

BASE_SEED = int(os.environ.get("AUXFUSE_TEST_SEED", "0"))
REFERENCE_DTYPE = torch.float64


def seed_of(key) -> int:
    """A 63-bit seed from `key` (a number or a string such as a test id) and the base seed; stable across
    processes and machines (crc32, not Python's salted hash)."""
    return (zlib.crc32(f"{BASE_SEED}:{key}".encode()) << 31) ^ zlib.crc32(f"{key}:{BASE_SEED}".encode())


def generator(key=0, device="cpu") -> torch.Generator:
    """A torch.Generator of its own for one draw site, seeded from `key` and the base seed.

    Example: ``torch.randn(3, 5, generator=generator(7))``."""
    return torch.Generator(device=device).manual_seed(seed_of(key))


def naive_loss(heads: Sequence[torch.Tensor], target, weights: Sequence[float], **options) -> torch.Tensor:
    """sum_h w_h * F.cross_entropy(head_h, target, **options): what users write by hand."""
    return sum(w * F.cross_entropy(x, target, **options) for w, x in zip(weights, heads))


def to_reference(x):
    """A floating-point tensor (a head, a probability target, a class weight) in float64; anything else as is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(REFERENCE_DTYPE)
    return x


def tolerance(dtype: torch.dtype, expected: torch.Tensor, num_classes: Optional[int] = None) -> dict:
    """assert_close's tolerance for a result computed from `dtype` inputs, against `expected` computed in
    float64 from the same values: a gradient over `num_classes` classes, or (num_classes None) a loss. It is
    what PyTorch's own naive sum in that dtype meets against float64 (tests/test_oracle.py checks fp32):
    - fp32: the error of a gradient grows with the row's length (sums over C classes) and with the gradient's
      scale, so the absolute part is relative to the largest element, times sqrt(C); and it is at least 1e-6
      (the tolerance this project used before): a value near 0 made by cancellation (the loss of a confident
      prediction, its p - 1 at the target, a gradient with C = 1) carries the rounding of the terms that
      cancelled, as large as the logits in float32;
    - fp16 / bf16 inputs: a gradient rounded to the input dtype (about 3 significant digits)."""
    scale = float(expected.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if expected.numel() else 0.0
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12 * max(scale, 1e-3))
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=max(2e-6 * math.sqrt(num_classes or 1) * scale, 1e-6))
    return dict(rtol=2e-2, atol=2e-3 * max(scale, 1e-3))


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype,
                             num_classes: Optional[int] = None, msg: str = "") -> None:
    """`actual` (from `input_dtype` inputs) equals the float64 `expected` within tolerance(): a gradient over
    `num_classes` classes, or (None) a loss. NaN matches NaN."""
    assert expected.dtype == REFERENCE_DTYPE, "the reference is computed in float64"
    tol = tolerance(input_dtype, expected, num_classes)
    prefix = f"{msg}: " if msg else ""
    torch.testing.assert_close(actual.detach().to(REFERENCE_DTYPE), expected.detach(), equal_nan=True,
                               msg=lambda m: prefix + m, **tol)


def random_grad_output(like: torch.Tensor, key="grad_output") -> torch.Tensor:
    """A float64 grad_output in [0.5, 1.5) shaped like `like`, from a generator of its own."""
    return torch.rand(like.shape, generator=generator(key), dtype=REFERENCE_DTYPE).to(like.device) + 0.5


def assert_matches_naive(loss: torch.Tensor, heads: Sequence[torch.Tensor], target, weights: Sequence[float], *,
                         grad_output: str = "random", msg: str = "", retain_graph: bool = True, **options) -> None:
    """`loss`, computed from `heads` (tensors that require grad), and its gradient w.r.t. every head equal the
    naive sum's computed in float64 from the same values (grad_output random, or "1"). retain_graph=False
    takes the gradients as training does, freeing the graph (the fused backends hand out their saved buffer
    then, a copy when the graph is kept)."""
    dtype = heads[0].dtype
    num_classes = heads[0].shape[1] if heads[0].dim() > 1 else heads[0].shape[0]
    ref_in = [to_reference(h).requires_grad_(True) for h in heads]
    ref = naive_loss(ref_in, to_reference(target), weights, **{k: to_reference(v) for k, v in options.items()})
    assert_matches_reference(loss, ref, dtype, msg=f"{msg} loss")
    g = random_grad_output(ref) if grad_output == "random" else torch.full_like(ref, float(grad_output))
    ours = torch.autograd.grad(loss, list(heads), g.to(loss.dtype), retain_graph=retain_graph)
    theirs = torch.autograd.grad(ref, ref_in, g)
    for h, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == dtype and a.shape == b.shape, f"{msg} head {h}"
        assert_matches_reference(a, b, dtype, num_classes, msg=f"{msg} head {h} gradient")


def check_backend(
    backend: str,
    heads: Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float],
    grad_output: str = "random",
    **options,
) -> Optional[auxfuse.MultiHeadLossOutput]:
    """Assert that `backend` equals the naive sum computed in float64 from the same values, in loss, every
    head's gradient, and the per-head details. `heads` are leaf tensors (requires_grad set here)."""
    dtype = heads[0].dtype
    ours_in = [h.detach().clone().requires_grad_(True) for h in heads]
    out = auxfuse.multi_head_cross_entropy(
        list(ours_in), target, list(weights), backend=backend, return_details=True, **options
    )
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches_naive(out.loss, ours_in, target, weights, grad_output=grad_output, retain_graph=False, **options)
    # Per-head details against each head alone.
    ref_in = [to_reference(h) for h in heads]
    ref_target = to_reference(target)
    ref_options = {k: to_reference(v) for k, v in options.items()}
    reduction = options.get("reduction", "mean")
    for h, x in enumerate(ref_in):
        single = F.cross_entropy(x.detach(), ref_target, **{**ref_options, "reduction": "mean" if reduction == "none" else reduction})
        assert_matches_reference(out.head_losses[h], single, dtype, msg=f"head {h} loss")
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


def naive_per_head(heads, targets, weights, class_weights=None, **options):
    """The loop users write: each head with its own target (and class weight), in float64."""
    class_weights = class_weights or [None] * len(heads)
    return sum(w * F.cross_entropy(x if x.dtype == torch.float64 else to_reference(x), to_reference(t),
                                   weight=to_reference(cw), **options)
               for w, x, t, cw in zip(weights, heads, targets, class_weights))


def check_per_head(backend, heads, targets, weights, *, class_weights=None, call_target=None, call_weight=None,
                   target_resize=None, **options):
    """Loss, every head's gradient (random grad_output) and the per-head details against the naive loop."""
    dtype = heads[0].dtype
    ours_in = [h.detach().clone().requires_grad_(True) for h in heads]
    ref_in = [to_reference(h).requires_grad_(True) for h in heads]
    out = auxfuse.multi_head_cross_entropy(
        ours_in, targets if call_target is None else call_target, weights, backend=backend, return_details=True,
        weight=class_weights if call_weight is None else call_weight, target_resize=target_resize, **options)
    ref = naive_per_head(ref_in, targets, weights, class_weights, **options)
    assert_matches_reference(out.loss, ref, dtype, msg="loss")
    g = random_grad_output(ref)
    ours = torch.autograd.grad(out.loss, ours_in, g.to(out.loss.dtype))
    theirs = torch.autograd.grad(ref, ref_in, g)
    for h, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == dtype and a.shape == b.shape
        assert_matches_reference(a, b, dtype, heads[h].shape[1], msg=f"head {h} gradient")
    ignore_index = options.get("ignore_index", -100)
    reduction = options.get("reduction", "mean")
    for h, (x, t) in enumerate(zip(ref_in, targets)):
        cw = None if class_weights is None else class_weights[h]
        single = F.cross_entropy(x.detach(), to_reference(t), weight=to_reference(cw),
                                 **{**options, "reduction": "mean" if reduction == "none" else reduction})
        assert_matches_reference(out.head_losses[h], single, dtype, msg=f"head {h} loss")
        if t.is_floating_point():
            hits, counted = int((x.argmax(1) == t.argmax(1)).sum()), t.numel() // t.shape[1]
        else:
            counted_rows = t != ignore_index
            hits, counted = int(((x.argmax(1) == t) & counted_rows).sum()), int(counted_rows.sum())
        assert int(out.head_correct[h]) == hits and int(out.count[h]) == counted, f"head {h}"
    assert out.count.shape == (len(heads),) and int(out.invalid_targets) == 0
    return out
