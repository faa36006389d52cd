"""Builds auxfuse._C: the op schema and the C++ CPU kernel always, the CUDA kernels when a toolkit is found.

Environment switches:
  AUXFUSE_FORCE_CUDA=1   build the CUDA kernels or fail (no silent CPU-only build)
  AUXFUSE_SKIP_CUDA=1    never build the CUDA kernels
  AUXFUSE_SKIP_EXTENSION=1  build no extension at all (the package then runs on its pure PyTorch backend)
  AUXFUSE_CPU_ARCH       the -march for the CPU kernel (default: native; set e.g. x86-64-v3 for portable builds)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: the visible GPUs, else "8.0;9.0")
  CUDA_HOME              the toolkit; else nvcc's folder when it has lib64, else /usr/local/cuda
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(home, "lib64")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _extensions():
    if _flag("AUXFUSE_SKIP_EXTENSION"):
        return [], {}
    cuda_home = None if _flag("AUXFUSE_SKIP_CUDA") else _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    if _flag("AUXFUSE_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            "AUXFUSE_FORCE_CUDA=1 but no CUDA build is possible: "
            f"CUDA toolkit={cuda_home!r}, torch.version.cuda={torch.version.cuda!r}"
        )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    march = os.environ.get("AUXFUSE_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for is header-inline; without it the CPU kernel runs on one thread.
    cxx_flags = ["-O3", f"-march={march}", "-fno-math-errno", "-fopenmp"]
    sources = [os.path.join("csrc", name) for name in ("auxfuse.cpp", "autograd.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    ext = extension_class(
        "auxfuse._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
