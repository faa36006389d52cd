"""The validated, normalized input every backend receives, and what every backend returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

REDUCTIONS = ("none", "mean", "sum")


@dataclass
class Problem:
    """Heads as (N, C, S) views sharing one shape, dtype and device, and the options of cross_entropy.

    target is int64 (N, S) class indices, or (N, C, S) probabilities of the heads' dtype.
    class_weight, when given, is a contiguous (C,) tensor of the accumulation dtype.
    """

    heads: list[torch.Tensor]
    names: list[str]
    head_weights: list[float]
    target: torch.Tensor
    prob_target: bool
    class_weight: Optional[torch.Tensor]
    ignore_index: int
    label_smoothing: float
    reduction: str
    needs_grad: bool
    want_details: bool

    @property
    def device(self) -> torch.device:
        return self.heads[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.heads[0].dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        """fp32 accumulation for fp16 / bf16 / fp32 logits; fp64 for fp64."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def num_classes(self) -> int:
        return self.heads[0].shape[1]

    @property
    def reduction_code(self) -> int:
        return REDUCTIONS.index(self.reduction)


class BackendResult(NamedTuple):
    loss: torch.Tensor  # () for mean / sum, (N, S) for none; differentiable w.r.t. the heads
    head_losses: torch.Tensor  # (H,) unweighted, reduced like the loss (mean for none)
    head_correct: Optional[torch.Tensor]  # (H,) int64 top-1 hits among counted rows, or None if not computed
    count: torch.Tensor  # () int64 counted rows
