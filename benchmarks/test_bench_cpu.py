"""CPU: forward + backward of the weighted multi-head cross-entropy, per provider and shape, and this machine's
floor (exp throughput, memory bandwidth) measured in the same run.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_cpu.py --benchmark-only

Providers: `naive` (sum_h w_h * F.cross_entropy(head_h, target), eager), `compiled` (the same function under
torch.compile), auxfuse's `torch` backend and its fused C++ `cpu` backend. Every round starts with the heads'
.grad cleared, so gradients are freshly allocated each time (as in training). pytest-benchmark reports the
medians; the closing summary gives the ratios, the cpu backend's bandwidth against the floor of
2 x element size bytes per logit (read once, gradient written once), and ns per logit for the linearity sizes.
Set AUXFUSE_BENCH_SHAPES=googlenet,inception to run a subset, AUXFUSE_BENCH_THREADS=1 for one thread (on a machine
shared with other processes, 2-thread OpenMP regions stall whenever one thread is descheduled).

The closing summary's ratio table comes from the `interleaved` runs (providers alternate within each round, so a
change in the machine's load hits them alike); pytest-benchmark's own table has each provider's rounds back to back.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from interleaving import interleaved_rounds

SHAPES = {  # name: (number of heads, logits shape, dtype, head weights)
    "googlenet_3x256x1000_fp32": (3, (256, 1000), torch.float32, (1.0, 0.3, 0.3)),
    "inception_2x256x1000_fp32": (2, (256, 1000), torch.float32, (1.0, 0.4)),
    "segmentation_2x8x21x128x128_fp32": (2, (8, 21, 128, 128), torch.float32, (1.0, 0.5)),
    "lm_2x4096x32000_fp32": (2, (4096, 32000), torch.float32, (1.0, 0.3)),
    "lm_2x4096x32000_bf16": (2, (4096, 32000), torch.bfloat16, (1.0, 0.3)),
}
_selected = os.environ.get("AUXFUSE_BENCH_SHAPES")
if _selected:
    SHAPES = {k: v for k, v in SHAPES.items() if any(s in k for s in _selected.split(","))}
PROVIDERS = ["naive", "compiled", "torch", "cpu"]
if os.environ.get("AUXFUSE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["AUXFUSE_BENCH_THREADS"]))
CPU_REASON = auxfuse.available_backends()["cpu"]


def _rounds(seconds_per_call: float, budget: float, lo: int = 5, hi: int = 100) -> int:
    return int(max(lo, min(hi, budget / max(seconds_per_call, 1e-6))))


def naive_sum(heads, target, weights):
    loss = weights[0] * F.cross_entropy(heads[0], target)
    for w, x in zip(weights[1:], heads[1:]):
        loss = loss + w * F.cross_entropy(x, target)
    return loss


class _Problem:
    """One shape's tensors, kept while its providers run (the LM shapes hold 2 GiB of logits)."""

    current: "_Problem | None" = None

    def __init__(self, name):
        num_heads, shape, dtype, weights = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        self.name, self.weights, self.dtype = name, list(weights), dtype
        self.heads = [torch.randn(shape, generator=g).to(dtype).requires_grad_(True) for _ in range(num_heads)]
        self.target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
        self.logits = num_heads * self.heads[0].numel()
        self.compiled = None

    @classmethod
    def get(cls, name):
        if cls.current is None or cls.current.name != name:
            cls.current = None  # free the previous shape's tensors first
            cls.current = cls(name)
        return cls.current

    def loss_fn(self, provider):
        heads, target, weights = self.heads, self.target, self.weights
        if provider == "naive":
            return lambda: naive_sum(heads, target, weights)
        if provider == "compiled":
            if self.compiled is None:
                self.compiled = torch.compile(naive_sum, dynamic=False)
            compiled = self.compiled
            return lambda: compiled(heads, target, weights)
        return lambda: auxfuse.multi_head_cross_entropy(heads, target, weights, backend=provider)

    def step(self, provider):
        loss_fn, heads = self.loss_fn(provider), self.heads

        def step():
            for h in heads:
                h.grad = None
            loss_fn().backward()

        return step


def _time_once(fn):
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- this machine's floor -------------------------------------------------------------------------------------

FLOOR_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of fp32


@pytest.fixture(scope="module")
def big():
    x = torch.randn(FLOOR_ELEMENTS)
    return x, torch.empty_like(x)


def _record_floor(benchmark, results, key, value, unit):
    benchmark.extra_info[key] = round(value, 2)
    results[("machine floor", key, unit)] = f"{value:.2f}"
    results[("_floor", key, "")] = value


def test_floor_copy_bandwidth(benchmark, bench_results, big):
    """Read + write into preallocated memory: copy_ of 256 MiB fp32."""
    x, out = big
    benchmark.group = "floor"
    benchmark.pedantic(lambda: out.copy_(x), rounds=20, warmup_rounds=2)
    gbps = 2 * x.numel() * 4 / benchmark.stats.stats.median / 1e9
    _record_floor(benchmark, bench_results, "copy_GBps", gbps, "GB/s (r+w)")


def test_floor_read_bandwidth(benchmark, bench_results, big):
    x, _ = big
    benchmark.group = "floor"
    benchmark.pedantic(lambda: x.sum(), rounds=20, warmup_rounds=2)
    _record_floor(benchmark, bench_results, "read_GBps", x.numel() * 4 / benchmark.stats.stats.median / 1e9, "GB/s")


def test_floor_first_touch_write(benchmark, bench_results):
    """Writing freshly allocated memory (what a new gradient tensor costs: page faults included)."""
    benchmark.group = "floor"
    benchmark.pedantic(lambda: torch.empty(FLOOR_ELEMENTS).fill_(1.0), rounds=10, warmup_rounds=1)
    gbps = FLOOR_ELEMENTS * 4 / benchmark.stats.stats.median / 1e9
    _record_floor(benchmark, bench_results, "first_touch_GBps", gbps, "GB/s")


def test_floor_exp_memory(benchmark, bench_results, big):
    """torch.exp(out=) on 256 MiB fp32 (preallocated): exp at memory speed."""
    x, out = big
    benchmark.group = "floor"
    benchmark.pedantic(lambda: torch.exp(x, out=out), rounds=20, warmup_rounds=2)
    _record_floor(benchmark, bench_results, "exp_large_Gelem_s", x.numel() / benchmark.stats.stats.median / 1e9,
                  "G exp/s")


def test_floor_exp_in_cache(benchmark, bench_results):
    """torch.exp(out=) on 1 MiB fp32 repeated 64 times: exp throughput with the data in cache."""
    x = torch.randn(256 * 1024)
    out = torch.empty_like(x)

    def run():
        for _ in range(64):
            torch.exp(x, out=out)

    benchmark.group = "floor"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    _record_floor(benchmark, bench_results, "exp_cached_Gelem_s", 64 * x.numel() / benchmark.stats.stats.median / 1e9,
                  "G exp/s")


@pytest.mark.parametrize("shape, provider", [(s, p) for s in SHAPES for p in PROVIDERS + ["interleaved"]])
def test_forward_backward(benchmark, bench_results, shape, provider):
    """pytest-benchmark's table: each provider's rounds run back to back; then the interleaved ratios."""
    if provider in ("cpu", "interleaved") and CPU_REASON:
        pytest.skip(CPU_REASON)
    if provider == "interleaved":
        return _interleaved_ratios(benchmark, bench_results, shape)
    problem = _Problem.get(shape)
    step = problem.step(provider)
    per_call = _time_once(step)  # warm up; torch.compile compiles here, so time a second call for it
    if provider == "compiled":
        per_call = _time_once(step)
    benchmark.group = shape
    benchmark.pedantic(step, rounds=_rounds(per_call, 3.0, lo=3), iterations=1)
    median = benchmark.stats.stats.median
    floor_bytes = 2 * problem.heads[0].element_size() * problem.logits
    benchmark.extra_info.update(provider=provider, logits=problem.logits, floor_bytes=floor_bytes,
                                achieved_GBps=round(floor_bytes / median / 1e9, 2), threads=torch.get_num_threads())
    bench_results[("per provider, back-to-back rounds: medians (ms)", shape, provider)] = f"{median * 1e3:.2f}"


INTERLEAVED = ["naive", "compiled", "cpu"]


def _interleaved_ratios(benchmark, bench_results, shape):
    """The ratios: naive, compiled and cpu take turns within every round, so a change in the machine's load
    (other processes, other VMs on the host) hits all of them alike. Also times the fused kernel alone
    (the op's forward with the gradient, grad_mode 1: no Python, no autograd) for comparison."""
    import statistics

    problem = _Problem.get(shape)
    steps = {p: problem.step(p) for p in INTERLEAVED}
    rows = [h.detach().reshape(h.shape[0], h.shape[1], -1) for h in problem.heads]
    target_rows = problem.target.reshape(problem.target.shape[0], -1)
    steps["kernel"] = lambda: torch.ops.auxfuse.multihead_ce_forward(rows, target_rows, None, problem.weights, -100,
                                                                     0.0, 1, 1)
    benchmark.group = "interleaved rounds (all providers per round)"
    # Two warm-up rounds: the first compiles, the second sizes the rounds to the 10 s budget.
    times = interleaved_rounds(benchmark, steps, 10.0, min_rounds=5, max_rounds=60, warmup_rounds=2)
    med = {p: statistics.median(t) for p, t in times.items()}
    floor_bytes = 2 * problem.heads[0].element_size() * problem.logits
    benchmark.extra_info.update({f"{p}_median_ms": round(m * 1e3, 3) for p, m in med.items()})
    benchmark.extra_info.update(naive_over_cpu=round(med["naive"] / med["cpu"], 2),
                                compiled_over_cpu=round(med["compiled"] / med["cpu"], 2),
                                cpu_achieved_GBps=round(floor_bytes / med["cpu"] / 1e9, 2), rounds=len(times["cpu"]))
    table = "interleaved rounds: forward+backward medians (ms), ratios, floor"
    for p in ("naive", "compiled", "cpu", "kernel"):
        bench_results[(table, shape, p)] = f"{med[p] * 1e3:.2f}"
    bench_results[(table, shape, "naive/cpu")] = f"{med['naive'] / med['cpu']:.2f}x"
    bench_results[(table, shape, "compiled/cpu")] = f"{med['compiled'] / med['cpu']:.2f}x"
    bench_results[(table, shape, "cpu GB/s")] = f"{floor_bytes / med['cpu'] / 1e9:.1f}"
    copy = bench_results.get(("_floor", "copy_GBps", ""))
    if copy:
        # The logits read once and the gradients written once into memory already mapped (the cpu backend's
        # gradient cache reuses the last step's): a copy of the logits' bytes.
        floor_s = floor_bytes / (copy * 1e9)
        bench_results[(table, shape, "floor")] = f"{floor_s * 1e3:.2f}"
        bench_results[(table, shape, "cpu/floor")] = f"{med['cpu'] / floor_s:.2f}x"
    bench_results[(table, shape, "rounds")] = str(len(times["cpu"]))


# --- linearity: time per logit of the cpu backend as N, C and the number of heads grow -------------------------

LINEAR = [("N", (2, 1024, 8192)), ("N", (2, 2048, 8192)), ("N", (2, 4096, 8192)),
          ("C", (2, 2048, 4096)), ("C", (2, 2048, 8192)), ("C", (2, 2048, 16384)),
          ("heads", (1, 2048, 8192)), ("heads", (2, 2048, 8192)), ("heads", (4, 2048, 8192))]


@pytest.mark.skipif(bool(CPU_REASON), reason=str(CPU_REASON))
@pytest.mark.parametrize("axis, size", LINEAR, ids=[f"{a}-{'x'.join(map(str, s))}" for a, s in LINEAR])
def test_linear_in_n_c_heads(benchmark, bench_results, axis, size):
    _Problem.current = None
    H, N, C = size
    g = torch.Generator().manual_seed(1)
    heads = [torch.randn(N, C, generator=g).requires_grad_(True) for _ in range(H)]
    target = torch.randint(0, C, (N,), generator=g)

    def step():
        for h in heads:
            h.grad = None
        auxfuse.multi_head_cross_entropy(heads, target, [1.0] + [0.3] * (H - 1), backend="cpu").backward()

    benchmark.group = f"linear in {axis}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    ns = benchmark.stats.stats.median / (H * N * C) * 1e9
    benchmark.extra_info.update(logits=H * N * C, ns_per_logit=round(ns, 3))
    bench_results[("cpu backend, linearity: ns per logit (median)", f"{axis}: H={H} N={N} C={C}", "ms")] = (
        f"{benchmark.stats.stats.median * 1e3:.1f}")
    bench_results[("cpu backend, linearity: ns per logit (median)", f"{axis}: H={H} N={N} C={C}", "ns/logit")] = (
        f"{ns:.3f}")
