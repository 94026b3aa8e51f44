"""``python -m bench.call_overhead``: the fixed cost of one call of each compiled op.

Each op of ``torch.ops.mtlsam`` is called on tiny CPU inputs (a few hundred elements, so the
arithmetic is negligible) and the median time per call is reported: dispatcher, argument checks
and (in the stable-ABI build, ``MTLSAM_STABLE_ABI=1``) the boxed calls through libtorch's C
shim. ``--against DIR`` runs the same measurement with the package from another source tree
(another build of the extension, e.g. the stable-ABI one built in place there), alternating
rounds between this process and a child process so that both see the same machine, and
reports the ratio per op:

    MTLSAM_STABLE_ABI=1 python setup.py build_ext --inplace     # in a copy of the tree, DIR
    python -m bench.call_overhead --against DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtlsam_ext.benchmark.harness import record

N = 512  # elements of the flat buffer: large enough to be real, small enough to be free
K = 4  # rows of gram / combine / gl stats


def _calls() -> dict[str, Callable[[], object]]:
    ops = torch.ops.mtlsam
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g)
    backup = torch.empty(N)
    param = torch.randn(N, generator=g)
    offsets = torch.tensor([0, 100, 300, N])
    coef = torch.rand(3, generator=g)
    rows = torch.randn(K, N, generator=g)
    out = torch.empty(N)
    w = torch.rand(K, generator=g)
    local = torch.randn(K, 200, generator=g)
    starts = torch.tensor([100, 300])
    lengths = torch.tensor([100, 100])
    lstarts = torch.tensor([0, 100])
    return {
        "segment_sumsq": lambda: ops.segment_sumsq(x, offsets, None),
        "gl_layer_stats": lambda: ops.gl_layer_stats(x, local, starts, lengths, lstarts, None),
        "mix_perturb_": lambda: ops.mix_perturb_(param, backup, x, coef, offsets, None, None,
                                                 None, None, None, False, True),
        "restore_": lambda: ops.restore_(param, backup),
        "gram": lambda: ops.gram(rows),
        "combine_": lambda: ops.combine_(out, rows, w),
    }


def measure(calls: int) -> dict[str, float]:
    """Median microseconds per call of each op, over 5 batches of ``calls`` calls."""
    from mtlsam_ext.kernels.build_record import ext_status

    status = ext_status()
    if status.module is None:
        raise SystemExit(f"the compiled extension is not loaded: {status.why_not}")
    res = {}
    for name, fn in _calls().items():
        for _ in range(50):
            fn()
        batches = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            batches.append((time.perf_counter() - t0) / calls * 1e6)
        res[name] = statistics.median(batches)
    return res


def _build() -> str:
    from mtlsam_ext.kernels.build_record import ext_status

    rec = ext_status().record or {}
    return (f"{'stable ABI' if rec.get('stable_abi') else 'ATen'} build against torch "
            f"{rec.get('torch')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --against")
    ap.add_argument("--against", type=Path, help="source tree of another build to compare")
    ap.add_argument("--out", help="append JSON lines here (with commit and versions)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # per-call cost, not the thread pool's wake-up

    if args.json:
        print(json.dumps({"build": _build(), "us": measure(args.calls)}))
        return 0
    import mtlsam_ext

    here = {"build": _build(), "runs": []}
    print(f"torch {torch.__version__}; this tree: {Path(mtlsam_ext.__file__).parent.parent} "
          f"({here['build']}); {N} elements, K = {K}, 1 thread, median of 5 x {args.calls} "
          "calls", flush=True)
    if args.against is None:
        rows = []
        for name, us in measure(args.calls).items():
            print(f"  {name:16s} {us:7.2f} us/call")
            rows.append({"op": name, "us_per_call": us, "build": here["build"]})
        record(args.out, rows, device="cpu", bench="call_overhead", elements=N, tasks=K)
        return 0
    other = {"build": None, "runs": []}
    # The child runs this file with DIR first on sys.path, so it imports DIR's mtlsam_ext.
    against = str(args.against.resolve())
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "sys.argv = [sys.argv[2], '--json', '--calls', sys.argv[3]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    child = [sys.executable, "-c", code, against, __file__, str(args.calls)]
    for _ in range(args.rounds):
        here["runs"].append(measure(args.calls))
        proc = subprocess.run(child, capture_output=True, text=True, check=True, cwd=against)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        other["build"] = got["build"]
        other["runs"].append(got["us"])
    print(f"against: {args.against} ({other['build']}); median over {args.rounds} rounds")
    print(f"  {'op':16s} {'this us':>8s} {'other us':>9s} {'other/this':>11s}")
    rows = []
    for name in here["runs"][0]:
        a = statistics.median(r[name] for r in here["runs"])
        b = statistics.median(r[name] for r in other["runs"])
        print(f"  {name:16s} {a:8.2f} {b:9.2f} {b / a:11.2f}")
        rows.append({"op": name, "us_per_call": a, "build": here["build"], "other_us": b,
                     "other_build": other["build"], "other_over_this": b / a})
    record(args.out, rows, device="cpu", bench="call_overhead", elements=N, tasks=K,
           rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
