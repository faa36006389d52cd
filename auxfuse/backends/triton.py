"""The `triton` backend: Triton kernels, called from a plain autograd.Function in eager mode and through
``torch.library.triton_op`` under torch.compile / make_fx.

Kernels (one launch covers every head):

  _denom_kernel     pre-pass over the targets: partial sums of the mean's divisor (grad-in-forward mode only)
  _forward_kernel   every head's per-row log-sum-exp, loss and hits; in grad-in-forward mode also the gradient
  _finalize_kernel  one program: the partial sums of the forward programs, added in a fixed order
  _backward_kernel  every head's gradient from the saved log-sum-exp (lse mode)
  _scale_kernel     multiplies grad-in-forward gradients by grad_output read on the device; returns at once
                    when it is exactly 1.0 (the plain loss.backward())

Two grad modes (chosen from static facts only, never from tensor values):

  lse      the forward saves each row's log-sum-exp (and a per-row coefficient); the backward kernel re-reads
           the logits and writes the gradient: logits read twice + gradient written once = 3 x element size
           bytes per logit. Two launches in forward (main + finalize), one in backward.
  forward  the forward kernel makes a second pass over each row right after the online max / sum pass (the
           row was just read, so it comes from L2 or L1) and writes every head's gradient with the head weight
           and the mean's 1 / divisor folded in (fp32 math, ``p - 1`` at the target formed in fp32, one
           rounding to the logits' dtype). The divisor (sum of the class weights of the counted targets) must
           be known before the gradient is written, so a small pre-pass kernel sums it from the targets in a
           fixed order (no float atomics) and the main kernel reads the partials on the device. Backward is one
           _scale_kernel launch: nothing moves when grad_output is 1.0. Logits read once + gradient written
           once = 2 x element size bytes per logit, the copy floor (LM 2 x 8192 x 128256 bf16: at most 67% of
           the floor in lse mode even at full bandwidth). Only the gradient buffer is saved for backward, not
           the logits, so the caller's logits can be freed right after the forward.
  Neither mode's GPU time has been measured with this code yet (written on a machine without a GPU);
  benchmarks/triton_bench.py times both on every shape, with the copy floor.

The rule (grad_mode): gradient in the forward when a gradient is needed, reduction is mean or sum, we are
not tracing (torch.compile / make_fx / a dispatch mode), and the shape is wide (C > NARROW_MAX_C, LM
vocabularies) or spatial (S > 1, segmentation). Otherwise lse:
  - classifier shapes (S == 1, narrow C, e.g. GoogLeNet's 3 x 256 x 1000) are launch-bound, not
    byte-bound: grad-in-forward adds two launches (pre-pass, scale) to save a read of a few MB;
  - reduction="none" has a per-row grad_output, so the gradient cannot be finished before backward;
  - under tracing the backward cannot skip the multiply by grad_output (its value is unknown), so
    grad-in-forward would cost a read + write more than lse, and the traced graph goes through the triton_op,
    whose schema keeps the lse mode.
AUXFUSE_TRITON_GRAD=lse|forward forces the mode of eager calls (forward still needs mean / sum; the
benchmark uses it to compare the two).

The backward of grad-in-forward scales the saved gradient buffer in place and hands it out as the heads'
gradients, so no second gradient-sized buffer exists, unless that buffer may be read again: when the graph
is kept (retain_graph=True, create_graph=True) or the backward is being traced (compiled autograd, make_fx,
a dispatch mode, fake / functional tensors) it writes grads * grad_output to a new buffer instead.

A probability target that requires grad (distillation: a teacher's soft labels being trained) gets its gradient
in the backward of every path (eager and traced, shared and per-head targets) from torch ops on the saved logits
(_prob_target_grad, the formula of csrc/autograd.cpp's prob_target_grad); the logits are then saved in
grad-in-forward mode too. The kernels keep their single pass for the common case, targets without gradient.

Eager calls go through _EagerFunction (a torch.autograd.Function that launches the kernels directly):
triton_op's dispatch, register_autograd's generated Function and wrap_triton cost tens of microseconds of
host time per call, which is what a 3 x 256 x 1000 loss is made of on a GPU. With the launches stubbed out
(CPU tensors, this machine's 2 cores) a forward + backward of that shape costs ~140 us of host time against
~370 us before this path existed (op dispatch + register_autograd + six zero fills), and ~170 Python calls
against ~900 through the op (benchmarks/triton_bench.py --host-overhead). Eager calls also keep the
non-tensor part of their launches (strides, options, grids) in a plan cached per call signature (shapes,
strides, dtypes, options); pass None in the unused head slots (fewer arguments for Triton's launcher to bind
and specialize); and, once a tuned kernel's config is known for a static key, call its JITFunction with that
config directly instead of going through the Autotuner's per-call argument merging. The Triton launcher's
own cost is not measured (the interpreter replaces it). Under torch.compile (and under any dispatch mode)
the same launch code (_forward_impl, _backward_impl) runs inside the ops

  auxfuse::triton_multihead_ce_forward   main kernel + finalize kernel, lse mode
  auxfuse::triton_multihead_ce_backward  the backward kernel

with the kernels wrapped by ``torch.library.wrap_triton``, so ``torch.compile(fullgraph=True)`` traces through
them. Both paths tell autograd not to zero-fill the gradients of the outputs that have none (head losses,
counts, saved buffers): those fills were six extra kernels per backward. Every output is allocated with
torch.empty and fully written by a kernel. The finalize kernel is kept as a second launch: folding it into
the main kernel ("last program" via an atomic ticket) needs a ticket buffer that is zero before its first
use and is never shared between a CUDA-graph capture and eager launches, and its memory ordering could not
be tested without a GPU.

The per-row formulas are the ones of csrc/multihead_ce.h; the oracle is reference.py.

Heads with a target each (deep supervision, multi-token, multi-task: the front end's one call,
compute_per_head) have their own kernels, one launch per pass for all heads whatever their sizes:

  _per_head_denom_kernel     grad-in-forward mean only: each head's divisor partials, over its own items
  _per_head_forward_kernel   a grid over host-built work items (head, first row, rows) of about equal work
                             (rows x class chunks), so a 128x128 head and a 16x16 one share the grid in
                             proportion to their size; reduction none: an item is the same rows of every head
                             (their weighted losses summed in the program). Always grad-in-forward when a
                             gradient is needed (each head's weight and 1 / its own divisor folded in)
  _per_head_finalize_kernel  one program: the items' partial sums, per head, in a fixed order
  _scale_kernel              backward (mean / sum): every head's gradient lives in one flat buffer, one launch

Each program reads its head from a head table: the fields of HeadDesc (csrc/multihead_ce.h) in its order, as one
int64 tensor (pointers as data_ptr() values, cast in the kernel; 0 for none), with the work items and HeadDesc's
float fields (as float32 bits) after it: one host-to-device copy per call (pinned, asynchronous). A head's
class-index or probability target, class weights or none, sizes and strides are read at run time, so one compiled
kernel takes any mix. A head of a resized target (target_resize) reads the full-resolution class indices through its
positions (Problem.target_positions, one more pointer in its row; the POS constexpr when any head of the call has
them), so the front end makes no copy per head. Tiles have one shape ([BLOCK_R, BLOCK_C] from the widest head), so a
3-class head next to a 37-class one computes on masked lanes. The compiler cannot see alignment in the table's
values: when every head (and probability target, and gradient) is 16-byte aligned with contiguous classes and C and
row strides multiples of 16 bytes (LM vocabularies), the host says so (VEC, checked per call) and the kernel hints
it, so rows stream in 16-byte loads and stores; other layouts (NCHW heads: classes strided by S) use scalar, still
coalesced, accesses. The table needs data_ptr(), which traced tensors lack, so traced calls (torch.compile, make_fx)
reach the same launches through an opaque custom op, auxfuse::triton_per_head_forward (a fake kernel for the shapes;
its gradients are one tensor per head, multiplied by grad_output in the traced backward); it is tagged
cudagraph_unsafe, and while a CUDA graph is captured per_head_unavailable_reason() sends the front end back to one
call per head (a replay would read the table's freed host buffer).

How the heads reach the shared-target kernels: each head is its own pointer argument (X0..X7, with its own
three strides), and the kernels loop over the heads with ``tl.static_range``, picking the head's pointer at
compile time. A table of ``data_ptr()``s in an int64 tensor was the other option (the per-head kernels above
take it, heads being of any number and size there); it needs ``data_ptr()`` (which a FakeTensor does not have,
so ``torch.compile`` could not trace the triton_op) and a host-to-device copy per call (one more transfer, and
not capturable in a CUDA graph). The cost is a limit of MAX_HEADS heads.

Program mapping. A head (N, C, S) is walked as N "outer" rows times S "inner" rows; a classifier head
(S == 1) is re-viewed as 1 x N, so a program always takes one outer index n and BLOCK_R consecutive inner
rows s, a [BLOCK_R, BLOCK_C] tile, and loops over the classes in BLOCK_C chunks with an online softmax:
  - narrow (C <= NARROW_MAX_C): one chunk holds the whole row, BLOCK_R rows per program (a small C like a
    segmentation's 21 classes gets 128 rows per program, read along the spatial axis, which is the
    contiguous one for NCHW and strided by C for channels_last);
  - wide (C > NARROW_MAX_C, LM vocabularies): one row per program, BLOCK_C chunks (autotuned). In
    grad-in-forward mode the first pass loads with evict_last and the second with evict_first, so the row
    stays in L2 between the passes (a 128256-class bf16 row is 250 KB; the programs in flight hold a few
    tens of MB, around an H100 / H200's 50 MB L2; the autotuner times the configs with GRAD in its key, so
    it picks the block size / warps whose rows in flight reuse L2 best).
Every program handles all heads of its rows, so the target and class weights are read once for all heads.

Reductions are deterministic: each program writes one row of partial sums (count, denominator, each head's
loss sum, each head's hits, rows with an invalid class index) and the finalize kernel, one program, sums them
in a fixed order and writes loss, head_losses, head_correct, count, invalid and denom (in grad-in-forward mode
the denominator is the pre-pass's, the same value the gradients were divided by). reduction="none" writes the
weighted per-row loss from the main kernel. No host syncs anywhere: grad_output and the mean's divisor are read
on the device, so a call is capturable in a CUDA graph.

Masked lanes (past the last class, past the last row) compute on safe values only (a 0 or -inf that reaches
no arithmetic that could overflow or give NaN), and 0 / 0 is formed with tl.where, so the interpreter's
numpy never warns; tests/triton turns RuntimeWarnings into errors.

Autotuning: a small config list (narrow: num_warps 4 / 8; wide: BLOCK_C 4096 / 8192 / 16384 with 8 / 16
warps). The config changes the order of the floating-point sums, so two processes may differ in the last
bit; set AUXFUSE_TRITON_AUTOTUNE=0 for fixed configs (bitwise reproducible across runs). Under
TRITON_INTERPRET=1 there is one config (nothing is benchmarked) and smaller blocks, so tests on CPU
tensors exercise the multi-chunk path at small C.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .problem import BackendResult, Problem, as_rows

name = "triton"
checks_targets = False  # the caller checks class indices on CPU (or when asked)
reads_target_positions = True  # compute_per_head reads a resized target through Problem.target_positions

MAX_HEADS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NONE, MEAN, SUM = 0, 1, 2
NO_GRAD, GRAD_IN_FORWARD, SAVE_LSE = 0, 1, 2  # grad modes (the numbering of backends/native.py)

# Read once, at import: Triton decides at decoration time whether a kernel is interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("AUXFUSE_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
# Forces the grad mode of eager calls: "lse" or "forward" (default: the rule of _grad_mode).
FORCED_GRAD = os.environ.get("AUXFUSE_TRITON_GRAD", "").strip().lower() or None
if FORCED_GRAD not in (None, "lse", "forward"):
    raise ValueError(f"AUXFUSE_TRITON_GRAD={FORCED_GRAD!r}; use 'lse' or 'forward' (or leave it unset)")

# Importing triton and defining a triton_op (which imports torch._inductor) take seconds: only where the
# kernels can run. AUXFUSE_TRITON_REGISTER=1 forces it (the tests compile the kernels for sm_90 on a CPU).
_WANTED = INTERPRET or os.environ.get("AUXFUSE_TRITON_REGISTER") == "1" or torch.cuda.is_available()
_NO_DEVICE = "no CUDA device is visible (and TRITON_INTERPRET=1 was not set when auxfuse was imported)"
triton = tl = None
_IMPORT_ERROR: Optional[str] = None if _WANTED else _NO_DEVICE
if _WANTED:
    try:
        import triton
        import triton.language as tl
    except ImportError as error:  # the package still works, on the other backends
        _IMPORT_ERROR = f"triton could not be imported ({error})"

if INTERPRET:
    NARROW_MAX_C = 128  # above: the wide (multi-chunk) path; small so CPU tests reach it
    TILE = 1024  # elements of a narrow program's tile (BLOCK_R * BLOCK_C)
    MIN_PROGRAMS = 4
    WIDE_BLOCK_C = 128
    DENOM_BLOCK = 8  # targets per step of a pre-pass program
    DENOM_MIN_ROWS = 16  # targets per pre-pass program, at least (small: tests reach several programs)
    SCALE_BLOCK = 64
    SCALE_MAX_PROGRAMS = 4
else:
    NARROW_MAX_C = 4096
    TILE = 4096
    MIN_PROGRAMS = 264  # two waves over an H100/H200's 132 SMs before tiles grow
    WIDE_BLOCK_C = 8192
    DENOM_BLOCK = 1024
    DENOM_MIN_ROWS = 8192
    SCALE_BLOCK = 4096
    SCALE_MAX_PROGRAMS = 1024  # grid-stride loop beyond (when grad_output is 1, each program is one load)
if INTERPRET:
    PH_TILE = 128  # rows x classes of a per-head tile: small, so CPU tests reach several tiles per work item
    PH_PROGRAMS = 4  # a per-head call's work items, about (more when a head is larger than one item's share)
else:
    PH_TILE = TILE // 2  # 8 warps: 8 elements of a tile per thread; a mixed call spills at 4096
    PH_PROGRAMS = 4 * MIN_PROGRAMS
PH_MAX_ROWS = 1 << 20  # rows of a per-head work item, at most: its partial counts stay exact in float32
PH_FIELDS = 22  # int64 fields per head in the per-head table (_head_fields)
DENOM_MAX_PROGRAMS = 1024  # the main kernel sums this many pre-pass partials, at most
FINALIZE_BLOCK = 256


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return _NO_DEVICE
    return None


def not_supported_reasons(problem: Problem) -> list[str]:
    reasons = []
    unavailable = unavailable_reason()
    if unavailable:
        reasons.append(unavailable)
    device = problem.device.type
    if device == "cpu":
        if not INTERPRET:
            reasons.append("CPU tensors run the Triton kernels only in the interpreter (TRITON_INTERPRET=1)")
    elif device != "cuda":
        reasons.append(f"the heads are on {device}; the Triton kernels run on CUDA")
    if problem.dtype not in DTYPES:
        reasons.append(f"the Triton kernels take float32 / float16 / bfloat16 logits, not {problem.dtype} "
                       "(use backend='torch' or 'cpu' for float64)")
    if len(problem.inputs) > MAX_HEADS:
        reasons.append(f"the Triton kernels take at most {MAX_HEADS} heads (one pointer argument each), "
                       f"got {len(problem.inputs)}")
    if problem.num_classes < 1:
        reasons.append("the heads have no classes")
    if problem.class_weight is not None and problem.class_weight.requires_grad:
        reasons.append("gradients w.r.t. class weights are computed by the torch backend only")
    return reasons


def _tracing() -> bool:
    """True while torch.compile traces or a dispatch mode (make_fx, FakeTensorMode, ...) is active: tensor
    values are not there to read, and the launches must go through wrap_triton."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def _is_traced(t: torch.Tensor) -> bool:
    """A tensor whose values are not there to read (fake, functional or another tensor subclass), or any
    tensor while tracing."""
    return (_tracing() or not (type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
            or torch._is_functional_tensor(t))


def grad_mode(problem: Problem) -> int:
    """The grad mode an eager call of `problem` uses: NO_GRAD, GRAD_IN_FORWARD or SAVE_LSE (static facts only).

    Example:
        >>> from auxfuse.backends import triton as tb                       # doctest: +SKIP
        >>> tb.grad_mode(problem) == tb.GRAD_IN_FORWARD                     # doctest: +SKIP
        True
    """
    if not problem.needs_grad:
        return NO_GRAD
    if problem.reduction == "none" or _tracing():
        return SAVE_LSE
    if FORCED_GRAD is not None:
        return GRAD_IN_FORWARD if FORCED_GRAD == "forward" else SAVE_LSE
    _, C, S = problem.heads[0].shape
    return GRAD_IN_FORWARD if (C > NARROW_MAX_C or S > 1) else SAVE_LSE


def _target_needs_grad(problem: Problem) -> bool:
    """A probability target that requires grad (class indices never do) while autograd records."""
    return torch.is_grad_enabled() and problem.target.requires_grad


def _prob_target_grad(heads, head_weights, class_weight: Optional[torch.Tensor], label_smoothing: float,
                      reduction: int, grad_loss: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. a probability target (N, C, S) that every head of `heads` ((N, C, S) each) reads: per
    row and class -(1 - eps) * w_c * sum_h w_h * log_softmax(x_h)_c, times the row's scale (grad_output; / N * S
    for the mean, the divisor of probability targets), in the heads' dtype (a probability target's, Problem):
    csrc/autograd.cpp's prob_target_grad in torch ops."""
    total = None
    for x, w in zip(heads, head_weights):
        term = torch.log_softmax(x, 1, dtype=torch.float32) * -float(w)
        total = term if total is None else total + term
    total = total * (1.0 - label_smoothing)
    if class_weight is not None:
        total = total * class_weight.view(1, -1, 1)
    N, _, S = total.shape
    scale = grad_loss.to(torch.float32)
    if reduction == MEAN:
        scale = scale / (N * S)
    elif reduction == NONE:
        scale = scale.reshape(N, 1, S)
    return (total * scale).to(heads[0].dtype)


def _target_grad_inputs(target_grad_heads: list[int], heads, class_weights) -> list:
    """What _per_head_target_grads needs saved: the logits, then the class weights (or None), of the heads whose
    probability target requires grad."""
    return [heads[h] for h in target_grad_heads] + [class_weights[h] for h in target_grad_heads]


def _per_head_target_grads(num_heads: int, target_grad_heads: list[int], kept, head_weights,
                           label_smoothing: float, reduction: int, grad_loss: torch.Tensor) -> list:
    """Each head's target's gradient: None, or for the heads of target_grad_heads _prob_target_grad of that head
    alone, from `kept` (_target_grad_inputs)."""
    grads = [None] * num_heads
    K = len(target_grad_heads)
    for h, x, class_weight in zip(target_grad_heads, kept[:K], kept[K:]):
        grads[h] = _prob_target_grad([as_rows(x)], [head_weights[h]], class_weight, label_smoothing, reduction,
                                     grad_loss)
    return grads


def compute(problem: Problem) -> BackendResult:
    """Weighted cross-entropy of all heads with the Triton kernels.

    Eager calls run the kernels from _EagerFunction (grad mode by grad_mode(problem)); calls under
    torch.compile or a dispatch mode go through the auxfuse::triton_multihead_ce_forward op (lse mode).

    Example (CUDA, or CPU tensors under TRITON_INTERPRET=1):
        >>> loss = auxfuse.multi_head_cross_entropy((logits, aux), target, backend="triton")  # doctest: +SKIP
        >>> loss.backward()                                                                # doctest: +SKIP
    """
    options = (problem.head_weights, problem.ignore_index, problem.label_smoothing, problem.reduction_code)
    if _tracing():
        loss, head_losses, head_correct, count, invalid = torch.ops.auxfuse.triton_multihead_ce_forward(
            problem.heads, problem.target, problem.class_weight, *options, problem.want_details,
            problem.needs_grad,
        )[:5]
    else:
        mode = grad_mode(problem)
        target_grad = _target_needs_grad(problem)
        if mode == NO_GRAD and not target_grad:
            out = _forward_impl(problem.heads, problem.target, problem.class_weight, *options,
                                problem.want_details, NO_GRAD, traced=False)
            loss, head_losses, head_correct, count, invalid = out[:5]
        else:
            loss, head_losses, head_correct, count, invalid = _EagerFunction.apply(
                (*options, problem.want_details, mode, target_grad), problem.target, problem.class_weight,
                *problem.inputs
            )
    return BackendResult(loss, head_losses, head_correct if problem.want_details else None, count, invalid)


def per_head_unavailable_reason() -> Optional[str]:
    """Why heads with a target each cannot run in one call here (None when they can: compute_per_head)."""
    unavailable = unavailable_reason()
    if unavailable:
        return unavailable
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return ("while a CUDA graph is captured the triton backend runs heads with a target each one call per "
                "head: its one-call head table is copied from a host buffer that a replay would read again")
    return None


def linear_chunk_rows_and_grad(z: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                               want_grad: bool):
    """One chunk of the fused linear + cross-entropy (auxfuse/linear.py) on the per-head kernels, eager only:
    the chunk's logits z (rows, V) with class indices (rows,) -> per-row losses (rows,), top-1 hits (), invalid
    class indices (), and with want_grad the gradient of the rows' sum w.r.t. z (z's dtype), in one launch."""
    if _tracing() or _is_traced(z):
        raise ValueError("auxfuse: the triton backend of the fused linear + cross-entropy runs in eager mode only "
                         "(its head table needs data_ptr()); use backend='cuda' or 'torch' under torch.compile")
    # The kernels read targets as (N, S) views, as Problem.target gives them.
    rows, _, hits, _, invalid, _, grads = _per_head_impl([z], [target.reshape(-1, 1)], [None], [None], [1.0],
                                                         ignore_index, label_smoothing, NONE, True, want_grad,
                                                         one_buffer=False)
    return rows.reshape(-1), hits[0], invalid, grads[0] if want_grad else None


def compute_per_head(problems: list[Problem]) -> BackendResult:
    """Every head with its own target and class weight (one validated one-head Problem each) in one launch per
    pass: heads of their own sizes, class counts and target kinds; each head's mean divides by its own
    divisor. count is per head, (H,). The heads' gradients are computed in the forward, a probability target's
    in backward (see _PerHeadFunction).

    Example (CUDA, or CPU tensors under TRITON_INTERPRET=1):
        >>> loss = auxfuse.multi_head_cross_entropy([out8, out4], [t8, t4], [1.0, 0.5],     # doctest: +SKIP
        ...                                         backend="triton")
    """
    first = problems[0]
    inputs = [p.inputs[0] for p in problems]
    targets = [p.target for p in problems]
    positions = [p.target_positions for p in problems]
    class_weights = [p.class_weight for p in problems]
    options = ([p.head_weights[0] for p in problems], first.ignore_index, first.label_smoothing,
               first.reduction_code, first.want_details)
    needs_grad = any(p.needs_grad for p in problems)
    if _tracing():
        out = torch.ops.auxfuse.triton_per_head_forward(inputs, targets, positions, class_weights, *options,
                                                        needs_grad)[:5]
    elif needs_grad or any(_target_needs_grad(p) for p in problems):
        out = _PerHeadFunction.apply(options, needs_grad, positions, class_weights, *targets, *inputs)
    else:
        out = _per_head_impl(inputs, targets, positions, class_weights, *options, grad=False)[:5]
    loss, head_losses, head_correct, count, invalid = out
    return BackendResult(loss, head_losses, head_correct if first.want_details else None, count, invalid)


if _IMPORT_ERROR is None:

    @triton.jit
    def _sel(h: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
        """The h-th of eight arguments, chosen at compile time (h is a constexpr)."""
        if h == 0:
            v = a0
        elif h == 1:
            v = a1
        elif h == 2:
            v = a2
        elif h == 3:
            v = a3
        elif h == 4:
            v = a4
        elif h == 5:
            v = a5
        elif h == 6:
            v = a6
        else:
            v = a7
        return v

    @triton.jit
    def _rows(S, BLOCK_R: tl.constexpr):
        """This program's outer index n (int64) and inner rows s (int64), the row mask and row index."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(S, BLOCK_R)
        n = pid // n_blocks
        s = (pid - n * n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = s < S
        n64 = n.to(tl.int64)
        s64 = s.to(tl.int64)
        return n64, s64, row_mask, n64 * S + s64

    @triton.jit
    def _weight_sum(CW, C, BLOCK_C: tl.constexpr):
        acc = tl.zeros([BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            acc += tl.load(CW + cols, mask=cols < C, other=0.0)
        return tl.sum(acc, 0)

    @triton.jit
    def _div(a, d):
        """a / d with IEEE results (x / 0 = +-inf, 0 / 0 = NaN) but no division by zero performed, so the
        interpreter's numpy does not warn (the all-ignored mean is NaN, as in PyTorch)."""
        zero = d == 0.0
        q = a / tl.where(zero, 1.0, d)
        big = a * tl.where(a == 0.0, 0.0, float("inf"))
        return tl.where(zero, tl.where(a == 0.0, float("nan"), big), q)

    @triton.jit
    def _inv(d):
        """1 / d, with 1 / 0 = inf formed without a division by zero (see _div)."""
        return tl.where(d == 0.0, float("inf"), 1.0 / tl.where(d == 0.0, 1.0, d))

    @triton.jit
    def _index_row_terms(T, t_row, CW, cw_on, row_mask, C, ignore_index, eps, HAS_CW: tl.constexpr):
        """Per row of class-index targets: counted, good (a valid class), the safe class, w_y, the target's
        coefficient (1 - eps) w_y and the smoothing term of the gradient. cw_on: this head has class weights
        (the per-head kernel's heads each have their own, or none; the shared-target kernels pass True)."""
        y = tl.load(T + t_row, mask=row_mask, other=ignore_index)
        counted = row_mask & (y != ignore_index)
        good = counted & (y >= 0) & (y < C)
        y_safe = tl.where(good, y, 0)
        w_y = tl.where(good, 1.0, 0.0)
        if HAS_CW:
            w_y = tl.where(cw_on, tl.load(CW + y_safe, mask=good & cw_on, other=0.0), w_y)
        target_coef = (1.0 - eps) * w_y
        smooth_row = tl.where(counted, eps / C, 0.0)
        return counted, good, y, y_safe, w_y, target_coef, smooth_row

    @triton.jit
    def _chunk_class_weights(CW, cols, col_mask, cw_on):
        """w_c of a chunk of classes: the head's class weights, or 1 for a head without (cw_on False: CW is
        never read). Lanes past C hold 0 or 1; every sum they could reach multiplies them by 0."""
        return tl.where(cw_on, tl.load(CW + cols, mask=col_mask & cw_on, other=0.0), 1.0)

    @triton.jit
    def _write_grad_rows(X, x_row, SC, G, g_row, G_SC, T, t_row, T_SC, CW, cw_on, t_on, C, row_mask, lse, coef,
                         y_safe, target_coef, smooth_row, eps, smooth_coef, row_scale,
                         PROB: tl.constexpr, INDEX: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        """One head's gradient for BLOCK_R rows, BLOCK_C columns at a time: the logits read once more (evicted
        first: not read again), the gradient scaled by row_scale and rounded once to the gradient's dtype.
        Shared by the backward kernel and the forward kernels' grad-in-forward pass. cw_on / t_on: this head
        has class weights / a probability target (per head in the per-head kernel, True in the others)."""
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < C
            mask = row_mask[:, None] & col_mask[None, :]
            cols64 = cols.to(tl.int64)
            x = tl.load(X + (x_row[:, None] + cols64[None, :] * SC), mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            wc = x  # placeholders, replaced below when used
            t = x
            if HAS_CW and (SMOOTH or PROB):
                wc = _chunk_class_weights(CW, cols, col_mask, cw_on)
            if PROB:
                t = tl.load(T + (t_row[:, None] + cols64[None, :] * T_SC), mask=mask & t_on, other=0.0)
                t = t.to(tl.float32)
            grad = _grad_chunk(x, t, wc, cols64, lse, coef, y_safe, target_coef, smooth_row, eps, smooth_coef,
                               t_on, PROB, INDEX, HAS_CW, SMOOTH)
            grad = grad * row_scale[:, None]
            tl.store(G + (g_row[:, None] + cols64[None, :] * G_SC), grad.to(G.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_chunk(x, t, wc, cols64, lse, coef, y_safe, target_coef, smooth_row, eps, smooth_coef, t_on,
                    PROB: tl.constexpr, INDEX: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr):
        """d loss_row / d x for one [BLOCK_R, BLOCK_C] chunk, in fp32, before the row's scale (shared by the
        backward kernel and the forward kernels' grad-in-forward pass). PROB / INDEX: some rows have
        probability / class-index targets (both in a per-head launch mixing them: a row of one kind has 0 in
        the other's terms: t_on False, or target_coef and smooth_row 0)."""
        grad = tl.exp(x - lse[:, None]) * coef[:, None]
        if PROB:
            t_smooth = (1.0 - eps) * t + smooth_coef
            if HAS_CW:
                t_smooth = t_smooth * wc[None, :]
            grad -= tl.where(t_on, t_smooth, 0.0)
        if INDEX:
            # p - 1 at the target, in fp32, before rounding to the logits' dtype.
            grad = tl.where(cols64[None, :] == y_safe[:, None], grad - target_coef[:, None], grad)
            if SMOOTH:
                if HAS_CW:
                    grad -= smooth_row[:, None] * wc[None, :]
                else:
                    grad -= smooth_row[:, None]
        return grad

    @triton.jit
    def _row_pass(X, x_row, SC, T, t_row, T_SC, CW, cw_on, t_on, C, row_mask, wt, t_max, t_arg,
                  PROB: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, HITS: tl.constexpr,
                  TARGET_STATS: tl.constexpr, EVICT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One head's pass over BLOCK_R rows, BLOCK_C classes at a time (online softmax). Returns lse, log s, the
        max m (lse 0 and m 0 on masked rows: nothing is stored for them), the first argmax, sum_c w_c x_c
        (smoothing), sum_c w_c t_c x_c (probability targets), and with TARGET_STATS the target's own sums
        (wt = sum_c w_c t_c and its first argmax t_arg / max t_max), accumulated onto the values passed in
        (the shared-target kernel takes them from head 0 only). cw_on / t_on: see _write_grad_rows."""
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        sum_exp = tl.zeros([BLOCK_R], tl.float32)
        arg = tl.zeros([BLOCK_R], tl.int32)
        wx = tl.zeros([BLOCK_R], tl.float32)  # sum_c w_c x_c (smoothing)
        wtx = tl.zeros([BLOCK_R], tl.float32)  # sum_c w_c t_c x_c (probability targets)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < C
            mask = row_mask[:, None] & col_mask[None, :]
            cols64 = cols.to(tl.int64)
            x = tl.load(X + (x_row[:, None] + cols64[None, :] * SC), mask=mask, other=float("-inf"),
                        eviction_policy=EVICT)
            x = x.to(tl.float32)
            chunk_max = tl.max(x, 1)
            m_new = tl.maximum(m, chunk_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf only: no NaN here
            sum_exp = sum_exp * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
            if HITS:
                chunk_arg = tl.argmax(x, 1, tie_break_left=True).to(tl.int32) + c0
                arg = tl.where(chunk_max > m, chunk_arg, arg)  # strictly greater: the first maximum
            m = m_new
            if SMOOTH or PROB:
                x_zero = tl.where(mask, x, 0.0)  # masked elements hold -inf; these sums want 0
            if HAS_CW and (SMOOTH or PROB):
                wc = _chunk_class_weights(CW, cols, col_mask, cw_on)
            if SMOOTH:
                if HAS_CW:
                    wx += tl.sum(x_zero * wc[None, :], 1)
                else:
                    wx += tl.sum(x_zero, 1)
            if PROB:
                t = tl.load(T + (t_row[:, None] + cols64[None, :] * T_SC), mask=mask & t_on, other=0.0)
                t = t.to(tl.float32)
                if HAS_CW:
                    w_t = t * wc[None, :]
                else:
                    w_t = t
                wtx += tl.sum(w_t * x_zero, 1)
                if TARGET_STATS:
                    wt += tl.sum(w_t, 1)
                    if HITS:
                        t_masked = tl.where(mask, t, float("-inf"))
                        t_chunk_max = tl.max(t_masked, 1)
                        t_chunk_arg = tl.argmax(t_masked, 1, tie_break_left=True).to(tl.int32) + c0
                        t_arg = tl.where(t_chunk_max > t_max, t_chunk_arg, t_arg)
                        t_max = tl.maximum(t_max, t_chunk_max)
        log_s = tl.log(tl.where(row_mask, sum_exp, 1.0))
        m = tl.where(row_mask, m, 0.0)
        return m + log_s, log_s, m, arg, wx, wtx, wt, t_max, t_arg

    @triton.jit
    def _prob_row_loss(lse, coef, wtx, wx, row_mask, eps, smooth_coef, SMOOTH: tl.constexpr):
        """A row's loss for a probability target: coef * lse - sum_c w_c t'_c x_c (coef = sum_c w_c t'_c)."""
        loss = coef * lse - (1.0 - eps) * wtx
        if SMOOTH:
            loss -= smooth_coef * wx
        return tl.where(row_mask, loss, 0.0)

    @triton.jit
    def _index_row_loss(X, x_row, SC, lse, log_s, m, wx, y_safe, counted, good, bad, target_coef, smooth_coef,
                        weight_sum, SMOOTH: tl.constexpr):
        """A row's loss for a class index (x_y read once more, only for valid targets); 0 where not counted,
        NaN for an index outside [0, C)."""
        x_y = tl.load(X + (x_row + y_safe * SC), mask=good, other=0.0).to(tl.float32)
        loss = target_coef * (log_s - (x_y - m))
        if SMOOTH:
            loss += smooth_coef * (weight_sum * lse - wx)
        loss = tl.where(counted, loss, 0.0)
        return tl.where(bad, float("nan"), loss)

    @triton.jit
    def _denom_kernel(
        T, T_SN, T_SS, CW, DPART, C, S, R, ROWS, ignore_index,
        HAS_CW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Pre-pass of grad-in-forward mode: DPART[p] = the sum of w_y over the counted (valid, not ignored)
        targets of rows [p * ROWS, (p + 1) * ROWS), in a fixed order."""
        pid = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, ROWS, BLOCK):
            local = i + tl.arange(0, BLOCK)
            r = pid * ROWS + local
            mask = (local < ROWS) & (r < R)
            n = r // S
            s = r - n * S
            y = tl.load(T + (n * T_SN + s * T_SS), mask=mask, other=ignore_index)
            good = mask & (y != ignore_index) & (y >= 0) & (y < C)
            if HAS_CW:
                acc += tl.load(CW + tl.where(good, y, 0), mask=good, other=0.0)
            else:
                acc += tl.where(good, 1.0, 0.0)
        tl.store(DPART + pid, tl.sum(acc, 0))

    @triton.jit
    def _forward_kernel(
        X0, X1, X2, X3, X4, X5, X6, X7,
        SN0, SC0, SS0, SN1, SC1, SS1, SN2, SC2, SS2, SN3, SC3, SS3,
        SN4, SC4, SS4, SN5, SC5, SS5, SN6, SC6, SS6, SN7, SC7, SS7,
        W0, W1, W2, W3, W4, W5, W6, W7,
        T, T_SN, T_SC, T_SS, CW,
        LOSS_ROWS, LSE, COEF, PART,
        G0, G1, G2, G3, G4, G5, G6, G7, G_SN, G_SC, G_SS, DPART, DP,
        C, S, R, ignore_index, eps,
        H: tl.constexpr, PROB: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr,
        RED: tl.constexpr, SAVE: tl.constexpr, HITS: tl.constexpr, KP: tl.constexpr, GRAD: tl.constexpr,
        BLOCK_D: tl.constexpr, EVICT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        n64, s64, row_mask, r = _rows(S, BLOCK_R)
        pid = tl.program_id(0).to(tl.int64)
        t_row = n64 * T_SN + s64 * T_SS
        smooth_coef = eps / C
        if SMOOTH and HAS_CW:
            weight_sum = _weight_sum(CW, C, BLOCK_C)
        else:
            weight_sum = C * 1.0
        y_safe = tl.zeros([BLOCK_R], tl.int64)  # placeholders for probability targets
        target_coef = tl.zeros([BLOCK_R], tl.float32)
        smooth_row = tl.zeros([BLOCK_R], tl.float32)
        wt = tl.zeros([BLOCK_R], tl.float32)  # sum_c w_c t_c (probability targets: head 0 computes it)
        t_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        t_arg = tl.zeros([BLOCK_R], tl.int32)
        if PROB:
            counted = row_mask
            w_y = tl.where(row_mask, 1.0, 0.0)
        else:
            counted, good, y, y_safe, w_y, target_coef, smooth_row = _index_row_terms(
                T, t_row, CW, True, row_mask, C, ignore_index, eps, HAS_CW)
            bad = counted != good  # a class index outside [0, C): never read, NaN loss
            coef = tl.where(good, target_coef + smooth_coef * weight_sum, 0.0)
            coef = tl.where(bad, float("nan"), coef)
        if GRAD:
            # The gradient's row scale: 1 / divisor for the mean (divisor from the pre-pass partials, or the
            # number of rows for probability targets), 1 for the sum; 0 for rows that count for nothing.
            if RED == 1:
                if PROB:
                    inv = 1.0 / R  # R >= 1 where a program runs
                else:
                    d_offs = tl.arange(0, BLOCK_D)
                    inv = _inv(tl.sum(tl.load(DPART + d_offs, mask=d_offs < DP, other=0.0), 0))
            else:
                inv = 1.0
            scale = tl.where(counted, inv, 0.0)
            g_row = n64 * G_SN + s64 * G_SS
        weighted_rows = tl.zeros([BLOCK_R], tl.float32)
        for h in tl.static_range(H):
            X = _sel(h, X0, X1, X2, X3, X4, X5, X6, X7)
            SN = _sel(h, SN0, SN1, SN2, SN3, SN4, SN5, SN6, SN7)
            SC = _sel(h, SC0, SC1, SC2, SC3, SC4, SC5, SC6, SC7)
            SS = _sel(h, SS0, SS1, SS2, SS3, SS4, SS5, SS6, SS7)
            x_row = n64 * SN + s64 * SS
            lse, log_s, m, arg, wx, wtx, wt, t_max, t_arg = _row_pass(
                X, x_row, SC, T, t_row, T_SC, CW, True, True, C, row_mask, wt, t_max, t_arg,
                PROB, HAS_CW, SMOOTH, HITS, h == 0, EVICT, BLOCK_R, BLOCK_C)
            if PROB:
                coef = (1.0 - eps) * wt + smooth_coef * weight_sum
                loss = _prob_row_loss(lse, coef, wtx, wx, row_mask, eps, smooth_coef, SMOOTH)
                if HITS:
                    hit = row_mask & (arg == t_arg)
            else:
                loss = _index_row_loss(X, x_row, SC, lse, log_s, m, wx, y_safe, counted, good, bad, target_coef,
                                       smooth_coef, weight_sum, SMOOTH)
                if HITS:
                    hit = good & (arg == y)
            if GRAD:
                # Second pass over the row (just read: L2 / L1), the gradient with everything folded in.
                G = _sel(h, G0, G1, G2, G3, G4, G5, G6, G7)
                row_scale = scale * _sel(h, W0, W1, W2, W3, W4, W5, W6, W7)
                _write_grad_rows(X, x_row, SC, G, g_row, G_SC, T, t_row, T_SC, CW, True, True, C, row_mask, lse,
                                 coef, y_safe, target_coef, smooth_row, eps, smooth_coef, row_scale, PROB, not PROB,
                                 HAS_CW, SMOOTH, BLOCK_C)
            if SAVE:
                tl.store(LSE + (tl.cast(R, tl.int64) * h + r), lse, mask=row_mask)
            if RED == 0:
                weighted_rows += _sel(h, W0, W1, W2, W3, W4, W5, W6, W7) * loss
            tl.store(PART + (pid * KP + 2 + h), tl.sum(loss, 0))
            if HITS:
                tl.store(PART + (pid * KP + 2 + H + h), tl.sum(hit.to(tl.float32), 0))
        tl.store(PART + pid * KP, tl.sum(counted.to(tl.float32), 0))
        tl.store(PART + (pid * KP + 1), tl.sum(w_y, 0))
        if PROB:
            tl.store(PART + (pid * KP + 2 + 2 * H), 0.0)
        else:
            tl.store(PART + (pid * KP + 2 + 2 * H), tl.sum(bad.to(tl.float32), 0))
        if RED == 0:
            tl.store(LOSS_ROWS + r, weighted_rows, mask=row_mask)
        if SAVE:
            tl.store(COEF + r, coef, mask=row_mask)

    @triton.jit
    def _finalize_kernel(
        PART, P, W0, W1, W2, W3, W4, W5, W6, W7, DPART, DP,
        LOSS, HEAD_LOSSES, HEAD_CORRECT, COUNT, INVALID, DENOM,
        H: tl.constexpr, KP: tl.constexpr, RED: tl.constexpr, HITS: tl.constexpr, USE_DPART: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program: the partial sums of every main-kernel program, added in a fixed order."""
        cols = tl.arange(0, KP)
        is_hits = (cols >= 2 + H) & (cols < 2 + 2 * H)
        is_int = (cols == 0) | is_hits | (cols == 2 + 2 * H)
        if HITS:
            used = cols <= 2 + 2 * H
        else:
            used = (cols < 2 + H) | (cols == 2 + 2 * H)  # the hits columns (and the padding) are never written
        f_acc = tl.zeros([KP], tl.float32)
        i_acc = tl.zeros([KP], tl.int64)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            v = tl.load(PART + (rows.to(tl.int64)[:, None] * KP + cols[None, :]),
                        mask=(rows < P)[:, None] & used[None, :], other=0.0)
            f_acc += tl.sum(v, 0)
            i_acc += tl.sum(tl.where(is_int[None, :], v, 0.0).to(tl.int64), 0)
        count = tl.sum(tl.where(cols == 0, i_acc, 0), 0)
        invalid = tl.sum(tl.where(cols == 2 + 2 * H, i_acc, 0), 0)
        if USE_DPART:  # the divisor the gradients were computed with (grad-in-forward)
            d_offs = tl.arange(0, BLOCK_D)
            denom = tl.sum(tl.load(DPART + d_offs, mask=d_offs < DP, other=0.0), 0)
        else:
            denom = tl.sum(tl.where(cols == 1, f_acc, 0.0), 0)
        is_head = (cols >= 2) & (cols < 2 + H)
        head_weights = tl.zeros([KP], tl.float32)
        for h in tl.static_range(H):
            head_weights = tl.where(cols == 2 + h, _sel(h, W0, W1, W2, W3, W4, W5, W6, W7), head_weights)
        total = tl.sum(tl.where(is_head, f_acc * head_weights, 0.0), 0)
        if RED == 2:
            head_losses = f_acc
            tl.store(LOSS, total)
        else:
            head_losses = _div(tl.where(is_head, f_acc, 0.0), denom)
            if RED == 1:
                tl.store(LOSS, _div(total, denom))
        tl.store(HEAD_LOSSES + (cols - 2), head_losses, mask=is_head)
        if HITS:
            tl.store(HEAD_CORRECT + (cols - 2 - H), i_acc, mask=is_hits)
        tl.store(COUNT, count)
        tl.store(INVALID, invalid)
        tl.store(DENOM, denom)

    @triton.jit
    def _backward_kernel(
        X0, X1, X2, X3, X4, X5, X6, X7,
        SN0, SC0, SS0, SN1, SC1, SS1, SN2, SC2, SS2, SN3, SC3, SS3,
        SN4, SC4, SS4, SN5, SC5, SS5, SN6, SC6, SS6, SN7, SC7, SS7,
        G0, G1, G2, G3, G4, G5, G6, G7, G_SN, G_SC, G_SS,
        W0, W1, W2, W3, W4, W5, W6, W7,
        T, T_SN, T_SC, T_SS, CW,
        LSE, COEF, DENOM, GRAD, GRAD_SN, GRAD_SS,
        C, S, R, ignore_index, eps,
        H: tl.constexpr, PROB: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, RED: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        n64, s64, row_mask, r = _rows(S, BLOCK_R)
        t_row = n64 * T_SN + s64 * T_SS
        smooth_coef = eps / C
        if RED == 0:
            g = tl.load(GRAD + (n64 * GRAD_SN + s64 * GRAD_SS), mask=row_mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(GRAD).to(tl.float32) + tl.zeros([BLOCK_R], tl.float32)
            if RED == 1:
                g = _div(g, tl.load(DENOM))
        y_safe = tl.zeros([BLOCK_R], tl.int64)  # placeholders for probability targets
        target_coef = tl.zeros([BLOCK_R], tl.float32)
        smooth_row = tl.zeros([BLOCK_R], tl.float32)
        if PROB:
            counted = row_mask
        else:
            counted, good, y, y_safe, w_y, target_coef, smooth_row = _index_row_terms(
                T, t_row, CW, True, row_mask, C, ignore_index, eps, HAS_CW)
        # Rows that count for nothing get exactly zero (also when all are ignored and the divisor is 0).
        scale = tl.where(counted, g, 0.0)
        coef = tl.load(COEF + r, mask=row_mask, other=0.0)
        g_row = n64 * G_SN + s64 * G_SS
        for h in tl.static_range(H):
            X = _sel(h, X0, X1, X2, X3, X4, X5, X6, X7)
            G = _sel(h, G0, G1, G2, G3, G4, G5, G6, G7)
            SN = _sel(h, SN0, SN1, SN2, SN3, SN4, SN5, SN6, SN7)
            SC = _sel(h, SC0, SC1, SC2, SC3, SC4, SC5, SC6, SC7)
            SS = _sel(h, SS0, SS1, SS2, SS3, SS4, SS5, SS6, SS7)
            x_row = n64 * SN + s64 * SS
            lse = tl.load(LSE + (tl.cast(R, tl.int64) * h + r), mask=row_mask, other=0.0)
            row_scale = scale * _sel(h, W0, W1, W2, W3, W4, W5, W6, W7)
            _write_grad_rows(X, x_row, SC, G, g_row, G_SC, T, t_row, T_SC, CW, True, True, C, row_mask, lse, coef,
                             y_safe, target_coef, smooth_row, eps, smooth_coef, row_scale, PROB, not PROB, HAS_CW,
                             SMOOTH, BLOCK_C)

    @triton.jit
    def _scale_loop(SRC, DST, NUMEL, g, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(pid * BLOCK, NUMEL, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < NUMEL
            v = tl.load(SRC + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DST + offs, (v * g).to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(SRC, DST, NUMEL, GRAD_OUT, SKIP_ONE: tl.constexpr, BLOCK: tl.constexpr):
        """DST = SRC * grad_output over NUMEL dense elements (fp32 multiply, one rounding). With SKIP_ONE
        (in place: DST is SRC) nothing is read or written when grad_output is exactly 1.0."""
        g = tl.load(GRAD_OUT).to(tl.float32)
        if SKIP_ONE:
            if g != 1.0:
                _scale_loop(SRC, DST, NUMEL, g, BLOCK)
        else:
            _scale_loop(SRC, DST, NUMEL, g, BLOCK)

    # --- One target per head (compute_per_head): one launch per pass for all heads, from a head table --------

    @triton.jit
    def _head_fields(TABLE, h, FI: tl.constexpr):
        """Head h's row of the head table: the integer fields of HeadDesc (csrc/multihead_ce.h) in its order,
        pointers as integers (0 for none), then the range of the head's divisor partials, then its target
        positions (target_resize; 0 for none) (PH_FIELDS)."""
        row = TABLE + h * FI
        return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
                tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
                tl.load(row + 10), tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
                tl.load(row + 15), tl.load(row + 16), tl.load(row + 17), tl.load(row + 18), tl.load(row + 19),
                tl.load(row + 20), tl.load(row + 21))

    @triton.jit
    def _target_offsets(n, s, yN, yS, pos_ptr, row_mask, POS: tl.constexpr):
        """Where rows (n, s) of a head read their class indices: at (n, s) of the head's own target or, for a
        head with target positions (target_resize: pos_ptr not 0; POS: some head of the call has them), at
        (n, positions[s]) of the full-resolution (N, S') target."""
        if POS:
            pos = tl.load(pos_ptr.to(tl.pointer_type(tl.int64)) + s, mask=row_mask & (pos_ptr != 0), other=0)
            s = tl.where(pos_ptr != 0, pos, s)
        return n * yN + s * yS

    @triton.jit
    def _head_rows(first, local, nrows, S):
        """Rows first + local of a head with S inner rows (of nrows from first): the mask, n and s (int64)."""
        r = first + local.to(tl.int64)
        n = r // S
        return local < nrows, n, r - n * S

    @triton.jit
    def _head_divisor(DPART, d_first, d_count, BLOCK_D: tl.constexpr):
        """A head's mean divisor: its pre-pass partials summed in a fixed order (the main and the finalize
        kernels both call this, so the gradient and the loss divide by bitwise the same value)."""
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j in range(0, d_count, BLOCK_D):
            offs = j + tl.arange(0, BLOCK_D)
            acc += tl.load(DPART + (d_first + offs), mask=offs < d_count, other=0.0)
        return tl.sum(acc, 0)

    @triton.jit
    def _per_head_denom_kernel(TABLE, D_OFF, DPART, ignore_index, FI: tl.constexpr, POS: tl.constexpr,
                               BLOCK: tl.constexpr):
        """Pre-pass of a grad-in-forward mean: DPART[q] = the sum of w_y over the counted targets of divisor item
        q (head, first row, rows), in a fixed order; a head with a probability target counts its rows."""
        q = tl.program_id(0).to(tl.int64)
        item = TABLE + D_OFF + 3 * q
        h, first, nrows = tl.load(item), tl.load(item + 1), tl.load(item + 2)
        (_, _, C, S, _, _, _, y_ptr, yN, yS, t_ptr, _, _, _, cw_ptr, _, _, _, _, _, _,
         pos_ptr) = _head_fields(TABLE, h, FI)
        Y = y_ptr.to(tl.pointer_type(tl.int64))
        CW = cw_ptr.to(tl.pointer_type(tl.float32))
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, nrows, BLOCK):
            row_mask, n, s = _head_rows(first, i + tl.arange(0, BLOCK), nrows, S)
            w_y = _index_row_terms(Y, _target_offsets(n, s, yN, yS, pos_ptr, row_mask, POS), CW, cw_ptr != 0,
                                   row_mask & (y_ptr != 0), C, ignore_index, 0.0, True)[4]
            acc += tl.where(t_ptr != 0, tl.where(row_mask, 1.0, 0.0), w_y)
        tl.store(DPART + q, tl.sum(acc, 0))

    @triton.jit
    def _head_scalars(TABLE, FTABLE, DPART, h, FI: tl.constexpr, HAS_CW: tl.constexpr, SMOOTH: tl.constexpr,
                      RED: tl.constexpr, GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """Head h's constants of the call: W = the sum of its class weights (C without; summed here, as the host
        never reads device values) and its gradient's scale on counted rows (grad_scale, the head weight, times
        1 / its divisor for the mean). Once per program, or per tile and head for reduction none."""
        row = TABLE + h * FI
        weight_sum = tl.load(FTABLE + 3 * h)
        if SMOOTH and HAS_CW:
            cw_ptr = tl.load(row + 14)
            if cw_ptr != 0:
                weight_sum = _weight_sum(cw_ptr.to(tl.pointer_type(tl.float32)), tl.load(row + 2).to(tl.int32),
                                         BLOCK_C)
        scale = tl.load(FTABLE + 3 * h + 2)
        if GRAD and RED == 1:
            scale = scale * _inv(_head_divisor(DPART, tl.load(row + 19), tl.load(row + 20), BLOCK_D))
        return weight_sum, scale

    @triton.jit
    def _per_head_tile(TABLE, h, weight_sum, scale, first, local, nrows, ignore_index, eps, ELEM: tl.constexpr,
                       FI: tl.constexpr, PROB: tl.constexpr, INDEX: tl.constexpr, POS: tl.constexpr,
                       HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, HITS: tl.constexpr, GRAD: tl.constexpr,
                       EVICT: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """BLOCK_R rows of head h (rows first + local, of nrows): each row's loss, whether it is counted, w_y
        (the mean's divisor term), hit and invalid class index; with GRAD the rows' gradient times `scale`
        (see _head_scalars). The head's fields are reloaded per tile (a few scalars, cached)."""
        (x_ptr, _, C, S, sN, sC, sS, y_ptr, yN, yS, t_ptr, tN, tC, tS, cw_ptr, g_ptr, gN, gC, gS, _, _,
         pos_ptr) = _head_fields(TABLE, h, FI)
        C = C.to(tl.int32)  # class indices as in the shared-target kernels (their C is an int32 argument)
        X = x_ptr.to(tl.pointer_type(ELEM))
        T = t_ptr.to(tl.pointer_type(ELEM))
        G = g_ptr.to(tl.pointer_type(ELEM))
        CW = cw_ptr.to(tl.pointer_type(tl.float32))
        t_on = t_ptr != 0
        cw_on = cw_ptr != 0
        row_mask, n, s = _head_rows(first, local, nrows, S)
        x_row = n * sN + s * sS
        t_row = n * tN + s * tS
        g_row = n * gN + s * gS
        if VEC:
            # What the host checked (_vector_width), told to the compiler, which cannot see it in the table's
            # values: 16-byte aligned pointers, classes contiguous, rows and C multiples of VEC elements. So the
            # class chunks move in 16-byte loads and stores.
            C = tl.multiple_of(C, VEC)
            X = tl.multiple_of(X, 16)
            T = tl.multiple_of(T, 16)
            G = tl.multiple_of(G, 16)
            x_row = tl.multiple_of(x_row, VEC)
            t_row = tl.multiple_of(t_row, VEC)
            g_row = tl.multiple_of(g_row, VEC)
            sC = 1
            tC = 1
            gC = 1
        smooth_coef = eps / C
        # Class-index terms, all 0 (nothing counted) for a head with a probability target (y_ptr 0).
        counted, good, y, y_safe, w_y, target_coef, smooth_row = _index_row_terms(
            y_ptr.to(tl.pointer_type(tl.int64)), _target_offsets(n, s, yN, yS, pos_ptr, row_mask, POS), CW, cw_on,
            row_mask & (y_ptr != 0), C, ignore_index, eps, HAS_CW)
        bad = counted != good  # a class index outside [0, C): never read, NaN loss and gradient
        coef = tl.where(good, target_coef + smooth_coef * weight_sum, 0.0)
        coef = tl.where(bad, float("nan"), coef)
        wt = tl.zeros([BLOCK_R], tl.float32)
        t_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        t_arg = tl.zeros([BLOCK_R], tl.int32)
        lse, log_s, m, arg, wx, wtx, wt, t_max, t_arg = _row_pass(
            X, x_row, sC, T, t_row, tC, CW, cw_on, t_on, C, row_mask, wt, t_max, t_arg,
            PROB, HAS_CW, SMOOTH, HITS, True, EVICT, BLOCK_R, BLOCK_C)
        loss = _index_row_loss(X, x_row, sC, lse, log_s, m, wx, y_safe, counted, good, bad, target_coef,
                               smooth_coef, weight_sum, SMOOTH)
        hit = good & (arg == y)
        if PROB:
            prob_coef = (1.0 - eps) * wt + smooth_coef * weight_sum
            loss = tl.where(t_on, _prob_row_loss(lse, prob_coef, wtx, wx, row_mask, eps, smooth_coef, SMOOTH), loss)
            coef = tl.where(t_on, prob_coef, coef)
            counted = tl.where(t_on, row_mask, counted)
            w_y = tl.where(t_on, tl.where(row_mask, 1.0, 0.0), w_y)  # probabilities: the mean is over rows
            hit = tl.where(t_on, row_mask & (arg == t_arg), hit)
        if GRAD:
            _write_grad_rows(X, x_row, sC, G, g_row, gC, T, t_row, tC, CW, cw_on, t_on, C, row_mask, lse, coef,
                             y_safe, target_coef, smooth_row, eps, smooth_coef, tl.where(counted, scale, 0.0), PROB,
                             INDEX, HAS_CW, SMOOTH, BLOCK_C)
        return loss, counted, w_y, hit, bad

    @triton.jit
    def _add_partials(acc, k, loss, counted, w_y, hit, bad, KP: tl.constexpr, HP: tl.constexpr):
        """acc[k] += this tile's partial sums: counted rows, sum of w_y, loss, hits, invalid class indices."""
        ks = tl.arange(0, KP)
        vals = tl.where(ks == 0, tl.sum(counted.to(tl.float32), 0), 0.0)
        vals = tl.where(ks == 1, tl.sum(w_y, 0), vals)
        vals = tl.where(ks == 2, tl.sum(loss, 0), vals)
        vals = tl.where(ks == 3, tl.sum(hit.to(tl.float32), 0), vals)
        vals = tl.where(ks == 4, tl.sum(bad.to(tl.float32), 0), vals)
        return tl.where((tl.arange(0, HP) == k)[:, None], acc + vals[None, :], acc)

    @triton.jit
    def _per_head_forward_kernel(
        TABLE, F_OFF, W_OFF, REF, DPART, PART, LOSS_ROWS, H, ignore_index, eps,
        FI: tl.constexpr, ALL_HEADS: tl.constexpr, PROB: tl.constexpr, INDEX: tl.constexpr, POS: tl.constexpr,
        HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, RED: tl.constexpr, HITS: tl.constexpr, GRAD: tl.constexpr,
        KP: tl.constexpr, HP: tl.constexpr, EVICT: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Work item p = (head, first row, rows) of a per-head call, BLOCK_R rows at a time. ALL_HEADS
        (reduction none: every head has the same rows, whose weighted losses are summed): the item's rows of
        every head, head 0 .. H-1 in turn, and the summed rows are stored. PART[p * (H or 1) + k] = the partial
        sums of the item's k-th head (see _add_partials); every column the finalize reads is written."""
        pid = tl.program_id(0).to(tl.int64)
        item = TABLE + W_OFF + 3 * pid
        head, first, nrows = tl.load(item), tl.load(item + 1), tl.load(item + 2)
        FTABLE = (TABLE + F_OFF).to(tl.pointer_type(tl.float32))
        ELEM: tl.constexpr = REF.dtype.element_ty
        acc = tl.zeros([HP, KP], tl.float32)
        if ALL_HEADS:
            for i in range(0, nrows, BLOCK_R):
                local = i + tl.arange(0, BLOCK_R)
                weighted = tl.zeros([BLOCK_R], tl.float32)
                for h in range(0, H):
                    weight_sum, scale = _head_scalars(TABLE, FTABLE, DPART, h, FI, HAS_CW, SMOOTH, RED, GRAD,
                                                      BLOCK_C, BLOCK_D)
                    loss, counted, w_y, hit, bad = _per_head_tile(
                        TABLE, h, weight_sum, scale, first, local, nrows, ignore_index, eps, ELEM, FI, PROB, INDEX,
                        POS, HAS_CW, SMOOTH, HITS, GRAD, EVICT, VEC, BLOCK_R, BLOCK_C)
                    weighted += tl.load(FTABLE + 3 * h + 1) * loss
                    acc = _add_partials(acc, h, loss, counted, w_y, hit, bad, KP, HP)
                tl.store(LOSS_ROWS + (first + local.to(tl.int64)), weighted, mask=local < nrows)
        else:
            weight_sum, scale = _head_scalars(TABLE, FTABLE, DPART, head, FI, HAS_CW, SMOOTH, RED, GRAD, BLOCK_C,
                                              BLOCK_D)
            for i in range(0, nrows, BLOCK_R):
                loss, counted, w_y, hit, bad = _per_head_tile(
                    TABLE, head, weight_sum, scale, first, i + tl.arange(0, BLOCK_R), nrows, ignore_index, eps,
                    ELEM, FI, PROB, INDEX, POS, HAS_CW, SMOOTH, HITS, GRAD, EVICT, VEC, BLOCK_R, BLOCK_C)
                acc = _add_partials(acc, 0, loss, counted, w_y, hit, bad, KP, HP)
        hs = tl.arange(0, HP)
        ks = tl.arange(0, KP)
        if ALL_HEADS:
            segs = H
        else:
            segs = 1
        tl.store(PART + ((pid * segs + hs)[:, None] * KP + ks[None, :]), acc,
                 mask=(hs < segs)[:, None] & (ks < 5)[None, :])

    @triton.jit
    def _per_head_finalize_kernel(
        TABLE, F_OFF, W_OFF, PART, NSEG, SEGS, DPART, LOSS, HEAD_LOSSES, HEAD_CORRECT, COUNT, INVALID, H,
        FI: tl.constexpr, RED: tl.constexpr, HITS: tl.constexpr, USE_DPART: tl.constexpr, KP: tl.constexpr,
        HP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: the NSEG partial rows of the per-head forward (SEGS per work item) summed per head in a
        fixed order; each head's mean divides by its own divisor."""
        hs = tl.arange(0, HP)
        ks = tl.arange(0, KP)
        is_int = (ks == 0) | (ks == 3) | (ks == 4)
        f_acc = tl.zeros([HP, KP], tl.float32)
        i_acc = tl.zeros([HP, KP], tl.int64)
        for p0 in range(0, NSEG, BLOCK_P):
            seg = p0 + tl.arange(0, BLOCK_P)
            in_range = seg < NSEG
            item = seg // SEGS
            head = tl.load(TABLE + W_OFF + 3 * item.to(tl.int64), mask=in_range, other=0) + (seg - item * SEGS)
            head = tl.where(in_range, head, -1)
            v = tl.load(PART + (seg.to(tl.int64)[:, None] * KP + ks[None, :]),
                        mask=in_range[:, None] & (ks < 5)[None, :], other=0.0)
            mine = tl.where((head[:, None] == hs[None, :])[:, :, None], v[:, None, :], 0.0)  # [P, HP, KP]
            f_acc += tl.sum(mine, 0)
            i_acc += tl.sum(tl.where(is_int[None, None, :], mine, 0.0).to(tl.int64), 0)
        loss_h = tl.sum(tl.where(ks[None, :] == 2, f_acc, 0.0), 1)
        if USE_DPART:  # the divisors the gradients were computed with
            denom = tl.zeros([HP], tl.float32)
            for h in range(0, H):
                row = TABLE + h * FI
                denom = tl.where(hs == h, _head_divisor(DPART, tl.load(row + 19), tl.load(row + 20), BLOCK_D), denom)
        else:
            denom = tl.sum(tl.where(ks[None, :] == 1, f_acc, 0.0), 1)
        is_head = hs < H
        FTABLE = (TABLE + F_OFF).to(tl.pointer_type(tl.float32))
        weights = tl.load(FTABLE + 3 * hs + 1, mask=is_head, other=0.0)
        if RED == 2:
            head_losses = loss_h
        else:
            head_losses = _div(tl.where(is_head, loss_h, 0.0), tl.where(is_head, denom, 1.0))
        if RED != 0:
            tl.store(LOSS, tl.sum(tl.where(is_head, weights * head_losses, 0.0), 0))
        tl.store(HEAD_LOSSES + hs, head_losses, mask=is_head)
        if HITS:
            tl.store(HEAD_CORRECT + hs, tl.sum(tl.where(ks[None, :] == 3, i_acc, 0), 1), mask=is_head)
        tl.store(COUNT + hs, tl.sum(tl.where(ks[None, :] == 0, i_acc, 0), 1), mask=is_head)
        tl.store(INVALID, tl.sum(tl.sum(tl.where(ks[None, :] == 4, i_acc, 0), 1), 0))

    def _configs(narrow: bool):
        """The deliberate config lists. BLOCK_R is not tuned: it fixes the number of partial sums."""
        if narrow:
            options = [dict(num_warps=4), dict(num_warps=8)]
            configs = [triton.Config({}, **o) for o in options]
        else:
            options = [(WIDE_BLOCK_C, 8), (4096, 8), (8192, 16), (16384, 16)]
            configs = [triton.Config({"BLOCK_C": b}, num_warps=w) for b, w in options]
        return configs if AUTOTUNE else configs[:1]

    def _tuned(kernel, narrow: bool, extra_key=()):
        key = ["C", "H", "BLOCK_R", *extra_key] if narrow else ["C", "H", *extra_key]
        return triton.autotune(configs=_configs(narrow), key=key)(kernel)

    # Every tuned kernel only writes outputs it fully overwrites (the benchmark runs are harmless); the
    # scale kernel, which may work in place, is not tuned.
    _KERNELS = {
        ("forward", True): _tuned(_forward_kernel, True, ("GRAD",)),
        ("forward", False): _tuned(_forward_kernel, False, ("GRAD",)),
        ("backward", True): _tuned(_backward_kernel, True),
        ("backward", False): _tuned(_backward_kernel, False),
    }

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)  # triton.cdiv is a constexpr_function: microseconds per host call

    def _next_pow2(v: int) -> int:
        return 1 << max(0, int(v) - 1).bit_length()

    def _plan(C: int, outer: int, inner: int) -> tuple[bool, int, Optional[int]]:
        """(narrow, BLOCK_R, BLOCK_C or None when autotuned) from static shapes only."""
        if C > NARROW_MAX_C:
            return False, 1, None
        block_c = max(16, _next_pow2(C))
        block_r = max(1, min(TILE // block_c, _next_pow2(inner)))
        while block_r > 1 and outer * _cdiv(inner, block_r) < MIN_PROGRAMS:
            block_r //= 2
        return True, block_r, block_c

    def _denom_plan(R: int) -> tuple[int, int]:
        """(programs, rows per program) of the divisor pre-pass: at most DENOM_MAX_PROGRAMS partials."""
        rows = max(DENOM_MIN_ROWS, _cdiv(_cdiv(R, DENOM_MAX_PROGRAMS), DENOM_BLOCK) * DENOM_BLOCK)
        return _cdiv(R, rows), rows

    class _Layout:
        """The heads' sizes as the kernels walk them: outer x inner rows (a classifier: 1 x N)."""

        def __init__(self, heads):
            h0 = heads[0]
            N, C, S = h0.shape
            self.N, self.C, self.S = N, C, S
            self.R = N * S
            self.classifier = S == 1
            self.outer, self.inner = (1, N) if self.classifier else (N, S)
            # Class-innermost heads (channels_last) get class-innermost gradients.
            self.channels_last = S > 1 and h0.stride(1) == 1

        def map3(self, sn: int, sc: int, ss: int) -> tuple[int, int, int]:
            return (0, sc, sn) if self.classifier else (sn, sc, ss)

        def strides3(self, t: torch.Tensor) -> tuple[int, int, int]:
            return self.map3(*t.stride())

        def strides2(self, t: torch.Tensor) -> tuple[int, int]:
            sn, ss = t.stride()
            return (0, sn) if self.classifier else (sn, ss)

        def grad_strides3(self) -> tuple[int, int, int]:
            """The strides of every head's gradient as _grad_buffer and _allocate_grads lay them out."""
            C, S = self.C, self.S
            return self.map3(S * C, 1, C) if self.channels_last else self.map3(C * S, S, 1)

    def _grad_buffer(heads) -> torch.Tensor:
        """All heads' gradients as one (H, N, C, S) tensor laid out like head 0 (class-innermost heads get a
        class-innermost buffer); dense, so the scale kernel walks it flat."""
        h0 = heads[0]
        N, C, S = h0.shape
        if S > 1 and h0.stride(1) == 1:
            return h0.new_empty((len(heads), N, S, C)).permute(0, 1, 3, 2)
        return h0.new_empty((len(heads), N, C, S))

    def _allocate_grads(heads) -> list[torch.Tensor]:
        """One gradient tensor per head (the op's outputs may not alias each other), laid out like head 0."""
        h0 = heads[0]
        N, C, S = h0.shape
        if S > 1 and h0.stride(1) == 1:
            return [h0.new_empty((N, S, C)).permute(0, 2, 1) for _ in heads]
        return [h0.new_empty((N, C, S)) for _ in heads]

    # The slots past the H-th head are never read (H is a constexpr). Eager launches pass None there: Triton
    # binds a None as a constant, which is cheaper per launch than a tensor or int it checks and specializes.
    # Traced launches (wrap_triton) repeat head 0 there instead (the form torch.compile has been tested with),
    # and in written slots a tensor the kernel never writes, so that no written argument aliases another one
    # (torch.compile's functionalization clones written arguments that alias).

    def _static_head_args(heads, layout: _Layout, head_weights, traced: bool) -> dict:
        """The heads' strides (SN/SC/SS 0..7), weights (W0..7) and the gradients' strides."""
        args = {}
        for h in range(MAX_HEADS):
            if h < len(heads) or traced:
                args[f"SN{h}"], args[f"SC{h}"], args[f"SS{h}"] = layout.strides3(heads[h if h < len(heads) else 0])
            else:
                args[f"SN{h}"] = args[f"SC{h}"] = args[f"SS{h}"] = None
        args.update(_weight_args(head_weights, traced))
        args["G_SN"], args["G_SC"], args["G_SS"] = layout.grad_strides3()
        return args

    def _tensor_head_args(heads, grads, unused_written: torch.Tensor, traced: bool) -> dict:
        """X0..X7 and G0..G7 (no G when grads is empty and not traced: the kernel does not write them)."""
        args = {}
        for h in range(MAX_HEADS):
            if h < len(heads):
                args[f"X{h}"] = heads[h]
            elif traced:
                args[f"X{h}"] = heads[0]
            else:
                args[f"X{h}"] = None
            if h < len(grads):
                args[f"G{h}"] = grads[h]
            else:
                args[f"G{h}"] = unused_written if traced else None
        return args

    def _weight_args(head_weights, traced: bool) -> dict:
        unused = 0.0 if traced else None
        return {f"W{h}": float(head_weights[h]) if h < len(head_weights) else unused for h in range(MAX_HEADS)}

    def _target_strides(target: torch.Tensor, prob: bool, layout: _Layout) -> dict:
        if prob:
            t_sn, t_sc, t_ss = layout.strides3(target)
        else:
            (t_sn, t_ss), t_sc = layout.strides2(target), 0
        return dict(T_SN=t_sn, T_SC=t_sc, T_SS=t_ss)

    def _kernel_plan(stage: str, layout: _Layout, H: int, grad: Optional[bool], dtype, target_dtype) -> tuple:
        """(tuned kernel, grid, block args, key for _run) of a forward / backward launch."""
        narrow, block_r, block_c = _plan(layout.C, layout.outer, layout.inner)
        blocks = dict(BLOCK_R=block_r, BLOCK_C=block_c) if narrow else dict(BLOCK_R=block_r)
        grid = (layout.outer * _cdiv(layout.inner, block_r),)
        # Everything the autotuner keys on (C, H, BLOCK_R, GRAD and the tensors' dtypes) follows from this.
        key = (stage, narrow, layout.C, H, block_r, grad, dtype, target_dtype)
        return _KERNELS[(stage, narrow)], grid, blocks, key

    _BEST_CONFIGS: dict = {}  # eager launches: static key -> (the tuned kernel's JITFunction, its config)
    _PLANS: dict = {}  # eager calls: call signature -> the non-tensor part of its launches
    _MAX_PLANS = 256

    def _cached_plan(build, key, traced: bool):
        """build(), memoized by key for eager calls (static shapes and strides; traced shapes may be symbolic)."""
        if traced:
            return build()
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            plan = _PLANS[key] = build()
        return plan

    def _signature(heads, target, class_weight, *options) -> tuple:
        h0 = heads[0]
        return (tuple(h0.shape), tuple(h.stride() for h in heads), h0.dtype, h0.device, tuple(target.shape),
                target.stride(), target.dtype, class_weight is None, *options)

    def _run(kernel, grid, args: dict, traced: bool, key=None):
        """Launch: directly in eager mode (no wrapper layers), through wrap_triton when tracing.

        An eager launch of a tuned kernel whose config is known for `key` skips the Autotuner's per-call work
        (merging ~80 arguments into dicts, formatting every tensor's dtype into its key) and calls the
        JITFunction with the config, as the Autotuner itself does once it has a cached choice."""
        if not traced:
            if grid[0] > 0:
                best = _BEST_CONFIGS.get(key) if key is not None else None
                if best is not None:
                    best[0][grid](**args, **best[1])
                else:
                    kernel[grid](**args)
                    config = getattr(kernel, "best_config", None)
                    if key is not None and config is not None:
                        _BEST_CONFIGS[key] = (kernel.fn, config.all_kwargs())
            return
        if INTERPRET and any(_is_fake(v) for v in args.values()):
            # Under TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel itself (no HOP), which
            # would run on fake tensors: skip it, leaving the outputs' metadata (the fake kernel's job).
            return
        torch.library.wrap_triton(kernel)[grid](**args)

    def _is_fake(value) -> bool:
        from torch._subclasses.fake_tensor import is_fake

        return isinstance(value, torch.Tensor) and (value.device.type == "meta" or is_fake(value))

    def _forward_plan(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction,
                      want_hits, mode, traced) -> dict:
        """Everything of the forward launches that is not a tensor: shapes, strides, options, grids."""
        H = len(heads)
        layout = _Layout(heads)
        prob = target.dim() == 3
        save = mode == SAVE_LSE
        grad = mode == GRAD_IN_FORWARD
        kp = _next_pow2(3 + 2 * H)  # count, divisor, H loss sums, H hits, invalid rows
        use_dpart = grad and reduction == MEAN and not prob
        dp, rows = _denom_plan(layout.R) if use_dpart else (0, 0)
        block_d = max(16, _next_pow2(dp))
        kernel, grid, blocks, key = _kernel_plan("forward", layout, H, grad, heads[0].dtype, target.dtype)
        has_cw = class_weight is not None
        smooth = label_smoothing != 0.0
        forward = _static_head_args(heads, layout, head_weights, traced)
        forward.update(_target_strides(target, prob, layout))
        forward.update(
            DP=dp, C=layout.C, S=layout.inner, R=layout.R, ignore_index=ignore_index, eps=float(label_smoothing),
            H=H, PROB=prob, HAS_CW=has_cw, SMOOTH=smooth, RED=reduction, SAVE=save, HITS=want_hits, KP=kp,
            GRAD=grad, BLOCK_D=block_d,
            EVICT="evict_last" if grad else "",  # grad-in-forward: keep the row in L2 for the second pass
            **blocks,
        )
        finalize = dict(
            P=grid[0], **_weight_args(head_weights, traced), DP=dp, H=H, KP=kp, RED=reduction, HITS=want_hits,
            USE_DPART=use_dpart, BLOCK_D=block_d, BLOCK_P=FINALIZE_BLOCK,
        )
        denom = None
        if use_dpart:
            t_sn, t_ss = layout.strides2(target)
            denom = dict(T_SN=t_sn, T_SS=t_ss, C=layout.C, S=layout.inner, R=layout.R, ROWS=rows,
                         ignore_index=ignore_index, HAS_CW=has_cw, BLOCK=DENOM_BLOCK)
        return dict(
            layout=layout, H=H, save=save, grad=grad, dp=dp, part_shape=(grid[0], kp),
            kernel=kernel, grid=grid, key=key, forward=forward, finalize=finalize, denom=denom,
        )

    def _forward_impl(heads, target, class_weight, head_weights, ignore_index: int, label_smoothing: float,
                      reduction: int, want_hits: bool, mode: int, traced: bool):
        """The forward launches of both paths. Returns loss, head_losses, head_correct ((0,) unless
        want_hits), count, invalid (rows with a class index outside [0, C)), denom, lse (H, N, S) and coef (N, S)
        (SAVE_LSE, else (0,)), and the heads' gradients as one (H, N, C, S) buffer (GRAD_IN_FORWARD, else
        None)."""
        options = (head_weights, ignore_index, label_smoothing, reduction, want_hits, mode, traced)
        plan = _cached_plan(
            lambda: _forward_plan(heads, target, class_weight, *options),
            _signature(heads, target, class_weight, tuple(head_weights), *options[1:]), traced)
        layout, H = plan["layout"], plan["H"]
        device = heads[0].device
        f32 = dict(dtype=torch.float32, device=device)
        loss = torch.empty((layout.N, layout.S) if reduction == NONE else (), **f32)
        head_losses = torch.empty((H,), **f32)
        head_correct = torch.empty((H if want_hits else 0,), dtype=torch.int64, device=device)
        count = torch.empty((), dtype=torch.int64, device=device)
        invalid = torch.empty((), dtype=torch.int64, device=device)
        denom = torch.empty((), **f32)
        lse = torch.empty((H, layout.N, layout.S) if plan["save"] else (0,), **f32)
        coef = torch.empty((layout.N, layout.S) if plan["save"] else (0,), **f32)
        part = torch.empty(plan["part_shape"], **f32)
        buffer = _grad_buffer(heads) if plan["grad"] else None
        # Written arguments that a mode does not use point at head_losses, which only the finalize writes.
        dpart = head_losses
        if plan["denom"] is not None:
            dpart = torch.empty((plan["dp"],), **f32)
            _run(_denom_kernel, (plan["dp"],), dict(
                plan["denom"], T=target, CW=class_weight if class_weight is not None else dpart, DPART=dpart,
            ), traced)
        args = _tensor_head_args(heads, buffer.unbind(0) if buffer is not None else (), head_losses, traced)
        args.update(plan["forward"])
        args.update(T=target, CW=class_weight if class_weight is not None else head_losses,
                    LOSS_ROWS=loss, LSE=lse, COEF=coef, PART=part, DPART=dpart)
        _run(plan["kernel"], plan["grid"], args, traced, plan["key"])
        _run(_finalize_kernel, (1,), dict(
            plan["finalize"], PART=part, DPART=dpart, LOSS=loss, HEAD_LOSSES=head_losses, HEAD_CORRECT=head_correct,
            COUNT=count, INVALID=invalid, DENOM=denom,
        ), traced)
        return loss, head_losses, head_correct, count, invalid, denom, lse, coef, buffer

    def _backward_plan(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction,
                       traced) -> dict:
        """Everything of the lse-mode backward launch that is not a tensor (or grad_loss's strides)."""
        H = len(heads)
        layout = _Layout(heads)
        prob = target.dim() == 3
        kernel, grid, blocks, key = _kernel_plan("backward", layout, H, None, heads[0].dtype, target.dtype)
        static = _static_head_args(heads, layout, head_weights, traced)
        static.update(_target_strides(target, prob, layout))
        static.update(
            C=layout.C, S=layout.inner, R=layout.R, ignore_index=ignore_index, eps=float(label_smoothing),
            H=H, PROB=prob, HAS_CW=class_weight is not None, SMOOTH=label_smoothing != 0.0, RED=reduction,
            **blocks,
        )
        return dict(layout=layout, kernel=kernel, grid=grid, key=key, static=static)

    def _backward_impl(grad_loss, heads, target, class_weight, head_weights, ignore_index: int,
                       label_smoothing: float, reduction: int, lse, coef, denom, traced: bool, one_buffer: bool):
        """The lse-mode backward launch of both paths: every head's gradient from the saved lse and coef;
        grad_loss () or (N, S), read on the device."""
        options = (head_weights, ignore_index, label_smoothing, reduction, traced)
        plan = _cached_plan(
            lambda: _backward_plan(heads, target, class_weight, *options),
            ("backward", *_signature(heads, target, class_weight, tuple(head_weights), *options[1:])), traced)
        layout = plan["layout"]
        grads = _grad_buffer(heads).unbind(0) if one_buffer else _allocate_grads(heads)
        if reduction == NONE:
            grad_loss = grad_loss.reshape(layout.N, layout.S)
            grad_sn, grad_ss = layout.strides2(grad_loss)
        else:
            grad_sn, grad_ss = 0, 0
        args = _tensor_head_args(heads, grads, coef, traced)
        args.update(plan["static"])
        args.update(T=target, CW=class_weight if class_weight is not None else lse, LSE=lse, COEF=coef,
                    DENOM=denom, GRAD=grad_loss, GRAD_SN=grad_sn, GRAD_SS=grad_ss)
        _run(plan["kernel"], plan["grid"], args, traced, plan["key"])
        return grads

    def scale_gradients(grads: torch.Tensor, grad_output: torch.Tensor, in_place: bool) -> torch.Tensor:
        """grads * grad_output for a dense gradient buffer (any permutation of a contiguous tensor), with
        grad_output (a one-element tensor) read on the device: in place (launching one kernel that returns
        at once when grad_output is exactly 1.0) or into a new buffer of the same layout.

        Example (CUDA, or CPU tensors under TRITON_INTERPRET=1):
            >>> g = torch.ones(2, 3, device="cuda")                           # doctest: +SKIP
            >>> scale_gradients(g, torch.tensor(2.5, device="cuda"), in_place=True) is g   # doctest: +SKIP
            True
        """
        out = grads if in_place else torch.empty_like(grads)
        assert out.stride() == grads.stride()  # empty_like keeps a dense layout
        numel = grads.numel()
        grid = (min(_cdiv(numel, SCALE_BLOCK), SCALE_MAX_PROGRAMS),)
        _run(_scale_kernel, grid, dict(SRC=grads, DST=out, NUMEL=numel, GRAD_OUT=grad_output,
                                       SKIP_ONE=in_place, BLOCK=SCALE_BLOCK), traced=_is_traced(grad_output))
        return out

    class _EagerFunction(torch.autograd.Function):
        """The eager path: the kernels launched directly, autograd by a plain Function (no triton_op dispatch,
        no register_autograd layer, no wrap_triton)."""

        @staticmethod
        def forward(ctx, options, target, class_weight, *inputs):
            # The heads come as the model gave them, (N, C, d1, ..., dk): their (N, C, S) views are made here,
            # where autograd does not record them (outside, each would be a node in forward and in backward).
            heads = [as_rows(x) for x in inputs]
            head_weights, ignore_index, label_smoothing, reduction, want_hits, mode, target_grad = options
            loss, head_losses, head_correct, count, invalid, denom, lse, coef, buffer = _forward_impl(
                heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, want_hits,
                mode, traced=False)
            ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs below
            ctx.mark_non_differentiable(head_losses, head_correct, count, invalid)
            ctx.mode, ctx.target_grad = mode, target_grad
            ctx.num_heads, ctx.head_shape = len(inputs), inputs[0].shape
            ctx.options = (head_weights, ignore_index, label_smoothing, reduction)
            # The logits (and class weights) are kept for the lse-mode backward and for a probability target's
            # gradient only: grad-in-forward mode saves nothing else, so the caller's logits can be freed.
            kept = []
            if mode == SAVE_LSE or target_grad:
                kept = ([class_weight] if class_weight is not None else []) + list(inputs)
            ctx.kept_class_weight = class_weight is not None and bool(kept)
            if mode == GRAD_IN_FORWARD:
                leading = (buffer,)
            elif mode == SAVE_LSE:
                leading = (lse, coef, denom, target)
            else:  # only the target's gradient
                leading = ()
            ctx.num_leading = len(leading)
            ctx.save_for_backward(*leading, *kept)
            return loss, head_losses, head_correct, count, invalid

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss, *unused):
            if grad_loss is None:
                return (None,) * (3 + ctx.num_heads)
            saved = ctx.saved_tensors
            leading, kept = saved[:ctx.num_leading], saved[ctx.num_leading:]
            class_weight = kept[0] if ctx.kept_class_weight else None
            heads = [as_rows(x) for x in (kept[1:] if ctx.kept_class_weight else kept)]
            head_weights, _, label_smoothing, reduction = ctx.options
            target_grad = None
            if ctx.target_grad:
                target_grad = _prob_target_grad(heads, head_weights, class_weight, label_smoothing, reduction,
                                                grad_loss)
            if ctx.mode == GRAD_IN_FORWARD:
                (buffer,) = leading
                # In place only where this backward is the buffer's last reader and values are real.
                in_place = not torch._C._autograd._get_current_graph_task_keep_graph() and not (
                    _is_traced(grad_loss) or _is_traced(buffer))
                grads = scale_gradients(buffer, grad_loss, in_place).unbind(0)
            elif ctx.mode == SAVE_LSE:
                lse, coef, denom, target = leading
                grads = _backward_impl(grad_loss, heads, target, class_weight, *ctx.options, lse, coef, denom,
                                       traced=_is_traced(grad_loss), one_buffer=True)
            else:  # the heads need no gradient
                return (None, target_grad, None) + (None,) * ctx.num_heads
            shape = ctx.head_shape
            return (None, target_grad, None) + tuple(g if g.shape == shape else g.view(shape) for g in grads)

    def _per_head_plan(heads, targets, positions, class_weights, label_smoothing, reduction, want_hits,
                       grad) -> dict:
        """The non-tensor part of a per-head call's launches (static shapes only): the work items (head, first
        row, rows) of the main kernel, the divisor pre-pass's items, each head's range of divisor partials, the
        constexprs."""
        H = len(heads)
        rows_of = [x.shape[0] * x.shape[2] for x in heads]
        max_c = max(x.shape[1] for x in heads)
        wide = max_c > NARROW_MAX_C
        block_c = WIDE_BLOCK_C if wide else max(16, _next_pow2(max_c))  # one tile shape for every head
        block_r = max(1, PH_TILE // block_c)
        all_heads = reduction == NONE
        if all_heads:  # every head has the same rows: an item is those rows of every head
            step = min(max(1, _cdiv(rows_of[0], block_r) // PH_PROGRAMS) * block_r, PH_MAX_ROWS)
            spans = [(0, step, rows_of[0])]
        else:
            # Items of about equal work (tiles x class chunks), so that a big head and a small one are spread
            # over the grid in proportion to their size, not one program per head.
            chunks = [_cdiv(x.shape[1], block_c) for x in heads]
            work = sum(_cdiv(R, block_r) * k for R, k in zip(rows_of, chunks))
            quantum = max(1, work // PH_PROGRAMS)
            spans = [(h, min(max(1, quantum // k) * block_r, PH_MAX_ROWS), R)
                     for h, (R, k) in enumerate(zip(rows_of, chunks))]
        items = [(h, r0, min(step, R - r0)) for h, step, R in spans for r0 in range(0, R, step)]
        use_dpart = grad and reduction == MEAN
        ditems, dranges = [], []
        for h, R in enumerate(rows_of):
            programs, rows = _denom_plan(R) if use_dpart else (0, 0)
            dranges.append((len(ditems), programs))
            ditems += [(h, q * rows, min(rows, R - q * rows)) for q in range(programs)]
        block_d = max(16, min(DENOM_MAX_PROGRAMS, _next_pow2(max(n for _, n in dranges))))
        prob = [t.dim() == 3 for t in targets]
        pos = any(p is not None for p in positions)  # some head reads a resized target through its positions
        flags = dict(PROB=any(prob), INDEX=not all(prob), POS=pos,
                     HAS_CW=any(cw is not None for cw in class_weights), SMOOTH=label_smoothing != 0.0,
                     RED=reduction, HITS=want_hits, KP=8, BLOCK_D=block_d)
        return dict(
            H=H, items=[v for item in items + ditems for v in item], P=len(items), Q=len(ditems), dranges=dranges,
            segs=H if all_heads else 1, denom=dict(POS=pos, BLOCK=DENOM_BLOCK),
            forward=dict(flags, ALL_HEADS=all_heads, GRAD=grad, HP=max(2, _next_pow2(H)) if all_heads else 2,
                         EVICT="evict_last" if grad else "", BLOCK_R=block_r, BLOCK_C=block_c,
                         num_warps=8),
            finalize=dict(RED=reduction, HITS=want_hits, USE_DPART=use_dpart, KP=8, HP=max(2, _next_pow2(H)),
                          BLOCK_P=64, BLOCK_D=block_d),
        )

    def _per_head_grads(inputs, heads, one_buffer: bool):
        """Every head's gradient, laid out like its head (a class-innermost head gets a class-innermost
        gradient, as _grad_buffer does): in one flat buffer (eager: backward scales them all in one launch) or
        one tensor each (the op's outputs may not alias). Returns the buffer (None unless one_buffer), the
        (N, C, S) views the kernel writes, and the same in the heads' shapes."""
        flat = heads[0].new_empty((sum(x.numel() for x in heads),)) if one_buffer else None
        rows, views, offset = [], [], 0
        for x, x3 in zip(inputs, heads):
            N, C, S = x3.shape
            part = flat[offset: offset + x3.numel()] if one_buffer else x3.new_empty((x3.numel(),))
            offset += x3.numel()
            g3 = part.view(N, S, C).permute(0, 2, 1) if S > 1 and x3.stride(1) == 1 else part.view(N, C, S)
            rows.append(g3)
            views.append(g3.view(x.shape))
        return flat, rows, views

    def _vector_width(heads, targets, grads) -> int:
        """Elements per 16 bytes when every head, probability target and gradient may be read and written in
        16-byte vectors (aligned, classes contiguous, row strides and C multiples of that), else 0. A fact of
        the call's pointers, so it is checked per call (a constexpr: two compiled variants at most)."""
        vec = 16 // heads[0].element_size()

        def aligned(t):
            sN, sC, sS = t.stride()
            return sC == 1 and t.data_ptr() % 16 == 0 and sN % vec == 0 and (t.shape[2] == 1 or sS % vec == 0)

        return vec if all(x.shape[1] % vec == 0 and aligned(x) and (t.dim() == 2 or aligned(t))
                          and (g is None or aligned(g)) for x, t, g in zip(heads, targets, grads)) else 0

    def _head_table(plan, heads, targets, positions, class_weights, grads, head_weights) -> torch.Tensor:
        """The call's table as one int64 tensor on the heads' device (one host-to-device copy): PH_FIELDS per
        head (HeadDesc's integer fields, the head's divisor partials and its target positions), the work items,
        the divisor items, then HeadDesc's float fields (weight_sum, weight, grad_scale) per head as float32
        bits. weight_sum holds C; for a head with class weights the kernel sums them on the device (the host
        never reads device values). grad_scale is the head weight; the kernel divides it by the head's divisor
        for the mean."""
        ints, floats = [], []
        for x, t, pos, cw, g, w, drange in zip(heads, targets, positions, class_weights, grads, head_weights,
                                               plan["dranges"]):
            index = t.dim() == 2
            ints += [x.data_ptr(), *x.shape, *x.stride()]
            ints += [t.data_ptr(), *t.stride(), 0, 0, 0, 0] if index else [0, 0, 0, t.data_ptr(), *t.stride()]
            ints.append(cw.data_ptr() if cw is not None else 0)
            ints += [g.data_ptr(), *g.stride()] if g is not None else [0, 0, 0, 0]
            ints += drange
            ints.append(pos.data_ptr() if pos is not None else 0)
            floats += [float(x.shape[1]), float(w), float(w)]
        floats += [0.0] * (len(floats) % 2)  # whole int64 words
        table = torch.cat([torch.tensor(ints + plan["items"], dtype=torch.int64),
                           torch.tensor(floats, dtype=torch.float32).view(torch.int64)])
        device = heads[0].device
        if device.type != "cpu":  # pinned: an asynchronous copy (no wait for the stream's queued work)
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("auxfuse: the triton backend's per-head call cannot be captured in a CUDA graph "
                                   "(its head table is copied from a host buffer); run the heads one call each")
            table = table.pin_memory().to(device, non_blocking=True)
        return table

    def _per_head_impl(inputs, targets, positions, class_weights, head_weights, ignore_index: int,
                       label_smoothing: float, reduction: int, want_hits: bool, grad: bool, one_buffer: bool = True):
        """The launches of a per-head call: the divisor pre-pass (grad-in-forward mean), the main kernel over
        the work items, the finalize. A head's target is (N, S) class indices, (N, C, S) probabilities, or with
        its positions (Problem.target_positions, else None) the full-resolution (N, S') class indices. Returns
        loss (() or (N, S)), head_losses, head_correct ((0,) unless want_hits), count (H,), invalid, and with
        grad the gradient buffer (one_buffer) and each head's gradient in its shape."""
        heads = [as_rows(x) for x in inputs]
        options = (label_smoothing, reduction, want_hits, grad)
        key = ("per_head", tuple((tuple(x.shape), x.stride()) for x in heads),
               tuple((tuple(t.shape), t.stride()) for t in targets), tuple(p is None for p in positions),
               tuple(cw is None for cw in class_weights), heads[0].dtype, heads[0].device, *options)
        plan = _cached_plan(lambda: _per_head_plan(heads, targets, positions, class_weights, *options), key, False)
        flat, grads, views = (_per_head_grads(inputs, heads, one_buffer) if grad
                              else (None, [None] * len(heads), []))
        table = _head_table(plan, heads, targets, positions, class_weights, grads, head_weights)
        H, P, Q = plan["H"], plan["P"], plan["Q"]
        offsets = dict(W_OFF=H * PH_FIELDS, F_OFF=H * PH_FIELDS + 3 * (P + Q))
        device = heads[0].device
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        loss = torch.empty(tuple(heads[0].shape[::2]) if reduction == NONE else (), **f32)
        head_losses = torch.empty((H,), **f32)
        head_correct = torch.empty((H if want_hits else 0,), **i64)
        count = torch.empty((H,), **i64)
        invalid = torch.empty((), **i64)
        part = torch.empty((P * plan["segs"], 8), **f32)
        dpart = torch.empty((max(Q, 1),), **f32)
        common = dict(TABLE=table, FI=PH_FIELDS)
        if Q:  # grad-in-forward mean: the divisors before the gradients
            _run(_per_head_denom_kernel, (Q,), dict(common, **plan["denom"], D_OFF=offsets["W_OFF"] + 3 * P,
                                                     DPART=dpart, ignore_index=ignore_index), traced=False)
        _run(_per_head_forward_kernel, (P,), dict(
            common, **offsets, **plan["forward"], VEC=_vector_width(heads, targets, grads), REF=heads[0],
            DPART=dpart, PART=part, LOSS_ROWS=loss, H=H, ignore_index=ignore_index, eps=float(label_smoothing)),
            traced=False)
        _run(_per_head_finalize_kernel, (1,), dict(
            common, **offsets, **plan["finalize"], PART=part, NSEG=P * plan["segs"], SEGS=plan["segs"],
            DPART=dpart, LOSS=loss, HEAD_LOSSES=head_losses, HEAD_CORRECT=head_correct, COUNT=count,
            INVALID=invalid, H=H), traced=False)
        return loss, head_losses, head_correct, count, invalid, flat, views

    class _PerHeadFunction(torch.autograd.Function):
        """compute_per_head's autograd: the heads' gradients computed in the forward (one flat buffer; none when
        only targets need one), times grad_output in backward: one scale launch for mean / sum (nothing moves
        when it is 1.0), a per-row multiply broadcast over the classes for none. A probability target that
        requires grad gets its gradient from its head's saved logits (_prob_target_grad). The targets come one
        argument each (autograd does not look into a list), then the heads."""

        @staticmethod
        def forward(ctx, options, grad, positions, class_weights, *tensors):
            H = len(tensors) // 2
            targets, inputs = tensors[:H], tensors[H:]
            loss, head_losses, head_correct, count, invalid, flat, views = _per_head_impl(
                inputs, targets, positions, class_weights, *options, grad=grad)
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(head_losses, head_correct, count, invalid)
            ctx.num_heads, ctx.options = H, options
            ctx.target_grad_heads = [h for h in range(H) if ctx.needs_input_grad[4 + h]]
            ctx.save_for_backward(flat, *_target_grad_inputs(ctx.target_grad_heads, inputs, class_weights))
            ctx.views = [(v.shape, v.stride(), v.storage_offset()) for v in views]
            return loss, head_losses, head_correct, count, invalid

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss, *unused):
            H = ctx.num_heads
            if grad_loss is None:
                return (None,) * (4 + 2 * H)
            flat, *kept = ctx.saved_tensors
            head_weights, _, label_smoothing, reduction, _ = ctx.options
            target_grads = _per_head_target_grads(H, ctx.target_grad_heads, kept, head_weights, label_smoothing,
                                                  reduction, grad_loss)
            if flat is None:  # the heads need no gradient
                return (None, None, None, None, *target_grads, *([None] * H))
            # In place only where this backward is the buffer's last reader and values are real.
            in_place = not torch._C._autograd._get_current_graph_task_keep_graph() and not (
                _is_traced(grad_loss) or _is_traced(flat))
            if reduction != NONE:
                flat = scale_gradients(flat, grad_loss, in_place)
                grads = [flat.as_strided(*view) for view in ctx.views]
            else:
                grads = []
                for size, stride, offset in ctx.views:
                    g = flat.as_strided(size, stride, offset)
                    scale = grad_loss.reshape(size[0], 1, *size[2:]).to(g.dtype)
                    grads.append(g.mul_(scale) if in_place else g * scale)
            return (None, None, None, None, *target_grads, *grads)

    # Traced calls (torch.compile, make_fx): an opaque custom op, not a triton_op, because the head table needs
    # the tensors' data_ptr()s, which only the real call has; its fake kernel gives the shapes. cudagraph_unsafe:
    # a CUDA graph replay would read the table's host buffer again, long after it was freed.
    @torch.library.custom_op("auxfuse::triton_per_head_forward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
    def _per_head_op(
        heads: list[torch.Tensor],
        targets: list[torch.Tensor],
        target_positions: list[Optional[torch.Tensor]],
        class_weights: list[Optional[torch.Tensor]],
        head_weights: list[float],
        ignore_index: int,
        label_smoothing: float,
        reduction: int,
        want_hits: bool,
        grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """loss, head_losses, head_correct ((0,) unless want_hits), count (H,), invalid and (grad) each head's
        gradient, weight and divisor folded in, one tensor per head."""
        out = _per_head_impl(heads, targets, target_positions, class_weights, head_weights, ignore_index,
                             label_smoothing, reduction, want_hits, grad, one_buffer=False)
        return (*out[:5], out[6])

    @_per_head_op.register_fake
    def _per_head_fake(heads, targets, target_positions, class_weights, head_weights, ignore_index, label_smoothing,
                       reduction, want_hits, grad):
        H, device = len(heads), heads[0].device
        rows = [as_rows(x) for x in heads]
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return (
            torch.empty(tuple(rows[0].shape[::2]) if reduction == NONE else (), **f32),
            torch.empty((H,), **f32),
            torch.empty((H if want_hits else 0,), **i64),
            torch.empty((H,), **i64),
            torch.empty((), **i64),
            _per_head_grads(heads, rows, one_buffer=False)[2] if grad else [],
        )

    def _per_head_setup_context(ctx, inputs, output):
        heads, targets, _, class_weights, head_weights, _, label_smoothing, reduction = inputs[:8]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:5], *output[5])
        ctx.options = (head_weights, label_smoothing, reduction)
        # backward returns the inputs' structure as register_autograd flattens it: a list (of None) for each
        # list of tensors only (class_weights or target_positions with a None in it is one input)
        ctx.no_grads = [[None] * len(x) if isinstance(x, list) and all(isinstance(v, torch.Tensor) for v in x)
                        else None for x in inputs]
        # Probability targets that require grad: their heads' logits and class weights (_prob_target_grad).
        ctx.target_grad_heads = [h for h, t in enumerate(targets) if t.requires_grad]
        ctx.num_grads = len(output[5])
        ctx.save_for_backward(*output[5], *_target_grad_inputs(ctx.target_grad_heads, heads, class_weights))

    def _per_head_op_backward(ctx, grad_loss, *unused):
        result = list(ctx.no_grads)
        if grad_loss is None:
            return tuple(result)
        saved = ctx.saved_tensors
        grads, kept = saved[:ctx.num_grads], saved[ctx.num_grads:]
        head_weights, label_smoothing, reduction = ctx.options
        if grads:
            if reduction == NONE:  # (N, S): per row, broadcast over the classes
                result[0] = [g * grad_loss.reshape(g.shape[0], 1, *g.shape[2:]).to(g.dtype) for g in grads]
            else:
                result[0] = [g * grad_loss.to(g.dtype) for g in grads]
        result[1] = _per_head_target_grads(len(result[1]), ctx.target_grad_heads, kept, head_weights,
                                           label_smoothing, reduction, grad_loss)
        return tuple(result)

    _per_head_op.register_autograd(_per_head_op_backward, setup_context=_per_head_setup_context)

    @torch.library.triton_op("auxfuse::triton_multihead_ce_forward", mutates_args=())
    def _forward_op(
        heads: list[torch.Tensor],
        target: torch.Tensor,
        class_weight: Optional[torch.Tensor],
        head_weights: list[float],
        ignore_index: int,
        label_smoothing: float,
        reduction: int,
        want_hits: bool,
        save_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor]:
        """loss, head_losses, head_correct ((0,) unless want_hits), count, invalid, denom, lse (H, N, S),
        coef (N, S).

        The traced path (torch.compile, make_fx): lse mode, the same launch code as the eager path."""
        out = _forward_impl(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction,
                            want_hits, SAVE_LSE if save_lse else NO_GRAD, traced=True)
        return out[:8]

    @torch.library.triton_op("auxfuse::triton_multihead_ce_backward", mutates_args=())
    def _backward_op(
        grad_loss: torch.Tensor,
        heads: list[torch.Tensor],
        target: torch.Tensor,
        class_weight: Optional[torch.Tensor],
        head_weights: list[float],
        ignore_index: int,
        label_smoothing: float,
        reduction: int,
        lse: torch.Tensor,
        coef: torch.Tensor,
        denom: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Every head's gradient from the saved lse and coef; grad_loss () or (N, S), read on the device."""
        return list(_backward_impl(grad_loss, heads, target, class_weight, head_weights, ignore_index,
                                   label_smoothing, reduction, lse, coef, denom, traced=True, one_buffer=False))

    def _setup_context(ctx, inputs, output):
        heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, _, save_lse = inputs
        ctx.set_materialize_grads(False)  # without it autograd zero-fills seven unused output gradients
        ctx.mark_non_differentiable(*output[1:])
        ctx.options = (head_weights, ignore_index, label_smoothing, reduction)
        ctx.num_heads = len(heads)
        ctx.has_class_weight = class_weight is not None
        ctx.saved_lse = save_lse
        ctx.target_grad = target.requires_grad  # a probability target (_prob_target_grad)
        denom, lse, coef = output[5], output[6], output[7]
        extra = [class_weight] if class_weight is not None else []
        ctx.save_for_backward(lse, coef, denom, target, *extra, *heads)

    def _backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return (None,) * 9
        lse, coef, denom, target, *rest = ctx.saved_tensors
        class_weight = rest[0] if ctx.has_class_weight else None
        heads = rest[1:] if ctx.has_class_weight else rest
        head_weights, _, label_smoothing, reduction = ctx.options
        target_grad = None
        if ctx.target_grad:
            target_grad = _prob_target_grad(heads, head_weights, class_weight, label_smoothing, reduction, grad_loss)
        if ctx.saved_lse:
            grads = list(torch.ops.auxfuse.triton_multihead_ce_backward(
                grad_loss, list(heads), target, class_weight, *ctx.options, lse, coef, denom
            ))
        elif ctx.target_grad:  # the heads need no gradient
            grads = [None] * len(heads)
        else:
            raise RuntimeError("auxfuse: the triton forward ran with save_lse=False (no gradient was expected)")
        return grads, target_grad, None, None, None, None, None, None, None

    _forward_op.register_autograd(_backward, setup_context=_setup_context)
