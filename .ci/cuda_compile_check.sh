#!/usr/bin/env bash
# CI compile check of the CUDA kernels (csrc/cuda/*.cu): no GPU is needed, only nvcc.
#
# - A throwaway venv (${TMPDIR:-/tmp}/mtlsam-cuda-venv, reused when present) gets the CUDA 13.0
#   build of torch (torch==2.14.1, from the local wheel mirror) with the runtime libraries it needs
#   to be imported (cuDNN, cuBLAS, ... -- torch's own dependencies; nothing else large), plus the
#   build tools. The local CUDA toolkit (CUDA_HOME) only needs nvcc and the CUDA runtime headers:
#   the kernels include c10/cuda headers, not ATen/cuda/CUDAContext.h (which needs cuBLAS/cuSPARSE
#   headers).
# - The extension is built with MTLSAM_FORCE_CUDA=1 from a copy of the sources, into a temporary
#   build directory, so nothing (.so, build/, egg-info) is left in the source tree.
# - Warnings policy: every nvcc compilation (our .cu files) runs with
#   NVCC_APPEND_FLAGS="-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror": device-side and
#   host-side warnings in our code fail the check. torch's include directories are added again
#   with -isystem, so torch's own headers (which have unused parameters) are not held to these
#   flags. The C++ sources (registration.cpp, csrc/cpu) keep setup.py's -Wall.
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
# MAX_JOBS (default 2), MTLSAM_CUDA_VENV (venv path), MTLSAM_TORCH_CUDA (torch requirement).
set -euo pipefail
start=$(date +%s)
src="$(cd "$(dirname "$0")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda_compile_check: nvcc not found under CUDA_HOME=$CUDA_HOME" >&2
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
"$py" -m pip install -q numpy 'setuptools>=77' wheel ninja
"$py" -c "import torch; print('cuda_compile_check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mtlsam-cuda-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# A copy of the sources (not the venvs or build outputs of the checkout).
mkdir -p "$tmp/src"
( cd "$src" && tar cf - --exclude=./.venv --exclude=./build --exclude='*.so' --exclude=./.git \
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
"$py" setup.py -q build_ext --build-temp "$tmp/build" --build-lib "$tmp/lib"
so=$(find "$tmp/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
    echo "cuda_compile_check: no extension was built" >&2
    exit 1
fi
# The CUDA kernels must be in the library (a dispatch name of csrc/cuda/reduce.cu). grep reads
# the file itself: no pipe whose early exit pipefail would turn into a failure.
if ! grep -a -q "mtlsam_segment_sumsq" "$so"; then
    echo "cuda_compile_check: $so has no CUDA kernels" >&2
    exit 1
fi
echo "cuda_compile_check: built $(basename "$so") with CUDA kernels in $(( $(date +%s) - start )) s"
