"""GPU benchmark of the `triton` backend against the naive eager sum of F.cross_entropy.

    python benchmarks/triton_bench.py            # prints a table; does nothing without CUDA
    TRITON_INTERPRET=1 python benchmarks/triton_bench.py --host-overhead   # CPU: Python cost per call

or, from another script:

    from benchmarks.triton_bench import run
    results = run()                              # {} without CUDA

Times forward + backward (gradients of every head) and forward alone, measures the peak memory of one
forward + backward above the inputs, and checks the loss and gradients against eager once per shape.
The forward + backward is also timed in each grad mode of the triton backend (lse: the gradient from the
saved log-sum-exp in backward; forward: the gradient written in the forward), whatever the default rule
picks for the shape (AUXFUSE_TRITON_GRAD=lse|forward sets the default of every other call). The floor is a
device copy of the same bytes: logits read once, gradients written once (``pct_of_floor`` = copy time /
forward + backward time). The first call of each shape compiles and autotunes the kernels (outside the
timings).

``--host-overhead`` needs no GPU: under TRITON_INTERPRET=1 it replaces the kernel launches with a no-op and
times what is left of a GoogLeNet-size forward + backward on CPU tensors, for the eager path
(autograd.Function) and for the triton_op path (op dispatch + register_autograd), and counts the Python
function calls of each with cProfile. The Triton launcher itself (and wrap_triton) is not measured there.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

# name: (heads, rows, classes, dtype)
SHAPES = {
    "googlenet_3x256x1000_fp32": (3, 256, 1000, torch.float32),
    "googlenet_3x256x1000_bf16": (3, 256, 1000, torch.bfloat16),
    "lm_2x8192x128256_bf16": (2, 8192, 128256, torch.bfloat16),
}


def _timed(fn, warmup_ms: float, rep_ms: float, device: str = "cuda") -> float:
    """Median milliseconds of fn (CUDA events, L2 flushed between runs), via triton.testing.do_bench.
    (device="cpu": a few wall-clock runs, only to check this script under TRITON_INTERPRET=1.)"""
    if device != "cuda":
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return sorted(runs)[1]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _peak_mib(fn, device: str = "cuda") -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(shapes: Optional[dict] = None, warmup_ms: float = 25, rep_ms: float = 100, verbose: bool = True,
        device: str = "cuda") -> dict:
    """Benchmark backend="triton" vs eager for each shape; returns {shape: {metric: value}} ({} without CUDA).

    device="cpu" (with TRITON_INTERPRET=1 and small shapes) only checks that the script runs."""
    if device == "cuda" and not torch.cuda.is_available():
        if verbose:
            print("triton_bench: skipped (no CUDA device)")
        return {}
    import auxfuse
    from auxfuse.backends import triton as tb

    reason = auxfuse.available_backends().get("triton")
    if reason is not None:
        if verbose:
            print(f"triton_bench: skipped (triton backend unavailable: {reason})")
        return {}
    results = {}
    for name, (H, N, C, dtype) in (shapes or SHAPES).items():
        gen = torch.Generator(device=device).manual_seed(0)
        heads = [torch.randn(N, C, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(H)]
        target = torch.randint(0, C, (N,), device=device, generator=gen)
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
            "max_abs_loss_diff": float((fused_l.detach() - eager_l.detach().float()).abs()),
            "max_abs_grad_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(fused_g, eager_g)),
        }
        del fused_l, eager_l, fused_g, eager_g
        with torch.no_grad():
            fused_loss()
        row["triton_fwd_bwd_ms"] = _timed(fused_step, warmup_ms, rep_ms, device)
        row["eager_fwd_bwd_ms"] = _timed(eager_step, warmup_ms, rep_ms, device)
        with torch.no_grad():
            row["triton_fwd_ms"] = _timed(fused_loss, warmup_ms, rep_ms, device)
            row["eager_fwd_ms"] = _timed(eager_loss, warmup_ms, rep_ms, device)
        row["speedup_fwd_bwd"] = row["eager_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
        forced = tb.FORCED_GRAD
        try:
            for mode in ("lse", "forward"):
                tb.FORCED_GRAD = mode
                fused_step()  # compile + autotune this mode's kernels outside the timing
                row[f"triton_{mode}_fwd_bwd_ms"] = _timed(fused_step, warmup_ms, rep_ms, device)
        finally:
            tb.FORCED_GRAD = forced
        # The floor: a copy of H x N x C elements reads each logit's bytes once and writes a gradient's once.
        src = torch.empty(H * N * C, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        row["copy_floor_ms"] = _timed(lambda: dst.copy_(src), warmup_ms, rep_ms, device)
        del src, dst
        row["pct_of_floor"] = 100.0 * row["copy_floor_ms"] / row["triton_fwd_bwd_ms"]
        row["triton_peak_mib"] = _peak_mib(fused_step, device)
        row["eager_peak_mib"] = _peak_mib(eager_step, device)
        # Bytes of the floor (logits read once, gradients written once) per second of forward + backward.
        floor_bytes = 2 * H * N * C * heads[0].element_size()
        row["triton_floor_TBps"] = floor_bytes / (row["triton_fwd_bwd_ms"] * 1e-3) / 1e12
        results[name] = row
        del heads, target
        if device == "cuda":
            torch.cuda.empty_cache()
    if verbose:
        _print_table(results)
    return results


def _print_table(results: dict) -> None:
    columns = ["triton_fwd_bwd_ms", "eager_fwd_bwd_ms", "speedup_fwd_bwd", "triton_lse_fwd_bwd_ms",
               "triton_forward_fwd_bwd_ms", "copy_floor_ms", "pct_of_floor", "triton_fwd_ms", "eager_fwd_ms",
               "triton_peak_mib", "eager_peak_mib", "triton_floor_TBps", "max_abs_loss_diff", "max_abs_grad_diff"]
    print("shape".ljust(28) + "".join(c.rjust(27) for c in columns))
    for name, row in results.items():
        print(name.ljust(28) + "".join(f"{row[c]:27.4g}" for c in columns))


def host_overhead(H: int = 3, N: int = 256, C: int = 1000, calls: int = 300, verbose: bool = True) -> dict:
    """Host time of one forward + backward with every kernel launch replaced by a no-op (CPU tensors, under
    TRITON_INTERPRET=1): the eager path (autograd.Function) against the triton_op path. Returns
    {path: {"us_per_call", "python_calls", "launches"}}; {} when the interpreter is not on."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if verbose:
            print("host_overhead: run with TRITON_INTERPRET=1 (set before triton is imported)")
        return {}
    import cProfile
    import pstats

    from auxfuse.backends import triton as tb
    from auxfuse.backends.problem import Problem

    gen = torch.Generator().manual_seed(0)
    heads = [torch.randn(N, C, 1, generator=gen).requires_grad_() for _ in range(H)]
    target = torch.randint(0, C, (N, 1), generator=gen)
    weights = [1.0] + [0.3] * (H - 1)
    problem = Problem(inputs=heads, names=[str(h) for h in range(H)], head_weights=weights, input_target=target,
                      prob_target=False, class_weight=None, ignore_index=-100, label_smoothing=0.0,
                      reduction="mean", needs_grad=True, want_details=False)
    grad_output = torch.ones(())
    launches = []

    def eager():
        torch.autograd.grad(tb.compute(problem).loss, heads, grad_output)

    def op():
        out = torch.ops.auxfuse.triton_multihead_ce_forward(heads, target, None, weights, -100, 0.0, 1, False, True)
        torch.autograd.grad(out[0], heads, grad_output)

    original, forced = tb._run, tb.FORCED_GRAD
    tb._run = lambda kernel, grid, args, traced, key=None: launches.append(getattr(kernel, "fn", kernel).__name__)
    results = {}
    try:
        # Under the interpreter NARROW_MAX_C is small; force the mode the GPU rule picks for each shape.
        for name, fn, mode in (("eager, lse mode", eager, "lse"), ("eager, grad-in-forward", eager, "forward"),
                               ("triton_op + register_autograd", op, None)):
            tb.FORCED_GRAD = mode
            for _ in range(20):
                fn()
            launches.clear()
            fn()
            per_call = list(launches)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, (time.perf_counter() - start) / calls)
            profiler = cProfile.Profile()
            profiler.enable()
            fn()
            profiler.disable()
            results[name] = {"us_per_call": best * 1e6, "python_calls": pstats.Stats(profiler).total_calls,
                             "launches": per_call}
    finally:
        tb._run, tb.FORCED_GRAD = original, forced
    if verbose:
        print(f"host time per forward + backward, {H} x {N} x {C} fp32, launches stubbed (best of 5 x {calls}):")
        for name, row in results.items():
            print(f"  {name:32s} {row['us_per_call']:8.1f} us  {row['python_calls']:5d} Python calls  "
                  f"launches: {', '.join(row['launches'])}")
    return results


if __name__ == "__main__":
    if "--host-overhead" in sys.argv[1:]:
        sys.exit(0 if host_overhead() else 1)
    sys.exit(0 if run() is not None else 1)
