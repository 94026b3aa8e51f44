"""Data-parallel two-task training with MTLSAM under torchrun, as a user would run it.

    torchrun --standalone --nproc_per_node 2 python/ddp_two_task.py --method gl --aggregator mgda

Each process trains on its own shard of the batch; MTLSAM sums each gradient phase over the
ranks itself (no DDP wrapper needed), so every rank holds the same parameters after every
step, which the program checks at the end. The backend is NCCL when every rank has a GPU,
gloo on the CPU; multi-node is the same program with torchrun's ``--nnodes``/``--rdzv-*``.

``--fsdp`` shards the backbone with FSDP2's ``fully_shard`` instead of replicating it: each
rank then holds only its shard of the backbone's parameters, gradients and MTLSAM buffers.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from mtlsam_ext import MTLSAM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="gl", choices=["gl", "fmtl", "sam", "erm"])
    ap.add_argument("--aggregator", default="mgda")
    ap.add_argument("--perturb-sync", default="global", choices=["global", "local"])
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0,
                    help="largest all-reduce of gradient rows (MiB); smaller rows leave sooner")
    ap.add_argument("--fsdp", action="store_true",
                    help="shard the backbone with FSDP2's fully_shard (global sync)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=512, help="global batch, split over ranks")
    args = ap.parse_args()

    # NCCL where every local rank has a GPU of its own, gloo on the CPU otherwise (two ranks on
    # a one-GPU machine would both need cuda:0)
    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same model and data on every rank; each takes its own shard
    x = torch.randn(args.batch, 8)
    y1 = torch.sin(x[:, :4].sum(1, keepdim=True))
    y2 = (x[:, 4:] ** 2).mean(1, keepdim=True) - x[:, :2].sum(1, keepdim=True)
    n = args.batch // world
    x, y1, y2 = (t[rank * n:(rank + 1) * n].to(device) for t in (x, y1, y2))

    backbone = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])
    backbone.to(device)
    heads.to(device)
    if args.fsdp:  # each Linear its own group, then the rest; the heads stay replicated
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the mesh on the ranks' device: FSDP2's default is the accelerator whenever one is
        # present, also for gloo ranks on the CPU
        mesh = init_device_mesh(device.type, (world,))
        for mod in backbone:
            if isinstance(mod, nn.Linear):
                fully_shard(mod, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
    opt = MTLSAM(backbone, torch.optim.Adam, heads=list(heads), method=args.method,
                 aggregator=args.aggregator, perturb_sync=args.perturb_sync,
                 bucket_cap_mb=args.bucket_cap_mb, lr=3e-3)

    targets = {"sine": (heads[0], y1), "square": (heads[1], y2)}

    def closure(task=None):
        h = backbone(x)
        wanted = targets if task is None else {task: targets[task]}
        return {name: nn.functional.mse_loss(head(h), y) for name, (head, y) in wanted.items()}

    for step in range(args.steps + 1):
        losses = opt.step(closure)  # the mean over ranks of each task's loss
        if rank == 0 and step % args.every == 0:
            print(f"step {step:4d}  " + "  ".join(f"{k} {float(v):.4f}"
                                                  for k, v in losses.items()))

    # every rank must hold the same parameters: compare with rank 0's
    with torch.no_grad():  # (sharded: the whole parameter, gathered from the shards)
        flat = torch.cat([(p.full_tensor() if args.fsdp else p).detach().reshape(-1) for p in
                          backbone.parameters()] + [p.detach().reshape(-1)
                                                    for p in heads.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        info = opt.info()
        print(f"world {world}, ranks identical: {bool(same.item())}, "
              f"communication per step: {info['communication']}")
    dist.barrier()
    dist.destroy_process_group()
    if not bool(same.item()):
        raise SystemExit("ranks diverged")


if __name__ == "__main__":
    main()
