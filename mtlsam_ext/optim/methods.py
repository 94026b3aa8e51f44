"""The passes of one step for each method, written against flat buffers and fused ops.

``step_gl`` (global-local sampled SAM, report Alg. 1), ``step_fmtl`` (F-MTL, Phan et al.
Alg. 1), ``step_sam`` (SAM on the weighted average loss, then the aggregator at the perturbed
point) and ``step_erm`` (the aggregator alone). Each returns the K losses at the unperturbed
point; the shared update is left in the flat gradient buffer and head i's gradient in its
segment of the heads' buffer, for the base optimizer to apply.

Gradients reach the flat buffers because ``p.grad`` are views of them and autograd
accumulates in place; for a per-task gradient the views are re-pointed at row i of the
``[K, N]`` row matrix (zeroed once per step) for that one backward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.flat import copy_or_zero
from mtlsam_ext.optim.amp import Scaling
from mtlsam_ext.optim.batched import AGREE, BatchedError, point_losses, timer
from mtlsam_ext.optim.batchnorm import batch_statistics
from mtlsam_ext.optim.checks import finite_report
from mtlsam_ext.optim.closure import CONTRACT, accepts_task
from mtlsam_ext.optim.perturbation import global_local_coefs, safe_scale
from mtlsam_ext.optim.segments import by_rows, whole
from mtlsam_ext.optim.zeroth_order import zo_local_grads

if TYPE_CHECKING:
    from mtlsam_ext.optim.mtlsam import MTLSAM


# Checks longer than this enter the finiteness test as their (min, max): below it, copying
# them into the one concatenated check costs less than an extra reduction per vector.
_CHECK_WHOLE = 4096


@contextlib.contextmanager
def _closure_contract() -> Iterator[None]:
    """Autograd's "backward through the graph a second time" means the closure ran backward
    itself: say so in terms of the closure contract."""
    try:
        yield
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise ValueError(f"{CONTRACT} (autograd: {err})") from None
        raise


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of coefficients applied to a buffer of ``dtype`` (float32 unless float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a * b`` where either factor may be absent (``None`` = 1, and ``None * None = None``
    so that a step without loss scale or clipping multiplies by nothing at all)."""
    if a is None:
        return b
    return a if b is None else a * b


def _rescale(scale: Tensor | None, local_scale: Tensor | None) -> Tensor | None:
    """``scale / local_scale`` in float64 (``None`` = 1; ``None`` when both are absent)."""
    if scale is None and local_scale is None:
        return None
    num = torch.ones((), dtype=torch.float64) if scale is None else scale.double()
    return num if local_scale is None else num / local_scale.double().to(num.device)


def _clip_coef(max_norm: float, total_sq: Tensor) -> Tensor:
    """``clip_grad_norm_``'s factor ``min(1, max_norm / (||d|| + 1e-6))`` (float64)."""
    return (max_norm / (total_sq.sqrt() + 1e-6)).clamp(max=1.0)


class Run:
    """State of one step in flight: backups, finiteness checks, the loss scale and the undo
    path."""

    def __init__(self, opt: MTLSAM, closure: Callable[..., Any],
                 scaling: Scaling | None = None) -> None:
        self.opt = opt
        self.closure = closure
        self.task_aware = accepts_task(closure)
        self.scaling = scaling or Scaling()
        self.be = opt.ops_backend
        self.shared = opt.shared
        self.heads = opt.heads
        self.bn = opt.bn_running_stats
        self.sync = opt.sync
        self.global_sync = opt.sync is not None and opt.sync.global_perturb
        # Sharded shared parameters (FSDP2): the shards' gradients arrive averaged over the
        # ranks; times W they follow this module's convention of summed gradients.
        self.sharded = opt.shared.sharded
        self.shard_scale = float(opt.sync.world) if self.sharded else 1.0
        self.n_calls = 0
        self.checks: list[Tensor] = []
        self.unperturbed: Tensor | None = None
        self.perturbed_losses: list[Tensor] = []
        self.pass_losses: list[Tensor] = []  # (checked as one stack by all_finite)
        self.shared_saved = False
        self.heads_saved = False
        self.backup = opt.buffers("backup", 1)
        self.head_backup = opt.buffers("head_backup", 1, self.heads) if self.heads else []
        # Head directions and head results live outside .grad: a closure that zeroes the
        # model's gradients between tasks must not wipe another head's values.
        self.head_dir = opt.buffers("head_dir", 1, self.heads) if self.heads else []
        self.head_out = opt.buffers("head_out", 1, self.heads) if self.heads else []
        self.on_commit: list[Callable[[], None]] = []
        self.clock = timer(self.shared.device)
        self.phase: Any = None  # the gradient phase in flight (data parallelism)

    # -- closure and losses ---------------------------------------------------------------------
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
        out = self.opt.call_closure(self.closure, task if self.task_aware else None,
                                    self.task_aware, pick=None if self.task_aware else task)
        if first and not self.opt._graph_checked:
            self.opt.check_no_backward()
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
            return point_losses(self, points, first, randomness)

    def first_losses(self) -> list[Tensor]:
        losses = self.call()
        self.opt.check_graph(losses)
        self.k = len(losses)
        if self.sync is not None and not self.opt._sync_checked:
            sh, hd = self.shared, self.heads
            layout = [self.k, len(sh.layers)] + sh.global_numels() + (
                hd.global_numels() if hd is not None else [])
            self.sync.check_same("the number of tasks and the flat layout", layout, sh.device)
            self.opt._sync_checked = True
        self.unperturbed = torch.stack([loss.detach() for loss in losses])
        self.checks.append(self.unperturbed)
        return losses

    def perturbed_loss(self, i: int) -> Tensor:
        out = self.call(i)
        loss = out[0] if self.task_aware else out[i]
        detached = loss.detach()
        self.perturbed_losses.append(detached)
        self.pass_losses.append(detached)
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
        with torch.enable_grad(), _closure_contract():
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
        with torch.enable_grad(), _closure_contract():
            return torch.autograd.grad(self.scaling.scaled(loss), params, retain_graph=True,
                                       allow_unused=True)

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
                more += [h[0] for h in self.head_out]
        phase, self.phase = self.phase or self.sync.phase(), None
        phase.finish(more)

    def settle(self) -> None:
        """A failed step: wait for the collectives it launched (the ranks launched the same
        ones), so none still writes into a buffer the next step reuses."""
        phase, self.phase = self.phase, None
        if phase is not None:
            phase.wait()

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
            with torch.enable_grad(), _closure_contract():
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

    def true_gram(self, grams: list[Tensor], partial: bool = True) -> Tensor:
        """The Gram matrix of the true gradients from per-bucket Grams of the (scaled) rows:
        summed over buckets (and over the shards' ranks, unless ``partial=False`` says they
        were already), divided by ``S^2`` under a loss scale, added to the checks."""
        g = grams[0] if len(grams) == 1 else sum(x.double() for x in grams)
        if partial:
            g = self.partial_sum(g)
        f = self.scaling.factor(self.sync is not None)
        if f is not None:
            inv = 1.0 / f.double()
            g = (g.double() * (inv * inv)).to(g.dtype)
        self.checks.append(g.reshape(-1))
        return g

    def gram(self, rows: list[Tensor]) -> Tensor:
        return self.true_gram([ops.gram(r, backend=self.be) for r in rows])

    def aggregate(self, gram: Tensor) -> Tensor:
        w = self.opt.aggregate(gram)
        self.checks.append(w.reshape(-1))
        return w

    def weights(self, rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``M``'s weights for these rows, and the (true) Gram matrix they came from. LS and
        mean do not depend on G, so the Gram pass (K reads of the rows) is skipped and ``None``
        returned; the finiteness check then falls on the combined gradient (one read), see
        :meth:`finish_update`."""
        const = self.opt.constant_weights
        if const is None:
            g = self.gram(rows)
            return self.aggregate(g), g
        k = rows[0].shape[0]
        acc = torch.float64 if rows[0].dtype == torch.float64 else torch.float32
        return torch.full((k,), 1.0 / k if const == "mean" else 1.0, dtype=acc,
                          device=rows[0].device), None

    def _sumsq(self, bufs: list[Tensor]) -> Tensor:
        """``sum ||b||^2`` over flat buffers, in float64 (one fused read each)."""
        return sum(ops.segment_sumsq(t, whole(t.numel()), None, backend=self.be).double()
                   for t in bufs)

    def finish_update(self, rows: list[Tensor] | None, w: Tensor, gram: Tensor | None) -> None:
        """Shared gradient := ``sum_i w_i rows_i``, then the loss scale and clipping.

        ``rows=None``: the shared gradient already holds the update (one backward of
        ``sum_i w_i l_i``, see :func:`_weighted_backward`); ``1/S`` and the clip factor are then
        applied to it in one pass, only when there is one.

        Under a loss scale S the combine uses ``w / S`` and the heads' gradients are multiplied
        by ``1/S``. With ``max_grad_norm`` the update (shared and heads as one vector) is
        scaled by ``min(1, max_norm / (||d|| + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_``
        does. ``||d_shared||^2 = w^T G w`` comes from the Gram matrix the aggregator already
        used when there is one (the clip factor is then folded into the weights as well), and
        otherwise from one read of the combined gradient, which then also serves as its
        finiteness check.
        """
        clip = self.opt.max_grad_norm
        f = self.scaling.factor(self.sync is not None)
        inv = None if f is None else 1.0 / f.double()
        heads = [b.grad for b in self.heads.buckets] if self.heads is not None else []
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        heads_sq = zero
        if heads:
            if clip is not None:
                heads_sq = self._sumsq(heads)
                if inv is not None:
                    heads_sq = heads_sq * (inv * inv)
                self.checks.append(heads_sq.reshape(1))
            else:
                self.checks.extend(heads)
        coef = None
        if clip is not None and gram is not None:
            wd = w.double()
            coef = _clip_coef(clip, (wd @ gram.double() @ wd).clamp_min(0) + heads_sq)
        mult = _times(inv, coef)
        grads = [b.grad for b in self.shared.buckets]
        if rows is not None:
            w_eff = w if mult is None else (w.double() * mult).to(w.dtype)
            for r, g in zip(rows, grads):
                ops.combine_(g, r, w_eff, backend=self.be)
            post = None
        else:
            post = inv  # the update is in .grad already: its 1/S is one multiply
        if clip is not None and gram is None:
            sh_sq = self.partial_sum(self._sumsq(grads))
            if post is not None:
                sh_sq = sh_sq * (post * post)
            self.checks.append(sh_sq.reshape(1))
            coef = _clip_coef(clip, sh_sq + heads_sq)
            post = _times(post, coef)
        elif gram is None:
            self.checks.extend(grads)
        if post is not None:
            for g in grads:
                g.mul_(post.to(_acc(g.dtype)))
        head_mult = _times(inv, coef)
        if head_mult is not None:
            for g in heads:
                g.mul_(head_mult.to(_acc(g.dtype)))

    # -- norms ----------------------------------------------------------------------------------
    def _scale(self, b) -> Tensor | None:
        return b.data if self.opt.adaptive else None

    def global_coef(self, vecs: list[Tensor], rho: float) -> Tensor:
        """``rho / ||T v||`` over all buckets (0 for a zero vector)."""
        return self.global_coefs([vecs], rho)[0]

    def global_coefs(self, per_task: list[list[Tensor]], rho: float) -> Tensor:
        """``[K]``: :meth:`global_coef` of each task's per-bucket vectors; sharded, the K
        partial sums travel in one collective."""
        sq = torch.stack([sum(ops.segment_sumsq(v, whole(v.numel()), self._scale(b),
                                                backend=self.be).double()
                              for v, b in zip(vecs, self.shared.buckets))
                          for vecs in per_task])
        return safe_scale(rho, self.partial_sum(sq).sqrt())

    def row_coefs(self, rows: list[Tensor], k: int, rho: float) -> Tensor:
        """``[K]``: :meth:`global_coef` of rows ``0..K-1`` of the ``[R, N_b]`` row matrices,
        one fused read of the K rows per bucket (each row one segment: the same bits as one
        call per row) instead of K calls."""
        if self.opt.adaptive:  # (the scale has one row's length)
            return self.global_coefs([[r[i] for r in rows] for i in range(k)], rho)
        sq = sum(ops.segment_sumsq(r[:k].reshape(-1), by_rows(k, r.shape[1]), None,
                                   backend=self.be).double() for r in rows)
        return safe_scale(rho, self.partial_sum(sq).sqrt())

    def head_coefs(self) -> Tensor:
        """``rho_heads / ||T g_ns^i||`` per head, from the heads' current gradients, which are
        kept as the heads' perturbation directions."""
        h = self.heads
        sq = torch.zeros(len(h.layers), dtype=torch.float64, device=h.device)
        for j, (b, seg) in enumerate(zip(h.buckets, h.segment_layers())):
            self.head_dir[j][0].copy_(b.grad)
            s = ops.segment_sumsq(b.grad, b.seg_offsets, b.data if self.opt.adaptive else None,
                                  backend=self.be)
            sq.index_add_(0, seg, s.double())
        return safe_scale(self.opt.rho_heads, sq.sqrt())

    # -- perturbation -------------------------------------------------------------------------
    def perturb_shared(self, directions: list[Tensor], coefs: list[Tensor],
                       offsets: list[Tensor], local: list[Tensor | None] | None = None,
                       local_coefs: list[Tensor] | None = None,
                       tables: list[tuple[Tensor, Tensor, Tensor, int]] | None = None) -> None:
        first = not self.shared_saved
        for j, b in enumerate(self.shared.buckets):
            kw: dict[str, Any] = {}
            if local is not None and local[j] is not None and tables[j][0].numel():
                st, ln, ls, _ = tables[j]
                kw = dict(local=local[j], local_coef=local_coefs[j], starts=st, lengths=ln,
                          local_starts=ls)
            ops.mix_perturb_(b.data, self.backup[j][0], directions[j],
                             coefs[j].to(b.dtype if b.dtype == torch.float64 else torch.float32),
                             offsets[j], adaptive=self.opt.adaptive, save_backup=first,
                             backend=self.be, **kw)
        self.shared_saved = True

    def restore_shared(self) -> None:
        if self.shared_saved:
            for j, b in enumerate(self.shared.buckets):
                ops.restore_(b.data, self.backup[j][0], backend=self.be)
            self.shared_saved = False
            self.shared.push()  # sharded: the shards hold theta again

    def save_heads(self) -> None:
        if self.heads is not None and not self.heads_saved:
            for j, b in enumerate(self.heads.buckets):
                self.head_backup[j][0].copy_(b.data)
            self.heads_saved = True

    def perturb_heads(self, coef: Tensor, zero_grad_after: bool = True) -> None:
        """Every head i at its own point, ``backup + coef_i T^2 g_ns^i`` (the directions kept
        by :meth:`head_coefs`), in one op per bucket with per-head coefficients, and the heads'
        gradients zeroed so each pass leaves its head's SAM gradient there. Head i reaches
        loss i only, so all heads can sit at their points for the whole set of passes: the
        same values as one op per task, K - 1 op calls and zero fills fewer per step."""
        if self.heads is None:
            return
        self.save_heads()
        for j, (b, seg) in enumerate(zip(self.heads.buckets, self.heads.segment_layers())):
            acc = torch.float64 if b.dtype == torch.float64 else torch.float32
            ops.mix_perturb_(b.data, self.head_backup[j][0], self.head_dir[j][0],
                             coef.to(acc)[seg], b.seg_offsets,
                             adaptive=self.opt.adaptive, save_backup=False, backend=self.be)
            if zero_grad_after:
                b.grad.zero_()

    def finish_head(self, i: int) -> None:
        """Keep head i's SAM gradient (from the backward just run). Head i stays perturbed
        until :meth:`heads_to_grad`: no later pass uses loss i, the only loss it reaches, so
        all heads are restored at once there instead of one restore per task."""
        if self.heads is None or not self.heads_saved:
            return
        dst, src = self.opt.head_views(self.head_out, i)
        torch._foreach_copy_(dst, src)

    def heads_to_grad(self) -> None:
        """Heads restored; their gradients := the SAM gradients kept by :meth:`finish_head`
        (every head's parameters pointed at the flat gradient again: a perturbed pass
        re-attaches only its own head after the closure)."""
        if self.heads is not None:
            self.heads.attach_grads()
            if self.heads_saved:
                for j, b in enumerate(self.heads.buckets):
                    ops.restore_(b.data, self.head_backup[j][0], backend=self.be)
                self.heads_saved = False
            for j, b in enumerate(self.heads.buckets):
                b.grad.copy_(self.head_out[j][0])

    def restore_all(self) -> None:
        self.restore_shared()
        if self.heads is not None and self.heads_saved:
            for j, b in enumerate(self.heads.buckets):
                ops.restore_(b.data, self.head_backup[j][0], backend=self.be)
            self.heads_saved = False

    # -- end of step ----------------------------------------------------------------------------
    def all_finite(self) -> Tensor:
        """True (a 0-d bool tensor) when every value the step checks is finite.

        One isfinite over all the step's small check vectors (losses, Gram, weights, norms)
        instead of one per vector: 2K + 3 small ops fewer per step. A large buffer (the
        combined gradient with LS/mean, the heads' gradients) enters as its ``aminmax``: one
        read with no temporary, NaN if any element is NaN and +-inf if any is infinite.
        ``torch.isfinite(x).all()`` on the MLP's 214k-element gradient took 467 us against
        aminmax's 37 us, and 41 ms against 1.8 ms on ResNet-18's 11M (this 2-core CPU)."""
        flat = [torch.stack(self.pass_losses)] if self.pass_losses else []
        for c in self.checks:
            if c.numel() > _CHECK_WHOLE:
                flat.extend(torch.aminmax(c.reshape(-1)))
            elif c.numel():
                flat.append(c.reshape(-1))
        dt = torch.float64 if any(c.dtype == torch.float64 for c in flat) else torch.float32
        return torch.isfinite(torch.cat([c.reshape(-1).to(dt) for c in flat])).all()

    def nonfinite_message(self) -> str:
        parts = [finite_report(list(self.unperturbed), "loss")]
        if self.perturbed_losses:
            bad = [i for i, v in enumerate(self.perturbed_losses)
                   if not bool(torch.isfinite(v).all())]
            if bad:
                parts.append(f"loss at the perturbed point not finite for task(s) {bad}")
        msg = "; ".join(p for p in parts if p)
        if not msg and self.sync is not None and bool(self.all_finite()):
            msg = "on another rank"
        return ("non-finite values in the step (" + (msg or "gradients, Gram matrix or "
                "aggregator weights are NaN/Inf") + "); parameters left unchanged")

    def end_passes(self) -> None:
        """After the last backward of a successful step: BatchNorm statistics back to the
        values the first forward left (the last forward's update is undone here)."""
        if self.bn and self.n_calls > 1:
            self.bn.restore("first")

    def commit(self) -> None:
        for fn in self.on_commit:
            fn()


# -- methods ------------------------------------------------------------------------------------
def _per_task_rows(run: Run, losses: list[Tensor], rows: list[Tensor], first_row: int = 0
                   ) -> None:
    """Rows ``first_row + i`` := the shared gradient of ``losses[i]`` (K backward passes, or
    one batched backward with ``batched_grads``).

    Heads accumulate across the passes, which leaves head i with its own gradient since only
    loss i reaches it (checked on the first step).
    """
    k = len(losses)
    state = run.grads_state()
    if state == "batched" and run.batched_rows(losses, rows, first_row):
        return
    trial = None
    if state == "trial":  # batched = "auto": both ways (batched first, the graph is kept)
        trial = _trial_grads(run, losses, rows)
        t0 = run.clock()
    for r in rows:  # the backward passes accumulate straight into the rows
        r[first_row:first_row + k].zero_()
    for i, loss in enumerate(losses):
        run.backward_into(loss, rows, first_row + i, retain_graph=i < k - 1)
        if trial is None:  # (a trial compares the rows first: they are sent at the end)
            run.row_ready(i)
    if trial is not None:
        run.opt.batched.record("grads", "sequential", run.clock() - t0)
        _agree(run, "grads", [r[first_row:first_row + k] for r in rows], trial)


def _trial_grads(run: Run, losses: list[Tensor], rows: list[Tensor]) -> list[Tensor] | None:
    """``batched="auto"`` trial of the batched cotangents: the shared rows into scratch
    buffers (the heads are left to the sequential passes), timed."""
    t0 = run.clock()
    got = run.batched_task_grads(losses, run.shared.ordered_params())
    if got is None:
        return None
    scratch = [t[:len(losses)] for t in run.opt.buffers("rows_trial", len(losses))]
    run.shared.copy_batched(scratch, 0, len(losses), got)
    run.opt.batched.record("grads", "batched", run.clock() - t0)
    return scratch


def _agree(run: Run, phase: str, want: list[Tensor], got: list[Tensor] | None,
           heads: bool = False) -> None:
    """``batched="auto"``: a trial whose batched result differs from the sequential one (beyond
    rounding, :data:`AGREE`) turns the phase off; trial buffers go once the phase is decided."""
    policy = run.opt.batched
    if got is not None and policy.state(phase) == "trial":
        pairs = list(zip(want, got))
        if heads and run.heads is not None:
            pairs += [(h[0], b.grad) for h, b in zip(run.head_out, run.heads.buckets)]
        for a, b in pairs:
            if not a.numel():
                continue
            # per row (task), the norm of the difference against the row's norm: rounding in
            # another summation order stays orders below AGREE; a different computation
            # (random ops, changed state) is off by O(1). (The largest element difference
            # against the largest element, checked before, flagged fp32 grouped convolutions
            # of the CNN at K = 40: 4.6e-4.)
            a2, b2 = (t.double().reshape(t.shape[0] if t.dim() == 2 else 1, -1) for t in (a, b))
            rel = float(((a2 - b2).norm(dim=1) / a2.norm(dim=1).clamp_min(1e-30)).max())
            if not rel <= AGREE[a.dtype]:
                policy.fall_back(phase, f"the batched {phase} differ from the sequential ones "
                                 f"(relative error {rel:.3g} in a task's gradient; random ops "
                                 "or state changed by the closure?)")
                break
    _trial_buffers_freed(run)


def _trial_buffers_freed(run: Run) -> None:
    """Trial buffers go once every phase is decided."""
    policy = run.opt.batched
    if all(policy.state(p) != "trial" for p in ("points", "grads")):
        run.opt._buffers.pop("rows_trial", None)
        if policy.state("points") != "batched":
            run.opt._buffers.pop("points", None)


def _sam_passes(run: Run, dirs: list[Tensor], coefs: list[Tensor], offs: list[Tensor],
                rows: list[Tensor], first_row: int, hc: Tensor | None,
                local: list[Tensor] | None = None, local_coefs: list[Tensor] | None = None,
                tables: list | None = None, summed: bool = False,
                split: tuple[list[Tensor], list[int]] | None = None) -> None:
    """The K perturbed passes: rows ``first_row + i`` := the shared gradient of loss i at
    ``theta + eps_i`` (``eps_i`` from row ``i`` of ``coefs`` / ``local_coefs`` / ``local`` and
    the direction ``dirs[b][i]``, or ``dirs[b][0]`` for all), head i's SAM gradient kept by
    :meth:`Run.finish_head`; the shared parameters are left perturbed (or not) for the
    caller's :meth:`Run.restore_shared`. Sequential passes, or one batched pass
    (:mod:`mtlsam_ext.optim.batched`), per ``batched``.

    ``summed`` (sequential passes only, see :func:`_summed`): every pass accumulates into row
    ``first_row``, which ends as ``sum_i g_i^SAM``; with ``split = (locals, layers)`` the
    gradients of those layers go to row ``i`` of the compact ``locals`` instead (gl-lagged's
    next local gradients) and row ``first_row`` sums the other layers only."""
    k = run.k
    state = run.opt.batched.state("points")
    # the kernels take their coefficients in the accumulation dtype: converted once here,
    # not per task and bucket inside the loop
    accs = [_acc(b.dtype) for b in run.shared.buckets]
    coefs = [c.to(a) for c, a in zip(coefs, accs)]
    if local_coefs is not None:
        local_coefs = [c.to(a) for c, a in zip(local_coefs, accs)]
    if state == "batched":  # (never summed: _summed asks for sequential passes)
        _batched_sam_passes(run, dirs, coefs, offs, rows, first_row, hc, local, local_coefs,
                            tables)
        return
    t0 = run.clock() if state == "trial" else 0.0
    for r in rows:  # the SAM passes accumulate straight into the rows (or the one sum)
        r[first_row:first_row + (1 if summed else k)].zero_()
    for loc in split[0] if split is not None else []:
        loc.zero_()
    if hc is not None:  # every head at its own task's point; no other loss reaches it
        run.perturb_heads(hc)
    for i in range(k):
        _perturb_task(run, i, dirs, coefs, offs, local, local_coefs, tables)
        loss = run.perturbed_loss(i)
        if split is not None:
            run.backward_split(loss, rows, split[0], i, split[1])
        else:
            run.backward_into(loss, rows, first_row if summed else first_row + i)
        run.finish_head(i)
        if state != "trial" and not summed:  # (a trial compares the rows first: they are
            run.row_ready(i)                 # sent at the end; the sum is final at the end)
    if summed:
        run.row_ready(0)
    if state == "trial":  # batched = "auto": the batched way too, into scratch rows
        policy = run.opt.batched
        if summed or not _summable(run):
            # the sequential way timed as the steady state runs it: with LS / mean that is the
            # summed passes (second trial step on), not the rows the first step compares
            policy.record("points", "sequential", run.clock() - t0)
        scratch = [t[:k] for t in run.opt.buffers("rows_trial", k)]
        t0 = run.clock()
        try:
            _batched_sam_passes(run, dirs, coefs, offs, scratch, 0, hc, local, local_coefs,
                                tables, trial=True)
        except BatchedError as err:
            policy.fall_back("points", str(err))
            scratch = None
        else:
            policy.record("points", "batched", run.clock() - t0)
        # (the heads' gradients the trial left are overwritten by heads_to_grad)
        if summed:
            _trial_buffers_freed(run)
        else:
            _agree(run, "points", [r[first_row:first_row + k] for r in rows], scratch,
                   heads=True)
            policy.phases["points"].checked = True


def _perturb_task(run: Run, i: int, dirs: list[Tensor], coefs: list[Tensor],
                  offs: list[Tensor], local: list[Tensor] | None,
                  local_coefs: list[Tensor] | None, tables: list | None) -> None:
    """The shared parameters at task ``i``'s point (see :func:`_sam_passes`)."""
    run.perturb_shared([d[0 if d.shape[0] == 1 else i] for d in dirs], [c[i] for c in coefs],
                       offs, local=None if local is None else [loc[i] for loc in local],
                       local_coefs=None if local_coefs is None else [c[i] for c in local_coefs],
                       tables=tables)


def _summed(run: Run) -> bool:
    """Whether the update can be taken from the sum of the SAM gradients, accumulated by the K
    sequential passes in one buffer: LS and mean weigh every task's SAM gradient by a constant
    (``d = w sum_i g_i^SAM``, ``w`` = 1 or 1/K), so the ``[K, N]`` SAM rows, their zeroing and
    the K-row combine are not needed (F-MTL with ``decompose``: ``sum_i g_loss_i + sum_i
    g_flat_i`` is the same sum). Equal to the row-wise update to rounding, not to the bit.
    Rows are still kept where something else reads them: batched passes (and the first step
    of a ``batched="auto"`` trial, which compares the batched rows with sequential ones), layer
    scores (per-layer Grams), gl-lagged's local gradients when the layers change or the ranks
    exchange rows (with fixed layers in one process only the sampled layers keep per-task
    rows, see :func:`_lagged_summed`). 16-bit parameters keep the rows too: autograd adds
    into a gradient of the parameters' dtype, so the sum would be rounded to bf16/fp16 after
    each of the K passes, where the combine sums the rows in float32 and rounds once."""
    phase = run.opt.batched.phases["points"]
    # batched="auto": the first trial step compares the batched rows with sequential ones; the
    # later trial steps run (and time) the summed passes the sequential steps would run
    return _summable(run) and (phase.state == "sequential"
                               or (phase.state == "trial" and phase.checked))


def _summable(run: Run) -> bool:
    """:func:`_summed` apart from the batched passes: the configuration would sum the SAM
    gradients whenever the K perturbed passes run sequentially."""
    opt = run.opt
    if any(b.dtype not in (torch.float32, torch.float64) for b in run.shared.buckets):
        return False
    if opt.method == "gl" and opt.local_grad == "lagged":
        # the next step's local gradients come from this step's SAM gradients on the sampled
        # layers: kept per task by the split passes (:func:`_lagged_summed`), where the
        # selection cannot change and no collective is needed; rows otherwise
        if opt.layer_selector.mode is not None or run.sync is not None:
            return False
    return (opt.constant_weights is not None and opt.batched.state("points") != "batched"
            and not opt.layer_selector.measures)


def _finish_summed(run: Run, sums: list[Tensor]) -> None:
    """Shared gradient := ``w * sum_i g_i^SAM`` (row 0 of ``sums``), ``w`` = 1 (LS) or 1/K
    (mean), then the loss scale and clipping (:meth:`Run.finish_update`)."""
    k = run.k
    acc = torch.float64 if sums[0].dtype == torch.float64 else torch.float32
    w = torch.full((1,), 1.0 / k if run.opt.constant_weights == "mean" else 1.0, dtype=acc,
                   device=sums[0].device)
    run.finish_update([r[:1] for r in sums], w, None)


def _lagged_summed(run: Run, sums: list[Tensor], nxt: list[Tensor], sampled: list[int]) -> None:
    """End of a gl-lagged step with LS / mean and a fixed layer selection: the split passes
    left ``sum_i g_i^SAM`` on the other layers in ``sums`` and each task's SAM gradient on the
    sampled layers in ``nxt``. Their sums go into ``sums``' sampled columns (one K-row combine
    over the compact columns), then the update as :func:`_finish_summed`. With LS this is the
    row-wise update bit for bit (the same sums in the same order); the ``[K, N]`` rows, their
    zeroing, the K-row combine over the other layers and the copy of the sampled columns into
    the lag are not needed: on commit ``nxt`` becomes the lag (no copy) and the old lag the
    next step's ``nxt``."""
    opt = run.opt
    runs = opt.sampled_runs(sampled)
    for s_row, loc, rb in zip(sums, nxt, runs):
        if not rb:
            continue
        acc = torch.float64 if loc.dtype == torch.float64 else torch.float32
        col = torch.empty(loc.shape[1], dtype=loc.dtype, device=loc.device)
        ops.combine_(col, loc, torch.ones(loc.shape[0], dtype=acc, device=loc.device),
                     backend=run.be)
        for s, n, q in rb:
            s_row[0, s:s + n].copy_(col[q:q + n])
    _finish_summed(run, sums)

    def swap() -> None:
        # the SAM gradients of the (unchanged) sampled layers are the next step's lag
        opt._buffers["lag"], opt._buffers["lag_next"] = nxt, opt._buffers.get("lag")
        if opt._buffers["lag_next"] is None:
            del opt._buffers["lag_next"]
        _lag_kept(run, sampled)

    run.on_commit.append(swap)


def _lag_kept(run: Run, layers: list[int]) -> None:
    """The lag now holds this step's SAM gradients on ``layers``, kept as computed (scaled:
    fp16 rows would lose small values if unscaled) with the scale they carry; the next step
    rescales its statistics by the ratio."""
    opt = run.opt
    opt._lag_layers = tuple(layers)
    opt._lag_scale = run.scaling.factor(run.sync is not None)
    opt._lag_valid = True


def _batched_sam_passes(run: Run, dirs: list[Tensor], coefs: list[Tensor], offs: list[Tensor],
                        rows: list[Tensor], first_row: int, hc: Tensor | None,
                        local: list[Tensor] | None, local_coefs: list[Tensor] | None,
                        tables: list | None, trial: bool = False) -> None:
    """:func:`_sam_passes` as batched passes of ``task_chunk`` points: the points written by
    :func:`ops.perturb_points_`, one vmapped forward, one backward into the rows."""
    opt, k, sh = run.opt, run.k, run.shared
    chunk = min(k, opt.batched.task_chunk or k)
    points = opt.buffers("points", chunk)
    if hc is not None:  # every head at its own task's point; no other loss reaches it
        run.perturb_heads(hc)
    randomness = "error" if opt.batched.mode == "auto" else "different"
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        pts, dsts = [], []
        for j, b in enumerate(sh.buckets):
            acc = _acc(b.dtype)
            theta = run.backup[j][0] if run.shared_saved else b.data
            has_local = local is not None and tables[j][0].numel() > 0
            st, ln, ls, _ = tables[j] if has_local else (None, None, None, None)
            d = dirs[j] if dirs[j].shape[0] == 1 else dirs[j][c0:c1]
            out = points[j][:c1 - c0]
            ops.perturb_points_(out, theta, d, coefs[j][c0:c1].to(acc), offs[j],
                                local[j][c0:c1] if has_local else None,
                                local_coefs[j][c0:c1].to(acc) if has_local else None, st, ln,
                                ls, adaptive=opt.adaptive, backend=run.be)
            pts.append(out)
            dst = rows[j][first_row + c0:first_row + c1]
            dst.zero_()
            dsts.append(dst)
        losses = run.call_points(sh.point_leaves(pts, dsts), c0, randomness)
        with torch.enable_grad():
            total = losses.sum()
        with warnings.catch_warnings():
            # The rows' column blocks are strided views; autograd adds into them in place
            # all the same, and says that a dense layout "may" be faster.
            warnings.filterwarnings("ignore", message="grad and param do not obey")
            run.backward(total)
        if not trial:
            run.perturbed_losses.extend(losses.detach().unbind(0))
            run.checks.append(losses.detach())
    if not trial:
        for i in range(k):
            run.finish_head(i)


def _finish(run: Run, rows: list[Tensor]) -> None:
    run.finish_update(rows, *run.weights(rows))


def _weighted_backward(run: Run, losses: list[Tensor]) -> None:
    """LS and mean: ``d = sum_i w_i g_i`` with constant ``w`` is the gradient of
    ``sum_i w_i l_i``, so one backward replaces K (and the rows, the combine and the Gram).

    Head i still gets its own ``grad l_i``: with ``mean`` its ``1/K`` is undone on the heads'
    (small) buffers. The result equals the K-row combine to rounding, not to the bit.
    """
    k = len(losses)
    w = 1.0 / k if run.opt.constant_weights == "mean" else 1.0
    with torch.enable_grad():
        total = sum(losses) if w == 1.0 else sum(w * loss for loss in losses)
    run.backward(total)
    if w != 1.0 and run.heads is not None:
        for b in run.heads.buckets:
            b.grad.mul_(k)


def _finish_weighted(run: Run) -> None:
    """End of a one-backward step: the shared gradient holds the update already."""
    run.reduce(run.grads(), head_grads=True)
    acc = torch.float64 if run.shared.buckets[0].dtype == torch.float64 else torch.float32
    run.finish_update(None, torch.ones(run.k, dtype=acc, device=run.shared.device), None)


def step_erm(run: Run) -> Tensor:
    """No perturbation: per-task gradients, then ``d = M(g_1..g_K)`` (the cost baseline); one
    backward of the weighted loss for LS and mean."""
    losses = run.first_losses()
    run.zero_all()
    if run.opt.constant_weights is not None:
        _weighted_backward(run, losses)
        _finish_weighted(run)
        return run.unperturbed
    rows = run.opt.buffers("rows", run.k)
    run.begin_phase(rows)
    _per_task_rows(run, losses, rows)
    run.reduce([], head_grads=True)
    _finish(run, rows)
    return run.unperturbed


def step_sam(run: Run) -> Tensor:
    """SAM on ``l_0 = sum w_i l_i`` (Foret et al. eq. 2), then ``M`` of the per-task gradients
    at the perturbed point; heads perturbed by their own normalised gradients."""
    opt = run.opt
    losses = run.first_losses()
    run.zero_all()
    run.backward(run.average_loss(losses))
    if run.global_sync:
        run.reduce(run.grads(), head_grads=True)
    coef = run.global_coef(run.grads(), opt.rho)
    hc = run.head_coefs() if run.heads is not None else None
    offs = [whole(b.numel) for b in run.shared.buckets]
    run.perturb_shared(run.grads(), [coef.reshape(1)] * len(offs), offs)
    if hc is not None:
        run.perturb_heads(hc)
    run.zero_shared()
    pert = run.call()
    run.perturbed_losses.extend(x.detach() for x in pert)
    run.checks.append(torch.stack([x.detach() for x in pert]))
    if opt.constant_weights is not None:  # one backward at the perturbed point
        _weighted_backward(run, pert)
        run.restore_all()
        _finish_weighted(run)
        return run.unperturbed
    rows = opt.buffers("rows", run.k)
    run.begin_phase(rows)
    _per_task_rows(run, pert, rows)
    run.reduce([], head_grads=True)
    run.restore_all()
    _finish(run, rows)
    return run.unperturbed


def step_fmtl(run: Run) -> Tensor:
    """F-MTL (Phan et al., Alg. 1): per task ``g_loss``, ``eps_i = rho g_loss/||g_loss||``,
    ``g_SAM`` at ``theta + eps_i``, ``g_flat = g_SAM - g_loss``; shared update
    ``M(g_loss) + M(g_flat)`` (``decompose``) or ``M(g_SAM)``. Rows 0..K-1 hold the loss
    gradients, rows K..2K-1 the SAM (then flat) gradients: (2K + 1) |theta_sh| with the backup
    (LS / mean: the K loss rows and one summed row, (K + 2) |theta_sh|, see :func:`_summed`).
    """
    opt = run.opt
    losses = run.first_losses()
    k = run.k
    summed = _summed(run)  # LS / mean: the SAM gradients summed in one buffer, no SAM rows
    rows = opt.buffers("rows", k) if summed else opt.buffers("rows2", 2 * k)
    run.zero_all()
    if run.global_sync:  # the loss rows travel while the later tasks' passes run
        run.begin_phase([r[:k] for r in rows])
    _per_task_rows(run, losses, rows)
    if run.global_sync:
        run.reduce([], head_grads=True)
    hc = run.head_coefs() if run.heads is not None else None
    offs = [whole(b.numel) for b in run.shared.buckets]
    coefs = run.row_coefs(rows, k, opt.rho)
    if summed:  # K loss rows, one summed row and the backup: (K + 2) |theta_sh|
        sums = opt.buffers("sam_sum", 1)
        run.begin_phase(sums)
        _sam_passes(run, rows, [coefs.reshape(k, 1)] * len(offs), offs, sums, 0, hc,
                    summed=True)
        run.restore_shared()
        run.reduce([], head_out=True)
        run.heads_to_grad()
        _finish_summed(run, sums)
        return run.unperturbed
    # SAM rows (and, with local perturbations, the loss rows too) in one phase; task i's
    # loss row is its direction, read by its own pass only, so it may travel after that pass
    run.begin_phase([r[k:] for r in rows] if run.global_sync
                    else [r[:k] for r in rows] + [r[k:] for r in rows])
    _sam_passes(run, [r[:k] for r in rows], [coefs.reshape(k, 1)] * len(offs), offs, rows, k,
                hc)
    run.restore_shared()
    run.reduce([], head_out=True)
    run.heads_to_grad()
    if opt.decompose:
        # Two K x K Grams rather than one 2K x 2K: the loss block then has exactly the bits
        # ERM computes, so rho = 0 reproduces ERM's update (the cross block is never used).
        w_loss, _ = run.weights([r[:k] for r in rows])
        if opt.constant_weights is None:
            # flat = SAM - loss in place, its Gram taken in the same pass
            w_flat = run.aggregate(run.true_gram(
                [ops.flat_gram_(r[k:], r[:k], backend=run.be) for r in rows]))
        else:
            for r in rows:
                ops.sub_(r[k:], r[:k], backend=run.be)
            w_flat, _ = run.weights([r[k:] for r in rows])
        # No Gram of the whole update (the loss/flat cross block is never formed): a clip
        # norm, if asked for, is read from the combined gradient.
        run.finish_update(rows, torch.cat([w_loss, w_flat.to(w_loss.dtype)]), None)
    else:
        sam_rows = [r[k:] for r in rows]
        _finish(run, sam_rows)
    return run.unperturbed


def step_gl(run: Run) -> Tensor:
    """Global-local sampled SAM (report Alg. 1, docs/design.md §1a): one average-loss gradient g0,
    task-local gradients on the sampled layers only, per-layer mixed and magnitude-matched
    perturbations, then K SAM gradients and ``d = M(g_1^SAM..g_K^SAM)``."""
    opt = run.opt
    sh = run.shared
    losses = run.first_losses()
    k = run.k
    sampled = opt.sampled_layers
    tables = opt.sampled_tables(sampled)
    lag = opt._buffers.get("lag")
    # The lag holds the layers chosen for this step (stored at the previous step's commit);
    # after a change of selection without that history, the step uses autograd.
    if opt.local_grad == "lagged" and opt._lag_valid and lag is not None \
            and opt._lag_layers == tuple(sampled) \
            and all(t.shape == (k, tb[3]) for t, tb in zip(lag, tables)):
        local = lag  # the previous step's SAM gradients on the sampled layers
        local_scale = opt._lag_scale  # the factor of the step that computed them
    elif opt.local_grad == "zo":
        local = []  # after g0: the zo forwards must not run before the first graph's backward
        # differences of the closure's unscaled losses (summed over ranks in global sync)
        local_scale = run.scaling.world if run.global_sync else None
    else:
        local_scale = run.scaling.factor(run.global_sync)
        # every column is written below (a copy per sampled parameter, zeros for one a loss
        # does not reach), except by the sharded path, which adds into the rows. Reused from
        # step to step with local_grad="autograd"; gl-lagged comes here only without a usable
        # lag (first step, new selection): kept, its [K, M] would outlive its use (+5.9 MB
        # on the main job's MLP)
        specs = [((k, t[3]), b.dtype) for t, b in zip(tables, sh.buckets)]
        local = opt.scratch("local", specs) if opt.local_grad == "autograd" else \
            [torch.empty(s, dtype=d, device=sh.device) for s, d in specs]
        if run.sharded:
            for loc in local:
                loc.zero_()
        params_s = sh.layer_params(sampled)
        state = run.grads_state()
        trial = got = None
        if state in ("batched", "trial"):
            # (the clock waits for the device: only an "auto" trial reads it)
            t0 = run.clock() if state == "trial" else 0.0
            got = run.batched_task_grads(losses, params_s)
            if got is not None:  # [K, *shape] per parameter, one batched backward
                if state == "trial":  # batched = "auto": into scratch, then sequential too
                    trial = [torch.zeros_like(t) for t in local]
                copy_or_zero(sh.local_batched_views(local if trial is None else trial,
                                                     sampled), got)
                if trial is not None:
                    opt.batched.record("grads", "batched", run.clock() - t0)
        if trial is not None or got is None:  # sequential (also after a failed batched try)
            t0 = run.clock() if trial is not None else 0.0
            if run.global_sync and trial is None:  # travel during the later passes and g0's
                run.begin_phase(local)
            for i in range(k):
                if run.sharded:
                    run.backward_local(losses[i], local, i, sampled)
                    continue
                got = run.task_grads(losses[i], params_s)
                copy_or_zero(sh.local_views(local, i, sampled), got)
                run.row_ready(i)
            if trial is not None:
                opt.batched.record("grads", "sequential", run.clock() - t0)
                _agree(run, "grads", local, trial)
    run.zero_all()
    run.backward(run.average_loss(losses))
    g0 = opt.buffers("g0", 1)
    for j, b in enumerate(sh.buckets):
        g0[j][0].copy_(b.grad)
    if run.global_sync:  # g0, the heads' gradients and exact local gradients: one phase
        begun = run.phase is not None  # (the local rows, already on their way)
        exact_local = [] if opt.local_grad == "zo" or local is lag or begun else local
        run.reduce([g[0] for g in g0] + list(exact_local), head_grads=True)
    hc = run.head_coefs() if run.heads is not None else None
    if opt.local_grad == "zo" and not local:
        # Forward-only estimates after the first graph is consumed: a forward updates
        # BatchNorm buffers in place, which the first graph's backward would refuse.
        local = zo_local_grads(run, tables, sum_over_ranks=run.global_sync)

    n_layers = len(sh.layers)
    dev = sh.device
    layer_sq = torch.zeros(n_layers, dtype=torch.float64, device=dev)
    dots = torch.zeros(k, n_layers, dtype=torch.float64, device=dev)
    loc_sq = torch.zeros_like(dots)
    seg_layers = sh.segment_layers()
    samp_layers, mask = opt.sampled_index(sampled)
    for j, b in enumerate(sh.buckets):
        scale = b.data if opt.adaptive else None
        layer_sq.index_add_(0, seg_layers[j], ops.segment_sumsq(
            g0[j][0], b.seg_offsets, scale, backend=run.be).double())
        st, ln, ls, _ = tables[j]
        ids = samp_layers[j]
        if st.numel():
            d, q = ops.gl_layer_stats(g0[j][0], local[j], st, ln, ls, scale, backend=run.be)
            dots.index_add_(1, ids, d.double())
            loc_sq.index_add_(1, ids, q.double())
    layer_sq, dots, loc_sq = run.partial_sums(layer_sq, dots, loc_sq)  # (sharded: summed)
    rescale = _rescale(run.scaling.factor(run.global_sync), local_scale)
    if rescale is not None:
        # g0 carries this step's loss scale S, the local gradients the scale S' they were
        # computed with: <g0, r ghat> and ||r ghat||^2 with r = S / S' put them on g0's scale
        # (the perturbation is invariant to a scale common to g0 and ghat).
        dots *= rescale
        loc_sq *= rescale * rescale
    coef_a, coef_b = global_local_coefs(layer_sq, dots, loc_sq, mask, opt.rho, opt.alpha,
                                        opt.norm)
    if rescale is not None:
        coef_b = coef_b * rescale  # B (r ghat) with ghat as stored

    summed = _summed(run)  # LS / mean: the SAM gradients summed in one buffer, no rows
    lagged_summed = summed and opt.local_grad == "lagged"
    rows = opt.buffers("sam_sum", 1) if summed else opt.buffers("rows", k)
    run.begin_phase(rows)
    offs = [b.seg_offsets for b in sh.buckets]
    # every task's per-segment coefficients gathered once (one index per bucket, not per task)
    ca = [coef_a[:, s] for s in seg_layers]
    cb = [coef_b[:, ids] for ids in samp_layers]
    # the compact [K, M_b] rows the split passes write the next step's local gradients into
    # (two sets alternate with the lag the step reads, see _lagged_summed)
    nxt = opt.scratch("lag_next", [((k, tb[3]), b.dtype) for tb, b in zip(tables, sh.buckets)]
                      ) if lagged_summed else None
    _sam_passes(run, g0, ca, offs, rows, 0, hc, local=local, local_coefs=cb, tables=tables,
                summed=summed, split=None if nxt is None else (nxt, sampled))
    run.restore_shared()
    run.reduce([], head_out=True)
    run.heads_to_grad()
    selector = opt.layer_selector
    if lagged_summed:
        _lagged_summed(run, rows, nxt, sampled)
        run.on_commit.append(lambda: selector.commit(opt.generator))
        return run.unperturbed
    if summed:
        _finish_summed(run, rows)
    elif selector.measures:
        # Per-layer Grams for the layer scores; their sum is the aggregator's Gram matrix, so
        # the pass replaces the Gram pass (with LS/mean it is an extra read of the rows).
        layer_gram = torch.zeros(len(sh.layers), k, k, dtype=torch.float64, device=sh.device)
        grams = []
        for r, b, seg in zip(rows, sh.buckets, seg_layers):
            sg = ops.segment_gram(r, b.seg_offsets, backend=run.be)
            layer_gram.index_add_(0, seg, sg.double())
            grams.append(sg.sum(0))
        layer_gram, *grams = run.partial_sums(layer_gram, *grams)  # (sharded: summed)
        selector.observe(layer_gram)
        g = run.true_gram(grams, partial=False)
        w = run.aggregate(g) if opt.constant_weights is None else run.weights(rows)[0]
        run.finish_update(rows, w, g)
    else:
        _finish(run, rows)
    run.on_commit.append(lambda: selector.commit(opt.generator))

    if opt.local_grad == "lagged":

        def keep_lagged() -> None:
            # Next step's local gradients: this step's SAM rows on the layers the next step
            # samples (chosen by the commit just before). Written only once the step has
            # succeeded, so a failed step leaves the history intact.
            nxt = opt.sampled_layers
            tabs = opt.sampled_tables(nxt)
            lag = opt.scratch("lag", [((k, t[3]), b.dtype) for t, b in zip(tabs, sh.buckets)])
            for r, runs, dst in zip(rows, opt.sampled_runs(nxt), lag):
                for s, n, ls in runs:
                    dst[:, ls:ls + n].copy_(r[:, s:s + n])
            _lag_kept(run, nxt)

        run.on_commit.append(keep_lagged)
    return run.unperturbed
