"""MultiHeadLoss: the nn.Module criterion."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .functional import ClassWeights, MultiHeadLossOutput, Targets, multi_head_cross_entropy
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

    Deep supervision, one full-resolution mask for heads at every scale (nnU-Net's weights):
        >>> scales = [torch.randn(2, 3, 32 // 2**i, 32 // 2**i, requires_grad=True) for i in range(4)]
        >>> criterion = auxfuse.MultiHeadLoss(auxfuse.nnunet_deep_supervision_weights(4), target_resize="nearest")
        >>> criterion(scales, torch.randint(0, 3, (2, 32, 32))).backward()
    """

    def __init__(
        self,
        weights: Weights = None,
        *,
        aux_weight: float = DEFAULT_AUX_WEIGHT,
        main: Optional[Union[str, int]] = None,
        weight: ClassWeights = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        backend: str = "auto",
        check_targets: bool = False,
        target_resize: Optional[str] = None,
    ):
        super().__init__()
        self.weights = dict(weights) if isinstance(weights, dict) else weights
        self.aux_weight = aux_weight
        self.main = main
        # Buffers, like nn.CrossEntropyLoss's weight, so that criterion.to(device) moves them; per-head class
        # weights are one buffer each (weight_0, weight_1, ... or weight_<head name>), None where a head has none.
        self._class_weight_keys = None
        if weight is None or isinstance(weight, torch.Tensor):
            self.register_buffer("weight", weight)
        else:
            per_head = dict(weight) if isinstance(weight, dict) else dict(enumerate(weight))
            self._class_weight_keys = (isinstance(weight, dict), list(per_head))
            for key, value in per_head.items():
                self.register_buffer(f"weight_{key}", value)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.backend = backend
        self.check_targets = check_targets
        self.target_resize = target_resize

    @property
    def class_weight(self) -> ClassWeights:
        """The class weights as given: one tensor (or None) for every head, or a list / dict of them per head."""
        if self._class_weight_keys is None:
            return self.weight
        by_name, keys = self._class_weight_keys
        values = [getattr(self, f"weight_{key}") for key in keys]
        return dict(zip(keys, values)) if by_name else values

    def forward(
        self, outputs: Any, target: Targets, return_details: bool = False
    ) -> Union[torch.Tensor, MultiHeadLossOutput]:
        return multi_head_cross_entropy(
            outputs,
            target,
            self.weights,
            aux_weight=self.aux_weight,
            main=self.main,
            weight=self.class_weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            backend=self.backend,
            check_targets=self.check_targets,
            target_resize=self.target_resize,
            return_details=return_details,
        )

    def extra_repr(self) -> str:
        return f"weights={self.weights}, reduction={self.reduction!r}, backend={self.backend!r}"
