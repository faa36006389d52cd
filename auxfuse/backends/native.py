"""The `cpu` and `cuda` backends: the fused kernels of the compiled extension (torch.ops.auxfuse.*).

The ops are defined in csrc/auxfuse.cpp and their autograd in csrc/autograd.cpp (in C++: at classifier sizes
a Python autograd layer cost as much as the kernel); this module registers their fake kernels (for
torch.compile and meta tensors) and chooses the grad_mode per call:
  - grad_mode 1, gradient in the forward: each row's gradient is written right after its log-sum-exp, while
    the row is in cache, with the head weight and the mean's divisor folded in; backward only scales by
    grad_output, and does nothing at all when it is 1 (loss.backward()): CUDA finds that out on the device.
    Traffic: 2 x element size bytes per logit. Always on CPU (one exponential per logit). On CUDA for large
    heads whose rows fit in cache (C <= 2048 and >= 16 MiB of logits, e.g. segmentation), with reduction
    mean or sum, in eager mode.
  - grad_mode 2, saved log-sum-exp: backward is one kernel that reads the logits again and grad_output on
    the device: 3 x element size bytes per logit, 2 launches in all. CUDA otherwise: small heads (classifiers:
    grad_mode 1 would add a pre-pass and a scale launch for a few microseconds of traffic), LM vocabularies
    (a row of 128K logits must survive in L2 between its two reads; not measured yet, so not the default),
    reduction none (grad_output is per row), and under torch.compile (a traced backward cannot skip the
    multiply by grad_output, which would make grad_mode 1 read and write the gradient once more).
  AUXFUSE_CUDA_GRAD=forward or =lse (read at import) forces one mode on CUDA for mean / sum in eager mode, to
  measure both (benchmarks/gpu_bench.py does).
  With a GradScaler (grad_output != 1) grad_mode 1 costs one more read and write of the gradient.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Optional

import torch

from .problem import BackendResult, Problem, acc_dtype_of, as_rows

try:
    from auxfuse import _C  # noqa: F401  (loading it registers the ops and kernels)

    _LOAD_ERROR: Optional[str] = None
except ImportError as error:  # the package still works, on the torch backend
    _LOAD_ERROR = f"the compiled extension auxfuse._C could not be imported ({error})"

NO_GRAD, GRAD_IN_FORWARD, SAVE_LSE = 0, 1, 2
_HEAD_INDEX = re.compile(r"auxfuse: head (\d+): ")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_HEADS = 16  # the CUDA kernels take the heads' pointers by value in the launch parameters
CUDA_ROW_IN_CACHE_MAX_CLASSES = 2048  # kWarpMaxClasses in the .cu: above, a block per row
CUDA_GRAD_IN_FORWARD_MIN_BYTES = 16 << 20
CUDA_GRAD_CHOICES = ("auto", "forward", "lse")
CUDA_GRAD = os.environ.get("AUXFUSE_CUDA_GRAD", "auto")


def cuda_grad_mode(problem: Problem) -> int:
    """The CUDA grad_mode of a call that needs a gradient (the rule is in this module's docstring)."""
    if CUDA_GRAD not in CUDA_GRAD_CHOICES:
        raise ValueError(f"auxfuse: AUXFUSE_CUDA_GRAD={CUDA_GRAD!r}; use one of {CUDA_GRAD_CHOICES}")
    if problem.reduction == "none" or torch.compiler.is_compiling():
        return SAVE_LSE
    if CUDA_GRAD != "auto":
        return GRAD_IN_FORWARD if CUDA_GRAD == "forward" else SAVE_LSE
    h0 = problem.inputs[0]
    logit_bytes = len(problem.inputs) * h0.numel() * h0.element_size()
    fits = h0.shape[1] <= CUDA_ROW_IN_CACHE_MAX_CLASSES and logit_bytes >= CUDA_GRAD_IN_FORWARD_MIN_BYTES
    return GRAD_IN_FORWARD if fits else SAVE_LSE


_HAS_KERNEL: dict[tuple[str, str], bool] = {}  # kernels register when _C loads, before this module asks


@torch.compiler.assume_constant_result  # a static fact: no graph break under torch.compile(fullgraph=True)
def _has_kernel(dispatch_key: str, op: str = "multihead_ce_forward") -> bool:
    found = _HAS_KERNEL.get((dispatch_key, op))
    if found is None:
        found = _HAS_KERNEL[(dispatch_key, op)] = (
            _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"auxfuse::{op}", dispatch_key)
        )
    return found


def _allocate_head_grads(heads):
    """Mirror of allocate_head_grads and grads_in_head_shape in csrc/ops_common.h: gradients laid out like the
    heads' (N, C, S) views (as_rows: the reshape of as_row_views there), returned in the heads' shape."""
    rows = as_rows(heads[0])
    H, (N, C, S) = len(heads), rows.shape
    if S > 1 and rows.stride(1) == 1:
        grads = rows.new_empty((H, N, S, C)).permute(0, 1, 3, 2)
    else:
        grads = rows.new_empty((H, N, C, S))
    return grads.view(H, *heads[0].shape)


if _LOAD_ERROR is None:
    _PER_HEAD_FORWARD = torch.ops.auxfuse.multihead_ce_per_head_forward.default

    @torch.library.register_fake("auxfuse::multihead_ce_forward")
    def _forward_fake(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, grad_mode):
        h0 = heads[0]
        N, C, S = as_rows(h0).shape
        acc = acc_dtype_of(h0.dtype)
        loss = h0.new_empty((N, S) if reduction == 0 else (), dtype=acc)
        if grad_mode == GRAD_IN_FORWARD:
            saved = _allocate_head_grads(heads)
        elif grad_mode == SAVE_LSE:
            saved = h0.new_empty((len(heads), N, S), dtype=acc)
        else:
            saved = h0.new_empty((0,), dtype=acc)
        return (
            loss,
            h0.new_empty((len(heads),), dtype=acc),
            h0.new_empty((len(heads),), dtype=torch.int64),
            h0.new_empty((), dtype=torch.int64),
            h0.new_empty((), dtype=acc),
            saved,
            h0.new_empty((), dtype=torch.int64),
        )

    @torch.library.register_fake("auxfuse::multihead_ce_per_head_forward")
    def _per_head_forward_fake(heads, targets, target_positions, class_weights, head_weights, ignore_index,
                               label_smoothing, reduction, grad_mode):
        h0, H = heads[0], len(heads)
        acc = acc_dtype_of(h0.dtype)
        N, _, S = as_rows(h0).shape
        return (
            h0.new_empty((N, S) if reduction == 0 else (), dtype=acc),
            h0.new_empty((H,), dtype=acc),
            h0.new_empty((H,), dtype=torch.int64),
            h0.new_empty((H,), dtype=torch.int64),
            h0.new_empty((H,), dtype=acc),
            [_allocate_head_grads([h])[0] for h in heads] if grad_mode == GRAD_IN_FORWARD else [],
            h0.new_empty((), dtype=torch.int64),
        )

    @torch.library.register_fake("auxfuse::multihead_ce_backward")
    def _backward_fake(grad_loss, heads, target, class_weight, head_weights, ignore_index, label_smoothing,
                       reduction, lse, denom):
        return _allocate_head_grads(heads)

    @torch.library.register_fake("auxfuse::multihead_ce_scale_grad_")
    def _scale_grad_fake(grads, grad_loss):
        return None


class NativeBackend:
    """One fused-kernel backend: `cpu` or `cuda` (the dispatch key of torch.ops.auxfuse.*)."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.dispatch_key = device_type.upper()
        # The CPU kernel checks every class index before it writes anything (a ValueError); CUDA never syncs.
        self.checks_targets = device_type == "cpu"
        # compute_per_head reads a resized target through Problem.target_positions (no copy per head).
        self.reads_target_positions = True
        self._per_head_reason: Optional[tuple[Optional[str]]] = None  # per_head_unavailable_reason's, once found

    def unavailable_reason(self) -> Optional[str]:
        if _LOAD_ERROR is not None:
            return _LOAD_ERROR
        if not _has_kernel(self.dispatch_key):
            return f"auxfuse._C was built without {self.dispatch_key} kernels"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(unavailable)
        if problem.device.type != self.device_type:
            reasons.append(f"the heads are on {problem.device.type}, this backend runs on {self.device_type}")
        if self.device_type == "cuda":
            if problem.dtype not in CUDA_DTYPES:
                reasons.append(f"the CUDA kernels take {[str(d) for d in CUDA_DTYPES]}, not {problem.dtype}")
            if len(problem.inputs) > CUDA_MAX_HEADS:
                reasons.append(f"the CUDA kernels take at most {CUDA_MAX_HEADS} heads, got {len(problem.inputs)}")
        if problem.class_weight is not None and problem.class_weight.requires_grad:
            reasons.append("gradients w.r.t. class weights are computed by the torch backend only")
        return reasons

    def compute(self, problem: Problem) -> BackendResult:
        # The heads go as they are: the op views them as (N, C, S) below autograd.
        heads, target = problem.inputs, problem.input_target
        if len(heads) > 1:
            stride = heads[0].stride()
            if any(h.stride() != stride for h in heads[1:]):
                # The kernels walk every head with head 0's strides.
                heads = [h.contiguous() for h in heads]
        if not problem.needs_grad:
            grad_mode = NO_GRAD
        else:
            grad_mode = GRAD_IN_FORWARD if self.device_type == "cpu" else cuda_grad_mode(problem)
        loss, head_losses, head_correct, count, _, _, invalid = torch.ops.auxfuse.multihead_ce_forward(
            heads,
            target,
            problem.class_weight,
            problem.head_weights,
            problem.ignore_index,
            problem.label_smoothing,
            problem.reduction_code,
            grad_mode,
        )
        return BackendResult(loss, head_losses, head_correct, count, invalid)

    def per_head_unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot take heads with a target each in one call (None when it can). Asked on every
        per-head call; found once, since the extension, its kernels and the device do not change."""
        if self._per_head_reason is None:
            reason = self.unavailable_reason()
            if not reason and not _has_kernel(self.dispatch_key, "multihead_ce_per_head_forward"):
                reason = f"auxfuse._C was built without a {self.dispatch_key} kernel for one target per head"
            self._per_head_reason = (reason or None,)
        return self._per_head_reason[0]

    def compute_per_head(self, problems: list[Problem]) -> BackendResult:
        """Every head with its own target and class weight (one one-head Problem each, validated) in one call
        of the fused op; count is per head, (H,)."""
        loss, head_losses, head_correct, count, _, _, invalid = self.run_per_head(
            [p.names[0] for p in problems], [p.inputs[0] for p in problems], [p.input_target for p in problems],
            [p.target_positions for p in problems], [p.class_weight for p in problems], self.per_head_options(problems))
        return BackendResult(loss, head_losses, head_correct, count, invalid)

    @staticmethod
    def per_head_options(problems: list[Problem]) -> tuple:
        """The per-head op's arguments after the tensors: head weights, ignore_index, label smoothing, reduction
        and grad mode. Fixed by the problems' validated options, so the front end keeps them in its plans."""
        first = problems[0]
        grad_mode = GRAD_IN_FORWARD if any(p.needs_grad for p in problems) else NO_GRAD
        return ([p.head_weights[0] for p in problems], first.ignore_index, first.label_smoothing,
                first.reduction_code, grad_mode)

    @staticmethod
    def run_per_head(names: list[str], heads: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                     positions: Sequence[Optional[torch.Tensor]], class_weights: Sequence[Optional[torch.Tensor]],
                     options: tuple) -> tuple:
        """One call of the per-head op on validated tensors as the kernels take them (class indices int64,
        class weights contiguous in the accumulation dtype): the op's outputs (loss, head_losses, head_correct,
        count, denom, grads, invalid). An invalid class index raises a ValueError that names its head."""
        try:
            return _PER_HEAD_FORWARD(heads, targets, positions, class_weights, *options)
        except ValueError as error:  # the kernel names a head by its index (an invalid class index): say its name
            found = _HEAD_INDEX.match(str(error))
            if found is None:
                raise
            raise ValueError(f"auxfuse: head {names[int(found.group(1))]!r}: {str(error)[found.end():]}") from None


cpu = NativeBackend("cpu")
cuda = NativeBackend("cuda")
