"""``python -m bench.profile_step``: where one optimizer step's time goes, method by method.

The step benchmark (``python -m bench.step_bench``) says how long a step takes and how much of
it is outside the forward and backward passes; this program says what that time is. For each
method it builds the benchmark's model and optimizer (:mod:`mtlsam_ext.benchmark.models`,
:mod:`mtlsam_ext.benchmark.methods`), warms up, times ``--steps`` plain steps, then runs the
same number under ``torch.profiler`` and prints:

- the step's wall time, and on a GPU the time its kernels kept the device busy (the sum of
  kernel times, so ``busy / wall`` well under 1 means the device waits for the host);
- host-device synchronisations per step (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  ``cudaEventSynchronize``, ``aten::_local_scalar_dense`` i.e. ``.item()``) and copies;
- the ops with the most self host time and, on a GPU, the most self device time.

    python -m bench.profile_step --device cuda --model resnet18 --tasks 10 \\
        --methods fmtl,gl-lagged --out bench/results/profile_cuda.jsonl
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mtlsam_ext.benchmark.harness import record, sync, time_fn
from mtlsam_ext.benchmark.methods import TASK_AWARE, make_optimizer
from mtlsam_ext.benchmark.models import MODELS, closure_for, make_problem
from mtlsam_ext.benchmark.step import parse_args as step_args

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
         "aten::_local_scalar_dense")
COPIES = ("cudaMemcpyAsync", "cudaMemcpy")


def _self_device_us(evt: Any) -> float:
    # renamed from self_cuda_time_total in torch 2.4
    return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0)))


def profile_method(name: str, model_name: str, k: int, args: argparse.Namespace,
                   device: torch.device, top: int) -> dict[str, Any]:
    model, x, y, batch = make_problem(model_name, k, args, device)
    closure = closure_for(model, x, y, name in TASK_AWARE)
    opt = make_optimizer(name, model, args)
    plain = time_fn(lambda: opt.step(closure), device=device, warmup=args.warmup,
                    repeats=args.steps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step(closure)
        sync(device)
        wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    n = args.steps
    per = {e.key: e for e in events}
    # the device-side events (kernels, memsets, copies): a host op's device time is theirs
    # again, so only these are summed
    # (not the device-side span of the profiler's annotation of Optimizer.step, which covers
    # the whole step again)
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    busy = sum(_self_device_us(e) for e in kernels) / n / 1e6
    syncs = {s: per[s].count / n for s in SYNCS if s in per}
    copies = {s: per[s].count / n for s in COPIES if s in per}
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_dev = sorted(kernels, key=_self_device_us, reverse=True)[:top]
    return {
        "bench": "profile_step", "model": model_name, "tasks": k, "method": name,
        "batch": batch, "backend": getattr(opt, "backend", None),
        "step_median_s": plain.median, "profiled_step_s": wall, "device_busy_s": busy,
        "syncs_per_step": syncs, "copies_per_step": copies,
        "top_host": [(e.key, e.count / n, e.self_cpu_time_total / n / 1e3) for e in by_host],
        "top_device": [(e.key, e.count / n, _self_device_us(e) / n / 1e3) for e in by_dev],
    }


def print_row(r: dict[str, Any]) -> None:
    print(f"\n== {r['model']} K={r['tasks']} {r['method']} (backend {r['backend']}): step "
          f"{r['step_median_s'] * 1e3:.2f} ms (profiled {r['profiled_step_s'] * 1e3:.2f} ms), "
          f"device busy {r['device_busy_s'] * 1e3:.2f} ms")
    print("   syncs per step: " + (", ".join(f"{k} {v:g}" for k, v in r["syncs_per_step"].items())
                                   or "none"))
    print("   copies per step: " + (", ".join(f"{k} {v:g}" for k, v
                                              in r["copies_per_step"].items()) or "none"))
    print(f"   {'top self host time':<58} {'calls':>7} {'ms/step':>9}")
    for key, calls, ms in r["top_host"]:
        print(f"   {key[:58]:<58} {calls:7.1f} {ms:9.3f}")
    if r["top_device"]:
        print(f"   {'top device time (kernels, copies)':<58} {'calls':>7} {'ms/step':>9}")
        for key, calls, ms in r["top_device"]:
            print(f"   {key[:58]:<58} {calls:7.1f} {ms:9.3f}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet18", help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--tasks", default="10", help="comma-separated task counts K")
    ap.add_argument("--methods", default="erm,fmtl,gl-lagged")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="ops listed per table")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", help="append JSON lines here")
    a = ap.parse_args(argv)
    args = step_args(["--backend", a.backend, "--steps", str(a.steps), "--warmup",
                      str(a.warmup)])
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    rows = []
    for model_name in a.model.split(","):
        for k in (int(v) for v in a.tasks.split(",")):
            for name in a.methods.split(","):
                r = profile_method(name, model_name, k, args, device, a.top)
                print_row(r)
                rows.append(r)
    record(a.out, rows, device=device)
    return rows


if __name__ == "__main__":
    main()
