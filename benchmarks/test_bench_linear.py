"""CPU: fused linear + multi-head cross-entropy (issue #19) against the naive loop (F.linear then
F.cross_entropy per head) and torch.compile of it: forward + backward time, and peak memory.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_linear.py --benchmark-only

Speed: 4 heads x 2048 rows x 256 -> 32000 classes, fp32, one shared projection, shifted labels; providers
take turns within every round; `matmuls (floor)` is the three matmuls of every head alone (logits, the hidden
states' gradient, the projection's gradient). Memory: 4 heads x 4096 rows, each provider in a subprocess of
its own, the process's peak RSS during one forward + backward minus its RSS before it (Linux). The shapes,
providers and the memory probe are auxfuse.bench's, which `python -m auxfuse bench --shapes linear` runs too.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from auxfuse import bench
from interleaving import interleaved_rounds

SPEED = bench.LinearShape("linear", 4, 2048, 256, 32000)
MEMORY = bench.LinearShape("linear", 4, 4096, 256, 32000)
PROVIDERS = {"naive": bench.NAIVE, "compiled": "torch.compile(naive)", "auxfuse": "auxfuse[cpu]",
             "matmuls": "matmuls (floor)"}
ROUND_SECONDS = 30.0


def test_speed_interleaved(benchmark, bench_results):
    leaves, targets = bench.make_inputs(SPEED, torch.float32, "cpu")
    loss_fns = bench.providers("cpu", torch.float32, SPEED)
    steps = {p: bench.step_fn(loss_fns[name], leaves, targets, list(SPEED.weights), "forward+backward")
             for p, name in PROVIDERS.items()}
    benchmark.group = "linear + cross-entropy, interleaved rounds"
    times = interleaved_rounds(benchmark, steps, ROUND_SECONDS, min_rounds=3, max_rounds=20)
    table = f"linear + CE, {SPEED} fp32: fwd+bwd median s [IQR]"
    median = {}
    for p, samples in times.items():
        q1, median[p], q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        bench_results[(table, p, "median s")] = f"{median[p]:.3f} [{q3 - q1:.3f}]"
    for p in PROVIDERS:
        bench_results[(table, p, "auxfuse speed-up")] = f"{median[p] / median['auxfuse']:.2f}x"
    benchmark.extra_info.update({f"{p}_median_s": round(m, 4) for p, m in median.items()})


@pytest.mark.parametrize("provider", ["naive", "auxfuse"])
def test_peak_memory(benchmark, bench_results, provider):
    benchmark.group = "linear + cross-entropy, peak memory (one run per process)"
    extra = benchmark.pedantic(lambda: bench.cpu_peak_extra_mib(MEMORY, torch.float32, PROVIDERS[provider]),
                               rounds=1, iterations=1)
    table = f"linear + CE, {MEMORY} fp32: peak extra RSS (MiB)"
    bench_results[(table, provider, "MiB")] = f"{extra:.0f}"
    bench_results[("_linear_memory", provider, "")] = extra
    naive = bench_results.get(("_linear_memory", "naive", ""))
    if provider == "auxfuse" and naive:
        bench_results[(table, provider, "of naive")] = f"{100 * extra / naive:.1f}%"
    benchmark.extra_info["extra_MiB"] = round(extra, 1)
