"""The provider x shape x dtype x mode suite (pytest-benchmark), on the current device.

    pytest benchmarks/test_bench_loss.py --benchmark-only                      # quick default
    pytest benchmarks/test_bench_loss.py --benchmark-only --benchmark-json out.json
    AUXFUSE_BENCH_FULL=1 pytest benchmarks/test_bench_loss.py --benchmark-only  # every shape in both modes

Providers, shapes and the step come from auxfuse.bench (shared with `python -m auxfuse bench`). Each case's
extra_info holds the floor's bytes (each logit read once; for forward+backward each gradient written once),
the achieved GB/s against that floor, and on CUDA the peak memory of the step.
"""

import os

import pytest
import torch

from auxfuse import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("AUXFUSE_BENCH_FULL") == "1"
DTYPES = [torch.float32, torch.bfloat16]


def _cases():
    for shape in bench.SHAPES[DEVICE]:
        for dtype in DTYPES:
            for mode in bench.MODES:
                # Quick default: large-vocabulary shapes in forward + backward with 2 heads, and on the CPU
                # not at all (benchmarks/test_bench_cpu.py times them there), so `pytest benchmarks/` stays short.
                quick = shape.name != "lm" or (DEVICE == "cuda" and mode == "forward+backward" and shape.heads == 2)
                if FULL or quick:
                    yield pytest.param(shape, dtype, mode, id=f"{shape}-{str(dtype)[6:]}-{mode}".replace(" ", "-"))


@pytest.mark.parametrize("shape, dtype, mode", list(_cases()))
@pytest.mark.parametrize("provider", list(bench.providers(DEVICE, torch.float32)))
def test_loss(benchmark, provider, shape, dtype, mode):
    loss_fn = bench.providers(DEVICE, dtype).get(provider)
    if loss_fn is None:
        pytest.skip(f"{provider} does not run {dtype} here")
    heads, target = bench.make_inputs(shape, dtype, DEVICE)
    run = bench.step_fn(loss_fn, heads, target, bench.HEAD_WEIGHTS[shape.heads], mode)
    run()  # warm-up (torch.compile compiles here)

    def timed():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = f"{shape} {str(dtype)[6:]} {mode}"
    rounds = 20 if shape.numel < 10**7 else 5  # medians of many calls where calls are cheap
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
    floor = bench.floor_bytes(shape, dtype, mode)
    benchmark.extra_info.update(
        floor_bytes=floor,
        floor_gbps=floor / benchmark.stats.stats.median / 1e9,
        peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20 if DEVICE == "cuda" else None,
    )
