"""auxfuse: fused multi-head cross-entropy for networks with auxiliary classifiers.

    >>> import auxfuse
    >>> criterion = auxfuse.MultiHeadLoss()   # loss = criterion(model(images), target)
"""

from .backends import available_backends
from .cpu_cache import CpuCacheInfo, cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from .functional import MultiHeadLossOutput, explain_backend, multi_head_cross_entropy
from .linear import MultiHeadLinearLoss, multi_head_linear_cross_entropy
from .loss import MultiHeadLoss
from .outputs import collect_heads, main_logits
from .targets import (
    deepseek_mtp_weights,
    medusa_head_weights,
    nnunet_deep_supervision_weights,
    resize_target,
    shifted_targets,
    target_positions,
)

__version__ = "0.1.0"
__all__ = [
    "CpuCacheInfo",
    "MultiHeadLinearLoss",
    "MultiHeadLoss",
    "MultiHeadLossOutput",
    "available_backends",
    "collect_heads",
    "cpu_cache_info",
    "deepseek_mtp_weights",
    "empty_cpu_cache",
    "explain_backend",
    "main_logits",
    "medusa_head_weights",
    "multi_head_cross_entropy",
    "multi_head_linear_cross_entropy",
    "nnunet_deep_supervision_weights",
    "resize_target",
    "set_cpu_cache_limit",
    "shifted_targets",
    "target_positions",
]
