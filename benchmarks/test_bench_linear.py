"""CPU: fused linear + multi-head cross-entropy (issue #19) against the naive loop (F.linear then
F.cross_entropy per head) and torch.compile of it: forward + backward time, and peak memory.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_linear.py --benchmark-only

Speed: 4 heads x 2048 rows x 256 -> 32000 classes, fp32, one shared projection, shifted labels; providers
take turns within every round; `matmuls` is the floor (the three matmuls of every head alone: logits, the
hidden states' gradient, the projection's gradient). Memory: 4 heads x 4096 rows, each provider in a
subprocess of its own, the process's peak RSS during one forward + backward minus its RSS before it (Linux).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from interleaving import interleaved_rounds

HEADS, HIDDEN, VOCAB = 4, 256, 32000
SPEED_ROWS, MEMORY_ROWS = 2048, 4096
ROUND_SECONDS = 30.0


def make_inputs(rows, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hiddens = [torch.randn(rows, HIDDEN, generator=g).to(dtype).requires_grad_(True) for _ in range(HEADS)]
    projection = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(dtype).requires_grad_(True)
    targets = auxfuse.shifted_targets(torch.randint(0, VOCAB, (rows,), generator=g), HEADS)
    return hiddens, projection, targets, auxfuse.deepseek_mtp_weights(HEADS - 1)


def naive_loop(hiddens, projection, targets, weights):
    loss = weights[0] * F.cross_entropy(F.linear(hiddens[0], projection), targets[0])
    for w, x, t in zip(weights[1:], hiddens[1:], targets[1:]):
        loss = loss + w * F.cross_entropy(F.linear(x, projection), t)
    return loss


def make_step(provider, hiddens, projection, targets, weights):
    leaves = [*hiddens, projection]
    if provider == "matmuls":
        def step():
            for x in hiddens:
                z = x @ projection.t()
                z @ projection
                z.t() @ x
        return step
    if provider == "naive":
        loss_fn = naive_loop
    elif provider == "compiled":
        loss_fn = torch.compile(naive_loop, dynamic=False)
    else:
        def loss_fn(*args):
            return auxfuse.multi_head_linear_cross_entropy(*args)

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn(hiddens, projection, targets, weights).backward()

    return step


def test_speed_interleaved(benchmark, bench_results):
    hiddens, projection, targets, weights = make_inputs(SPEED_ROWS)
    providers = ("naive", "compiled", "auxfuse", "matmuls")
    steps = {p: make_step(p, hiddens, projection, targets, weights) for p in providers}
    benchmark.group = "linear + cross-entropy, interleaved rounds"
    times = interleaved_rounds(benchmark, steps, ROUND_SECONDS, min_rounds=3, max_rounds=20)
    table = f"linear + CE, {HEADS} x {SPEED_ROWS} x {HIDDEN} -> {VOCAB} fp32: fwd+bwd median s [IQR]"
    median = {}
    for p, samples in times.items():
        q1, median[p], q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        bench_results[(table, p, "median s")] = f"{median[p]:.3f} [{q3 - q1:.3f}]"
    for p in providers:
        bench_results[(table, p, "auxfuse speed-up")] = f"{median[p] / median['auxfuse']:.2f}x"
    benchmark.extra_info.update({f"{p}_median_s": round(m, 4) for p, m in median.items()})


_MEMORY_SCRIPT = """
import gc, json, sys, torch
sys.path.insert(0, {benchmarks!r})
import test_bench_linear as bench


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


torch.set_num_threads(int({threads}))
bench.make_step({provider!r}, *bench.make_inputs(8))()  # load and initialise what the step uses, on 8 rows
hiddens, projection, targets, weights = bench.make_inputs({rows})
step = bench.make_step({provider!r}, hiddens, projection, targets, weights)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status_kib("VmRSS")
step()
print(json.dumps({{"extra_MiB": (status_kib("VmHWM") - before) / 1024}}))
"""


def peak_extra_mib(provider: str, rows: int) -> float:
    """One forward + backward in a fresh process (after one on 8 rows, which loads and initialises the code it
    runs): the process's peak RSS during the step (Linux's VmHWM, reset just before it) over its RSS before
    it, MiB. Gradients of the hidden states and projection are part of it (every provider makes them)."""
    script = _MEMORY_SCRIPT.format(benchmarks=os.path.dirname(os.path.abspath(__file__)), rows=rows,
                                   provider=provider, threads=torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_MiB"]


@pytest.mark.parametrize("provider", ["naive", "auxfuse"])
def test_peak_memory(benchmark, bench_results, provider):
    benchmark.group = "linear + cross-entropy, peak memory (one run per process)"
    extra = benchmark.pedantic(lambda: peak_extra_mib(provider, MEMORY_ROWS), rounds=1, iterations=1)
    table = f"linear + CE, {HEADS} x {MEMORY_ROWS} x {HIDDEN} -> {VOCAB} fp32: peak extra RSS (MiB)"
    bench_results[(table, provider, "MiB")] = f"{extra:.0f}"
    bench_results[("_linear_memory", provider, "")] = extra
    naive = bench_results.get(("_linear_memory", "naive", ""))
    if provider == "auxfuse" and naive:
        bench_results[(table, provider, "of naive")] = f"{100 * extra / naive:.1f}%"
    benchmark.extra_info["extra_MiB"] = round(extra, 1)
