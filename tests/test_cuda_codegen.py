"""What nvcc makes of the CUDA kernels (csrc/cuda/multihead_ce.cu), read from their sm_90 machine code: no GPU
needed. The CPU emulation (test_cuda_emulated.py) checks what the kernels compute; this checks the properties
their speed rests on, which the emulation cannot see and which a small source change can silently undo:

- contiguous classes (a warp or a block per row) stream the logits with 16-byte loads, 4 in flight per
  thread, and write gradients with 16-byte streaming (evict-first) stores;
- a thread per row (class-strided segmentation logits) keeps at least 24 loads in flight per thread in the
  forward and 16 in the gradient writer;
- no register spill reaches a loop that streams global memory (at most one local-memory access per
  iteration, e.g. a pointer reloaded once per 4 vectors): the spills ptxas reports sit in per-row code.

"Loop" below is an innermost loop of the machine code (tests/sass.py). Marked slow: nvcc compiles the kernels
(about 15 s on 2 cores).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import pytest
import torch

import sass

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"f": "float", "N3c104HalfE": "half", "N3c108BFloat16E": "bfloat16"}
KERNEL = re.compile(  # multihead_ce_{forward,backward,per_head}_kernel<T, G, BLOCK[, GRAD]>, mangled
    r"multihead_ce_(forward|backward|per_head)_kernelI(f|N3c104HalfE|N3c108BFloat16E)Li(\d+)ELi(\d+)E(?:Lb([01])E)?")


@dataclass
class Kernel:
    direction: str  # forward / backward / per_head (the forward of one target per head)
    dtype: str
    group: int  # threads per row: 1, 32 or a block
    grad: bool  # forward that also writes the gradient (grad_mode 1)
    loops: list  # sass.Loop: the innermost loops

    @property
    def name(self) -> str:
        return f"{self.direction} {self.dtype} G={self.group}" + (" grad" if self.grad else "")

    def streaming_loops(self) -> list:
        return [loop for loop in self.loops if loop.streams]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    nvcc, cuobjdump = sass.find_tool("nvcc"), sass.find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip(f"needs nvcc and cuobjdump (found {nvcc}, {cuobjdump})")
    cubin = str(tmp_path_factory.mktemp("sass") / "multihead_ce.cubin")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    subprocess.run([nvcc, "-DAUXFUSE_KERNELS_ONLY", "-I", os.path.join(ROOT, "csrc"), "-I", include, "-std=c++17",
                    "-gencode", "arch=compute_90,code=sm_90", "-cubin", "-o", cubin,
                    os.path.join(ROOT, "csrc", "cuda", "multihead_ce.cu")], check=True, capture_output=True)
    found = []
    for name, loops in sass.functions(cubin, cuobjdump).items():
        match = KERNEL.search(name)
        if match is not None:
            direction, dtype, group, _block, grad = match.groups()
            found.append(Kernel(direction, DTYPES[dtype], int(group), grad == "1", loops))
    return found


def test_every_kernel_variant_is_there(kernels):
    """3 dtypes x 3 mappings: a backward kernel, and a forward kernel and a per-head forward kernel with and without
    the gradient."""
    assert len(kernels) == 45
    assert sorted({(k.direction, k.grad) for k in kernels}) == [
        ("backward", False), ("forward", False), ("forward", True), ("per_head", False), ("per_head", True)]
    assert {(k.dtype, k.group) for k in kernels} == {(d, g) for d in DTYPES.values() for g in (1, 32, 512)}


def test_contiguous_classes_stream_with_16_byte_vectors(kernels):
    for k in kernels:
        if k.group == 1:
            continue
        vector_loads = max(loop.count(r"LDG\.E\.128") for loop in k.loops)
        assert vector_loads >= 4, f"{k.name}: no loop with 4 16-byte loads in flight"
        if k.grad or k.direction == "backward":
            assert any(loop.count(r"STG\.E\.EF\.128") >= 4 for loop in k.loops), (
                f"{k.name}: the gradient is not written with 16-byte streaming stores")


def test_thread_per_row_keeps_loads_in_flight(kernels):
    for k in kernels:
        if k.group != 1:
            continue
        most_loads = max(loop.global_loads for loop in k.streaming_loops())
        assert most_loads >= (16 if k.direction == "backward" else 24), f"{k.name}: {most_loads} loads per loop"
        if k.grad or k.direction == "backward":
            most_stores = max(loop.global_stores for loop in k.streaming_loops())
            assert most_stores >= 16, f"{k.name}: {most_stores} gradient stores per loop"


def test_no_spills_in_streaming_loops(kernels):
    for k in kernels:
        for loop in k.streaming_loops():
            assert loop.local_accesses <= 1, (
                f"{k.name}: {loop.local_accesses} local-memory accesses in a loop with {loop.global_loads} "
                f"global loads and {loop.global_stores} stores")
