"""Builds auxfuse._C: the op schema and the C++ CPU kernel always, the CUDA kernels when a toolkit is found.

Environment switches:
  AUXFUSE_FORCE_CUDA=1   build the CUDA kernels or fail (no silent CPU-only build)
  AUXFUSE_SKIP_CUDA=1    never build the CUDA kernels
  AUXFUSE_SKIP_EXTENSION=1  build no extension at all (the package then runs on its pure PyTorch backend)
  AUXFUSE_CPU_ARCH       build for one machine: every C++ source with -march=<value> (e.g. native), one copy of the
                         CPU kernel. Default: portable: the compiler's baseline, plus on x86-64 the CPU kernel
                         compiled again for AVX2 and for AVX-512, the copy chosen at run time (csrc/cpu/dispatch.cpp)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: the visible GPUs, else "8.0;9.0")
  CUDA_HOME              the toolkit; else nvcc's folder when it has lib64, else /usr/local/cuda
"""

import glob
import json
import os
import platform
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


def _config_file(config):
    """build/auxfuse_build_config.json: this build's configuration, rewritten only when it changes. In the
    extension's depends, so that a build with other switches (AUXFUSE_CPU_ARCH, AUXFUSE_SKIP_CUDA, ...) or another
    torch rebuilds, and an unchanged one finds the library up to date."""
    path = os.path.join(ROOT, "build", "auxfuse_build_config.json")
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    try:
        with open(path) as f:
            unchanged = f.read() == text
    except FileNotFoundError:
        unchanged = False
    if not unchanged:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return path


def _incremental_build_extension():
    from torch.utils import cpp_extension

    class IncrementalBuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension with ninja, without the rebuild it forces on every run: build_ext skips the
        extension when the library is newer than its sources and depends (headers, build configuration), so an
        unchanged tree costs neither a ninja run nor a relink (nor rewrites a library a running process has
        mapped); after a change, ninja recompiles the objects whose sources or included headers changed."""

        def finalize_options(self):
            requested = self.force  # --force on the command line, else None
            super().finalize_options()
            self.force = requested

        def build_extension(self, ext):
            super().build_extension(ext)
            # Up to date with its depends now, also after a configuration change that recompiled nothing (and so
            # did not relink): the next run skips it.
            os.utime(self.get_ext_fullpath(ext.name))

    return IncrementalBuildExtension.with_options(use_ninja=True)


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

    # -fopenmp: at::parallel_for is header-inline; without it the CPU kernel runs on one thread.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    # Baseline objects first: an inline function (std::, c10::) that the compiler emits in a baseline object and in
    # a per-level one is linked from the first object that has it, so baseline code never calls an AVX-512 build
    # of it (PyTorch links its CPU kernels in the same order: "Linking AVX and non-AVX files").
    sources = [os.path.join("csrc", name) for name in ("auxfuse.cpp", "autograd.cpp")]
    sources += [os.path.join("csrc", "cpu", name)
                for name in ("dispatch.cpp", "gradient_cache.cpp", "multihead_ce.cpp")]
    cpu_arch = os.environ.get("AUXFUSE_CPU_ARCH")
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        sources += [os.path.join("csrc", "cpu", f"multihead_ce_{level}.cpp") for level in ("avx2", "avx512")]
        define_macros.append(("AUXFUSE_CPU_DISPATCH", None))
    extra = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    config = {"sources": sources, "flags": extra, "macros": define_macros, "torch": torch.__version__,
              "cxx": os.environ.get("CXX"), "cuda_home": cuda_home if with_cuda else None,
              "cuda_arch": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    ext = extension_class(
        "auxfuse._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # build_ext rebuilds only when one of these (or a source) is newer than the library; ninja then recompiles
        # the objects whose sources or included headers changed.
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)) + [_config_file(config)],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,
    )
    cmdclass = {"build_ext": _incremental_build_extension()}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
