"""MultiHeadLoss: the nn.Module criterion."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .functional import MultiHeadLossOutput, multi_head_cross_entropy
from .outputs import DEFAULT_AUX_WEIGHT, Weights


class MultiHeadLoss(nn.Module):
    """Drop-in criterion for models with auxiliary heads: weighted cross-entropy of all heads, fused.

    Takes the model's output as it comes (GoogLeNetOutputs / InceptionOutputs in training, a Tensor in eval,
    a segmentation dict, a tuple) and returns ``sum_h w_h * F.cross_entropy(head_h, target, ...)``.
    See ``auxfuse.multi_head_cross_entropy`` for every argument.

    Example:
        >>> import torch, torchvision, auxfuse
        >>> model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).train()
        >>> criterion = auxfuse.MultiHeadLoss()           # Inception v3 preset: logits 1, aux_logits 0.4
        >>> outputs = model(torch.randn(2, 3, 299, 299))
        >>> loss = criterion(outputs, torch.tensor([3, 7]))
        >>> loss.backward()
    """

    def __init__(
        self,
        weights: Weights = None,
        *,
        aux_weight: float = DEFAULT_AUX_WEIGHT,
        main: Optional[Union[str, int]] = None,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        backend: str = "auto",
        check_targets: bool = False,
    ):
        super().__init__()
        self.weights = dict(weights) if isinstance(weights, dict) else weights
        self.aux_weight = aux_weight
        self.main = main
        # A buffer, like nn.CrossEntropyLoss's, so that criterion.to(device) moves it.
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.backend = backend
        self.check_targets = check_targets

    def forward(
        self, outputs: Any, target: torch.Tensor, return_details: bool = False
    ) -> Union[torch.Tensor, MultiHeadLossOutput]:
        return multi_head_cross_entropy(
            outputs,
            target,
            self.weights,
            aux_weight=self.aux_weight,
            main=self.main,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            backend=self.backend,
            check_targets=self.check_targets,
            return_details=return_details,
        )

    def extra_repr(self) -> str:
        return f"weights={self.weights}, reduction={self.reduction!r}, backend={self.backend!r}"
