"""The `triton` backend: Triton kernels behind torch.library.triton_op (not written yet)."""

from __future__ import annotations

from typing import Optional

from .problem import BackendResult, Problem

name = "triton"


def unavailable_reason() -> Optional[str]:
    return "the Triton kernels are not written yet"


def not_supported_reasons(problem: Problem) -> list[str]:
    return [unavailable_reason()]


def compute(problem: Problem) -> BackendResult:
    raise NotImplementedError(unavailable_reason())
