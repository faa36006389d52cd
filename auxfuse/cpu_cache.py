"""The `cpu` backend's cache of large gradient buffers (csrc/cpu/gradient_cache.cpp says how it works).

The fused CPU kernels write every head's gradient into a new buffer on every call. A buffer of 32 MiB or more
comes from this cache: when the last tensor using it is freed (``param.grad = None``, ``zero_grad()``), its
memory waits here for the next call that needs the same size instead of going back to the operating system, so
a training loop's large gradients cost no page faults after the first step (as CUDA's caching allocator does
for GPU memory). Idle memory is bounded: a call that needs a size no idle buffer has first releases them all,
and the idle bytes never pass the limit (default: a quarter of physical memory, or ``AUXFUSE_CPU_CACHE_BYTES``
read when the extension loads; 0 turns the cache off, anything but a number of bytes warns).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends.native import _LOAD_ERROR


class CpuCacheInfo(NamedTuple):
    """What ``auxfuse.cpu_cache_info()`` returns.

    cached_bytes: memory of the idle buffers waiting to be reused.
    cached_blocks: how many there are.
    limit_bytes: the most the idle buffers may hold (0: the cache is off).
    hits, misses: requests for 32 MiB or more served from the cache, and from new memory, since the process
        started.
    """

    cached_bytes: int
    cached_blocks: int
    limit_bytes: int
    hits: int
    misses: int


def cpu_cache_info() -> CpuCacheInfo:
    """The state of the `cpu` backend's gradient cache (all zeros without the compiled extension).

    Example:
        >>> import auxfuse
        >>> info = auxfuse.cpu_cache_info()
        >>> info.cached_bytes <= info.limit_bytes or info.limit_bytes == 0
        True
    """
    if _LOAD_ERROR is not None:
        return CpuCacheInfo(0, 0, 0, 0, 0)
    return CpuCacheInfo(*torch.ops.auxfuse.cpu_cache_info())


def empty_cpu_cache() -> None:
    """Give the idle gradient buffers back to the operating system (like ``torch.cuda.empty_cache()``): after
    training, or before a phase that needs the memory. Buffers still in use are not touched.

    Example:
        >>> import auxfuse
        >>> auxfuse.empty_cpu_cache()
        >>> auxfuse.cpu_cache_info().cached_bytes
        0
    """
    if _LOAD_ERROR is None:
        torch.ops.auxfuse.cpu_cache_empty()


def set_cpu_cache_limit(nbytes: int) -> None:
    """Set the most memory idle gradient buffers may hold (bytes; 0 turns the cache off and releases them).
    Idle buffers beyond the new limit are released at once, the longest-idle first.

    Example:
        >>> import auxfuse
        >>> auxfuse.set_cpu_cache_limit(2 << 30)  # at most 2 GiB idle
        >>> auxfuse.set_cpu_cache_limit(0)        # no cache: every gradient in new memory
    """
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"auxfuse: the CPU cache limit is a number of bytes >= 0, not {nbytes!r}")
    if _LOAD_ERROR is None:
        torch.ops.auxfuse.cpu_cache_set_limit(nbytes)
