"""The backends and the chooser.

Every backend offers the same things: ``name``, ``checks_targets`` (whether it raises for an invalid class
index itself), ``unavailable_reason()`` (static facts about this environment: what is built and importable,
which devices exist), ``not_supported_reasons(problem)`` (those plus facts of the input: device, dtype, head
count) and ``compute(problem)``.

``auto`` decides by static facts only, never by tensor values, so ``torch.compile`` sees one fixed path:
CUDA tensors try ``cuda``, then ``triton``, then ``torch``; CPU tensors ``cpu``, then ``torch``.
"""

from __future__ import annotations

from typing import Optional

from . import reference, triton
from .native import cpu, cuda
from .problem import BackendResult, Problem

BACKENDS = {"cuda": cuda, "triton": triton, "cpu": cpu, "torch": reference}
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def select_backend(name: str, problem: Problem):
    """The backend that will run `problem`: the named one (or a ValueError with its reasons), or auto's pick."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(problem.device.type, ("torch",)):
            if not BACKENDS[candidate].not_supported_reasons(problem):
                return BACKENDS[candidate]
        return reference
    if name not in BACKENDS:
        raise ValueError(f"auxfuse: unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    reasons = BACKENDS[name].not_supported_reasons(problem)
    if reasons:
        raise ValueError(f"auxfuse: backend {name!r} cannot run this input: " + "; ".join(reasons))
    return BACKENDS[name]


def available_backends() -> dict[str, Optional[str]]:
    """Each backend's name, mapped to None when it can run here, else to the reason it cannot.

    Example:
        >>> import auxfuse
        >>> auxfuse.available_backends()["torch"] is None
        True
    """
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


__all__ = ["BACKENDS", "AUTO_ORDER", "BackendResult", "Problem", "available_backends", "select_backend"]
