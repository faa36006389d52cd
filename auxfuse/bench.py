"""Benchmark definitions shared by `python -m auxfuse bench` and the pytest-benchmark suite in benchmarks/:
the providers (naive eager sum, torch.compile of it, every auxfuse backend that can run, Liger-Kernel's
cross-entropy looped over heads when installed), the shapes per device, and one timing function."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import auxfuse
from auxfuse.backends import AUTO_ORDER


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    batch: int
    classes: int
    spatial: tuple = ()

    @property
    def logits_shape(self) -> tuple:
        return (self.batch, self.classes, *self.spatial)

    @property
    def target_shape(self) -> tuple:
        return (self.batch, *self.spatial)

    @property
    def numel(self) -> int:
        return self.heads * math.prod(self.logits_shape)

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in (self.heads, *self.logits_shape))
        return f"{self.name} {dims}"


# Quick shapes by device: what `python -m auxfuse bench` and `pytest benchmarks/` run by default.
SHAPES = {
    "cpu": [
        Shape("inception", 2, 256, 1000),
        Shape("googlenet", 3, 256, 1000),
        Shape("segmentation", 2, 8, 21, (128, 128)),
        Shape("lm", 2, 4096, 32000),
        Shape("lm", 4, 4096, 32000),
    ],
    "cuda": [
        Shape("inception", 2, 256, 1000),
        Shape("googlenet", 3, 256, 1000),
        Shape("segmentation", 2, 8, 21, (512, 512)),
        Shape("lm", 2, 8192, 128256),
        Shape("lm", 4, 8192, 128256),
    ],
}
HEAD_WEIGHTS = {2: [1.0, 0.4], 3: [1.0, 0.3, 0.3], 4: [1.0, 0.3, 0.3, 0.3]}
MODES = ("forward", "forward+backward")


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """Heads (leaf tensors needing grad) and class-index targets with a few ignored rows."""
    g = torch.Generator(device=device).manual_seed(seed)
    heads = [
        torch.randn(shape.logits_shape, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        for _ in range(shape.heads)
    ]
    target = torch.randint(0, shape.classes, shape.target_shape, generator=g, device=device)
    return heads, target


def naive_sum(heads, target, weights):
    """What users write by hand: `loss1 + w * loss2 + ...` with F.cross_entropy."""
    return sum(w * F.cross_entropy(x, target) for w, x in zip(weights, heads))


_compiled_naive = None


def _compiled_naive_sum(heads, target, weights):
    global _compiled_naive
    if _compiled_naive is None:
        _compiled_naive = torch.compile(naive_sum, dynamic=False)
    return _compiled_naive(heads, target, weights)


def _liger_loop():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    criterion = LigerCrossEntropyLoss()

    def loss(heads, target, weights):
        flat_target = target.reshape(-1)
        return sum(w * criterion(x.reshape(-1, x.shape[1]), flat_target) for w, x in zip(weights, heads))

    return loss


def providers(device: str, dtype: torch.dtype) -> dict[str, Optional[Callable]]:
    """name -> loss function(heads, target, weights), or None where the provider cannot run (skipped)."""
    result: dict[str, Optional[Callable]] = {"naive eager": naive_sum, "torch.compile(naive)": _compiled_naive_sum}
    available = auxfuse.available_backends()
    for name in AUTO_ORDER[device]:  # the backends that take tensors on this device
        if available[name] is None and not (name == "cuda" and dtype == torch.float64):
            result[f"auxfuse[{name}]"] = (
                lambda heads, target, weights, _b=name: auxfuse.multi_head_cross_entropy(heads, target, weights,
                                                                                          backend=_b)
            )
    if device == "cuda":
        try:
            result["liger (looped)"] = _liger_loop()
        except ImportError:
            pass
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(loss_fn: Callable, heads, target, weights, mode: str) -> Callable[[], None]:
    """One benchmark step: the loss, and for forward+backward its gradients w.r.t. every head."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                loss_fn(heads, target, weights)
    else:
        def run():
            loss = loss_fn(heads, target, weights)
            torch.autograd.grad(loss, heads)
    return run


def time_step(run: Callable[[], None], device: str, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call, one sample per repeat (device-synchronized)."""
    for _ in range(warmup):
        run()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def floor_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """The fewest bytes a loss can move: each logit read once, and for backward each gradient written once."""
    element = torch.finfo(dtype).bits // 8
    return shape.numel * element * (1 if mode == "forward" else 2)


@dataclass
class Row:
    shape: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    speedup_vs_naive: Optional[float] = None
    floor_gbps: Optional[float] = None
    peak_mib: Optional[float] = None
    error: Optional[str] = None
    samples_ms: list = field(default_factory=list)


def measure(shape: Shape, dtype: torch.dtype, device: str, mode: str, name: str, loss_fn: Callable,
            repeats: int) -> Row:
    heads, target = make_inputs(shape, dtype, device)
    weights = HEAD_WEIGHTS[shape.heads]
    row = Row(str(shape), str(dtype).replace("torch.", ""), mode, name, float("nan"))
    try:
        run = step_fn(loss_fn, heads, target, weights, mode)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        samples = time_step(run, device, repeats)
        if device == "cuda":
            row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        row.samples_ms = [s * 1e3 for s in samples]
        row.median_ms = statistics.median(row.samples_ms)
        row.floor_gbps = floor_bytes(shape, dtype, mode) / (row.median_ms * 1e-3) / 1e9
    except Exception as error:  # one failing provider is reported, not fatal
        row.error = f"{type(error).__name__}: {str(error)[:200]}"
    return row


def run_bench(device: str, dtypes: list, shapes: list, modes: list, repeats: int, progress: bool = True) -> list[Row]:
    from tqdm import tqdm

    plan = [(s, d, m, n, f) for s in shapes for d in dtypes for m in modes for n, f in providers(device, d).items()]
    rows = []
    for shape, dtype, mode, name, fn in tqdm(plan, desc="auxfuse bench", disable=not progress, dynamic_ncols=True):
        rows.append(measure(shape, dtype, device, mode, name, fn, repeats))
    naive = {(r.shape, r.dtype, r.mode): r.median_ms for r in rows if r.provider == "naive eager"}
    for r in rows:
        base = naive.get((r.shape, r.dtype, r.mode))
        if base and r.error is None:
            r.speedup_vs_naive = base / r.median_ms
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| shape | dtype | mode | provider | median ms | vs naive | GB/s at floor | peak MiB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.shape} | {r.dtype} | {r.mode} | {r.provider} | error: {r.error} | | | |")
            continue
        speed = f"{r.speedup_vs_naive:.2f}x" if r.speedup_vs_naive else ""
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        lines.append(f"| {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.median_ms:.3f} | {speed} | "
                     f"{r.floor_gbps:.1f} | {peak} |")
    return "\n".join(lines)


def plot_speedups(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r.shape, r.dtype, r.mode) for r in rows})
    names = [n for n in dict.fromkeys(r.provider for r in rows) if n != "naive eager"]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = []
        for case in cases:
            match = [r for r in rows if (r.shape, r.dtype, r.mode) == case and r.provider == name]
            values.append(match[0].speedup_vs_naive or 0.0 if match else 0.0)
        ax.bar([c + i * width for c in range(len(cases))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(["\n".join(case) for case in cases], fontsize=7)
    ax.set_ylabel("speed-up vs naive eager sum")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                        help="repeatable; default float32 and bfloat16")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable; default both")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (e.g. googlenet,lm)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 10 CPU, 30 CUDA)")
    parser.add_argument("--json", default="auxfuse_bench.json")
    parser.add_argument("--plot", default="auxfuse_bench.png")


def main(args: argparse.Namespace) -> list[Row]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    shapes = SHAPES["cuda" if device == "cuda" else "cpu"]
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s.name in wanted]
    repeats = args.repeats or (30 if device == "cuda" else 10)
    rows = run_bench(device, dtypes, shapes, list(args.mode or MODES), repeats)
    table = format_table(rows)
    print(table)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    meta = {"device": device, "machine": machine, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "repeats": repeats}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.plot:
        plot_speedups(rows, args.plot, f"auxfuse vs naive sum ({machine}, {meta['date']})")
        print(f"wrote {args.json} and {args.plot}")
    return rows
