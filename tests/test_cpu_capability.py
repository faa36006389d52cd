"""The CPU kernel's copies per instruction-set level (csrc/cpu/dispatch.cpp): the copy that runs is the one for
ATen's CPU capability; each copy, forced with ATEN_CPU_CAPABILITY, computes the loss and gradients of the naive
sum in float64; no code outside the AVX2 and AVX-512 copies uses their instructions; and the default build runs
on a CPU without AVX-512 (valgrind's).

Run as a script (`python tests/test_cpu_capability.py`), this file is the child process of those checks: it
prints the copy that runs and each case's largest error against the float64 sum, as JSON."""

import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import auxfuse

LEVELS = ["DEFAULT", "AVX2", "AVX512"]  # x86-64's levels, lowest first, as ATen names them


# --- the child: one process, one copy ---------------------------------------------------------------------------

CASES = {  # name: (logits shape, dtype, options); odd sizes, so that every vector loop has a tail
    "classifier_fp32": ((37, 1003), torch.float32, {}),
    "classifier_smoothing_weights_ignore_fp32": ((37, 1003), torch.float32, dict(label_smoothing=0.1, weight=True,
                                                                                  ignore_index=255)),
    "classifier_probabilities_fp32": ((37, 1003), torch.float32, dict(probabilities=True)),
    "classifier_none_fp32": ((37, 1003), torch.float32, dict(reduction="none")),
    "segmentation_fp32": ((2, 21, 13, 17), torch.float32, dict(label_smoothing=0.1)),
    "classifier_bf16": ((37, 1003), torch.bfloat16, {}),
    "segmentation_fp16": ((2, 21, 13, 17), torch.float16, {}),
}
# Largest |ours - float64 sum| allowed, relative to the float64 value's magnitude (design.md: fp32 rtol 1e-5;
# fp16 / bf16 logits at element precision).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-3), torch.float16: (2e-2, 2e-3)}


def _case_errors(shape, dtype, options):
    """Loss and gradients of the cpu backend against the naive sum in float64 from the same values: the largest
    error beyond the tolerance (<= 0 when within), for the loss and for the gradients."""
    g = torch.Generator().manual_seed(0)
    options = dict(options)
    heads = [(torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_(True) for _ in range(2)]
    classes = shape[1]
    if options.pop("probabilities", False):
        target = torch.softmax(torch.randn(shape, generator=g), dim=1).to(dtype)
        ref_target = target.double()
    else:
        target = ref_target = torch.randint(0, classes, shape[:1] + shape[2:], generator=g)
        if "ignore_index" in options:
            target[::3] = options["ignore_index"]  # every third sample counts for nothing
    if options.pop("weight", False):
        options["weight"] = torch.rand(classes, generator=g) + 0.5
    weights = [1.0, 0.4]
    loss = auxfuse.multi_head_cross_entropy(heads, target, weights, backend="cpu", **options)
    ref_heads = [h.detach().double().requires_grad_(True) for h in heads]
    ref_options = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    ref = sum(w * F.cross_entropy(h, ref_target, **ref_options) for w, h in zip(weights, ref_heads))
    grad_output = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    loss.backward(grad_output.to(loss.dtype))
    ref.backward(grad_output)
    rtol, atol = TOLERANCE[dtype]

    def excess(ours, theirs):
        return ((ours.double() - theirs).abs() - (atol + rtol * theirs.abs())).max().item()

    return excess(loss.detach(), ref.detach()), max(excess(h.grad, r.grad) for h, r in zip(heads, ref_heads))


def _child():
    report = {"capability": torch.ops.auxfuse.cpu_capability(), "cases": {}}
    for name, (shape, dtype, options) in CASES.items():
        report["cases"][name] = _case_errors(shape, dtype, options)
    print(json.dumps(report))


if __name__ == "__main__":
    _child()
    sys.exit(0)


# --- the tests ----------------------------------------------------------------------------------------------------

CPU_REASON = auxfuse.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"no CPU kernel: {CPU_REASON}")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _compiled_levels():
    """The levels with a copy of the kernel in this build: each copy exports its table, auxfuse::<LEVEL>::kKernels
    (csrc/cpu/kernels.h). All three in the portable x86-64 build; one in a build for one machine."""
    library = ctypes.CDLL(auxfuse._C.__file__)
    return [level for level in LEVELS if hasattr(library, f"_ZN7auxfuse{len(level)}{level}8kKernelsE")]


def _machine_level():
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in LEVELS else "DEFAULT"


def _run_child(env=None, prefix=()):
    """This file as a script, importing the auxfuse that this process imported; returns its JSON report."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(auxfuse.__file__)))
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([*prefix, sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runs_the_copy_for_atens_capability():
    levels = _compiled_levels()
    if len(levels) == 1:
        assert torch.ops.auxfuse.cpu_capability() == levels[0]  # a build for one machine runs its only copy
    else:
        assert X86_64 and levels == LEVELS
        assert torch.ops.auxfuse.cpu_capability() == _machine_level()


@pytest.mark.parametrize("level", LEVELS)
def test_each_copy_computes_the_float64_sum(level):
    if level not in _compiled_levels():
        pytest.skip(f"no {level} copy in this build")
    if LEVELS.index(level) > LEVELS.index(_machine_level()):
        pytest.skip(f"this CPU runs up to {_machine_level()}")
    report = _run_child({"ATEN_CPU_CAPABILITY": level.lower()})
    assert report["capability"] == level
    beyond = {name: errors for name, errors in report["cases"].items() if max(errors) > 0}
    assert not beyond, f"{level}: (loss, gradient) error beyond the tolerance: {beyond}"


def _functions_using_vector_isa(library_path):
    """{function name: {"VEX", "EVEX"}} for every function of the library with an instruction in VEX (AVX, AVX2,
    FMA, ...) or EVEX (AVX-512) encoding, read from the prefix byte of each instruction (c4 / c5, 62 in 64-bit
    code, after any legacy prefixes)."""
    listing = subprocess.run(["objdump", "-d", "-C", library_path], capture_output=True, text=True, check=True).stdout
    legacy = {"66", "67", "f0", "f2", "f3", "26", "2e", "36", "3e", "64", "65"}
    found, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 3:
            continue
        code = fields[1].split()
        while code and code[0] in legacy:
            code.pop(0)
        if code and code[0] in ("c4", "c5", "62"):
            found.setdefault(function, set()).add("EVEX" if code[0] == "62" else "VEX")
    return found


@pytest.mark.skipif(not X86_64, reason="x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_only_the_per_level_copies_use_avx():
    """The SIGILL this build prevents: an inline function that both baseline code and a per-level copy use, linked
    from the per-level object. Every function with AVX or AVX-512 instructions must be part of the AVX2 or AVX512
    copy (its namespace in the name, mangled or not), or a clone the compiler made of a function for one object
    ("[clone .isra.0]": local to that object, called only from it); the AVX2 copy never uses AVX-512."""
    if _compiled_levels() != LEVELS:
        pytest.skip("a build for one machine: every function may use its instructions")
    misplaced, avx512_in_avx2 = [], []
    for function, encodings in _functions_using_vector_isa(auxfuse._C.__file__).items():
        if "AVX512" in function:
            continue
        if "AVX2" in function:
            if "EVEX" in encodings:
                avx512_in_avx2.append(function)
        elif "[clone " not in function:
            misplaced.append(function)
    assert not misplaced, f"{len(misplaced)} functions outside the AVX2/AVX512 copies use AVX: {misplaced[:10]}"
    assert not avx512_in_avx2, f"AVX-512 instructions in the AVX2 copy: {avx512_in_avx2[:10]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (its virtual CPU has no AVX-512)")
def test_runs_on_a_cpu_without_avx512():
    """The whole child under valgrind, whose virtual x86-64 has AVX2 but no AVX-512: where a build made on an
    AVX-512 machine used AVX-512 outside the dispatched copy, this died with SIGILL. --tool=none: valgrind's CPU
    without its memory checks (about 50 s here, most of it importing torch)."""
    if "DEFAULT" not in _compiled_levels():
        pytest.skip("a build for one machine (AUXFUSE_CPU_ARCH) runs where it was built")
    report = _run_child(prefix=("valgrind", "--tool=none", "-q"))
    if report["capability"] == "AVX512":
        pytest.skip("this valgrind's CPU has AVX-512: it cannot show that the build runs without")
    beyond = {name: errors for name, errors in report["cases"].items() if max(errors) > 0}
    assert not beyond, f"under valgrind ({report['capability']}): error beyond the tolerance: {beyond}"
