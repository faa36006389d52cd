"""Reading GPU machine code (SASS) without a GPU, for the codegen tests of the CUDA kernels
(test_cuda_codegen.py) and of the Triton kernels (triton/test_triton_interpret.py): cuobjdump's listing of a
cubin, split into functions, and each function's innermost loops.

A loop is a backward branch and the instructions it jumps over; an innermost loop holds no other loop. A
streaming loop is one that loads or stores global memory: where a kernel spends its time.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = r"^(?:@!?U?P\w+ )?"  # an optional predicate, e.g. "@!P0 "


def find_tool(name: str) -> Optional[str]:
    """nvcc / cuobjdump: from CUDA_HOME, torch's CUDA_HOME, /usr/local/cuda, the PATH, or (cuobjdump) the copy
    Triton ships."""
    from torch.utils import cpp_extension

    for base in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if base and os.access(os.path.join(base, "bin", name), os.X_OK):
            return os.path.join(base, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton
    except ImportError:
        return None
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    return found[0] if found else None


@dataclass
class Loop:
    instructions: list  # the opcodes with their operands, in address order

    def count(self, pattern: str) -> int:
        """Instructions whose opcode (after any predicate) matches `pattern`, e.g. r"LDG\\.E\\.128"."""
        return sum(bool(re.search(_GUARD + pattern, op)) for op in self.instructions)

    @property
    def global_loads(self) -> int:
        return self.count(r"LDG\b")

    @property
    def global_stores(self) -> int:
        return self.count(r"STG\b")

    @property
    def local_accesses(self) -> int:
        """Loads and stores of thread-local memory: register spills (or a local array)."""
        return self.count(r"(LDL|STL)\b")

    @property
    def streams(self) -> bool:
        return bool(self.global_loads or self.global_stores)


def innermost_loops(instructions: list) -> list:
    """instructions: (address, text) pairs of one function."""
    spans = []
    for address, op in instructions:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if branch and int(branch.group(1), 16) < address:
            spans.append((int(branch.group(1), 16), address))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [Loop([op for address, op in instructions if lo <= address <= hi]) for lo, hi in innermost]


def functions(cubin: str, cuobjdump: str) -> dict:
    """{mangled name: its innermost loops} of every function in the cubin file."""
    listing = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    found = {}
    for function in listing.split("Function : ")[1:]:
        name = function.split("\n", 1)[0].strip()
        instructions = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(function)]
        found[name] = innermost_loops(instructions)
    return found
