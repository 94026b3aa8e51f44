"""``python -m bench.ops_bench``: bandwidth of every fused op, per backend, against a copy.

For each op, dtype and layout of the flat parameter buffer (``resnet18``: ResNet-18's 62
tensors, 11,689,512 elements; ``tiny2000``: 2,000 tensors of 1..512 elements) it times each
requested backend and reports the effective bandwidth (bytes the op must move / median time,
see ``bench/ops_cases.py``) next to a ``copy_`` moving the same bytes in the same run, and
next to the pure-torch paths: ``torch`` (the reference on the flat buffer) and ``foreach``
(``torch._foreach_*`` over per-tensor lists, where foreach covers the op).

    python -m bench.ops_bench --device cpu --backends ext,torch,foreach
    python -m bench.ops_bench --device cuda --backends ext,triton,torch,foreach
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from bench.ops_cases import (
    DTYPES,
    LAYOUTS,
    REDUCTIONS,
    cases,
    copy_seconds,
    dot_buffer,
    dot_seconds,
    foreach_cases,
    interleaved_ratio,
)
from mtlsam_ext.benchmark.harness import record, time_fn


def _kernel_module(name: str, dev: torch.device):
    if name == "torch":
        from mtlsam_ext.kernels import torch_ref

        return torch_ref
    from mtlsam_ext.ops.dispatch import available_backends, kernels

    if name not in available_backends(dev):
        raise SystemExit(f"backend {name!r} is not available on {dev}")
    return kernels(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None,
                    help="comma list of ext,triton,torch,foreach (default: all available)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--layouts", default="resnet18,tiny2000")
    ap.add_argument("--tasks", type=int, default=4, help="rows K of gram/combine/gl stats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", help="append JSON lines here")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 2
    from mtlsam_ext.ops.dispatch import available_backends

    names = (args.backends.split(",") if args.backends
             else [b for b in available_backends(dev)] + ["foreach"])
    mods = {n: _kernel_module(n, dev) for n in names if n != "foreach"}
    rows_out = []
    cols = "".join(f"{n + ' GB/s':>14}" for n in names)
    head = (f"{'layout':9}{'dtype':6}{'op':28}{'MB':>8}{cols}{'copy GB/s':>11}{'best/copy':>10}"
            f"{'dot GB/s':>10}{'best/dot':>9}{'ext/dot alt':>12}")
    print(head)
    print("-" * len(head))
    for lname in args.layouts.split(","):
        sizes = LAYOUTS[lname]()
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            fe = foreach_cases(sizes, dtype, dev) if "foreach" in names else {}
            for op, nbytes, fn in cases(sizes, dtype, args.tasks, dev):
                t_copy = copy_seconds(nbytes, dev, args.warmup, args.repeats)
                # Reductions are read-only: their reference is torch.dot's read bandwidth.
                t_dot = (dot_seconds(nbytes, dev, args.warmup, args.repeats)
                         if op in REDUCTIONS else None)
                row = dict(bench="ops", layout=lname, segments=len(sizes), elements=sum(sizes),
                           dtype=dname, op=op, tasks=args.tasks, bytes=nbytes,
                           copy_s=t_copy, copy_gbs=nbytes / t_copy / 1e9, dot_s=t_dot,
                           dot_gbs=None if t_dot is None else nbytes / t_dot / 1e9)
                cells = []
                for n in names:
                    call = fe.get(op) if n == "foreach" else partial(fn, mods[n])
                    if call is None:
                        row[f"{n}_s"] = None
                        cells.append(f"{'-':>14}")
                        continue
                    t = time_fn(call, device=dev, warmup=args.warmup,
                                repeats=args.repeats).median
                    row[f"{n}_s"] = t
                    row[f"{n}_gbs"] = nbytes / t / 1e9
                    cells.append(f"{nbytes / t / 1e9:>14.2f}")
                fused = [row[f"{n}_s"] for n in names
                         if n in ("ext", "triton") and row.get(f"{n}_s")]
                best = min(fused) if fused else None
                row["best_over_copy"] = None if best is None else t_copy / best
                pure = [row[f"{n}_s"] for n in ("torch", "foreach") if row.get(f"{n}_s")]
                if best is not None and pure:
                    row["speedup_vs_pure_torch"] = min(pure) / best
                ratio = "-" if best is None else f"{t_copy / best:.2f}"
                row["best_over_dot"] = (None if best is None or t_dot is None
                                        else t_dot / best)
                dot_gbs = "-" if t_dot is None else f"{row['dot_gbs']:.2f}"
                dratio = "-" if row["best_over_dot"] is None else f"{row['best_over_dot']:.2f}"
                # The same ratio with ext and torch.dot alternating call by call (the
                # separate medians above can straddle a change of the machine's bandwidth).
                alt = None
                if t_dot is not None and "ext" in mods:
                    alt = interleaved_ratio(partial(fn, mods["ext"]), dot_buffer(nbytes, dev),
                                            dev, args.warmup, args.repeats)
                row["ext_over_dot_interleaved"] = alt
                alt_s = "-" if alt is None else f"{alt:.2f}"
                print(f"{lname:9}{dname:6}{op:28}{nbytes / 1e6:8.1f}{''.join(cells)}"
                      f"{row['copy_gbs']:11.2f}{ratio:>10}{dot_gbs:>10}{dratio:>9}{alt_s:>12}")
                rows_out.append(row)
    cmd = "python -m bench.ops_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    full = record(args.out, rows_out, device=dev, command=cmd)
    env = full[0] if full else {}
    print(f"\ntorch {env.get('torch')}, triton {env.get('triton')}, {env.get('device_name')}, "
          f"{env.get('threads')} threads, commit {env.get('commit')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
