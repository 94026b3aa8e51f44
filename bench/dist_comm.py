"""Communication per data-parallel step: MTLSAM's own collectives against what DDP would send.

Two gloo processes on the CPU run each method for a few steps on the main job's MLP (K tasks)
and report, for the last step, the collectives MTLSAM issued and the bytes it summed, next to
DDP's per-backward all-reduce of every parameter (backward passes x parameter bytes), which
is what a per-task-gradient optimizer would send under a plain DDP wrapper.

Run from the repository root: ``python -m bench.dist_comm --tasks 10``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from mtlsam_ext import MTLSAM
from mtlsam_ext.benchmark.step import MLPNet

CONFIGS = {"erm": dict(method="erm"), "sam": dict(method="sam"), "fmtl": dict(method="fmtl"),
           "gl-autograd": dict(method="gl"), "gl-lagged": dict(method="gl", local_grad="lagged"),
           "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1)}
# Backward passes through the whole model per step (what DDP would all-reduce after each).
BACKWARDS = {"erm": lambda k: k, "sam": lambda k: 1 + k, "fmtl": lambda k: 2 * k,
             "gl-autograd": lambda k: 1 + 2 * k, "gl-lagged": lambda k: 1 + k,
             "gl-zo": lambda k: 1 + k}


def worker(rank: int, world: int, init: str, k: int, aggregator: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for name, cfg in CONFIGS.items():
        for sync in ("global", "local"):
            torch.manual_seed(0)
            model = MLPNet(k)
            x = torch.randn(32, 64)
            y = torch.randint(0, 10, (32, k))
            opt = MTLSAM(model.body, torch.optim.SGD, heads=list(model.heads), lr=0.01,
                         aggregator=aggregator, perturb_sync=sync,
                         generator=torch.Generator().manual_seed(0), **cfg)

            def closure(model=model, x=x, y=y):
                h = model.body(x)
                return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]

            for _ in range(3):
                opt.step(closure)
            comm = opt.info()["communication"]
            n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            ddp = BACKWARDS[name](k) * n_bytes
            rows.append((name, sync, comm["collectives"], comm["bytes"], BACKWARDS[name](k), ddp))
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--aggregator", default="mgda")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), args.tasks, args.aggregator, out),
                 nprocs=2, join=True)
        rows = torch.load(out)
    print(f"MLP (main job), K={args.tasks}, aggregator={args.aggregator}, 2 ranks (gloo), "
          f"torch {torch.__version__}; per step")
    print(f"{'method':<13}{'sync':<8}{'collectives':>12}{'MiB':>9}{'DDP bwd':>9}"
          f"{'DDP MiB':>9}{'ratio':>7}")
    for name, sync, coll, nbytes, bwd, ddp in rows:
        print(f"{name:<13}{sync:<8}{coll:>12}{nbytes / 2**20:>9.2f}{bwd:>9}"
              f"{ddp / 2**20:>9.2f}{nbytes / ddp:>7.2f}")


if __name__ == "__main__":
    main()
