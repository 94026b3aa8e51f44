"""Data-parallel synchronisation: one collective per gradient phase over the flat buffers.

DESIGN.md §4: every quantity a step needs is a sum over parameter elements (norms, Gram
entries, per-layer statistics) or a mean over examples (gradients). So each gradient phase
(the per-task rows, g0, the sampled-layer local rows, the SAM rows, the heads' gradients) is
summed over ranks once, and everything after it is computed identically on every rank. With
equal local batch sizes and mean losses this equals one process on the concatenated batch.

The collectives sum; the mean's ``1/W`` is never a pass over the rows: a summed gradient is
``W`` times the mean, exactly as a loss-scaled one is ``S`` times the true one, so ``W``
joins the loss scale that the step already folds into its coefficients (:mod:`.amp`).

``perturb_sync="global"`` averages every phase; ``"local"`` perturbs with each rank's own
gradients (SAM's m-sharpness) and averages only what the aggregator combines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

PERTURB_SYNC = ("global", "local")


def unwrap_ddp(obj: Any) -> tuple[Any, nn.Module | None]:
    """``(module, ddp)`` for a ``DistributedDataParallel`` wrapper, ``(obj, None)`` otherwise."""
    ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_cls is not None and isinstance(obj, ddp_cls):
        return obj.module, obj
    return obj, None


class Sync:
    """The process group of a data-parallel MTLSAM, its collectives and their accounting."""

    def __init__(self, group: Any, perturb_sync: str) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.perturb_sync = perturb_sync
        self.collectives = 0
        self.bytes = 0
        self.last_step: dict[str, int] = {"collectives": 0, "bytes": 0}

    @property
    def global_perturb(self) -> bool:
        return self.perturb_sync == "global"

    def world_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(float(self.world), dtype=torch.float32, device=device)

    def begin_step(self) -> None:
        self.collectives = 0
        self.bytes = 0

    def end_step(self) -> None:
        self.last_step = {"collectives": self.collectives, "bytes": self.bytes}

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the ranks in place: one phase. The launches are asynchronous,
        so the phase's buffers travel together; a handful of buffers (one per dtype bucket and
        kind), never one per parameter or per task."""
        tensors = [t for t in tensors if t.numel()]
        works = [self.dist.all_reduce(t, group=self.group, async_op=True) for t in tensors]
        for w in works:
            w.wait()
        self.collectives += len(tensors)
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)

    def check_same(self, what: str, values: list[int], device: torch.device) -> None:
        """Raise on every rank (never hang) if ``values`` differ between ranks."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        n = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
        lo, hi = n.clone(), n.clone()
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN, group=self.group)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX, group=self.group)
        same = bool(lo == hi)
        if same:
            lo_v, hi_v = mine.clone(), mine.clone()
            self.dist.all_reduce(lo_v, op=self.dist.ReduceOp.MIN, group=self.group)
            self.dist.all_reduce(hi_v, op=self.dist.ReduceOp.MAX, group=self.group)
            same = bool(torch.equal(lo_v, hi_v))
        if not same:
            raise ValueError(f"ranks disagree on {what} (this rank {self.rank}: {values}); "
                             "every rank's closure must return the same number of losses over "
                             "the same model")

    def broadcast_seed(self, seed: int, device: torch.device) -> int:
        """Rank 0's seed on every rank (construction only): random choices then agree without
        any communication during the steps."""
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        self.dist.broadcast(t, src=self.dist.get_global_rank(self.group, 0)
                            if self.group is not None else 0, group=self.group)
        return int(t.item())

    def all_ok_and_mean(self, ok: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """The step's finiteness flag, true only if it is true on every rank, and the mean of
        the ranks' losses: one small collective folded into the step's existing check."""
        packed = torch.cat([(~ok).to(torch.float64).reshape(1), losses.double().reshape(-1)])
        self.dist.all_reduce(packed, group=self.group)
        self.collectives += 1
        self.bytes += packed.numel() * packed.element_size()
        mean = (packed[1:] / self.world).to(losses.dtype)
        return packed[0] == 0, mean


def resolve_sync(process_group: Any, perturb_sync: str) -> Sync | None:
    """The :class:`Sync` for ``process_group`` (``None``: the default group when
    ``torch.distributed`` is initialised; ``False``: no synchronisation)."""
    if perturb_sync not in PERTURB_SYNC:
        raise ValueError(f"perturb_sync must be one of {PERTURB_SYNC}, got {perturb_sync!r}")
    if process_group is False:
        return None
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return Sync(group, perturb_sync)
