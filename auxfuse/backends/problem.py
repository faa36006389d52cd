"""The validated, normalized input every backend receives, and what every backend returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from ..targets import read_at_positions

REDUCTIONS = ("none", "mean", "sum")


def check_reduction_and_smoothing(reduction: str, label_smoothing: float) -> None:
    """ValueError for a reduction or a label smoothing that F.cross_entropy would not take."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"auxfuse: reduction={reduction!r}; use one of {REDUCTIONS}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"auxfuse: label_smoothing={label_smoothing} must be in [0, 1]")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, d1..dk) -> (N, C, S) without a copy wherever the strides allow (channels_last included)."""
    if x.dim() == 3:
        return x
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of logits of `dtype`: fp32 for fp16 / bf16 / fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Problem:
    """The heads and the options of cross_entropy, validated.

    inputs: the heads as the model gave them, batched: (N, C, d1, ..., dk) (k >= 0), one shape, dtype and device.
    input_target: int64 class indices (N, d1, ..., dk), or probabilities (N, C, d1, ..., dk) of the heads' dtype.
    heads / target: the same as (N, C, S) and (N, S) / (N, C, S) views, made on first use: the fused ops take
    the inputs as they are, since each view of a head that requires grad is an autograd node.
    class_weight, when given, is a contiguous (C,) tensor of the accumulation dtype.
    target_positions (target_resize, one head per Problem): None, or an int64 (S,) tensor on the heads' device
    that maps the head's flattened spatial positions onto the target's: input_target is then the
    full-resolution class-index target (N, e1, ..., ek), and the head's target at (n, s) is
    input_target.reshape(N, -1)[n, target_positions[s]]. Backends that read it in their kernels say so with
    `reads_target_positions`; the others get `gathered()`.
    """

    inputs: list[torch.Tensor]
    names: list[str]
    head_weights: list[float]
    input_target: torch.Tensor
    prob_target: bool
    class_weight: Optional[torch.Tensor]
    ignore_index: int
    label_smoothing: float
    reduction: str
    needs_grad: bool
    want_details: bool
    target_positions: Optional[torch.Tensor] = None

    # Made on first use (not functools.cached_property: torch.compile does not trace its descriptor).
    _heads: Optional[list[torch.Tensor]] = field(default=None, repr=False)
    _target: Optional[torch.Tensor] = field(default=None, repr=False)

    def with_tensors(
        self, inputs: list[torch.Tensor], input_target: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
        target_positions: Optional[torch.Tensor] = None,
    ) -> "Problem":
        """The same problem for other tensors of the same shapes, dtypes and devices (the front end's plans).
        Spelled out rather than dataclasses.replace, which costs 4x as much: this runs on every call."""
        return Problem(
            inputs=inputs,
            names=self.names,
            head_weights=self.head_weights,
            input_target=input_target,
            prob_target=self.prob_target,
            class_weight=class_weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            needs_grad=self.needs_grad,
            want_details=self.want_details,
            target_positions=target_positions,
        )

    def gathered(self) -> "Problem":
        """This problem with the head's own target (N, d1, ..., dk) in place of target_positions (a copy)."""
        if self.target_positions is None:
            return self
        target = read_at_positions(self.input_target, self.target_positions, self.inputs[0].shape[2:])
        return self.with_tensors(self.inputs, target, self.class_weight)

    @property
    def heads(self) -> list[torch.Tensor]:
        if self._heads is None:
            self._heads = [as_rows(x) for x in self.inputs]
        return self._heads

    @property
    def target(self) -> torch.Tensor:
        """(N, S) class indices or (N, C, S) probabilities (with target_positions: the full-resolution (N, S')
        target the positions index)."""
        if self._target is None:
            t = self.input_target
            if self.prob_target:
                self._target = as_rows(t)
            else:
                self._target = t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
        return self._target

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[0].dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        """fp32 accumulation for fp16 / bf16 / fp32 logits; fp64 for fp64."""
        return acc_dtype_of(self.dtype)

    @property
    def num_classes(self) -> int:
        return self.inputs[0].shape[1]

    @property
    def reduction_code(self) -> int:
        return REDUCTIONS.index(self.reduction)


class BackendResult(NamedTuple):
    loss: torch.Tensor  # () for mean / sum, (N, S) for none; differentiable w.r.t. the heads
    head_losses: torch.Tensor  # (H,) unweighted, reduced like the loss (mean for none)
    head_correct: Optional[torch.Tensor]  # (H,) int64 top-1 hits among counted rows, or None if not computed
    count: torch.Tensor  # () int64 counted rows
    invalid: torch.Tensor  # () int64 counted rows whose class index is outside [0, C) (their loss is NaN)
