"""GPU benchmark of the weighted multi-head cross-entropy: providers x shapes x modes, one table.

    python3 benchmarks/gpu_bench.py [--json PATH] [--only SHAPE_ID ...] [--budget-s 240]
    python3 benchmarks/gpu_bench.py --dry-run     # the plan: shapes, providers, bytes; no GPU needed
    python3 benchmarks/gpu_bench.py --smoke       # tiny shapes on whatever device is here (code-path check)
    python3 benchmarks/gpu_bench.py --verdict benchmarks/results/h200_2026-11-29.json   # targets of a saved run

Providers: naive eager sum of F.cross_entropy; torch.compile of that sum; auxfuse backends torch, cuda and
triton (triton only when auxfuse.available_backends()["triton"] is None); auxfuse-cuda-op-lse and
auxfuse-cuda-op-gif, the registered op called directly (the cuda kernels without the Python front end) in
grad_mode 2 (saved log-sum-exp, backward kernel) and grad_mode 1 (gradient in the forward, backward a scale
kernel that returns at once for grad_output 1): the measurement behind the cuda grad_mode rule in
auxfuse/backends/native.py; Liger-Kernel's LigerCrossEntropyLoss looped over the heads when liger_kernel
imports (2-D logits only); auxfuse-triton-gif and auxfuse-triton-lse, the triton backend with its grad mode
forced (the measurement behind its rule, grad_mode in auxfuse/backends/triton.py). After the targets, a table
says per shape and backend which grad mode the rule picks and which one was faster.
Modes: fwd (the training forward: inputs require grad, no backward) and fwd+bwd (forward, then
torch.autograd.grad of the loss w.r.t. every head).

Timing: back-to-back iterations between CUDA events (so CPU launch overhead counts, as in a training loop),
input sets rotated so that every iteration reads logits that are not in L2 (several sets when one set is
smaller than 256 MB), the median over repeats. Per row: median ms, speed-up vs naive and vs compile,
achieved GB/s on the floor's bytes (2 x element size x logits for fwd+bwd, 1 x for fwd) and as a fraction of
the device-to-device copy bandwidth measured in the same run, peak memory above the inputs
(torch.cuda.max_memory_allocated delta), and device operations (kernels, memsets, copies) per fwd+bwd
counted with torch.profiler (logits under 64 MiB). For the cuda providers the kernels' own bytes in the
grad_mode each runs (Shape.cuda_own_bytes: 3 x element size x logits + the saved log-sum-exp for fwd+bwd in
grad_mode 2, 2 x in grad_mode 1; the targets) are reported too. A failing provider prints its error in the
table and the run goes on. The Markdown table is printed, then the verdict on the numbers issues #4 and #5
ask for (TARGETS: speed-ups, % of the copy bandwidth, device ops, memory; met, missed or not measured); with
--json (or $OUT set) the full results and the verdicts go to JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GiB = 1024**3


@dataclass
class Shape:
    id: str
    heads: int
    logits: tuple  # (N, C, *spatial)
    dtype: torch.dtype
    weights: tuple

    @property
    def numel(self) -> int:
        return self.heads * math.prod(self.logits)

    @property
    def rows(self) -> int:
        return self.logits[0] * math.prod(self.logits[2:])

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def floor_bytes(self, mode: str) -> int:
        return (2 if mode == "fwd+bwd" else 1) * self.elem * self.numel

    def cuda_own_bytes(self, mode: str, grad_mode: int) -> int:
        """What the cuda kernels move: the logits read once per pass over them and the int64 targets per
        launch that reads them; grad_mode 2 (saved log-sum-exp) adds the fp32 log-sum-exp (written, read
        back) and, with a backward, a second read of the logits and the gradient's write; grad_mode 1
        (gradient in the forward, backward a no-op for grad_output 1) writes the gradient in the forward
        (heads that require grad, so in both modes) and reads the targets in its pre-pass too."""
        if grad_mode == 1:
            return 2 * self.elem * self.numel + 2 * 8 * self.rows
        if mode == "fwd+bwd":
            return 3 * self.elem * self.numel + 2 * 8 * self.rows + 2 * 4 * self.heads * self.rows
        return self.elem * self.numel + 8 * self.rows + 4 * self.heads * self.rows

    def meta_heads(self, rows_view: bool = False) -> list:
        """The heads as meta tensors (no memory), for asking auxfuse's rules about this shape: as the model
        gives them, or as (N, C, S) row views."""
        size = (self.logits[0], self.logits[1], math.prod(self.logits[2:])) if rows_view else self.logits
        return [torch.empty(size, dtype=self.dtype, device="meta")] * self.heads

    def cuda_grad_mode(self, provider: str) -> int:
        """The grad_mode the cuda provider runs this shape in: auxfuse's own rule for a mean loss."""
        if provider in CUDA_OP_GRAD_MODES:
            return CUDA_OP_GRAD_MODES[provider]
        from auxfuse.backends.native import cuda_grad_mode

        return cuda_grad_mode(SimpleNamespace(inputs=self.meta_heads(), reduction="mean"))

    def triton_grad_mode(self) -> int:
        """The grad mode the triton backend's rule picks for a mean loss of this shape (same numbering)."""
        from auxfuse.backends.triton import grad_mode

        return grad_mode(SimpleNamespace(needs_grad=True, reduction="mean", heads=self.meta_heads(rows_view=True)))

    def describe(self) -> str:
        dims = "x".join(map(str, self.logits))
        return f"{self.heads}x{dims} {str(self.dtype).replace('torch.', '')}"


# The shapes with targets (TARGETS below) first, so that a run cut short by its time budget loses the others.
SHAPES = [
    Shape("googlenet-fp32", 3, (256, 1000), torch.float32, (1.0, 0.3, 0.3)),
    Shape("googlenet-bf16", 3, (256, 1000), torch.bfloat16, (1.0, 0.3, 0.3)),
    Shape("lm2-bf16", 2, (8192, 128256), torch.bfloat16, (1.0, 0.3)),
    Shape("seg-fp16", 2, (8, 21, 512, 512), torch.float16, (1.0, 0.5)),
    Shape("lm4-bf16", 4, (8192, 128256), torch.bfloat16, (1.0, 0.3, 0.3, 0.3)),
    Shape("inception-fp32", 2, (256, 1000), torch.float32, (1.0, 0.4)),
]
SHAPES_BY_ID = {s.id: s for s in SHAPES}
SMOKE_SHAPES = [
    Shape("smoke-cls", 3, (8, 37), torch.float32, (1.0, 0.3, 0.3)),
    Shape("smoke-seg", 2, (2, 5, 4, 4), torch.float32, (1.0, 0.5)),
]
MODES = ("fwd+bwd", "fwd")
PROVIDERS = ("naive", "compile", "auxfuse-torch", "auxfuse-cuda", "auxfuse-cuda-op-lse", "auxfuse-cuda-op-gif",
             "auxfuse-triton", "liger", "auxfuse-triton-gif", "auxfuse-triton-lse")
CUDA_OP_GRAD_MODES = {"auxfuse-cuda-op-gif": 1, "auxfuse-cuda-op-lse": 2}
TRITON_FORCED_GRAD = {"auxfuse-triton-gif": "forward", "auxfuse-triton-lse": "lse"}  # tb.FORCED_GRAD values
# Within one run's time budget: the grad-mode providers time fwd+bwd only (what their comparison is about), and
# device operations are counted where launches are the cost (logits under PROFILE_MAX_MIB).
FWD_BWD_ONLY = (*CUDA_OP_GRAD_MODES, *TRITON_FORCED_GRAD)
PROFILE_MAX_MIB = 64


# ---------------------------------------------------------------------------------------------------------
# Providers: each returns a loss function (heads, target) -> scalar loss, or raises with the reason.
# ---------------------------------------------------------------------------------------------------------

def naive_sum(heads, target, weights):
    return sum(w * F.cross_entropy(h, target) for w, h in zip(weights, heads))


_COMPILED = {}


def make_provider(name: str, shape: Shape) -> tuple[Callable, bool]:
    """(loss_fn, needs_private_inputs). Raises RuntimeError('skip: ...') when the provider does not apply."""
    weights = shape.weights
    if name == "naive":
        return (lambda heads, t: naive_sum(heads, t, weights)), False
    if name == "compile":
        if "naive" not in _COMPILED:
            import torch._dynamo as dynamo  # (a bare `import torch._dynamo` would make `torch` local here)

            for knob in ("cache_size_limit", "recompile_limit"):  # renamed across torch versions
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 64))
            # Static shapes: one specialised graph per benchmark shape, as a training job gets.
            _COMPILED["naive"] = torch.compile(naive_sum, dynamic=False)
        fn = _COMPILED["naive"]
        return (lambda heads, t: fn(list(heads), t, weights)), False
    if name in CUDA_OP_GRAD_MODES:
        # The registered op with its autograd formula, without auxfuse's Python front end: how much of the
        # cuda provider's time is the front end (output parsing, validation, backend choice), per grad_mode.
        import auxfuse

        reason = auxfuse.available_backends().get("cuda")
        if reason is not None:
            raise RuntimeError(f"skip: {reason}")
        w = list(weights)
        grad_mode = CUDA_OP_GRAD_MODES[name]

        def op_loss(heads, t):  # the op takes the heads as they are, (N, C, d1, ..., dk)
            mode = grad_mode if any(h.requires_grad for h in heads) else 0
            return torch.ops.auxfuse.multihead_ce_forward(list(heads), t, None, w, -100, 0.0, 1, mode)[0]

        return op_loss, False
    if name in TRITON_FORCED_GRAD:
        # MultiHeadLoss's triton path with its grad mode forced (as AUXFUSE_TRITON_GRAD does): the measurement
        # behind the triton grad-mode rule (grad_mode in auxfuse/backends/triton.py).
        import auxfuse
        from auxfuse.backends import triton as tb

        reason = auxfuse.available_backends().get("triton")
        if reason is not None:
            raise RuntimeError(f"skip: {reason}")
        forced, w = TRITON_FORCED_GRAD[name], list(weights)

        def forced_loss(heads, t):
            previous, tb.FORCED_GRAD = tb.FORCED_GRAD, forced  # read by the forward only
            try:
                return auxfuse.multi_head_cross_entropy(list(heads), t, w, backend="triton")
            finally:
                tb.FORCED_GRAD = previous

        return forced_loss, False
    if name.startswith("auxfuse-"):
        import auxfuse

        backend = name.split("-", 1)[1]
        reason = auxfuse.available_backends().get(backend)
        if reason is not None:
            raise RuntimeError(f"skip: {reason}")
        return (lambda heads, t: auxfuse.multi_head_cross_entropy(list(heads), t, list(weights),
                                                                  backend=backend)), False
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as error:  # noqa: BLE001
            raise RuntimeError(f"skip: liger_kernel not importable ({type(error).__name__})")
        if len(shape.logits) != 2:
            raise RuntimeError("skip: LigerCrossEntropyLoss takes 2-D logits only")
        criterion = LigerCrossEntropyLoss()
        # Liger writes its gradient into the logits' storage: it gets inputs of its own.
        return (lambda heads, t: sum(w * criterion(h, t) for w, h in zip(weights, heads))), True
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------------

def make_inputs(shape: Shape, device, num_sets: int, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(num_sets):
        heads = [(torch.randn(shape.logits, generator=g, device=device) * 2).to(shape.dtype).requires_grad_(True)
                 for _ in range(shape.heads)]
        target = torch.randint(0, shape.logits[1], (shape.logits[0], *shape.logits[2:]), generator=g, device=device)
        sets.append((heads, target))
    return sets


def num_input_sets(shape: Shape) -> int:
    """Enough sets that consecutive iterations never find their logits in L2 (H200: 60 MB)."""
    set_bytes = shape.elem * shape.numel
    return max(1, min(32, math.ceil(256 * 2**20 / set_bytes)))


def step_fn(loss_fn, mode: str):
    if mode == "fwd":
        return lambda heads, t: loss_fn(heads, t)

    def fwd_bwd(heads, t):
        loss = loss_fn(heads, t)
        return torch.autograd.grad(loss, heads)

    return fwd_bwd


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_step(step, sets, device, target_ms: float, repeats: int) -> tuple[float, list]:
    """Median over `repeats` of the mean ms per iteration of back-to-back iterations, rotating input sets."""
    with Timer(device) as t:
        step(*sets[0])
    iters = max(len(sets), min(200, math.ceil(target_ms / max(t.ms, 1e-3))))
    samples = []
    for _ in range(repeats):
        with Timer(device) as t:
            for i in range(iters):
                step(*sets[i % len(sets)])
        samples.append(t.ms / iters)
    return statistics.median(samples), samples


def peak_memory_delta(step, inputs, device) -> Optional[int]:
    if device.type != "cuda":
        return None
    sync(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(*inputs)
    del out
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_ops(step, inputs, device) -> Optional[dict]:
    """Device-side operations of one step: kernels, memsets, memcpys (names kept for the JSON)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(*inputs)
        sync(device)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = [n for n in names if "memset" in n.lower()]
    copies = [n for n in names if "memcpy" in n.lower()]
    kernels = [n for n in names if n not in memsets and n not in copies]
    return {"total": len(names), "kernels": len(kernels), "memsets": len(memsets), "memcpys": len(copies),
            "auxfuse_kernels": sum("auxfuse" in n for n in kernels), "names": names}


def copy_bandwidth(device, gib: float = 2.0) -> Optional[float]:
    """Device-to-device copy: (read + write) bytes / time, GB/s (1e9), median of 10."""
    if device.type != "cuda":
        return None
    n = int(gib * GiB) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(10):
        with Timer(device) as t:
            dst.copy_(src)
        samples.append(2 * src.numel() * 4 / (t.ms * 1e-3) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    shape: str
    mode: str
    provider: str
    ms: Optional[float] = None
    samples: list = field(default_factory=list)
    floor_gbps: Optional[float] = None
    own_gbps: Optional[float] = None
    peak_mb: Optional[float] = None
    ops: Optional[dict] = None
    warmup_s: Optional[float] = None
    error: Optional[str] = None
    vs_naive: Optional[float] = None
    vs_compile: Optional[float] = None


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_shape(shape: Shape, device, providers, modes, deadline: float, repeats: int, target_ms: float,
              log) -> list[Row]:
    rows = []
    shared_sets = None
    try:
        shared_sets = make_inputs(shape, device, num_input_sets(shape))
    except Exception as error:  # noqa: BLE001
        for mode in modes:
            for p in providers:
                rows.append(Row(shape.id, mode, p, error=f"inputs: {type(error).__name__}: {error}"[:200]))
        return rows
    for provider in providers:
        private = None
        for mode in modes:
            row = Row(shape.id, mode, provider)
            rows.append(row)
            if time.monotonic() > deadline:
                row.error = "skipped: time budget"
                continue
            if provider in FWD_BWD_ONLY and mode != "fwd+bwd":
                row.error = "skip: fwd+bwd only (grad-mode comparison)"
                continue
            try:
                loss_fn, needs_private = make_provider(provider, shape)
                if needs_private and private is None:
                    private = make_inputs(shape, device, len(shared_sets), seed=1)
                sets = private if needs_private else shared_sets
                step = step_fn(loss_fn, mode)
                t0 = time.monotonic()
                for i in range(3):  # warm-up (compiles, allocates the stream's ticket, fills the caches)
                    out = step(*sets[i % len(sets)])
                del out
                sync(device)
                row.warmup_s = time.monotonic() - t0
                row.ms, row.samples = time_step(step, sets, device, target_ms, repeats)
                row.floor_gbps = shape.floor_bytes(mode) / (row.ms * 1e-3) / 1e9
                if provider.startswith("auxfuse-cuda"):
                    own_bytes = shape.cuda_own_bytes(mode, shape.cuda_grad_mode(provider))
                    row.own_gbps = own_bytes / (row.ms * 1e-3) / 1e9
                peak = peak_memory_delta(step, sets[0], device)
                row.peak_mb = None if peak is None else peak / 2**20
                if mode == "fwd+bwd" and shape.elem * shape.numel <= PROFILE_MAX_MIB * 2**20:
                    row.ops = device_ops(step, sets[0], device)
                log(f"  {shape.id:15s} {mode:8s} {provider:15s} {row.ms:9.3f} ms  (warm-up {row.warmup_s:.1f} s)")
            except Exception as error:  # noqa: BLE001
                message = str(error).strip().split("\n")[0]
                row.error = message[:200] if message.startswith("skip:") else f"{type(error).__name__}: {message}"[:200]
                if not message.startswith("skip:"):
                    log(f"  {shape.id:15s} {mode:8s} {provider:15s} FAILED: {row.error}")
                    log("    " + traceback.format_exc().strip().replace("\n", "\n    ")[-1500:])
            finally:
                free_memory(device)
        del private
        free_memory(device)
    del shared_sets
    free_memory(device)
    order = {p: i for i, p in enumerate(providers)}
    rows.sort(key=lambda r: (modes.index(r.mode), order[r.provider]))
    by_mode = {}
    for r in rows:
        by_mode.setdefault(r.mode, {})[r.provider] = r
    for r in rows:
        base = by_mode[r.mode]
        if r.ms:
            if base.get("naive") and base["naive"].ms:
                r.vs_naive = base["naive"].ms / r.ms
            if base.get("compile") and base["compile"].ms:
                r.vs_compile = base["compile"].ms / r.ms
    return rows


def fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def markdown_table(shapes, rows, copy_gbps) -> str:
    described = {s.id: s.describe() for s in shapes}
    lines = [
        f"device-to-device copy bandwidth: {fmt(copy_gbps, '.0f')} GB/s (read + write)",
        "",
        "| shape | mode | provider | median ms | x naive | x compile | floor GB/s | % copy | own GB/s (% copy) "
        "| peak MB | device ops / fwd+bwd | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pct = None if (r.floor_gbps is None or not copy_gbps) else 100 * r.floor_gbps / copy_gbps
        own = "-"
        if r.own_gbps is not None:
            own = f"{r.own_gbps:.0f}" + (f" ({100 * r.own_gbps / copy_gbps:.0f}%)" if copy_gbps else "")
        ops = "-"
        if r.ops:
            ops = f"{r.ops['total']}" + (f" ({r.ops['auxfuse_kernels']} auxfuse)" if r.ops["auxfuse_kernels"] else "")
        note = (r.error or "").replace("|", "/")
        lines.append(
            f"| {described.get(r.shape, r.shape)} | {r.mode} | {r.provider} | {fmt(r.ms, '.3f')} | "
            f"{fmt(r.vs_naive, '.2f')} | {fmt(r.vs_compile, '.2f')} | {fmt(r.floor_gbps, '.0f')} | "
            f"{fmt(pct, '.0f')} | {own} | {fmt(r.peak_mb, '.0f')} | {ops} | {note} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The numbers issues #4 (cuda) and #5 (triton) ask of an H200 run, read off a run's fwd+bwd rows
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    issue: int
    shape: str
    provider: str
    measure: str  # a key of MEASURES
    goal: float


# measure -> (what it means, True when higher is better)
MEASURES = {
    "x naive": ("speed-up over the naive eager sum", True),
    "x compile": ("speed-up over torch.compile of the naive sum", True),
    "x liger": ("speed-up over Liger-Kernel's cross-entropy looped over the heads", True),
    "% copy": ("floor bytes / time as a % of the device-to-device copy bandwidth", True),
    "device ops": ("kernels + memsets + copies in one forward + backward", False),
    "MB over grads": ("peak memory above the inputs, less the gradients (MB); allowed: 64 B per row and head "
                      "+ 2 MB of allocator rounding", False),
}


def _targets() -> list:
    lm = ("lm2-bf16", "lm4-bf16")
    googlenet = ("googlenet-fp32", "googlenet-bf16")
    out = []
    for shape in googlenet:
        out += [Target(4, shape, "auxfuse-cuda", "device ops", 2), Target(4, shape, "auxfuse-cuda", "x naive", 5),
                Target(4, shape, "auxfuse-cuda", "x compile", 2), Target(5, shape, "auxfuse-triton", "x naive", 3)]
    for shape in lm:
        rows = SHAPES_BY_ID[shape].rows * SHAPES_BY_ID[shape].heads
        out += [Target(4, shape, "auxfuse-cuda", "% copy", 85), Target(4, shape, "auxfuse-cuda", "x liger", 1.5),
                Target(4, shape, "auxfuse-cuda", "MB over grads", 64 * rows / 2**20 + 2)]
    out += [Target(4, "seg-fp16", "auxfuse-cuda", "% copy", 80), Target(5, "lm2-bf16", "auxfuse-triton", "% copy", 80)]
    return out


TARGETS = _targets()


def _measure(target: Target, rows: dict, copy_gbps: Optional[float]) -> tuple[Optional[float], str]:
    """(value, why it is missing). rows: {(shape, provider): row dict} of the fwd+bwd mode."""
    row = rows.get((target.shape, target.provider))
    if row is None:
        return None, "not in this run"
    if row.get("error") or row.get("ms") is None:
        return None, row.get("error") or "no time"
    if target.measure == "x naive":
        return row.get("vs_naive"), "no naive time"
    if target.measure == "x compile":
        return row.get("vs_compile"), "no compile time"
    if target.measure == "x liger":
        liger = rows.get((target.shape, "liger")) or {}
        return (liger["ms"] / row["ms"] if liger.get("ms") else None), "no Liger time"
    if target.measure == "% copy":
        ok = row.get("floor_gbps") is not None and copy_gbps
        return (100 * row["floor_gbps"] / copy_gbps if ok else None), "no copy bandwidth"
    if target.measure == "device ops":
        return (row["ops"]["total"] if row.get("ops") else None), "not profiled"
    if target.measure == "MB over grads":
        shape = SHAPES_BY_ID[target.shape]
        peak = row.get("peak_mb")
        return (None if peak is None else peak - shape.elem * shape.numel / 2**20), "no peak memory"
    raise ValueError(target.measure)


def verdict_bandwidth(*copy_gbps: Optional[float]) -> Optional[float]:
    """The copy bandwidth the % targets are judged against: the higher of the run's measurements."""
    return max((g for g in copy_gbps if g), default=None)


def target_verdicts(rows: list, copy_gbps: Optional[float]) -> list:
    """Each target of TARGETS with the run's value: dicts of issue, shape, provider, measure, goal, value, met
    (None when the run has no value, with the reason in `note`). rows: Row.__dict__s, as in the JSON."""
    by_key = {(r["shape"], r["provider"]): r for r in rows if r["mode"] == "fwd+bwd"}
    verdicts = []
    for t in TARGETS:
        value, missing = _measure(t, by_key, copy_gbps)
        higher_is_better = MEASURES[t.measure][1]
        met = None if value is None else (value >= t.goal if higher_is_better else value <= t.goal)
        verdicts.append(dict(issue=t.issue, shape=t.shape, provider=t.provider, measure=t.measure, goal=t.goal,
                             value=value, met=met, note="" if value is not None else missing))
    return verdicts


def verdict_table(verdicts: list, copy_gbps: Optional[float]) -> str:
    met = sum(v["met"] is True for v in verdicts)
    missed = sum(v["met"] is False for v in verdicts)
    lines = [f"targets of issues #4 and #5 (fwd+bwd; copy bandwidth {fmt(copy_gbps, '.0f')} GB/s, the higher of "
             f"the run's two measurements): {met} met, "
             f"{missed} missed, {len(verdicts) - met - missed} not measured",
             "",
             "| issue | shape | provider | measure | goal | measured | verdict |",
             "|---|---|---|---|---:|---:|---|"]
    for v in verdicts:
        bound = ">=" if MEASURES[v["measure"]][1] else "<="
        verdict = {True: "met", False: "MISSED", None: f"not measured ({v['note']})"}[v["met"]]
        lines.append(f"| #{v['issue']} | {v['shape']} | {v['provider']} | {v['measure']} | {bound} {v['goal']:.4g} | "
                     f"{fmt(v['value'], '.3g')} | {verdict.replace('|', '/')} |")
    lines.append("")
    lines += [f"{measure}: {meaning}" for measure, (meaning, _) in MEASURES.items()]
    return "\n".join(lines)


GRAD_MODE_PROVIDERS = {"cuda": ("auxfuse-cuda-op-gif", "auxfuse-cuda-op-lse"),
                       "triton": ("auxfuse-triton-gif", "auxfuse-triton-lse")}
GRAD_MODE_NAMES = {1: "gif", 2: "lse"}


def grad_mode_rules(rows: list) -> list:
    """Per shape and backend: the grad mode auxfuse's rule picks (gif: gradient in the forward, lse: saved
    log-sum-exp), the fwd+bwd times with each mode forced, and whether the rule picked the faster one (None
    when a time is missing). rows: Row.__dict__s, as in the JSON."""
    by_key = {(r["shape"], r["provider"]): r for r in rows if r["mode"] == "fwd+bwd"}
    checks = []
    for shape_id in dict.fromkeys(r["shape"] for r in rows):
        shape = SHAPES_BY_ID.get(shape_id)
        if shape is None:
            continue
        rules = {"cuda": shape.cuda_grad_mode("auxfuse-cuda"), "triton": shape.triton_grad_mode()}
        for backend, (gif, lse) in GRAD_MODE_PROVIDERS.items():
            ms = {1: (by_key.get((shape_id, gif)) or {}).get("ms"), 2: (by_key.get((shape_id, lse)) or {}).get("ms")}
            faster = None if None in ms.values() else min(ms, key=ms.get)
            checks.append(dict(shape=shape_id, backend=backend, rule=GRAD_MODE_NAMES[rules[backend]],
                               gif_ms=ms[1], lse_ms=ms[2], faster=GRAD_MODE_NAMES.get(faster),
                               rule_right=None if faster is None else faster == rules[backend]))
    return checks


def grad_mode_table(checks: list) -> str:
    lines = ["grad mode per shape (fwd+bwd, each mode forced): does auxfuse's rule pick the faster one?", "",
             "| shape | backend | rule picks | gif ms | lse ms | faster | rule right |",
             "|---|---|---|---:|---:|---|---|"]
    for c in checks:
        right = {True: "yes", False: "NO", None: "not measured"}[c["rule_right"]]
        lines.append(f"| {c['shape']} | {c['backend']} | {c['rule']} | {fmt(c['gif_ms'], '.3f')} | "
                     f"{fmt(c['lse_ms'], '.3f')} | {c['faster'] or '-'} | {right} |")
    return "\n".join(lines)


def judge(rows: list, *copy_gbps: Optional[float]) -> dict:
    """A run's verdict on the targets and its grad-mode check. rows: Row.__dict__s, as in the JSON; copy_gbps:
    the run's copy-bandwidth measurements."""
    gbps = verdict_bandwidth(*copy_gbps)
    return {"verdict_gbps": gbps, "targets": target_verdicts(rows, gbps), "grad_mode_rules": grad_mode_rules(rows)}


def judgement_tables(judged: dict) -> str:
    return verdict_table(judged["targets"], judged["verdict_gbps"]) + "\n\n" + grad_mode_table(
        judged["grad_mode_rules"])


def environment(device) -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "platform": platform.platform(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=props.total_memory / GiB)
    try:
        import auxfuse

        info["auxfuse_backends"] = auxfuse.available_backends()
    except Exception as error:  # noqa: BLE001
        info["auxfuse_backends"] = f"import failed: {error}"
    return info


def shape_facts(s: Shape, modes) -> dict:
    grad_mode = s.cuda_grad_mode("auxfuse-cuda")
    return dict(id=s.id, heads=s.heads, logits=s.logits, dtype=str(s.dtype), weights=s.weights,
                floor_bytes={m: s.floor_bytes(m) for m in modes}, cuda_grad_mode=grad_mode,
                cuda_own_bytes={m: s.cuda_own_bytes(m, grad_mode) for m in modes})


def plan(shapes, providers, modes) -> str:
    lines = ["plan:"]
    for s in shapes:
        lines.append(
            f"  {s.id:15s} {s.describe():32s} logits {s.elem * s.numel / 2**20:10.1f} MB, input sets "
            f"{num_input_sets(s):2d}, floor fwd+bwd {s.floor_bytes('fwd+bwd') / 1e9:7.3f} GB, cuda own "
            f"{s.cuda_own_bytes('fwd+bwd', s.cuda_grad_mode('auxfuse-cuda')) / 1e9:7.3f} GB"
        )
    lines.append(f"  providers: {', '.join(providers)}")
    lines.append(f"  modes: {', '.join(modes)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write full results here (default: $OUT/gpu_results.json)")
    parser.add_argument("--only", nargs="*", default=None, help="shape ids to run")
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting measurements after this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target-ms", type=float, default=60.0, help="time per repeat")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the local device")
    parser.add_argument("--verdict", metavar="JSON", help="print the targets table of a saved run and exit")
    args = parser.parse_args(argv)
    if args.verdict:
        with open(args.verdict) as f:
            saved = json.load(f)
        print(judgement_tables(judge(saved["rows"], saved.get("copy_gbps"), saved.get("copy_gbps_after"))))
        return 0

    start = time.monotonic()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.only:
        shapes = [s for s in shapes if s.id in args.only]
    modes = MODES
    print(plan(shapes, args.providers, modes), flush=True)
    if args.dry_run:
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke for a CPU code-path check", file=sys.stderr)
        return 2
    env = environment(device)
    print(json.dumps(env, indent=None, default=str), flush=True)

    def log(message):
        print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)

    copy_gbps = copy_bandwidth(device)
    log(f"copy bandwidth {fmt(copy_gbps, '.0f')} GB/s")
    deadline = start + args.budget_s
    rows: list[Row] = []
    for shape in shapes:
        log(f"{shape.id}: {shape.describe()}")
        rows += run_shape(shape, device, args.providers, modes, deadline, args.repeats, args.target_ms, log)
    copy_after = copy_bandwidth(device)
    log(f"copy bandwidth after the run {fmt(copy_after, '.0f')} GB/s; total {time.monotonic() - start:.0f} s")

    judged = None if args.smoke else judge([r.__dict__ for r in rows], copy_gbps, copy_after)
    out_path = args.json or (os.path.join(os.environ["OUT"], "gpu_results.json") if os.environ.get("OUT") else None)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        payload = {
            "environment": env,
            "copy_gbps": copy_gbps,
            "copy_gbps_after": copy_after,
            "elapsed_s": time.monotonic() - start,
            "shapes": [shape_facts(s, modes) for s in shapes],
            "rows": [r.__dict__ for r in rows],
            "targets": judged["targets"] if judged else [],
            "grad_mode_rules": judged["grad_mode_rules"] if judged else [],
        }
        with open(out_path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        log(f"results: {out_path}")
    print()
    print(markdown_table(shapes, rows, copy_gbps), flush=True)
    if judged:
        print()
        print(judgement_tables(judged), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
