"""GPU benchmark of the `triton` backend against the naive eager sum of F.cross_entropy.

    python benchmarks/triton_bench.py            # prints a table; does nothing without CUDA

or, from another script:

    from benchmarks.triton_bench import run
    results = run()                              # {} without CUDA

Times forward + backward (gradients of every head) and forward alone, measures the peak memory of one
forward + backward above the inputs, and checks the loss and gradients against eager once per shape.
The first call of each shape compiles and autotunes the kernels (outside the timings).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

# name: (heads, rows, classes, dtype)
SHAPES = {
    "googlenet_3x256x1000_fp32": (3, 256, 1000, torch.float32),
    "googlenet_3x256x1000_bf16": (3, 256, 1000, torch.bfloat16),
    "lm_2x8192x128256_bf16": (2, 8192, 128256, torch.bfloat16),
}


def _timed(fn, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of fn (CUDA events, L2 flushed between runs), via triton.testing.do_bench."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(shapes: Optional[dict] = None, warmup_ms: float = 25, rep_ms: float = 100, verbose: bool = True) -> dict:
    """Benchmark backend="triton" vs eager for each shape; returns {shape: {metric: value}} ({} without CUDA)."""
    if not torch.cuda.is_available():
        if verbose:
            print("triton_bench: skipped (no CUDA device)")
        return {}
    import auxfuse

    reason = auxfuse.available_backends().get("triton")
    if reason is not None:
        if verbose:
            print(f"triton_bench: skipped (triton backend unavailable: {reason})")
        return {}
    results = {}
    for name, (H, N, C, dtype) in (shapes or SHAPES).items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        heads = [torch.randn(N, C, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(H)]
        target = torch.randint(0, C, (N,), device="cuda", generator=gen)
        weights = [1.0] + [0.3] * (H - 1)

        def fused_loss():
            return auxfuse.multi_head_cross_entropy(heads, target, weights, backend="triton")

        def eager_loss():
            return sum(w * F.cross_entropy(x, target) for w, x in zip(weights, heads))

        def fused_step():
            return torch.autograd.grad(fused_loss(), heads)

        def eager_step():
            return torch.autograd.grad(eager_loss(), heads)

        # Correctness once (and compile + autotune outside the timings).
        fused_l, eager_l = fused_loss(), eager_loss()
        fused_g = torch.autograd.grad(fused_l, heads)
        eager_g = torch.autograd.grad(eager_l, heads)
        row = {
            "max_abs_loss_diff": float((fused_l - eager_l.float()).abs()),
            "max_abs_grad_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(fused_g, eager_g)),
        }
        del fused_l, eager_l, fused_g, eager_g
        with torch.no_grad():
            fused_loss()
        row["triton_fwd_bwd_ms"] = _timed(fused_step, warmup_ms, rep_ms)
        row["eager_fwd_bwd_ms"] = _timed(eager_step, warmup_ms, rep_ms)
        with torch.no_grad():
            row["triton_fwd_ms"] = _timed(fused_loss, warmup_ms, rep_ms)
            row["eager_fwd_ms"] = _timed(eager_loss, warmup_ms, rep_ms)
        row["speedup_fwd_bwd"] = row["eager_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
        row["triton_peak_mib"] = _peak_mib(fused_step)
        row["eager_peak_mib"] = _peak_mib(eager_step)
        # Bytes of the floor: logits read twice (forward, backward) and gradients written once, per head.
        floor_bytes = 3 * H * N * C * heads[0].element_size()
        row["triton_fwd_bwd_TBps"] = floor_bytes / (row["triton_fwd_bwd_ms"] * 1e-3) / 1e12
        results[name] = row
        del heads, target
        torch.cuda.empty_cache()
    if verbose:
        _print_table(results)
    return results


def _print_table(results: dict) -> None:
    columns = ["triton_fwd_bwd_ms", "eager_fwd_bwd_ms", "speedup_fwd_bwd", "triton_fwd_ms", "eager_fwd_ms",
               "triton_peak_mib", "eager_peak_mib", "triton_fwd_bwd_TBps", "max_abs_loss_diff", "max_abs_grad_diff"]
    print("shape".ljust(28) + "".join(c.rjust(20) for c in columns))
    for name, row in results.items():
        print(name.ljust(28) + "".join(f"{row[c]:20.4g}" for c in columns))


if __name__ == "__main__":
    sys.exit(0 if run() is not None else 1)
