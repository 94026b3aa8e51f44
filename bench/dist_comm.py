"""Communication and time per data-parallel step: MTLSAM's own collectives against what DDP
would send, and 2 ranks against 1 process.

Two gloo processes on the CPU (one thread each) run each method on the main job's MLP (K tasks,
32 samples per rank) and report, for the last step, the collectives MTLSAM issued and the
bytes it summed, next to DDP's per-backward all-reduce of every parameter (backward passes x
parameter bytes), which is what a per-task-gradient optimizer would send under a plain DDP
wrapper. Then the median step time of the 2 ranks against one process (one thread) on the
same 64 samples, measured in the same run.

``--caps`` runs every configuration once per bucket cap (``bucket_cap_mb``): the default 25
MiB holds all K rows of this MLP (one collective per phase, sent after the passes); a cap of
one row (about 0.9 MiB at K = 10) sends each row as soon as its pass has written it, so it
travels while the next pass runs.

``--fsdp`` adds the backbone sharded by FSDP2 (``fully_shard`` on the body, one group):
MTLSAM then all-reduces only partial sums and the heads, while FSDP2 all-gathers the
parameters before each forward (and backward) and reduce-scatters each backward's gradient;
those collectives are counted too (``dist.all_gather_single`` / ``reduce_scatter_single``,
full-size bytes).

Run from the repository root: ``python -m bench.dist_comm --tasks 10 --caps 25,1 --fsdp``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from mtlsam_ext import MTLSAM
from mtlsam_ext.benchmark.models import MLPNet

CONFIGS = {"erm": dict(method="erm"), "sam": dict(method="sam"), "fmtl": dict(method="fmtl"),
           "gl-autograd": dict(method="gl"), "gl-lagged": dict(method="gl", local_grad="lagged"),
           "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1)}
# Backward passes through the whole model per step (what DDP would all-reduce after each).
BACKWARDS = {"erm": lambda k: k, "sam": lambda k: 1 + k, "fmtl": lambda k: 2 * k,
             "gl-autograd": lambda k: 1 + 2 * k, "gl-lagged": lambda k: 1 + k,
             "gl-zo": lambda k: 1 + k}


PER_RANK = 32  # samples per rank
STEPS = 10  # timed steps (after 3 warm-up steps)


FSDP_CONFIGS = ["erm", "sam", "fmtl", "gl-autograd", "gl-lagged"]


class CountFSDP:
    """Counts FSDP2's own collectives (it calls these two functions of torch.distributed)."""

    def __init__(self) -> None:
        self.calls, self.bytes = 0, 0
        self.real = {n: getattr(dist, n) for n in ("all_gather_single", "reduce_scatter_single")}

    def __enter__(self) -> CountFSDP:
        for n, f in self.real.items():
            def counted(*a, _f=f, _n=n, **kw):
                big = kw.get("output", a[0]) if _n == "all_gather_single" else kw.get(
                    "input", a[1] if len(a) > 1 else None)
                self.calls += 1
                self.bytes += big.numel() * big.element_size()
                return _f(*a, **kw)
            setattr(dist, n, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for n, f in self.real.items():
            setattr(dist, n, f)


def run_config(name: str, sync: str, k: int, aggregator: str, batch: int,
               process_group: object = None, cap: float = 25.0, fsdp: bool = False
               ) -> tuple[dict, float]:
    """A few steps of one configuration; (communication of the last step, median ms/step).
    ``fsdp``: the backbone sharded by FSDP2; FSDP2's own collectives of the last step are
    added to the communication as ``fsdp_collectives`` / ``fsdp_bytes``."""
    torch.manual_seed(0)
    model = MLPNet(k)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # One FSDP2 group for the whole body: per-Linear groups would send 4x the number of
        # (smaller) collectives, and on loopback gloo each costs about a millisecond.
        fully_shard(model.body)
    x = torch.randn(batch, 64)
    y = torch.randint(0, 10, (batch, k))
    opt = MTLSAM(model.body, torch.optim.SGD, heads=list(model.heads), lr=0.01,
                 aggregator=aggregator, perturb_sync=sync, process_group=process_group,
                 **({"bucket_cap_mb": cap} if process_group is not False else {}),
                 generator=torch.Generator().manual_seed(0), **CONFIGS[name])

    def closure() -> list[torch.Tensor]:
        h = model.body(x)
        return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]

    for _ in range(3):
        opt.step(closure)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - t0)
    comm = opt.info()["communication"]
    if fsdp:
        with CountFSDP() as counted:
            opt.step(closure)
        comm = dict(opt.info()["communication"], fsdp_collectives=counted.calls,
                    fsdp_bytes=counted.bytes)
    return comm, 1e3 * sorted(times)[len(times) // 2]


def fsdp_passes_only(k: int, batch: int) -> float:
    """Median ms of FSDP2 alone on the same sharded body: one forward and K backward passes
    (what erm's step spends in passes), no optimizer."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLPNet(k)
    fully_shard(model.body)
    x = torch.randn(batch, 64)
    y = torch.randint(0, 10, (batch, k))

    def passes() -> None:
        h = model.body(x)
        losses = [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < k - 1)
        for p in model.parameters():
            p.grad = None

    times = []
    for step in range(3 + STEPS):
        t0 = time.perf_counter()
        passes()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def worker(rank: int, world: int, init: str, k: int, aggregator: str, caps: list[float],
           fsdp: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for name in CONFIGS:
        for sync in ("global", "local"):
            for cap in caps:
                dist.barrier()
                comm, ms = run_config(name, sync, k, aggregator, PER_RANK, cap=cap)
                slowest = torch.tensor([ms])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step ends on the slowest
                n_bytes = sum(p.numel() * p.element_size() for p in MLPNet(k).parameters())
                ddp = BACKWARDS[name](k) * n_bytes
                rows.append((name, sync, cap, comm["collectives"], comm["bytes"],
                             BACKWARDS[name](k), ddp, float(slowest)))
    sharded = []
    for name in FSDP_CONFIGS if fsdp else []:
        dist.barrier()
        comm, ms = run_config(name, "global", k, aggregator, PER_RANK, fsdp=True)
        slowest = torch.tensor([ms])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        sharded.append((name, comm, float(slowest)))
    if fsdp:
        dist.barrier()
        slowest = torch.tensor([fsdp_passes_only(k, PER_RANK)])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        sharded.append(("passes-only", None, float(slowest)))
    if rank == 0:
        torch.save((rows, sharded), out)
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--aggregator", default="mgda")
    ap.add_argument("--caps", default="25",
                    help="comma-separated bucket_cap_mb values, each run side by side")
    ap.add_argument("--fsdp", action="store_true",
                    help="also the backbone sharded by FSDP2 (global sync)")
    ap.add_argument("--out", help="append the rows as JSON lines here")
    args = ap.parse_args()
    caps = [float(c) for c in args.caps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), args.tasks, args.aggregator, caps,
                               args.fsdp, out), nprocs=2, join=True)
        rows, sharded = torch.load(out)
    torch.set_num_threads(1)
    single = {name: run_config(name, "global", args.tasks, args.aggregator, 2 * PER_RANK,
                               process_group=False)[1] for name in CONFIGS}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"MLP (main job), K={args.tasks}, aggregator={args.aggregator}, 2 ranks (gloo) x "
          f"{PER_RANK} samples vs 1 process x {2 * PER_RANK}, 1 thread each, "
          f"torch {torch.__version__}, commit {commit}; per step")
    print(f"{'method':<13}{'sync':<8}{'cap MiB':>8}{'collectives':>12}{'MiB':>9}{'DDP bwd':>9}"
          f"{'DDP MiB':>9}{'ratio':>7}{'ms 2 ranks':>11}{'ms 1 proc':>10}{'x 1 proc':>9}"
          f"{'x cap ' + args.caps.split(',')[0]:>10}")
    records = []
    first = {(name, sync): ms for name, sync, cap, *_, ms in rows if cap == caps[0]}
    for name, sync, cap, coll, nbytes, bwd, ddp, ms in rows:
        print(f"{name:<13}{sync:<8}{cap:>8g}{coll:>12}{nbytes / 2**20:>9.2f}{bwd:>9}"
              f"{ddp / 2**20:>9.2f}{nbytes / ddp:>7.2f}{ms:>11.1f}{single[name]:>10.1f}"
              f"{ms / single[name]:>9.2f}{ms / first[name, sync]:>10.2f}")
        records.append(dict(method=name, sync=sync, bucket_cap_mb=cap, collectives=coll,
                            bytes=nbytes,
                            ddp_backwards=bwd, ddp_bytes=ddp, ms_2_ranks=ms,
                            ms_1_process=single[name], tasks=args.tasks,
                            aggregator=args.aggregator, torch=torch.__version__,
                            commit=commit))
    if sharded:
        plain = {name: ms for name, sync, cap, *_, ms in rows
                 if sync == "global" and cap == caps[0]}
        print("\nbackbone sharded by FSDP2 (fully_shard), perturb_sync=global; MTLSAM's own "
              "collectives, then FSDP2's (all-gathers + reduce-scatters, full-size bytes)")
        print(f"{'method':<13}{'collectives':>12}{'KiB':>9}{'FSDP2 coll':>11}{'FSDP2 MiB':>10}"
              f"{'ms 2 ranks':>11}{'x replicated':>13}")
        for name, comm, ms in sharded:
            if comm is None:
                print(f"FSDP2 alone, one forward + {args.tasks} backward passes, no optimizer: "
                      f"{ms:.1f} ms")
                records.append(dict(method="fsdp2-forward-k-backwards", sharded="fsdp2",
                                    ms_2_ranks=ms, tasks=args.tasks, torch=torch.__version__,
                                    commit=commit))
                continue
            print(f"{name:<13}{comm['collectives']:>12}{comm['bytes'] / 2**10:>9.2f}"
                  f"{comm['fsdp_collectives']:>11}{comm['fsdp_bytes'] / 2**20:>10.2f}"
                  f"{ms:>11.1f}{ms / plain[name]:>13.2f}")
            records.append(dict(method=name, sync="global", sharded="fsdp2",
                                collectives=comm["collectives"], bytes=comm["bytes"],
                                fsdp_collectives=comm["fsdp_collectives"],
                                fsdp_bytes=comm["fsdp_bytes"], ms_2_ranks=ms,
                                ms_replicated=plain[name], tasks=args.tasks,
                                aggregator=args.aggregator, torch=torch.__version__,
                                commit=commit))
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
