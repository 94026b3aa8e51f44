#!/usr/bin/env bash
# CI check of the CUDA wheel: build the stable-ABI cu130 wheel against torch 2.14.1
# (csrc/cuda/*.cu compiled with nvcc; no GPU is needed), check that it uses no C++ symbol of
# libtorch, install it into the CUDA venv and smoke-test it there (python/smoke_wheel.py: it
# loads, the CPU ops and MTLSAM steps of backend="ext" equal the torch backend, the CUDA kernels
# are registered), then install it under torch 2.13.0 (CPU) in a fresh venv, where the load guard
# must refuse it with one warning. The CUDA sources are also compiled in the ATen mode (the one a
# source build uses; one file set, one arch, no wheel), and when MTLSAM_CPU_WHEEL names the
# stable-ABI CPU wheel built against torch 2.13.0 by .ci/run, it is smoke-tested under this
# venv's torch 2.14.1: one binary, two torch releases.
#
# - A throwaway venv (${TMPDIR:-/tmp}/mtlsam-cuda-venv, reused when present) gets the CUDA 13.0
#   build of torch (torch==2.14.1, from the local wheel mirror) with the runtime libraries it needs
#   to be imported (cuDNN, cuBLAS, ... -- torch's own dependencies; nothing else large), plus the
#   build tools. The local CUDA toolkit (CUDA_HOME) only needs nvcc and the CUDA runtime headers:
#   the kernels include c10/cuda headers, not ATen/cuda/CUDAContext.h (which needs cuBLAS/cuSPARSE
#   headers).
# - The wheel is built with MTLSAM_FORCE_CUDA=1 and `pip wheel --no-build-isolation` from a copy
#   of the sources in a temporary directory, so nothing (.so, build/, egg-info) is left in the
#   source tree. The arch list is two archs (8.0;9.0), not the release default, to keep CI
#   time: the release wheels come from python/build_wheels.py.
# - Warnings policy: every nvcc compilation (our .cu files) runs with
#   NVCC_APPEND_FLAGS="-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror": device-side and
#   host-side warnings in our code fail the check. torch's include directories are added again
#   with -isystem, so torch's own headers (which have unused parameters) are not held to these
#   flags. The C++ sources (registration.cpp, csrc/cpu) keep setup.py's -Wall.
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
# MAX_JOBS (default 2), MTLSAM_CUDA_VENV (venv path), MTLSAM_TORCH_CUDA (torch requirement),
# MTLSAM_CROSS_TORCH (the torch the wheel must be refused under; default torch==2.13.0),
# MTLSAM_CPU_WHEEL (a stable-ABI CPU wheel to smoke-test under the CUDA venv's torch).
set -euo pipefail
start=$(date +%s)
src="$(cd "$(dirname "$0")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda_wheel_check: nvcc not found under CUDA_HOME=$CUDA_HOME" >&2
    exit 1
fi
venv="${MTLSAM_CUDA_VENV:-${TMPDIR:-/tmp}/mtlsam-cuda-venv}"
torch_req="${MTLSAM_TORCH_CUDA:-torch==2.14.1}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    "$py" -m pip install -q "$torch_req"
fi
"$py" -m pip install -q numpy 'setuptools>=77' wheel ninja scipy tqdm
"$py" -c "import torch; print('cuda_wheel_check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mtlsam-cuda-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# A copy of the sources (not the venvs or build outputs of the checkout).
mkdir -p "$tmp/src"
( cd "$src" && tar cf - --exclude=./.venv --exclude=./build --exclude='*.so' --exclude=./.git --exclude=_build_info.json \
      setup.py pyproject.toml README.md csrc mtlsam_ext ) | ( cd "$tmp/src" && tar xf - )
cd "$tmp/src"
export MTLSAM_FORCE_CUDA=1
# torch's build helper passes its include directories with -I; naming them again with -isystem
# makes GCC treat them as system headers (GCC ignores -I for a directory also given by -isystem),
# so torch's headers do not trip our -Wextra -Werror.
torch_isystem=$("$py" -c "from torch.utils import cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths('cuda')))")
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }$torch_isystem -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$venv/bin:$CUDA_HOME/bin:$PATH"
export MTLSAM_LOCAL_VERSION=cu130 MTLSAM_STABLE_ABI=1
"$py" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/wheels" .
wheel=$(find "$tmp/wheels" -name 'mtlsam_ext-*.whl' | head -n 1)
if [ -z "$wheel" ]; then
    echo "cuda_wheel_check: no wheel was built" >&2
    exit 1
fi
so="$tmp/_C.so"
unzip -p "$wheel" 'mtlsam_ext/_C.abi3.so' > "$so"
# The CUDA kernels must be in the library (a dispatch name of csrc/cuda/reduce.cu). grep reads
# the file itself: no pipe whose early exit pipefail would turn into a failure.
if ! grep -a -q "mtlsam_segment_sumsq" "$so"; then
    echo "cuda_wheel_check: $(basename "$wheel") has no CUDA kernels" >&2
    exit 1
fi
echo "cuda_wheel_check: built $(basename "$wheel") in $(( $(date +%s) - start )) s"
# The stable ABI's promise, checked on the binary: no mangled c10/ATen/torch symbol is imported
# (those change between torch releases), only the C shim's functions.
cxx_syms=$(nm -D --undefined-only "$so" | awk '{print $NF}' | c++filt | grep -E '(^| )(c10|at|torch)::' || true)
if [ -n "$cxx_syms" ]; then
    echo "cuda_wheel_check: the stable-ABI module imports C++ symbols of libtorch:" >&2
    echo "$cxx_syms" | head -n 20 >&2
    exit 1
fi

# The ATen mode of the CUDA sources (what `pip install .` builds on a GPU machine): compiled, with
# the same warning policy, for one arch; not linked (the matrix program builds that wheel).
aten_start=$(date +%s)
mkdir -p "$tmp/aten"
cxx11_abi=$("$py" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
for f in csrc/cuda/*.cu; do
    "$CUDA_HOME/bin/nvcc" -c "$f" -o "$tmp/aten/$(basename "$f").o" -I csrc $torch_isystem \
        -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DMTLSAM_WITH_CUDA=1 \
        "-D_GLIBCXX_USE_CXX11_ABI=$cxx11_abi" \
        -Xcompiler -fPIC -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror &
done
wait_all=0
for job in $(jobs -p); do wait "$job" || wait_all=1; done
if [ "$wait_all" != 0 ]; then
    echo "cuda_wheel_check: the ATen mode of csrc/cuda does not compile" >&2
    exit 1
fi
echo "cuda_wheel_check: ATen-mode CUDA sources compiled in $(( $(date +%s) - aten_start )) s"

# Smoke test from the installed wheel, run outside the source tree (python -I: neither the
# script's directory nor the working directory is on sys.path).
mkdir -p "$tmp/run"
cp "$src/python/smoke_wheel.py" "$tmp/run/"
cd "$tmp/run"
"$py" -m pip install -q --no-deps --force-reinstall "$wheel"
"$py" -I smoke_wheel.py --expect loads
"$py" -m pip uninstall -q -y mtlsam_ext
if [ -n "${MTLSAM_CPU_WHEEL:-}" ]; then
    echo "cuda_wheel_check: $(basename "$MTLSAM_CPU_WHEEL") (stable ABI, built against torch 2.13.0) under this venv's torch"
    "$py" -m pip install -q --no-deps --force-reinstall "$MTLSAM_CPU_WHEEL"
    "$py" -I smoke_wheel.py --expect loads
    "$py" -m pip uninstall -q -y mtlsam_ext
fi

# The load guard for real: the CUDA wheel under torch 2.13 (a CPU-only build) must be refused
# cleanly.
python3 -m venv "$tmp/cross-venv"
"$tmp/cross-venv/bin/python" -m pip install -q "${MTLSAM_CROSS_TORCH:-torch==2.13.0}" "$wheel"
"$tmp/cross-venv/bin/python" -I smoke_wheel.py --expect refused
echo "cuda_wheel_check: wheel built and smoke-tested in $(( $(date +%s) - start )) s"
