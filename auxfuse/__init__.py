"""auxfuse: fused multi-head cross-entropy for networks with auxiliary classifiers.

    >>> import auxfuse
    >>> criterion = auxfuse.MultiHeadLoss()   # loss = criterion(model(images), target)
"""

from .backends import available_backends
from .functional import MultiHeadLossOutput, explain_backend, multi_head_cross_entropy
from .loss import MultiHeadLoss
from .outputs import collect_heads, main_logits

__version__ = "0.1.0"
__all__ = [
    "MultiHeadLoss",
    "MultiHeadLossOutput",
    "available_backends",
    "collect_heads",
    "explain_backend",
    "main_logits",
    "multi_head_cross_entropy",
]
