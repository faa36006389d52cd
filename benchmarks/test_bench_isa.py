"""CPU kernel: the portable build's copy per instruction-set level against a build for this machine
(AUXFUSE_CPU_ARCH=native, what setup.py compiled before the per-level copies): is the dispatched AVX-512 copy as
fast as the native build?

    python -m pytest benchmarks/test_bench_isa.py --benchmark-only

Each build and level runs in a worker process of its own (a process runs one copy: the level is chosen when the
extension loads), this file run as a script: `native` imports a build made with AUXFUSE_CPU_ARCH=native and
AUXFUSE_SKIP_CUDA=1 from a copy of the sources in build/bench_native/ (compiled on first use, a few minutes; ninja
reuses it afterwards), the others import the build under test with ATEN_CPU_CAPABILITY set. The workers take turns
within every round, so a change in the machine's load hits them alike; each turn times the op's forward with the
gradient (grad_mode 1: the whole fused kernel, no autograd) a few times and reports its median. The summary gives
the median over rounds per worker and its ratio to `native`. One thread by default (AUXFUSE_BENCH_THREADS to
change): on a machine shared with other processes, 2-thread OpenMP regions stall whenever one thread is
descheduled.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

import auxfuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_REASON = auxfuse.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(bool(CPU_REASON), reason=str(CPU_REASON))
LEVELS = ["AVX512", "AVX2", "DEFAULT"]
SHAPES = {  # name: (number of heads, logits shape, dtype)
    "googlenet_3x256x1000_fp32": (3, (256, 1000), torch.float32),
    "segmentation_2x8x21x128x128_fp32": (2, (8, 21, 128, 128), torch.float32),
    "lm_2x1024x32000_fp32": (2, (1024, 32000), torch.float32),
    "lm_2x1024x32000_bf16": (2, (1024, 32000), torch.bfloat16),
}
CALLS_PER_TURN = 5


# --- the worker: one build, one level ---------------------------------------------------------------------------

def _kernel_call(name):
    """The op's forward with the gradient (grad_mode 1) on one shape's tensors, as a function of no arguments."""
    num_heads, shape, dtype = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(shape, generator=g).to(dtype) for _ in range(num_heads)]
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    rows = [h.reshape(shape[0], shape[1], -1) for h in heads]
    target_rows = target.reshape(shape[0], -1)
    weights = [1.0] + [0.3] * (num_heads - 1)
    return lambda: torch.ops.auxfuse.multihead_ce_forward(rows, target_rows, None, weights, -100, 0.0, 1, 1)


def _worker():
    """Reads shape names from stdin; for each, answers with the median time of CALLS_PER_TURN calls (JSON)."""
    torch.set_num_threads(int(os.environ.get("AUXFUSE_BENCH_THREADS", "1")))
    print(json.dumps({"capability": torch.ops.auxfuse.cpu_capability()}), flush=True)
    calls = {}
    for line in sys.stdin:
        name = line.strip()
        if name not in calls:
            calls[name] = _kernel_call(name)
            calls[name]()  # warm up: first-touch of the gradient's pages, caches
        times = []
        for _ in range(CALLS_PER_TURN):
            start = time.perf_counter()
            calls[name]()
            times.append(time.perf_counter() - start)
        print(json.dumps({"median_s": statistics.median(times)}), flush=True)


# --- the benchmark ------------------------------------------------------------------------------------------------


def _build_native():
    """The sources as they are, built with AUXFUSE_CPU_ARCH=native (C++ only) in build/bench_native/; returns the
    folder to import auxfuse from."""
    folder = os.path.join(ROOT, "build", "bench_native")
    for name in ("csrc", "auxfuse"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(folder, name), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), folder)
    env = dict(os.environ, AUXFUSE_CPU_ARCH="native", AUXFUSE_SKIP_CUDA="1")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=folder, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return folder


class _Worker:
    """This file as a script, importing auxfuse from `import_root`, at ATen's CPU capability `level` if given."""

    def __init__(self, import_root, level=None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env["PYTHONPATH"] = import_root
        if level:
            env["ATEN_CPU_CAPABILITY"] = level.lower()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.capability = self._answer()["capability"]

    def _answer(self):
        line = self.proc.stdout.readline()
        assert line, f"worker exited with status {self.proc.wait()}"
        return json.loads(line)

    def time(self, shape):
        self.proc.stdin.write(shape + "\n")
        self.proc.stdin.flush()
        return self._answer()["median_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def workers():
    """{"native": the build for this machine, "avx512" / "avx2" / "default": the build under test at each level this
    machine runs}."""
    machine = torch.backends.cpu.get_cpu_capability()
    started = {"native": _Worker(_build_native())}
    for level in LEVELS[LEVELS.index(machine) if machine in LEVELS else -1:]:
        started[level.lower()] = _Worker(ROOT, level)
    for name, worker in started.items():
        expected = machine if name == "native" else name.upper()
        assert worker.capability == expected, f"{name} runs the {worker.capability} copy"
    yield started
    for worker in started.values():
        worker.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_dispatched_against_native(benchmark, bench_results, workers, shape):
    times = {name: [] for name in workers}

    def one_round():
        for name, worker in workers.items():
            times[name].append(worker.time(shape))

    one_round()  # each worker allocates and warms up this shape
    for t in times.values():
        t.clear()
    benchmark.group = "dispatched copies vs native build: rounds of all workers"
    benchmark.pedantic(one_round, rounds=15, iterations=1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    table = (f"CPU kernel, forward with gradient: median over {len(times['native'])} rounds (ms) of the native build "
             "and of each dispatched copy, and its ratio to native (/nat)")
    for name, median in medians.items():
        bench_results[(table, shape, name)] = f"{median * 1e3:.3f}"
        if name != "native":
            bench_results[(table, shape, f"{name}/nat")] = f"{median / medians['native']:.3f}"
    benchmark.extra_info.update({f"{name}_median_ms": round(m * 1e3, 4) for name, m in medians.items()})


if __name__ == "__main__":
    _worker()
