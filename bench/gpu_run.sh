#!/usr/bin/env bash
# One GPU validation run that finishes in a few minutes: build the extension for this GPU's
# architecture only, check every compiled op against the reference, run the CUDA and Triton
# tests, the op and step benchmarks, a profile of the step and a memory check of the CUDA ops.
# Run from the repository root on a machine with
# a CUDA torch, nvcc of the same CUDA major, pytest (pytest-xdist and pytest-timeout if
# present) and, for the last stage, compute-sanitizer:
#
#   OUT=/tmp/gpu_out MTLSAM_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh [stages]
#
# stages: any of build,tests,ops,steps,profile,sanitize (default: all, in that order; build
# also runs when no extension is built yet). Every stage has its own time limit, so a hang in
# one still leaves the others' results. What it writes under $OUT (at most eight files):
#   run.log (versions, nvidia-smi, info with the kernels' self-check verdicts, the summary of
#   every stage), build.log, tests.log (the sanitizer's output too), junit.xml, ops_cuda.jsonl,
#   step_cuda.jsonl, profile_cuda.jsonl, bench.log (the benchmarks' tables and the profile)
set -u
PY=${PY:-python3}
export PATH=$PATH:/usr/local/cuda/bin
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
STAGES=${1:-build,tests,ops,steps,profile,sanitize}
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$(date +%s); lap() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }
export MTLSAM_COMMIT=${MTLSAM_COMMIT:-} PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton"
echo "commit ${MTLSAM_COMMIT:-(git)}"
cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=${MAX_JOBS:-16}

# In-place build: the tests run from the repository root, where this tree's mtlsam_ext/ is the
# one imported (an installed wheel would be shadowed by it).
if has build || ! ls mtlsam_ext/_C*.so > /dev/null 2>&1; then
    lap "build for sm_$cap"
    # MTLSAM_FORCE_CUDA: a missing nvcc is an error here, not a silently CPU-only build
    if ! MTLSAM_FORCE_CUDA=1 timeout 150 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
        tail -40 "$OUT/build.log"; echo "build failed"; exit 1
    fi
    grep -E "warning|error|libstdc" "$OUT/build.log" | head -20
fi
readelf -d mtlsam_ext/_C*.so 2> /dev/null | grep NEEDED
# the first thing on a new GPU: every compiled op on every device, backend and dtype against
# the pure-torch reference (the check MTLSAM otherwise runs on first use); verdicts in run.log
lap "self-check of the compiled kernels"
timeout 150 "$PY" -m mtlsam_ext.info --selfcheck
echo "selfcheck rc $?"

xdist=(); "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 8)
per_test=(); "$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 120)
if has tests; then
    lap "tests"
    timeout 170 "$PY" -m pytest -q -rfE "${xdist[@]}" "${per_test[@]}" -p no:cacheprovider \
        tests/test_ops_cuda.py tests/test_steps_cuda.py tests/test_triton.py \
        tests/test_triton_steps.py tests/test_aggregators.py::test_cuda_matches_cpu \
        tests/test_build_record.py tests/test_dispatch_auto.py tests/test_selfcheck.py \
        --junitxml "$OUT/junit.xml" > "$OUT/tests.log" 2>&1
    echo "pytest rc $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
    tail -3 "$OUT/tests.log"
fi
if has ops; then
    lap "op benchmark"
    timeout 100 "$PY" -m bench.ops_bench --device cuda --dtypes fp32,bf16 \
        --out "$OUT/ops_cuda.jsonl" > "$OUT/bench.log" 2>&1
    echo "ops_bench rc $?"; tail -60 "$OUT/bench.log"
fi
if has steps; then
    lap "step benchmark"
    # the main job as a user runs it on a GPU (MLP and ResNet-18, K = 10, interleaved rounds),
    # then the batched perturbed passes (batched="points") against the sequential ones
    timeout 150 "$PY" -m mtlsam_ext.bench --device cuda --budget-s 30 --no-progress \
        --out "$OUT/step_cuda.jsonl" >> "$OUT/bench.log" 2>&1
    echo "main job rc $?"; tail -32 "$OUT/bench.log"
    timeout 90 "$PY" -m bench.step_bench --device cuda --model resnet18 --tasks 10 \
        --methods fmtl,fmtl-vmap,gl-lagged,gl-lagged-vmap --budget-s 25 --no-progress \
        --out "$OUT/step_cuda.jsonl" >> "$OUT/bench.log" 2>&1
    echo "batched passes rc $?"; tail -8 "$OUT/bench.log"
fi
if has profile; then
    lap "profile of the step"
    timeout 90 "$PY" -m bench.profile_step --device cuda --model resnet18 --tasks 10 \
        --methods erm,fmtl,gl-lagged --out "$OUT/profile_cuda.jsonl" >> "$OUT/bench.log" 2>&1
    echo "profile_step rc $?"; grep -E "^== |syncs|copies" "$OUT/bench.log" | tail -9
fi
if has sanitize && command -v compute-sanitizer > /dev/null; then
    # the cases most likely to read or write out of bounds: ragged and one-element segments,
    # misaligned rows, unsorted sampled tables, segments spanning many blocks, empty inputs
    lap "compute-sanitizer memcheck of the CUDA ops"
    timeout 75 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q -x \
        -p no:cacheprovider tests/test_ops_cuda.py \
        -k "ragged or one_element or misaligned or unsorted or shuffled or alignment or spanning or empty" \
        >> "$OUT/tests.log" 2>&1
    echo "memcheck rc $?"; grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/tests.log" | tail -4
fi
lap "done"
