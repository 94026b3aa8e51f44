"""Build script: the package plus the optional compiled extension ``mtlsam_ext._C``.

- The C++ CPU kernels (csrc/registration.cpp, csrc/cpu/) are built whenever torch and a C++
  compiler are present; without either, or with ``MTLSAM_SKIP_EXT=1``, the pure-torch package
  installs and the ``torch`` backend runs everywhere.
- The CUDA kernels (csrc/cuda/) are added when torch is a CUDA build and a CUDA toolkit is
  found, or when ``MTLSAM_FORCE_CUDA=1`` (then a missing nvcc or a CPU-only torch is an error).
  nvcc's CUDA major must equal torch's (``torch.version.cuda``): a mismatch is a build error.
- The module only uses ``TORCH_LIBRARY`` and a bare ``PyInit``, so it is built against
  Python's limited API (abi3, CPython >= 3.10): one wheel per (CUDA, torch) pair serves every
  CPython from 3.10 on.
- A build record (torch and CUDA versions, archs, compiler, limited API) is compiled into the
  module (``mtlsam_ext._C.build_info()``) and written next to it as
  ``mtlsam_ext/_build_info.json``, which the loader reads *before* importing the module so that
  a wheel built against another torch is refused with a warning instead of an undefined symbol.

Environment knobs:
- ``TORCH_CUDA_ARCH_LIST``: default ``8.0;8.6;8.9;9.0+PTX``, plus ``10.0;12.0`` (PTX on 12.0)
  from CUDA 12.8 on.
- ``MAX_JOBS``: parallel compile jobs; default the CPU count. Default and user value alike are
  lowered to what available memory allows (``NVCC_JOB_GIB`` per nvcc job, ``CXX_JOB_GIB`` per
  C++-only job).
- ``MTLSAM_LOCAL_VERSION``: PEP 440 local version label appended to the version (``cpu``,
  ``cu130torch2.14``, ...), set by python/build_wheels.py.
- ``MTLSAM_KEEP_DEBUG=1``: keep debug info in the module (stripped by default).
- ``MTLSAM_STABLE_ABI=1``: build against libtorch's stable ABI (``csrc/tensor_api.h``; torch
  >= 2.10 at build time). The module then uses only C functions of libtorch and loads under every
  torch from ``STABLE_ABI_MIN_TORCH`` on (same CUDA major for CUDA builds), not only the one it
  was built with; the ``+cpu`` and ``+cu130`` wheels are built this way.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch that is
already installed instead of pulling another one into an isolated environment.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# CPython 3.10's limited API (abi3): the oldest Python the package supports.
LIMITED_API_TAG = "cp310"
# Peak resident memory of one compile job, rounded up for headroom so that MAX_JOBS never
# outruns the memory. Measured (python/results/wheels/matrix.md, "peak MiB": the largest single
# process of the build): 1473 MiB for nvcc's cicc on csrc/cuda with the default six archs + PTX
# (CUDA 13.0, torch 2.14.1), 966 MiB for g++ on the CPU sources (torch 2.13.0).
NVCC_JOB_GIB = 2.0
CXX_JOB_GIB = 1.0
# Python's own build flags (sysconfig CFLAGS) carry -g: debug info was 9.0 of the CPU module's
# 9.4 MB. The linker drops it; MTLSAM_KEEP_DEBUG=1 keeps it.
LINK_ARGS = ["-fopenmp"] + ([] if os.environ.get("MTLSAM_KEEP_DEBUG") == "1"
                            else ["-Wl,--strip-debug"])
# The stable-ABI build targets torch 2.10 (TORCH_TARGET_VERSION): it may only use what 2.10's
# stable C shim exports, and the load guard accepts any torch from this release on.
STABLE_ABI_MIN_TORCH = "2.10"
STABLE_ABI_TARGET = "0x020A000000000000"
LOCAL_VERSION_RE = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")


def _warn(msg: str) -> None:
    print(f"mtlsam_ext setup: {msg}", file=sys.stderr)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def package_version() -> str:
    """``mtlsam_ext/_version.py``'s version plus ``+MTLSAM_LOCAL_VERSION`` when set."""
    text = open(os.path.join(HERE, "mtlsam_ext", "_version.py")).read()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if match is None:
        raise RuntimeError("mtlsam_ext/_version.py does not define __version__")
    local = os.environ.get("MTLSAM_LOCAL_VERSION", "").strip()
    if not local:
        return match.group(1)
    if not LOCAL_VERSION_RE.match(local):
        raise ValueError(f"MTLSAM_LOCAL_VERSION={local!r} is not a PEP 440 local version label "
                         "(lower-case letters and digits, dot-separated)")
    return f"{match.group(1)}+{local}"


def nvcc_version(nvcc: str) -> str:
    """``"13.0.88"`` from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return match.group(1)


def check_nvcc_matches_torch(nvcc_ver: str, torch_cuda: str) -> None:
    """A CUDA-major mismatch links the wrong libcudart and fails at load or at first launch."""
    if nvcc_ver.split(".")[0] != torch_cuda.split(".")[0]:
        raise RuntimeError(
            f"nvcc is CUDA {nvcc_ver} but torch was built with CUDA {torch_cuda}: the CUDA "
            "major versions must match. Point CUDA_HOME at a CUDA "
            f"{torch_cuda.split('.')[0]}.x toolkit, or install the torch build for CUDA "
            f"{nvcc_ver.split('.')[0]}.")


def default_arch_list(nvcc_ver: str) -> str:
    """Ampere, Ada, Hopper (+ Blackwell datacenter and consumer from CUDA 12.8, the first
    toolkit that targets them); PTX of the newest arch lets later GPUs JIT the kernels."""
    major, minor = (int(v) for v in nvcc_ver.split(".")[:2])
    if (major, minor) >= (12, 8):
        return "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    return "8.0;8.6;8.9;9.0+PTX"


def bounded_max_jobs(per_job_gib: float) -> int:
    """Parallel compile jobs: the CPU count, bounded by MemAvailable / per-job peak memory.

    A user's ``MAX_JOBS`` is honoured up to that bound (a build that swaps or is killed by the
    OOM killer is the failure this prevents)."""
    cpus = os.cpu_count() or 1
    avail_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    by_mem = cpus if avail_gib is None else max(1, int(avail_gib / per_job_gib))
    bound = max(1, min(cpus, by_mem))
    asked = os.environ.get("MAX_JOBS")
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise ValueError(f"MAX_JOBS must be a positive integer, got {asked!r}")
        if int(asked) > by_mem:
            _warn(f"MAX_JOBS={asked} lowered to {by_mem}: {avail_gib:.1f} GiB available and "
                  f"up to {per_job_gib} GiB per compile job")
            return by_mem
        return int(asked)
    return bound


def check_stable_abi_torch(torch_version: str) -> None:
    """The stable-ABI build needs torch's stable headers of at least the target release."""
    parts = torch_version.split("+")[0].split(".")
    have = (int(parts[0]), int(parts[1]))
    need = tuple(int(p) for p in STABLE_ABI_MIN_TORCH.split("."))
    if have < need:
        raise RuntimeError(f"MTLSAM_STABLE_ABI=1 needs torch >= {STABLE_ABI_MIN_TORCH} at build "
                           f"time (its stable-ABI headers); torch {torch_version} is installed")


def loaded_libstdcxx() -> str | None:
    """Path of the shared libstdc++ mapped into this process (torch, imported, links it)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return fields[-1]
    except OSError:
        pass
    return None


def libstdcxx_link_args(cxx: str) -> list[str]:
    """Link arguments that keep the module on the process's shared libstdc++.

    A toolchain whose library path holds libstdc++.a but no libstdc++.so links a private static
    copy of libstdc++ into the module, silently (seen: a GPU machine image whose GCC 13 is a
    wrapper under /opt/gcc). That copy's symbols are exported, so some of the module's calls bind
    to the shared libstdc++ that torch loaded and some to the copy; formatting a number into the
    message of a failed argument check then crashed the process (every check whose message held
    only strings passed). Where the compiler finds no libstdc++.so (``-print-file-name`` echoes a
    bare name), the shared library torch loaded is named on the link line, ahead of the driver's
    own ``-lstdc++``, so the module links it like any other build does."""
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found):
        return []
    loaded = loaded_libstdcxx()
    if loaded is None:
        _warn(f"{cxx} finds no libstdc++.so and none is loaded: libstdc++ may be linked "
              "statically into the module")
        return []
    _warn(f"{cxx} finds no libstdc++.so (it would link libstdc++ statically): linking {loaded}, "
          "the one torch loaded")
    return [loaded]


def compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else cxx


def write_record_source(record: dict) -> str:
    """A C++ source holding the build record as a string, compiled into the module."""
    gen_dir = os.path.join(HERE, "build", "generated")
    os.makedirs(gen_dir, exist_ok=True)
    path = os.path.join(gen_dir, "build_record.cpp")
    text = json.dumps(record, sort_keys=True)
    if ")json\"" in text:
        raise ValueError("build record text collides with the raw-string delimiter")
    src = ("// Generated by setup.py: what this module was built against.\n"
           f'extern "C" const char mtlsam_build_record[] = R"json({text})json";\n')
    if not os.path.exists(path) or open(path).read() != src:  # keep ninja's timestamps stable
        with open(path, "w") as f:
            f.write(src)
    return os.path.relpath(path, HERE)


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

    link_args = LINK_ARGS + libstdcxx_link_args(cxx)
    sources = _sources("csrc/registration.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    stable = os.environ.get("MTLSAM_STABLE_ABI", "0") == "1"
    abi_flags: list[str] = []
    if stable:
        check_stable_abi_torch(torch.__version__)
        abi_flags = ["-DMTLSAM_STABLE_ABI=1", f"-DTORCH_TARGET_VERSION={STABLE_ABI_TARGET}"]
        cxx_flags += abi_flags
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    have_nvcc = bool(nvcc and os.path.exists(nvcc))
    want_cuda = force_cuda or (torch.version.cuda is not None and have_nvcc)
    record: dict = {
        "mtlsam_ext": package_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": want_cuda,
        "nvcc": None,
        "cuda_archs": None,
        "compiler": compiler_version(cxx),
        "py_limited_api": LIMITED_API_TAG,
        "stable_abi": stable,
        "min_torch": STABLE_ABI_MIN_TORCH if stable else None,
        "build_python": platform.python_version(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if want_cuda:
        if not have_nvcc:
            raise RuntimeError("CUDA kernels requested (MTLSAM_FORCE_CUDA=1) but nvcc was not "
                               "found: set CUDA_HOME to a CUDA toolkit")
        if torch.version.cuda is None:
            raise RuntimeError("CUDA kernels requested but the installed torch is a CPU-only "
                               "build; install a CUDA build of torch first")
        nv = nvcc_version(nvcc)
        check_nvcc_matches_torch(nv, torch.version.cuda)
        # torch's helper reads TORCH_CUDA_ARCH_LIST from the environment at compile time.
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(nv)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        os.environ["MAX_JOBS"] = str(bounded_max_jobs(NVCC_JOB_GIB))
        record.update(nvcc=nv, cuda_archs=archs)
        cu = _sources("csrc/cuda/*.cu")
        ext = cpp_extension.CUDAExtension(
            "mtlsam_ext._C", sources + cu + [write_record_source(record)],
            define_macros=[("MTLSAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                         "-Xcompiler", "-fopenmp"] + abi_flags},
            extra_link_args=link_args, py_limited_api=True)
    else:
        os.environ["MAX_JOBS"] = str(bounded_max_jobs(CXX_JOB_GIB))
        ext = cpp_extension.CppExtension("mtlsam_ext._C",
                                         sources + [write_record_source(record)],
                                         extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_args, py_limited_api=True)
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtWithRecord(base):
        """torch's build_ext, then the record written next to the built module (in the
        source tree for editable installs, in build/lib for wheels)."""

        def run(self) -> None:
            super().run()
            out_dir = os.path.dirname(self.get_ext_fullpath("mtlsam_ext._C"))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.write("\n")

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtWithRecord},
            # abi3 wheel tag: cp310-abi3-<platform>.
            "options": {"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}}}


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(version=package_version(), **extension_setup())
