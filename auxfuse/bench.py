"""`python -m auxfuse bench`, and the definitions it shares with the pytest-benchmark suite in benchmarks/: the
providers (naive eager sum, torch.compile of it, every auxfuse backend that can run, Liger-Kernel's
cross-entropy looped over heads when installed), the shapes per device, the inputs and the step.

The CLI times the providers of one case (shape, dtype, mode) in interleaved rounds: every round runs each
provider in turn, each for a block of calls lasting about ``--round-ms``, and rounds repeat until the case's
share of ``--seconds`` is spent; ``--passes`` sweeps over all the cases spread every case's rounds over the
whole run. A change in the machine's load (another process, a compile next door) then hits every provider of
a round alike, and the speed-up is taken round by round (naive's block time over the provider's), so it holds
still where the times themselves drift. On the CPU one core is left free (see `default_cpu_threads`). The
table and the plot give each median with its interquartile range."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import auxfuse
from auxfuse.backends import AUTO_ORDER


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: `heads` heads of logits (batch, classes, *spatial) sharing one target.

    Example:
        >>> str(Shape("segmentation", 2, 8, 21, (128, 128)))
        'segmentation 2x8x21x128x128'
    """

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


@dataclass(frozen=True)
class PerHeadShape:
    """One benchmark shape whose heads each have their own logits shape and target: `kind` "own" (a target
    drawn per head: deep supervision, multi-task) or "shifted" (multi-token heads: one sequence of labels
    shifted by 0, 1, ... per head).

    Example:
        >>> str(PerHeadShape("multi_task", ((256, 1000), (256, 100), (256, 10)), "own", (1.0, 0.5, 0.5)))
        'multi_task 256x1000+256x100+256x10'
    """

    name: str
    logits_shapes: tuple
    kind: str
    weights: tuple

    @property
    def heads(self) -> int:
        return len(self.logits_shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.logits_shapes)

    def __str__(self) -> str:
        return f"{self.name} " + "+".join("x".join(str(d) for d in s) for s in self.logits_shapes)


@dataclass(frozen=True)
class LinearShape:
    """Fused linear + cross-entropy (multi-token heads): `heads` hidden states (rows, hidden) through one shared
    (vocab, hidden) projection, labels shifted by 0, 1, ... per head, DeepSeek's weights. Its "heads" in a step
    are the leaves that get gradients: the hidden states and the projection.

    Example:
        >>> str(LinearShape("linear", 4, 2048, 256, 32000))
        'linear 4x2048x256->32000'
    """

    name: str
    heads: int
    rows: int
    hidden: int
    vocab: int

    @property
    def numel(self) -> int:  # the logits a naive sum holds
        return self.heads * self.rows * self.vocab

    @property
    def weights(self) -> tuple:
        return tuple(auxfuse.deepseek_mtp_weights(self.heads - 1))

    def __str__(self) -> str:
        return f"{self.name} {self.heads}x{self.rows}x{self.hidden}->{self.vocab}"


def _per_head_shapes(pyramid: int, tokens: int, vocab: int) -> list[PerHeadShape]:
    scales = tuple((2, 21, pyramid // 2**i, pyramid // 2**i) for i in range(4))
    return [
        PerHeadShape("deep_supervision", scales, "own", tuple(auxfuse.nnunet_deep_supervision_weights(4))),
        PerHeadShape("multi_token", ((tokens, vocab),) * 4, "shifted", tuple(auxfuse.deepseek_mtp_weights(3))),
        PerHeadShape("multi_task", ((256, 1000), (256, 100), (256, 10)), "own", (1.0, 0.5, 0.5)),
    ]


# Shapes by device. `python -m auxfuse bench` runs all but the LM-sized ones (lm, multi_token) on the CPU by
# default (a naive call takes seconds there; `--shapes lm,multi_token` asks for them, benchmarks/ times them).
SHAPES = {
    "cpu": [
        Shape("inception", 2, 256, 1000),
        Shape("googlenet", 3, 256, 1000),
        Shape("segmentation", 2, 8, 21, (128, 128)),
        Shape("lm", 2, 4096, 32000),
        Shape("lm", 4, 4096, 32000),
        *_per_head_shapes(pyramid=128, tokens=2048, vocab=32000),
        LinearShape("linear", 4, 2048, 256, 32000),
    ],
    "cuda": [
        Shape("inception", 2, 256, 1000),
        Shape("googlenet", 3, 256, 1000),
        Shape("segmentation", 2, 8, 21, (512, 512)),
        Shape("lm", 2, 8192, 128256),
        Shape("lm", 4, 8192, 128256),
        *_per_head_shapes(pyramid=512, tokens=8192, vocab=128256),
        LinearShape("linear", 4, 8192, 4096, 128256),
    ],
}
CPU_OPT_IN = ("lm", "multi_token", "linear")
HEAD_WEIGHTS = {2: [1.0, 0.4], 3: [1.0, 0.3, 0.3], 4: [1.0, 0.3, 0.3, 0.3]}


def weights_of(shape) -> list[float]:
    """The head weights a shape is benchmarked with.

    Example:
        >>> weights_of(Shape("googlenet", 3, 256, 1000))
        [1.0, 0.3, 0.3]
    """
    return list(shape.weights) if isinstance(shape, (PerHeadShape, LinearShape)) else HEAD_WEIGHTS[shape.heads]
MODES = ("forward", "forward+backward")


def make_inputs(shape, dtype: torch.dtype, device: str, seed: int = 0):
    """Heads (leaf tensors needing grad) and class-index targets (one Tensor, or a list of one per head for a
    PerHeadShape), drawn from a generator seeded with `seed`.

    Example:
        >>> heads, target = make_inputs(Shape("googlenet", 3, 256, 1000), torch.float32, "cpu")
        >>> len(heads), tuple(heads[0].shape), tuple(target.shape)
        (3, (256, 1000), (256,))
    """
    g = torch.Generator(device=device).manual_seed(seed)
    if isinstance(shape, LinearShape):
        hiddens = [torch.randn(shape.rows, shape.hidden, generator=g, device=device).to(dtype).requires_grad_()
                   for _ in range(shape.heads)]
        projection = (torch.randn(shape.vocab, shape.hidden, generator=g, device=device) * 0.05).to(dtype)
        labels = torch.randint(0, shape.vocab, (shape.rows,), generator=g, device=device)
        return [*hiddens, projection.requires_grad_()], auxfuse.shifted_targets(labels, shape.heads)
    if isinstance(shape, PerHeadShape):
        heads = [torch.randn(s, generator=g, device=device).to(dtype).requires_grad_() for s in shape.logits_shapes]
        if shape.kind == "shifted":
            rows, classes = shape.logits_shapes[0]
            labels = torch.randint(0, classes, (rows,), generator=g, device=device)
            return heads, auxfuse.shifted_targets(labels, shape.heads)
        return heads, [torch.randint(0, s[1], (s[0], *s[2:]), generator=g, device=device)
                       for s in shape.logits_shapes]
    heads = [
        torch.randn(shape.logits_shape, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        for _ in range(shape.heads)
    ]
    target = torch.randint(0, shape.classes, shape.target_shape, generator=g, device=device)
    return heads, target


def naive_sum(heads, target, weights):
    """What users write by hand: `loss1 + w * loss2 + ...` with F.cross_entropy (one target, or one per head).

    Example:
        >>> heads, target = make_inputs(Shape("inception", 2, 8, 10), torch.float32, "cpu")
        >>> loss = naive_sum(heads, target, [1.0, 0.4])
    """
    targets = target if isinstance(target, list) else [target] * len(heads)
    return sum(w * F.cross_entropy(x, t) for w, x, t in zip(weights, heads, targets))


def naive_linear_sum(leaves, targets, weights):
    """The linear + cross-entropy users write: F.linear then F.cross_entropy per head (LinearShape's inputs:
    the hidden states, then the shared projection).

    Example:
        >>> leaves, targets = make_inputs(LinearShape("linear", 2, 8, 4, 10), torch.float32, "cpu")
        >>> loss = naive_linear_sum(leaves, targets, [1.0, 0.3])
    """
    *hiddens, projection = leaves
    return sum(w * F.cross_entropy(F.linear(x, projection), t) for w, x, t in zip(weights, hiddens, targets))


_compiled_by_signature: dict = {}


def _compiled(fn: Callable) -> Callable:
    """torch.compile of `fn` (a naive sum), one compiled copy per input signature. Dynamo keeps compiled graphs,
    and counts its recompile limit (8), per code object: past the limit one shared function would silently
    run the naive sum eagerly, so every signature gets its own copy of the function's code."""

    def call(heads, target, weights):
        targets = target if isinstance(target, list) else [target]
        signature = (fn.__name__, tuple((h.shape, h.dtype, h.device) for h in heads),
                     tuple(t.shape for t in targets), tuple(weights), torch.is_grad_enabled())
        compiled = _compiled_by_signature.get(signature)
        if compiled is None:
            code_copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
            compiled = _compiled_by_signature[signature] = torch.compile(code_copy, dynamic=False)
        return compiled(heads, target, weights)

    return call


_compiled_naive_sum = _compiled(naive_sum)


def _liger_loop():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    criterion = LigerCrossEntropyLoss()

    def loss(heads, target, weights):
        targets = target if isinstance(target, list) else [target] * len(heads)
        return sum(w * criterion(x.movedim(1, -1).reshape(-1, x.shape[1]), t.reshape(-1))
                   for w, x, t in zip(weights, heads, targets))

    return loss


def linear_providers(device: str) -> dict[str, Callable]:
    """name -> loss function(leaves, targets, weights) of a LinearShape: the naive loop, torch.compile of it,
    auxfuse's fused linear + cross-entropy on each of its backends that runs here, and the three matmuls of
    every head alone (the floor: logits, the hidden states' gradient, the projection's gradient).

    Example:
        >>> list(linear_providers("cpu"))
        ['naive eager', 'torch.compile(naive)', 'auxfuse[cpu]', 'auxfuse[torch]', 'matmuls (floor)']
    """
    from auxfuse.linear import LINEAR_BACKENDS

    result: dict[str, Callable] = {NAIVE: naive_linear_sum, "torch.compile(naive)": _compiled(naive_linear_sum)}
    available = auxfuse.available_backends()
    for name in AUTO_ORDER[device]:
        if name in LINEAR_BACKENDS and available[name] is None:
            result[f"auxfuse[{name}]"] = (
                lambda leaves, targets, weights, _b=name: auxfuse.multi_head_linear_cross_entropy(
                    leaves[:-1], leaves[-1], targets, weights, backend=_b))

    result["matmuls (floor)"] = linear_floor
    return result


def linear_floor(leaves, targets, weights, mode: str = "forward+backward") -> None:
    """The matmuls of a linear + cross-entropy alone, without autograd: per head the logits, and for
    forward+backward the hidden states' and the projection's gradients (a whole step: see step_fn)."""
    *hiddens, projection = leaves
    with torch.no_grad():
        for x in hiddens:
            z = x @ projection.t()
            if mode != "forward":
                z @ projection
                z.t() @ x


linear_floor.whole_step = True


def providers(device: str, dtype: torch.dtype, shape=None) -> dict[str, Optional[Callable]]:
    """name -> loss function(heads, target, weights), for every provider that can run on this device (for a
    LinearShape, `linear_providers`).

    Example:
        >>> list(providers("cpu", torch.float32))[:2]
        ['naive eager', 'torch.compile(naive)']
    """
    if isinstance(shape, LinearShape):
        return linear_providers(device)
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


def _time_call(step: Callable[[], None], device: str) -> float:
    """Seconds one call takes, its device work included."""
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def step_fn(loss_fn: Callable, heads, target, weights, mode: str) -> Callable[[], None]:
    """One benchmark step: the loss, and for forward+backward its gradients w.r.t. every head.

    Example:
        >>> heads, target = make_inputs(Shape("tiny", 2, 4, 10), torch.float32, "cpu")
        >>> step = step_fn(naive_sum, heads, target, [1.0, 0.4], "forward+backward")
        >>> step()  # one loss and its gradients
    """
    if getattr(loss_fn, "whole_step", False):  # it times itself as a step of this mode (linear_floor)
        def run():
            loss_fn(heads, target, weights, mode)
    elif mode == "forward":
        def run():
            with torch.no_grad():
                loss_fn(heads, target, weights)
    else:
        def run():
            loss = loss_fn(heads, target, weights)
            torch.autograd.grad(loss, heads)
    return run


def floor_bytes(shape, dtype: torch.dtype, mode: str) -> int:
    """The fewest bytes a loss can move: each logit read once, and for backward each gradient written once.

    Example:
        >>> floor_bytes(Shape("googlenet", 3, 256, 1000), torch.float32, "forward+backward")
        6144000
    """
    element = torch.finfo(dtype).bits // 8
    return shape.numel * element * (1 if mode == "forward" else 2)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of at least one value.

    Example:
        >>> quartiles([1.0, 2.0, 3.0, 4.0, 100.0])
        (2.0, 3.0, 4.0)
    """
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def busy_cpu_seconds() -> Optional[float]:
    """CPU seconds the whole machine has spent busy since boot (every process, and time the hypervisor gave to
    other guests), from Linux's /proc/stat; None where there is no /proc/stat.

    Example:
        >>> seconds = busy_cpu_seconds()  # None off Linux
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    """Interleaved rounds of one case: per provider, one sample per round (the median time per call over that
    round's block of calls, in seconds), how many calls each block made, the rounds' wall time, and the CPU
    seconds other work used meanwhile (None where it cannot be read)."""

    samples: dict[str, list[float]]
    calls_per_block: dict[str, int]
    wall_seconds: float = 0.0
    other_cpu_seconds: Optional[float] = None


def time_interleaved(steps: dict[str, Callable[[], None]], device: str, seconds: float, round_ms: float,
                     min_rounds: int = 5, max_rounds: int = 1000,
                     calls_per_block: Optional[dict[str, int]] = None) -> Timing:
    """Time `steps` (name -> one call) in rounds: every round runs each of them in turn for a block of calls
    lasting about `round_ms`, the starting one rotating from round to round; rounds repeat until `seconds`
    have passed and at least `min_rounds` have run. A block's sample is the median of its calls' times, so a
    call that another process preempted does not move it. The blocks' lengths in calls are measured first,
    unless `calls_per_block` gives them. The steps must already be warm (compiled, allocated).

    Example:
        >>> x = torch.randn(64, 64)
        >>> timing = time_interleaved({"mm": lambda: x @ x, "add": lambda: x + x}, "cpu", 0.05, 1.0)
        >>> len(timing.samples["mm"]) == len(timing.samples["add"]) >= 5
        True
    """
    if calls_per_block is None:
        calls_per_block = {}
        for name, step in steps.items():  # the fastest of a few calls sets the block's length in calls
            call_times: list[float] = []
            while not call_times or (len(call_times) < 3 and sum(call_times) < round_ms * 1e-3):
                call_times.append(_time_call(step, device))
            calls_per_block[name] = max(1, math.ceil(round_ms * 1e-3 / min(call_times)))
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    # No garbage collection during the rounds (as timeit does): a collection takes ~0.1 s with torch.compile loaded
    # and would land on whichever provider happens to be running. The steps make no reference cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    machine_busy_start, own_cpu_start = busy_cpu_seconds(), time.process_time()
    try:
        start_all = time.perf_counter()
        for round_index in range(max_rounds):
            first = round_index % len(names)  # rotate: no provider always runs right after the same other one
            for name in names[first:] + names[:first]:
                step, calls = steps[name], calls_per_block[name]
                samples[name].append(statistics.median(_time_call(step, device) for _ in range(calls)))
            if round_index + 1 >= min_rounds and time.perf_counter() - start_all >= seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    timing = Timing(samples, calls_per_block, wall_seconds=time.perf_counter() - start_all)
    machine_busy_end = busy_cpu_seconds()
    if machine_busy_start is not None and machine_busy_end is not None:
        others = (machine_busy_end - machine_busy_start) - (time.process_time() - own_cpu_start)
        timing.other_cpu_seconds = max(0.0, others)
    return timing


_PEAK_SCRIPT = """
import gc, json, torch
from auxfuse import bench


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


torch.set_num_threads({threads})
shape, dtype = bench.LinearShape(**{shape!r}), getattr(torch, {dtype!r})
loss_fn = bench.providers("cpu", dtype, shape)[{provider!r}]
small = bench.LinearShape(shape.name, shape.heads, 8, shape.hidden, 64)
bench.step_fn(loss_fn, *bench.make_inputs(small, dtype, "cpu"), list(small.weights), {mode!r})()  # load the code
leaves, targets = bench.make_inputs(shape, dtype, "cpu")
step = bench.step_fn(loss_fn, leaves, targets, list(shape.weights), {mode!r})
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status_kib("VmRSS")
step()
print(json.dumps({{"extra_MiB": (status_kib("VmHWM") - before) / 1024}}))
"""


def cpu_peak_extra_mib(shape: LinearShape, dtype: torch.dtype, provider: str, mode: str = "forward+backward") -> float:
    """One step of `provider` on `shape` in a fresh process (after one on a tiny shape, which loads the code it
    runs): the process's peak RSS during the step (Linux's VmHWM, reset just before it) over its RSS before it,
    in MiB. The gradients of the hidden states and projection are part of it (every provider makes them).

    Example:
        >>> cpu_peak_extra_mib(LinearShape("linear", 4, 4096, 256, 32000), torch.float32, NAIVE)  # doctest: +SKIP
        3001.2
    """
    import subprocess
    import sys

    script = _PEAK_SCRIPT.format(shape=asdict(shape), dtype=str(dtype).replace("torch.", ""), provider=provider,
                                 mode=mode, threads=torch.get_num_threads())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the peak-memory process failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_MiB"]


@dataclass
class Row:
    """One provider's result on one case: times in ms per call, speed-ups over the naive sum taken round by
    round, each median with its first and third quartiles.

    Example:
        >>> Row("googlenet 3x256x1000", "float32", "forward", "naive eager", 0.48).provider
        'naive eager'
    """

    shape: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    speedup_vs_naive: Optional[float] = None  # the median over rounds of naive's time / this provider's
    speedup_q1: Optional[float] = None
    speedup_q3: Optional[float] = None
    floor_gbps: Optional[float] = None
    peak_mib: Optional[float] = None
    error: Optional[str] = None
    rounds: int = 0
    calls_per_round: int = 0
    other_cores: Optional[float] = None  # CPU cores other work kept busy during the case's rounds
    samples_ms: list = field(default_factory=list)  # one per round: the median ms per call of its block


NAIVE = "naive eager"


class CaseTimer:
    """One case (shape, dtype, mode) timed in one or more passes, each a stretch of interleaved rounds; the
    samples of every pass are pooled. A provider that fails is reported in its row's `error` and left out.

    Example:
        >>> timer = CaseTimer(Shape("tiny", 2, 8, 10), torch.float32, "cpu", "forward", {NAIVE: naive_sum})
        >>> timer.run_pass(seconds=0.02, round_ms=1.0, min_rounds=5)
        >>> timer.rows()[0].rounds >= 5
        True
    """

    def __init__(self, shape: Shape, dtype: torch.dtype, device: str, mode: str, loss_fns: dict[str, Callable]):
        self.shape, self.dtype, self.device, self.mode, self.loss_fns = shape, dtype, device, mode, loss_fns
        dtype_name = str(dtype).replace("torch.", "")
        self._rows = {name: Row(str(shape), dtype_name, mode, name, float("nan")) for name in loss_fns}
        self._samples: dict[str, list[float]] = {name: [] for name in loss_fns}
        self._calls_per_block: Optional[dict[str, int]] = None  # measured in the first pass, kept after
        self._wall_seconds, self._other_cpu_seconds = 0.0, 0.0
        self._other_known = True

    def run_pass(self, seconds: float, round_ms: float, min_rounds: int) -> None:
        """Time the providers for `seconds` more of interleaved rounds, on freshly made (identical) inputs: only
        the pass at hand holds the case's tensors."""
        heads, target = make_inputs(self.shape, self.dtype, self.device)
        weights = weights_of(self.shape)
        first_pass = self._calls_per_block is None
        steps = {}
        for name, loss_fn in self.loss_fns.items():
            row = self._rows[name]
            if row.error:
                continue
            try:
                step = step_fn(loss_fn, heads, target, weights, self.mode)
                step()  # warm-up: torch.compile compiles here in the first pass
                if first_pass and self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    step()
                    torch.cuda.synchronize()
                    row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                elif first_pass and isinstance(self.shape, LinearShape) and (name == NAIVE or "auxfuse" in name):
                    # Memory is what the linear + CE is for: the CPU's peak RSS, a process per provider.
                    row.peak_mib = cpu_peak_extra_mib(self.shape, self.dtype, name, self.mode)
                steps[name] = step
            except Exception as error:  # one failing provider is reported, not fatal
                row.error = f"{type(error).__name__}: {str(error)[:200]}"
        if not steps:
            return
        timing = time_interleaved(steps, self.device, seconds, round_ms, min_rounds,
                                  calls_per_block=self._calls_per_block)
        self._calls_per_block = timing.calls_per_block
        for name, samples in timing.samples.items():
            self._samples[name] += samples
        self._wall_seconds += timing.wall_seconds
        if timing.other_cpu_seconds is None:
            self._other_known = False
        else:
            self._other_cpu_seconds += timing.other_cpu_seconds

    def rows(self) -> list[Row]:
        """Every provider's row: median and quartiles of its samples, and of its per-round speed-ups."""
        naive = self._samples.get(NAIVE) if NAIVE in self._rows and not self._rows[NAIVE].error else None
        for name, samples in self._samples.items():
            row = self._rows[name]
            if row.error or not samples:
                continue
            row.samples_ms = [sample * 1e3 for sample in samples]
            row.q1_ms, row.median_ms, row.q3_ms = quartiles(row.samples_ms)
            row.rounds, row.calls_per_round = len(samples), self._calls_per_block[name]
            row.floor_gbps = floor_bytes(self.shape, self.dtype, self.mode) / (row.median_ms * 1e-3) / 1e9
            if self._other_known and self._wall_seconds:
                row.other_cores = self._other_cpu_seconds / self._wall_seconds
            if naive:  # round by round: both blocks of a round ran under the same load
                ratios = [n / s for n, s in zip(naive, samples)]
                row.speedup_q1, row.speedup_vs_naive, row.speedup_q3 = quartiles(ratios)
        return list(self._rows.values())


def measure_case(shape: Shape, dtype: torch.dtype, device: str, mode: str, loss_fns: dict[str, Callable],
                 seconds: float, round_ms: float, min_rounds: int = 5) -> list[Row]:
    """One case (shape, dtype, mode) in a single pass: every provider warmed up, then timed in interleaved
    rounds.

    Example:
        >>> rows = measure_case(Shape("tiny", 2, 8, 10), torch.float32, "cpu", "forward",
        ...                     {NAIVE: naive_sum}, seconds=0.05, round_ms=1.0)
        >>> rows[0].provider, rows[0].speedup_vs_naive
        ('naive eager', 1.0)
    """
    timer = CaseTimer(shape, dtype, device, mode, loss_fns)
    timer.run_pass(seconds, round_ms, min_rounds)
    return timer.rows()


def run_bench(device: str, dtypes: list, shapes: list, modes: list, seconds: float, round_ms: float,
              passes: int = 5, progress: bool = True) -> list[Row]:
    """Every case of shapes x dtypes x modes, `seconds` each, in `passes` sweeps over all the cases: each case
    is timed in slices spread over the whole run, so a change in the machine's load in the middle of the run
    (a neighbour's build starting) reaches every case, not just the ones it coincides with.

    Example:
        >>> rows = run_bench("cpu", [torch.float32], [Shape("tiny", 2, 8, 10)], ["forward"], 0.05, 1.0,
        ...                  progress=False)
        >>> [r.provider for r in rows if r.error is None]
        ['naive eager', 'torch.compile(naive)', 'auxfuse[cpu]', 'auxfuse[torch]']
    """
    from tqdm import tqdm

    timers = [CaseTimer(s, d, device, m, providers(device, d, s)) for s in shapes for d in dtypes for m in modes]
    min_rounds = math.ceil(5 / passes)  # at least 5 rounds per case over all the passes
    with tqdm(total=passes * len(timers), desc="auxfuse bench", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(passes):
            for timer in timers:
                timer.run_pass(seconds / passes, round_ms, min_rounds)
                bar.update()
    return [row for timer in timers for row in timer.rows()]


def format_table(rows: list[Row]) -> str:
    """A Markdown table: per case and provider the median ms per call with its interquartile range, and the
    speed-up over the naive sum (median of the per-round ratios) with its interquartile range.

    Example:
        >>> print(format_table([Row("tiny 2x8x10", "float32", "forward", "naive eager", 1.0, 0.9, 1.1, 1.0,
        ...                         1.0, 1.0, 0.5, rounds=5, calls_per_round=20)]).splitlines()[2])
        | tiny 2x8x10 | float32 | forward | naive eager | 1.000 | 0.900-1.100 | 1.00x | 1.00-1.00 | 0.5 | n/a | 5 x 20 |
    """
    lines = ["| shape | dtype | mode | provider | median ms | IQR ms | vs naive | IQR | GB/s at floor | peak MiB | "
             "rounds x calls |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.shape} | {r.dtype} | {r.mode} | {r.provider} | error: {r.error} | | | | | | |")
            continue
        speed, speed_iqr = "", ""
        if r.speedup_vs_naive is not None:
            speed, speed_iqr = f"{r.speedup_vs_naive:.2f}x", f"{r.speedup_q1:.2f}-{r.speedup_q3:.2f}"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        lines.append(f"| {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.median_ms:.3f} | "
                     f"{r.q1_ms:.3f}-{r.q3_ms:.3f} | {speed} | {speed_iqr} | {r.floor_gbps:.1f} | {peak} | "
                     f"{r.rounds} x {r.calls_per_round} |")
    return "\n".join(lines)


def plot_speedups(rows: list[Row], path: str, title: str) -> None:
    """Bars of each provider's median speed-up over the naive sum per case, error bars from the first to the
    third quartile of the per-round ratios.

    Example:
        >>> plot_speedups(rows, "auxfuse_bench.png", "auxfuse vs naive sum")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r.shape, r.dtype, r.mode) for r in rows))
    names = [n for n in dict.fromkeys(r.provider for r in rows) if n != NAIVE]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.8))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        by_case = {(r.shape, r.dtype, r.mode): r for r in rows if r.provider == name}
        measured = [(c, by_case[case]) for c, case in enumerate(cases)
                    if case in by_case and by_case[case].speedup_vs_naive is not None]
        positions = [c + i * width for c, _ in measured]
        medians = [r.speedup_vs_naive for _, r in measured]
        spread = [[r.speedup_vs_naive - r.speedup_q1 for _, r in measured],
                  [r.speedup_q3 - r.speedup_vs_naive for _, r in measured]]
        ax.bar(positions, medians, width, yerr=spread, capsize=2, error_kw={"linewidth": 0.8}, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(["\n".join((*shape.split(" "), dtype, mode)) for shape, dtype, mode in cases], fontsize=7)
    ax.set_ylabel("speed-up vs naive eager sum\n(median, bars: interquartile range over rounds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_cpu_threads() -> int:
    """torch's thread count, less one when it would take every core of the machine. A team of threads on
    every core waits at each of its barriers for whichever thread the OS has just descheduled to run anything
    else (a compile, another test run): one core left free keeps every provider's team running, and the
    speed-ups the same from one run to the next on a shared machine.

    Example:
        >>> 1 <= default_cpu_threads() <= torch.get_num_threads()
        True
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m auxfuse bench`.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args([]).seconds
        3.0
    """
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                        help="repeatable; default float32 and bfloat16")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable; default both")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shape names (inception, googlenet, segmentation, lm, deep_supervision, "
                             "multi_token, multi_task, linear); default all but lm, multi_token and linear on the CPU, "
                             "all on CUDA")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time budget per case (shape, dtype, mode), warm-up and compile not counted")
    parser.add_argument("--passes", type=int, default=5,
                        help="sweeps over all the cases, each giving every case its share of --seconds")
    parser.add_argument("--round-ms", type=float, default=25.0,
                        help="each provider's block of calls per round lasts about this long (at least one call)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default on the CPU: torch's choice, less one if that takes every "
                             "core)")
    parser.add_argument("--json", default="auxfuse_bench.json")
    parser.add_argument("--plot", default="auxfuse_bench.png", help="PNG of the speed-ups ('' to skip)")


def main(args: argparse.Namespace) -> list[Row]:
    """Run the benchmark as `python -m auxfuse bench` does: print the table, write the JSON and the PNG.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> rows = main(parser.parse_args(["--shapes", "googlenet", "--seconds", "1"]))  # doctest: +SKIP
    """
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or device != "cuda":
        torch.set_num_threads(args.threads or default_cpu_threads())
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    shapes = SHAPES["cuda" if device == "cuda" else "cpu"]
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s.name in wanted]
    elif device != "cuda":
        shapes = [s for s in shapes if s.name not in CPU_OPT_IN]
    rows = run_bench(device, dtypes, shapes, list(args.mode or MODES), args.seconds, args.round_ms, args.passes)
    print(format_table(rows))
    contended = {(r.shape, r.dtype, r.mode): r.other_cores for r in rows if (r.other_cores or 0.0) > 0.25}
    if device != "cuda" and contended:
        print(f"note: other processes kept up to {max(contended.values()):.1f} of this machine's {os.cpu_count()} "
              f"cores busy during {len(contended)} of {len({(r.shape, r.dtype, r.mode) for r in rows})} cases; "
              f"the providers shared the CPU with it alike, round by round, so compare speed-ups rather than "
              f"times, and rerun on an idle machine for times")
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"CPU, {threads} thread{'s' if threads > 1 else ''} ({os.cpu_count()} cores)")
    meta = {"device": device, "machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "threads": threads, "cpu_count": os.cpu_count(), "seconds_per_case": args.seconds,
            "passes": args.passes, "round_ms": args.round_ms}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(rows, args.plot, f"auxfuse vs naive sum ({machine}, torch {torch.__version__}, "
                                       f"{meta['date']}; {args.seconds:g} s per case in interleaved rounds, "
                                       f"{args.passes} passes)")
        print(f"wrote {args.plot}")
    return rows
