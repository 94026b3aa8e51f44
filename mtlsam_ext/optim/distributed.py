"""Data-parallel synchronisation: one collective per gradient phase over the flat buffers.

docs/design.md §4: every quantity a step needs is a sum over parameter elements (norms, Gram
entries, per-layer statistics) or a mean over examples (gradients). So each gradient phase
(the per-task rows, g0, the sampled-layer local rows, the SAM rows, the heads' gradients) is
summed over ranks once, and everything after it is computed identically on every rank. With
equal local batch sizes and mean losses this equals one process on the concatenated batch.

The collectives sum; the mean's ``1/W`` is never a pass over the rows: a summed gradient is
``W`` times the mean, exactly as a loss-scaled one is ``S`` times the true one, so ``W``
joins the loss scale that the step already folds into its coefficients (:mod:`.amp`).

``perturb_sync="global"`` averages every phase; ``"local"`` perturbs with each rank's own
gradients (SAM's m-sharpness) and averages only what the aggregator combines.

A phase over ``[K, N]`` rows (:class:`Phase`) is cut into buckets of whole rows (or, for a
row larger than the bucket cap, pieces of one row) and each bucket's all-reduce starts as
soon as its last row is written, so it travels while the next task's pass runs; the phase
waits for all of them only where its sums are first read. Rows small enough for one bucket
(every row of a small model) still make one collective per phase, sent at its end.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run

PERTURB_SYNC = ("global", "local")


def unwrap_ddp(obj: Any) -> tuple[Any, nn.Module | None]:
    """``(module, ddp)`` for a ``DistributedDataParallel`` wrapper, ``(obj, None)`` otherwise."""
    ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_cls is not None and isinstance(obj, ddp_cls):
        return obj.module, obj
    return obj, None


# DDP's default bucket size (``bucket_cap_mb=25``): large enough that a bucket's latency is
# small next to its transfer, small enough that the first bucket leaves while later rows are
# still being computed.
BUCKET_CAP_MB = 25.0


def check_bucket_cap(bucket_cap_mb: Any) -> float:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
            or not 0 < bucket_cap_mb < float("inf"):
        raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
    return float(bucket_cap_mb)


class Phase:
    """One gradient phase in flight: row blocks summed over the ranks bucket by bucket as
    their rows become ready (:meth:`ready`), then any further buffers, then one wait
    (:meth:`finish`).

    Every block is a contiguous ``[R, N]`` tensor whose row ``i`` belongs to task ``i``; rows
    ``i0..i1-1`` of a block form one bucket when ``i1 - i0`` rows fit in the cap, a row larger
    than the cap is sent as column pieces of at most the cap. A bucket is launched by the
    ``ready`` of its last row, so no launched bucket is written again in the phase.
    """

    def __init__(self, sync: Sync, blocks: Sequence[Tensor]) -> None:
        self.sync = sync
        self.works: list[Any] = []
        self.plan: dict[int, list[Tensor]] = {}
        for blk in blocks:
            if blk.numel() == 0:
                continue
            if blk.dim() != 2 or not blk.is_contiguous():
                raise ValueError("a phase's row blocks must be contiguous [R, N] tensors")
            for last, piece in self._buckets(blk):
                self.plan.setdefault(last, []).append(piece)

    def _buckets(self, blk: Tensor) -> list[tuple[int, Tensor]]:
        cap = self.sync.cap_bytes
        r, n = blk.shape
        row_bytes = n * blk.element_size()
        if row_bytes <= cap:
            per = max(1, cap // row_bytes)
            return [(min(r, i0 + per) - 1, blk[i0:i0 + per]) for i0 in range(0, r, per)]
        cols = max(1, cap // blk.element_size())
        return [(i, blk[i, c0:c0 + cols]) for i in range(r) for c0 in range(0, n, cols)]

    def _launch(self, t: Tensor) -> None:
        s = self.sync
        self.works.append(s.dist.all_reduce(t, group=s.group, async_op=True))
        s.collectives += 1
        s.bytes += t.numel() * t.element_size()

    def ready(self, i: int) -> None:
        """Row ``i`` of every block is final: start the buckets it completes."""
        for t in self.plan.pop(i, ()):
            self._launch(t)

    def finish(self, more: Sequence[Tensor] = ()) -> None:
        """Start whatever is left (rows never marked ready, then ``more``, 1-D buffers in
        pieces of at most the cap) and wait for the whole phase."""
        for i in sorted(self.plan):
            self.ready(i)
        for t in more:
            if t.numel() == 0:
                continue
            cols = max(1, self.sync.cap_bytes // t.element_size())
            flat = t.view(-1)
            for c0 in range(0, flat.numel(), cols):
                self._launch(flat[c0:c0 + cols])
        self.wait()

    def wait(self) -> None:
        works, self.works = self.works, []
        for w in works:
            w.wait()


class Sync:
    """The process group of a data-parallel MTLSAM, its collectives and their accounting."""

    def __init__(self, group: Any, perturb_sync: str,
                 bucket_cap_mb: float = BUCKET_CAP_MB) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.perturb_sync = perturb_sync
        self.cap_bytes = max(1, int(check_bucket_cap(bucket_cap_mb) * 2**20))
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

    def phase(self, blocks: Sequence[Tensor] = ()) -> Phase:
        """A gradient phase over ``[R, N]`` row blocks (see :class:`Phase`)."""
        return Phase(self, blocks)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the ranks in place: one phase, launched together and waited
        together; a handful of buffers (one per dtype bucket and kind, cut at the bucket
        cap), never one per parameter or per task."""
        self.phase().finish(tensors)

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

    def sum_partial(self, t: Tensor) -> Tensor:
        """Sharded parameters: a rank's partial sums over its shard (norms, Gram entries,
        per-layer statistics) summed over the ranks in place: one small collective."""
        self.dist.all_reduce(t, group=self.group)
        self.collectives += 1
        self.bytes += t.numel() * t.element_size()
        return t

    def all_ok_and_mean(self, ok: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """The step's finiteness flag, true only if it is true on every rank, and the mean of
        the ranks' losses: one small collective folded into the step's existing check."""
        packed = torch.cat([(~ok).to(torch.float64).reshape(1), losses.double().reshape(-1)])
        self.dist.all_reduce(packed, group=self.group)
        self.collectives += 1
        self.bytes += packed.numel() * packed.element_size()
        mean = (packed[1:] / self.world).to(losses.dtype)
        return packed[0] == 0, mean


class StepComm:
    """The collectives of one step: each gradient phase begun, its rows sent as they are
    written, and summed over the ranks where the step first reads them; partial sums of
    sharded parameters. Every method does nothing without data parallelism."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sync = run.sync
        self.sharded = run.sharded
        self.heads = run.heads
        self.phase: Phase | None = None  # the gradient phase in flight

    def begin_phase(self, blocks: list[Tensor]) -> None:
        """Start a gradient phase over ``[K, N]`` row blocks whose row ``i`` is task ``i``'s:
        :meth:`row_ready` then sends each bucket of rows as soon as it is written, so it
        travels during the next task's pass; :meth:`reduce` ends the phase. Nothing without
        data parallelism."""
        if self.sync is not None and not self.sharded:  # (sharded: the rows are averaged)
            self.phase = self.sync.phase(blocks)

    def row_ready(self, i: int) -> None:
        """Row ``i`` of the phase's blocks is final (and will not be read before the phase
        ends)."""
        if self.phase is not None:
            self.phase.ready(i)

    def reduce(self, bufs: list[Tensor], head_grads: bool = False, head_out: bool = False
               ) -> None:
        """End a gradient phase: the rows begun with :meth:`begin_phase` and the given flat
        buffers, plus the heads' gradients and/or their kept SAM gradients, summed over the
        ranks (nothing without data parallelism)."""
        if self.sync is None:
            return
        # sharded: the shared buffers hold gradients the sharding wrapper averaged already
        more: list[Tensor] = [] if self.sharded else list(bufs)
        if self.heads is not None:
            if head_grads:
                more += [b.grad for b in self.heads.buckets]
            if head_out:
                more += [h[0] for h in self.run.perturb.head_out]
        phase, self.phase = self.phase or self.sync.phase(), None
        phase.finish(more)

    def settle(self) -> None:
        """A failed step: wait for the collectives it launched (the ranks launched the same
        ones), so none still writes into a buffer the next step reuses."""
        phase, self.phase = self.phase, None
        if phase is not None:
            phase.wait()

    def partial_sum(self, t: Tensor) -> Tensor:
        """A sum over the shared parameters' elements: with sharded parameters this rank's
        part, summed over the ranks in place; as it is otherwise."""
        return self.sync.sum_partial(t) if self.sharded else t

    def partial_sums(self, *ts: Tensor) -> list[Tensor]:
        """:meth:`partial_sum` of several tensors in one collective (packed in float64, each
        returned in its own dtype and shape); the tensors themselves when not sharded."""
        if not self.sharded:
            return list(ts)
        packed = self.sync.sum_partial(torch.cat([t.double().reshape(-1) for t in ts]))
        return [p.view(t.shape).to(t.dtype)
                for p, t in zip(packed.split([t.numel() for t in ts]), ts)]


def check_sharded(flat: Any, sync: Sync | None, *, method: str, local_grad: str,
                  batched: Any, batched_grads: bool) -> None:
    """``shared`` sharded by FSDP2: what the sharded step supports, checked at construction.

    The step keeps this rank's shards in its flat buffers; the sharding wrapper averages each
    backward's gradient into the shards (the rows never travel), and every sum over elements
    (norms, Gram, per-layer statistics, clip norm) is this rank's partial sum, all-reduced
    as a handful of scalars."""
    def refuse(what: str) -> None:
        raise ValueError(f"shared parameters sharded by fully_shard: {what}")

    if sync is None:
        refuse("needs torch.distributed initialised and process_group not False")
    if not sync.global_perturb:
        refuse('perturb_sync must be "global" (no rank holds its own full gradient)')
    if method == "gl" and local_grad == "zo":
        refuse('local_grad="zo" is not supported (use "autograd" or "lagged")')
    if batched is not False or batched_grads:
        refuse("batched and batched_grads are not supported (vmap over sharded parameters)")
    mesh = flat.params[0].device_mesh
    ranks = sync.dist.get_process_group_ranks(mesh.get_group())
    mine = sync.dist.get_process_group_ranks(sync.group)
    if ranks != mine or any(p.device_mesh != mesh for p in flat.params):
        refuse(f"the parameters' mesh (ranks {ranks}) must be the process group's "
               f"(ranks {mine}), one mesh for all of them")


# A process that ends right after its last collectives could abort (SIGABRT, "terminate called
# without an active exception") after the program itself had finished: a process group's worker
# thread may still hold the last reference to a tensor created in Python (a finished work keeps
# its inputs until the worker drops it, and a barrier keeps the works queued before it), and
# freeing that tensor needs the GIL. Once the interpreter has begun to finalise, Python ends any
# thread that asks for the GIL (pthread_exit), and that unwind through the worker's noexcept
# loop calls std::terminate. Seen with gloo under torchrun in 1 of 12-20 runs of
# python/ddp_two_task.py (the tensor was the program's own, from its last all_reduce); waiting
# 0.5 s before exiting made 40 of 40 runs clean. So every process that builds a data-parallel
# MTLSAM waits this long at exit, before finalisation and with the GIL released, for the
# workers to drop such references.
EXIT_DRAIN_S = 0.1
_exit_drain_registered = False


def _drain_at_exit() -> None:
    time.sleep(EXIT_DRAIN_S)


def register_exit_drain() -> None:
    """Register :func:`_drain_at_exit` once per process (an ``atexit`` hook: it runs before the
    interpreter finalises, after the program's last statement)."""
    global _exit_drain_registered
    if not _exit_drain_registered:
        atexit.register(_drain_at_exit)
        _exit_drain_registered = True


def resolve_sync(process_group: Any, perturb_sync: str,
                 bucket_cap_mb: float = BUCKET_CAP_MB) -> Sync | None:
    """The :class:`Sync` for ``process_group`` (``None``: the default group when
    ``torch.distributed`` is initialised; ``False``: no synchronisation)."""
    check_bucket_cap(bucket_cap_mb)
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
    register_exit_drain()
    return Sync(group, perturb_sync, bucket_cap_mb)
