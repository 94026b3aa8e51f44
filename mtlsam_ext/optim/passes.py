"""``Passes``: the closure's forwards and the backward passes of one step, and where their
gradients land.

Gradients reach the flat buffers because ``p.grad`` are views of them and autograd
accumulates in place; for a per-task gradient the views are re-pointed at row i of a
``[K, N]`` row matrix (zeroed once per step) for that one backward. Every backward runs on
the loss times the loss scale (:mod:`mtlsam_ext.optim.amp`); the closure contract (no
``backward`` inside the closure) is enforced here and in :mod:`mtlsam_ext.optim.closure`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext.optim.batched import BatchedError, point_losses
from mtlsam_ext.optim.batchnorm import batch_statistics
from mtlsam_ext.optim.checks import check_graph
from mtlsam_ext.optim.closure import CONTRACT, call_closure, check_no_backward

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


@contextlib.contextmanager
def closure_contract() -> Iterator[None]:
    """Autograd's "backward through the graph a second time" means the closure ran backward
    itself: say so in terms of the closure contract."""
    try:
        yield
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise ValueError(f"{CONTRACT} (autograd: {err})") from None
        raise


class Passes:
    """The forwards (closure calls, vmapped point batches) and backwards of one step."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.opt = run.opt
        self.task_aware = run.task_aware
        self.scaling = run.scaling
        self.shared = run.shared
        self.heads = run.heads
        self.sync = run.sync
        self.sharded = run.sharded
        self.shard_scale = run.shard_scale
        self.bn = run.opt.bn_running_stats
        self.n_calls = 0

    def call(self, task: int | None = None) -> list[Tensor]:
        """One forward through the closure: all K losses, or ``[loss_task]`` when the closure
        is task-aware and ``task`` is given. BatchNorm running statistics keep the values of
        the first forward of the step (``bn_stats="first"``)."""
        first = self.n_calls == 0
        if self.bn:
            # Put back the first forward's statistics *before* a later forward rather than
            # after it: batch_norm saves the running buffers for its backward, so changing
            # them between a forward and its backward would fail autograd's version check.
            if first:
                self.bn.save("pre")
            else:
                self.bn.restore("first")
        if first and not self.opt._graph_checked:
            # First step: gradients are zero before the closure, so any gradient after it
            # means the closure ran backward() itself.
            self.opt.zero_grad()
        self.shared.push()  # sharded: the forward all-gathers the shards, not the buffer
        out = call_closure(self.opt, self.run.closure, task if self.task_aware else None,
                           self.task_aware, pick=None if self.task_aware else task)
        if first and not self.opt._graph_checked:
            check_no_backward(self.opt)
        self.n_calls += 1
        if first and self.bn:
            self.bn.save("first")
        return out

    def call_points(self, points: list[Tensor], first: int, randomness: str) -> Tensor:
        """One vmapped forward of the closure over a chunk of points (per-parameter
        ``[K', *shape]`` leaves): ``[K']`` losses, point ``i`` taking loss ``first + i``. A
        later forward of the step (never the first): the running statistics are the first
        forward's, and BatchNorm normalises with batch statistics without touching them."""
        if self.bn:
            self.bn.restore("first")
        self.n_calls += 1
        with batch_statistics(self.opt.batched_bn):
            return point_losses(self.run, points, first, randomness)

    def first_losses(self) -> list[Tensor]:
        losses = self.call()
        check_graph(self.opt, losses)
        run = self.run
        run.k = len(losses)
        if self.sync is not None and not self.opt._sync_checked:
            sh, hd = self.shared, self.heads
            layout = [run.k, len(sh.layers)] + sh.global_numels() + (
                hd.global_numels() if hd is not None else [])
            self.sync.check_same("the number of tasks and the flat layout", layout, sh.device)
            self.opt._sync_checked = True
        run.unperturbed = torch.stack([loss.detach() for loss in losses])
        run.checks.append(run.unperturbed)
        return losses

    def perturbed_loss(self, i: int) -> Tensor:
        out = self.call(i)
        loss = out[0] if self.task_aware else out[i]
        detached = loss.detach()
        self.run.checks.perturbed_losses.append(detached)
        self.run.checks.pass_losses.append(detached)
        return loss

    def average_loss(self, losses: list[Tensor]) -> Tensor:
        w = self.opt.task_weights(len(losses), losses[0].device)
        dt = losses[0].dtype
        # the weights cast and split once (K index and cast ops fewer), the same products
        ws = w.to(dt).unbind(0) if all(x.dtype == dt for x in losses) else \
            [w[i].to(x.dtype) for i, x in enumerate(losses)]
        with torch.enable_grad():
            return sum(wi * loss for wi, loss in zip(ws, losses))

    def _scaled_backward(self, loss: Tensor, retain_graph: bool) -> None:
        with torch.enable_grad(), closure_contract():
            self.scaling.scaled(loss).backward(retain_graph=retain_graph)

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """``loss.backward()`` on the scaled loss (sharded: the shards' gradients then added
        to the flat gradient buffer)."""
        self._scaled_backward(loss, retain_graph)
        if self.sharded:
            self.shared.take_grads(self.grads(), self.shard_scale)

    def backward_local(self, loss: Tensor, local: list[Tensor], i: int,
                       layer_ids: list[int]) -> None:
        """Sharded: task i's gradient on the sampled layers into row ``i`` of the compact
        local rows, from a full backward (``autograd.grad`` does not reach parameters that
        FSDP2 shards: it reduce-scatters in the backward's gradient hooks)."""
        self._scaled_backward(loss, retain_graph=True)
        self.shared.take_grads([loc[i] for loc in local], self.shard_scale, layer_ids)

    def backward_into(self, loss: Tensor, rows: list[Tensor], i: int,
                      retain_graph: bool = False) -> None:
        """``loss.backward()`` with the shared gradients pointing at row ``i`` (zero before:
        the callers zero their rows once per step), then back at the flat gradient buffer
        before anything else (a closure that zeroes the model's gradients must not reach the
        rows). Replaces zero + backward + copy of the whole shared buffer per task."""
        if self.sharded:
            self._scaled_backward(loss, retain_graph)
            self.shared.take_grads([r[i] for r in rows], self.shard_scale)
            return
        self.shared.point_grads(rows, i)
        try:
            self.backward(loss, retain_graph=retain_graph)
        finally:
            self.shared.attach_grads()

    def backward_split(self, loss: Tensor, sums: list[Tensor], locals_: list[Tensor], i: int,
                       layer_ids: list[int]) -> None:
        """:meth:`backward_into` with the gradients of ``layer_ids`` going to row ``i`` of the
        compact local buffers and the others added to row 0 of ``sums`` (see
        :meth:`FlatParams.point_grads_split`)."""
        self.shared.point_grads_split(sums, locals_, i, layer_ids)
        try:
            self.backward(loss)
        finally:
            self.shared.attach_grads()

    def task_grads(self, loss: Tensor, params: list[Tensor]) -> tuple[Tensor | None, ...]:
        """``autograd.grad`` of the scaled loss (the graph is kept for the later passes)."""
        with torch.enable_grad(), closure_contract():
            return torch.autograd.grad(self.scaling.scaled(loss), params, retain_graph=True,
                                       allow_unused=True)

    def batched_task_grads(self, losses: list[Tensor], params: list[Tensor]
                           ) -> tuple[Tensor | None, ...] | None:
        """``[K, *shape]`` gradients of the K (scaled) losses for each of ``params`` in ONE
        backward with K batched cotangents (``autograd.grad(..., is_grads_batched=True)``: the
        rows of the identity, vmapped over the graph); the graph is kept.

        ``None``, with one warning, when vmap cannot run this model's backward; the optimizer
        then stays on K sequential passes (``batched_grads`` is switched off)."""
        k = len(losses)
        with torch.enable_grad():
            stacked = torch.stack([self.scaling.scaled(loss) for loss in losses])
        eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
        try:
            with torch.enable_grad(), closure_contract():
                return torch.autograd.grad(stacked, params, grad_outputs=eye,
                                           is_grads_batched=True, retain_graph=True,
                                           allow_unused=True)
        except RuntimeError as err:  # (a closure that ran backward is a ValueError already)
            policy = self.opt.batched
            if policy.state("grads") == "batched" and not self.opt.batched_grads:
                raise BatchedError(f"batched=True: vmap could not run this model's backward "
                                   f"with K batched cotangents: {err}") from err
            if policy.state("grads") == "trial":
                policy.fall_back("grads", f"vmap could not run this model's backward ({err})")
                return None
            self.opt.batched_grads = False
            warnings.warn(f"batched_grads: vmap could not run this model's backward ({err}); "
                          "computing the task gradients with K backward passes", stacklevel=5)
            return None

    def batched_rows(self, losses: list[Tensor], rows: list[Tensor], first_row: int) -> bool:
        """Rows ``first_row + i`` := the shared gradient of ``losses[i]`` for every i from
        :meth:`batched_task_grads`; each head gets the sum of its batched gradients, i.e. its
        own task's gradient (only loss i reaches head i). Shared and head gradients are zero
        on entry (:meth:`zero_all` precedes the per-task rows). False if vmap failed."""
        shared = self.shared.ordered_params()
        heads = self.heads.ordered_params() if self.heads is not None else []
        got = self.batched_task_grads(losses, shared + heads)
        if got is None:
            return False
        self.shared.copy_batched(rows, first_row, len(losses), got[:len(shared)])
        if self.heads is not None:
            self.heads.add_summed_batched(got[len(shared):])
        return True

    def grads_state(self) -> str:
        """How the per-task gradients at one point are computed: ``"batched"`` (one backward
        with K cotangents), ``"sequential"`` or ``"trial"`` (``batched="auto"``)."""
        return "batched" if self.opt.batched_grads else self.opt.batched.state("grads")

    # -- gradients ------------------------------------------------------------------------------
    def zero_shared(self) -> None:
        self.shared.zero_grad()

    def zero_all(self) -> None:
        self.shared.zero_grad()
        if self.heads is not None:
            self.heads.zero_grad()

    def grads(self) -> list[Tensor]:
        return [b.grad for b in self.shared.buckets]

    def end_passes(self) -> None:
        """After the last backward of a successful step: BatchNorm statistics back to the
        values the first forward left (the last forward's update is undone here)."""
        if self.bn and self.n_calls > 1:
            self.bn.restore("first")
