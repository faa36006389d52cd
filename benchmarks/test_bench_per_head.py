"""CPU: forward + backward with one target per head (issue #18): a deep-supervision pyramid, multi-token
prediction heads and multi-task heads, against the naive loop and torch.compile of it.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_per_head.py --benchmark-only

Shapes:
  deep_supervision  2 x 21 classes at 128^2, 64^2, 32^2, 16^2, each head its own mask, nnU-Net's weights
  multi_token       4 heads x 2048 rows x 32000 classes, labels shifted by 0..3 (the tail ignored)
  multi_task        256 rows; 1000, 100 and 10 classes, each head its own labels

Providers take turns within every round (a change in the machine's load hits them alike); the closing
summary gives each provider's median and interquartile range, and auxfuse's speed-up over naive and compiled.
Set AUXFUSE_BENCH_SHAPES=deep,task to run a subset, AUXFUSE_BENCH_THREADS=1 for one thread.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from interleaving import interleaved_rounds


def _deep_supervision(g):
    sizes = (128, 64, 32, 16)
    heads = [torch.randn(2, 21, s, s, generator=g) for s in sizes]
    targets = [torch.randint(0, 21, (2, s, s), generator=g) for s in sizes]
    return heads, targets, auxfuse.nnunet_deep_supervision_weights(len(sizes))


def _multi_token(g):
    heads = [torch.randn(2048, 32000, generator=g) for _ in range(4)]
    labels = torch.randint(0, 32000, (2048,), generator=g)
    return heads, auxfuse.shifted_targets(labels, 4), auxfuse.deepseek_mtp_weights(3)


def _multi_task(g):
    classes = (1000, 100, 10)
    heads = [torch.randn(256, c, generator=g) for c in classes]
    targets = [torch.randint(0, c, (256,), generator=g) for c in classes]
    return heads, targets, [1.0, 0.5, 0.5]


SHAPES = {"deep_supervision": _deep_supervision, "multi_token": _multi_token, "multi_task": _multi_task}
_selected = os.environ.get("AUXFUSE_BENCH_SHAPES")
if _selected:
    SHAPES = {k: v for k, v in SHAPES.items() if any(s in k for s in _selected.split(","))}
if os.environ.get("AUXFUSE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["AUXFUSE_BENCH_THREADS"]))
ROUND_SECONDS = 10.0  # the time budget of one shape's interleaved rounds


def naive_loop(heads, targets, weights):
    """What users write today: one F.cross_entropy per head, each with its own target."""
    loss = weights[0] * F.cross_entropy(heads[0], targets[0])
    for w, x, t in zip(weights[1:], heads[1:], targets[1:]):
        loss = loss + w * F.cross_entropy(x, t)
    return loss


def _steps(heads, targets, weights):
    compiled = torch.compile(naive_loop, dynamic=False)
    losses = {
        "naive": lambda: naive_loop(heads, targets, weights),
        "compiled": lambda: compiled(heads, targets, weights),
        "auxfuse": lambda: auxfuse.multi_head_cross_entropy(heads, targets, weights),
    }

    def step_of(loss_fn):
        def step():
            for h in heads:
                h.grad = None
            loss_fn().backward()

        return step

    return {name: step_of(fn) for name, fn in losses.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_per_head_targets_interleaved(benchmark, bench_results, shape):
    heads, targets, weights = SHAPES[shape](torch.Generator().manual_seed(0))
    heads = [h.requires_grad_(True) for h in heads]
    steps = _steps(heads, targets, weights)
    benchmark.group = "per-head targets, interleaved rounds"
    times = interleaved_rounds(benchmark, steps, ROUND_SECONDS, min_rounds=5, max_rounds=100, warmup_rounds=2)
    table = "per-head targets, interleaved rounds: forward+backward median ms [IQR], ratios"
    median = {}
    for p, samples in times.items():
        q1, median[p], q3 = statistics.quantiles(samples, n=4)
        bench_results[(table, shape, p)] = f"{median[p] * 1e3:.2f} [{(q3 - q1) * 1e3:.2f}]"
    for other in ("naive", "compiled"):  # auxfuse's speed-up over each
        ratio = median[other] / median["auxfuse"]
        bench_results[(table, shape, f"vs {other}")] = f"{ratio:.2f}x"
        benchmark.extra_info[f"{other}_over_auxfuse"] = round(ratio, 3)
    bench_results[(table, shape, "rounds")] = str(len(times["auxfuse"]))
    benchmark.extra_info.update({f"{p}_median_ms": round(m * 1e3, 3) for p, m in median.items()})
