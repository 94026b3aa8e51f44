"""Build script: the package plus the optional compiled extension ``mtlsam_ext._C``.

- The C++ CPU kernels (csrc/registration.cpp, csrc/cpu/) are built whenever torch and a C++
  compiler are present; without either, or with ``MTLSAM_SKIP_EXT=1``, the pure-torch package
  installs and the ``torch`` backend runs everywhere.
- The CUDA kernels (csrc/cuda/) are added when torch is a CUDA build and a CUDA toolkit is
  found, or when ``MTLSAM_FORCE_CUDA=1`` (then a missing nvcc or a CPU-only torch is an error).
- ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured by torch's build helper.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch that is
already installed instead of pulling another one into an isolated environment.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg: str) -> None:
    print(f"mtlsam_ext setup: {msg}", file=sys.stderr)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension_setup() -> dict:
    if os.environ.get("MTLSAM_SKIP_EXT", "0") == "1":
        _warn("MTLSAM_SKIP_EXT=1: installing the pure-torch package only")
        return {}
    force_cuda = os.environ.get("MTLSAM_FORCE_CUDA", "0") == "1"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if force_cuda:
            raise RuntimeError("MTLSAM_FORCE_CUDA=1 needs torch installed before the build "
                               "(use pip install --no-build-isolation)") from None
        _warn("torch is not importable at build time: skipping the compiled extension")
        return {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        if force_cuda:
            raise RuntimeError(f"MTLSAM_FORCE_CUDA=1 but no C++ compiler ({cxx!r}) was found")
        _warn(f"no C++ compiler ({cxx!r}) found: skipping the compiled extension")
        return {}

    sources = _sources("csrc/registration.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    have_nvcc = bool(nvcc and os.path.exists(nvcc))
    want_cuda = force_cuda or (torch.version.cuda is not None and have_nvcc)
    if want_cuda:
        if not have_nvcc:
            raise RuntimeError("CUDA kernels requested (MTLSAM_FORCE_CUDA=1) but nvcc was not "
                               "found: set CUDA_HOME to a CUDA toolkit")
        if torch.version.cuda is None:
            raise RuntimeError("CUDA kernels requested but the installed torch is a CPU-only "
                               "build; install a CUDA build of torch first")
        cu = _sources("csrc/cuda/*.cu")
        ext = cpp_extension.CUDAExtension(
            "mtlsam_ext._C", sources + cu,
            define_macros=[("MTLSAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                         "-Xcompiler", "-fopenmp"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("mtlsam_ext._C", sources,
                                         extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(
                use_ninja=shutil.which("ninja") is not None)}}


setup(**extension_setup())
