"""Builds and loads the CUDA emulation (emulate.cpp: csrc/cuda/multihead_ce.cu compiled as C++ on CPU threads)
for the tests that use it (tests/test_cuda_emulated*.py): torch.ops.auxfuse_emu.*.

The build directory is this checkout's build/cuda_emulation, so that checkouts (git worktrees) building their own
emulation on one machine never share torch's default extension directory for the same extension name."""

from __future__ import annotations

import glob
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def cuda_include_dir():
    """A folder with cuda_fp16.h and vector_types.h (the CUDA toolkit's, or a pip nvidia package's), or None."""
    from torch.utils import cpp_extension

    for base in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_fp16.h")):
            return os.path.join(base, "include")
    try:
        import nvidia

        for path in nvidia.__path__:
            found = glob.glob(os.path.join(path, "*", "include", "cuda_fp16.h"))
            if found:
                return os.path.dirname(found[0])
    except ImportError:
        pass
    return None


def load_emulation():
    """torch.ops.auxfuse_emu, built on first use (about a minute); None without the CUDA headers."""
    from torch.utils import cpp_extension

    include = cuda_include_dir()
    if include is None:
        return None
    build_directory = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="auxfuse_cuda_emulation",
        sources=[os.path.join(HERE, "emulate.cpp")],
        extra_include_paths=[HERE, os.path.join(ROOT, "csrc"), include],
        extra_cflags=["-O1"],
        build_directory=build_directory,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.auxfuse_emu
