"""Worker processes for tests/test_distributed.py (gloo on CPU): each scenario runs on every
rank and saves what the parent process compares."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from mtlsam_ext import MTLSAM
from mtlsam_ext.aggregators import aggregator_state
from tests.models import TwoTask

STEPS = 5


def fully_shard(module: nn.Module) -> nn.Module:
    """FSDP2's ``fully_shard`` on a CPU mesh of all ranks. Without a mesh it shards onto the
    accelerator where one is present (its default mesh follows ``torch.accelerator``), which
    moved the backbone to cuda:0 and left the heads on the CPU when these gloo tests ran on a
    GPU machine."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as fsdp2

    return fsdp2(module, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def shard(m: TwoTask, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = m.x.shape[0] // world
    return m.x[rank * n:(rank + 1) * n], m.y[rank * n:(rank + 1) * n]


def closure_for(m: TwoTask, x: torch.Tensor, y: torch.Tensor):
    def closure():
        h = m.body(x)
        return [((hd(h).squeeze(1) - y[:, i]) ** 2).mean() for i, hd in enumerate(m.heads)]
    return closure


def make(m: TwoTask, cfg: dict, **kw) -> MTLSAM:
    return MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, momentum=0.9,
                  backend="torch", generator=torch.Generator().manual_seed(7), **cfg, **kw)


def run_scenarios(rank: int, world: int, init_file: str, out_dir: str,
                  scenarios: list[tuple[str, dict]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    try:
        for name, spec in scenarios:
            try:
                results[name] = SCENARIOS[spec["kind"]](rank, world, spec)
            except Exception as err:  # reported to the parent, which asserts on it
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()


def train(rank: int, world: int, spec: dict) -> dict:
    """``steps`` steps; with ``"trace"``, every all-reduce MTLSAM launches is recorded with
    the number of closure calls made before it in its step (when it left, against the
    passes); with ``"fail_at"`` = (step, call), that closure call raises on every rank."""
    m = TwoTask(k=3, dtype=torch.float64, seed=1, width=12)
    x, y = shard(m, rank, world)
    kw = {"bucket_cap_mb": spec["cap"]} if "cap" in spec else {}
    opt = make(m, spec["cfg"], aggregator=spec["agg"], perturb_sync=spec.get("sync", "global"),
               **kw)
    calls, trace, failed = [0], [], []
    inner = closure_for(m, x, y)
    fail_step, fail_call = spec.get("fail_at", (-1, -1))

    def closure():
        calls[0] += 1
        if len(trace) == fail_step and calls[0] == fail_call:
            raise RuntimeError("closure failed on purpose")
        return inner()

    real = dist.all_reduce

    def traced(t, *a, **k):
        trace[-1].append((calls[0], t.numel()))
        return real(t, *a, **k)

    losses = []
    dist.all_reduce = traced
    try:
        for _ in range(spec.get("steps", STEPS)):
            calls[0] = 0
            trace.append([])
            try:
                losses.append(opt.step(closure))
            except RuntimeError as err:
                failed.append(str(err))
    finally:
        dist.all_reduce = real
    return {"params": [p.detach().clone() for p in m.parameters()], "losses": losses,
            "info": opt.info(), "trace": trace, "failed": failed,
            "agg_state": aggregator_state(opt._aggregate)}


def nonfinite(rank: int, world: int, spec: dict) -> dict:
    m = TwoTask(k=2, dtype=torch.float64, seed=1)
    x, y = shard(m, rank, world)
    opt = make(m, spec["cfg"], aggregator="mgda")
    opt.step(closure_for(m, x, y))
    before = [p.detach().clone() for p in m.parameters()]
    good = closure_for(m, x, y)
    bad = (lambda: [good()[0] * float("nan"), good()[1]]) if rank == 1 else good
    try:
        opt.step(bad)
        err = None
    except ValueError as e:
        err = str(e)
    after_skip = [p.detach().clone() for p in m.parameters()]
    losses = opt.step(good)  # and every rank goes on together
    return {"error_msg": err, "before": before, "after_skip": after_skip, "losses": losses,
            "params": [p.detach().clone() for p in m.parameters()]}


def wrong_k(rank: int, world: int, spec: dict) -> dict:
    m = TwoTask(k=3, dtype=torch.float64, seed=1)
    x, y = shard(m, rank, world)
    opt = MTLSAM(m.body, torch.optim.SGD, lr=0.05, backend="torch", method="fmtl")
    full = closure_for(m, x, y)
    closure = full if rank == 0 else (lambda: full()[:2])
    try:
        opt.step(closure)
        return {"error_msg": None}
    except ValueError as e:
        return {"error_msg": str(e)}


def resume(rank: int, world: int, spec: dict) -> dict:
    """Steps 1-2, state dict saved on rank 0 and loaded everywhere into fresh optimizers and
    models, steps 3-4; against four uninterrupted steps."""
    cfg, agg = spec["cfg"], spec.get("agg", "pcgrad")
    m = TwoTask(k=3, dtype=torch.float64, seed=1)
    x, y = shard(m, rank, world)
    ref = TwoTask(k=3, dtype=torch.float64, seed=1)
    opt_ref = make(ref, cfg, aggregator=agg)
    for _ in range(4):
        opt_ref.step(closure_for(ref, x, y))
    opt = make(m, cfg, aggregator=agg)
    for _ in range(2):
        opt.step(closure_for(m, x, y))
    path = spec["path"]
    if rank == 0:
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    state = torch.load(path, weights_only=False)
    m2 = TwoTask(k=3, dtype=torch.float64, seed=5)
    m2.load_state_dict(state["model"])
    opt2 = MTLSAM(m2.body, torch.optim.SGD, heads=list(m2.heads), lr=0.05, momentum=0.9,
                  backend="torch", generator=torch.Generator().manual_seed(99), aggregator=agg,
                  **cfg)
    opt2.load_state_dict(state["opt"])
    for _ in range(2):
        opt2.step(closure_for(m2, x, y))
    return {"resumed": [p.detach().clone() for p in m2.parameters()],
            "straight": [p.detach().clone() for p in ref.parameters()]}


class Whole(nn.Module):
    def __init__(self, m: TwoTask) -> None:
        super().__init__()
        self.m = m


def ddp(rank: int, world: int, spec: dict) -> dict:
    """The backbone wrapped in DDP and given as ``shared``: the passes run under no_sync and
    the result equals the plain module's."""
    m = TwoTask(k=2, dtype=torch.float64, seed=1)
    x, y = shard(m, rank, world)
    wrapped = nn.parallel.DistributedDataParallel(m.body)
    ddp_calls = [0]

    def counting_hook(state, bucket):  # DDP's own gradient all-reduce, counted
        ddp_calls[0] += 1
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    wrapped.register_comm_hook(None, counting_hook)
    opt = MTLSAM(wrapped, torch.optim.SGD, heads=list(m.heads), lr=0.05, backend="torch",
                 method=spec["cfg"]["method"], aggregator="mgda",
                 generator=torch.Generator().manual_seed(7))

    def closure():
        h = wrapped(x)
        return [((hd(h).squeeze(1) - y[:, i]) ** 2).mean() for i, hd in enumerate(m.heads)]

    for _ in range(STEPS):
        opt.step(closure)
    return {"params": [p.detach().clone() for p in m.parameters()], "info": opt.info(),
            "ddp_allreduce_calls": ddp_calls[0]}


def sharded(rank: int, world: int, spec: dict) -> dict:
    """Sharding MTLSAM does not support, refused at construction with the reason, the module
    left as it was: FSDP1 on the backbone, FSDP2 on the heads, FSDP2 on part of the
    backbone (sharded and plain parameters mixed)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    m = TwoTask(k=2, dtype=torch.float64, seed=1)
    body, heads = m.body, list(m.heads)
    if spec["wrapper"] == "fsdp1":
        body = FullyShardedDataParallel(m.body, device_id=torch.device("cpu"))
    elif spec["wrapper"] == "fsdp2-heads":
        heads = [fully_shard(h) for h in m.heads]
    else:
        fully_shard(m.body[0])
    before = [p.detach().clone() for p in m.heads.parameters()]
    try:
        MTLSAM(body, torch.optim.SGD, heads=heads, lr=0.05)
        msg = None
    except ValueError as e:
        msg = str(e)
    same = all(torch.equal(a, b.detach()) for a, b in zip(before, m.heads.parameters()))
    x, _ = shard(m, rank, world)
    out = heads[0](body(x))  # the wrapped modules still run
    return {"error_msg": msg, "out_shape": tuple(out.shape), "heads_same": same}


def fsdp(rank: int, world: int, spec: dict) -> dict:
    """The backbone sharded by FSDP2 (every Linear, then the whole body), the heads plain:
    ``steps`` steps on this rank's shard of the batch; the full parameters afterwards (the
    shards gathered), the losses and the communication. ``spec["refuse"]``: options the
    sharded step does not support, expected to fail at construction."""
    m = TwoTask(k=3, dtype=torch.float64, seed=1, width=spec.get("width", 12))
    x, y = shard(m, rank, world)
    for mod in m.body:
        if isinstance(mod, nn.Linear):
            fully_shard(mod)
    fully_shard(m.body)
    if "refuse" in spec:
        try:
            make(m, spec["cfg"], aggregator="mgda", **spec["refuse"])
            return {"error_msg": None}
        except ValueError as e:
            return {"error_msg": str(e)}
    kw = dict(spec.get("kw", {}))
    if spec.get("scaler"):  # a power-of-two loss scale that grows after every step
        kw["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = make(m, spec["cfg"], aggregator=spec["agg"], **kw)
    closure = closure_for(m, x, y)
    if spec.get("resume"):  # 2 steps, each rank's own state dicts into a fresh copy, 2 more
        import copy

        for _ in range(2):
            opt.step(closure)
        saved = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
        m2 = TwoTask(k=3, dtype=torch.float64, seed=5, width=spec.get("width", 12))
        for mod in m2.body:
            if isinstance(mod, nn.Linear):
                fully_shard(mod)
        fully_shard(m2.body)
        m2.load_state_dict(saved["model"])
        opt2 = MTLSAM(m2.body, torch.optim.SGD, heads=list(m2.heads), lr=0.05, momentum=0.9,
                      backend="torch", generator=torch.Generator().manual_seed(99),
                      aggregator=spec["agg"], **spec["cfg"])
        opt2.load_state_dict(saved["opt"])
        for _ in range(2):
            opt.step(closure)
            opt2.step(closure_for(m2, x, y))
        return {"straight": [p.full_tensor() for p in m.body.parameters()],
                "resumed": [p.full_tensor() for p in m2.body.parameters()]}
    losses, skipped = [], []
    for step in range(spec.get("steps", STEPS)):
        if step == spec.get("nan_at") and rank == 1:
            def bad():  # one forward: FSDP2's all-gathers must match the other ranks'
                out = closure()
                return [out[0] * float("nan")] + out[1:]
        else:
            bad = closure
        before = [p.full_tensor() for p in m.body.parameters()]
        try:
            losses.append(opt.step(bad))
            if "grad_scaler" in kw:
                kw["grad_scaler"].update()
        except ValueError as e:
            skipped.append((str(e), all(torch.equal(a, b.full_tensor()) for a, b in
                                        zip(before, m.body.parameters()))))
    full = [p.full_tensor() for p in m.body.parameters()] + [
        p.detach().clone() for p in m.heads.parameters()]
    return {"params": full, "losses": losses, "info": opt.info(), "skipped": skipped,
            "scale": kw["grad_scaler"].get_scale() if "grad_scaler" in kw else None}


def bn(rank: int, world: int, spec: dict) -> dict:
    """A BatchNorm CNN (float64) on this rank's half of the batch, the backbone replicated or
    sharded by FSDP2: parameters (gathered) and the backbone's running statistics after
    ``STEPS`` steps."""
    from tests.models import BNNet

    m = BNNet(k=2, seed=3, dtype=torch.float64)
    n = m.x.shape[0] // world
    x, y = m.x[rank * n:(rank + 1) * n], m.y[rank * n:(rank + 1) * n]
    if spec["sharded"]:
        for mod in m.body:
            if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                fully_shard(mod)
        fully_shard(m.body)
    opt = make(m, spec["cfg"], aggregator="mgda")

    def closure():
        h = m.body(x)
        return [((hd(h).squeeze(1) - y[:, i]) ** 2).mean() for i, hd in enumerate(m.heads)]

    for _ in range(STEPS):
        opt.step(closure)
    with torch.no_grad():
        params = [(p.full_tensor() if spec["sharded"] else p).detach().clone()
                  for p in m.body.parameters()] + [p.detach().clone()
                                                   for p in m.heads.parameters()]
    stats = {k: v.clone() for k, v in m.body.state_dict().items() if "running" in k}
    return {"params": params, "stats": {k: (v.full_tensor() if hasattr(v, "full_tensor")
                                            else v) for k, v in stats.items()}}


SCENARIOS = {"train": train, "nonfinite": nonfinite, "wrong_k": wrong_k, "resume": resume,
             "ddp": ddp, "sharded": sharded, "fsdp": fsdp, "bn": bn}
