"""``Update``: the shared update from the per-task gradient rows, ``d = sum_i w_i g_i`` with
``w = M(G)`` from the K x K Gram matrix, then the loss scale's ``1/S`` and clipping.

The aggregator sees the true Gram matrix: the rows carry the loss scale ``S`` (and, summed over
``W`` ranks, ``W``), divided out of ``G`` here. LS and mean weigh the rows by constants, so no
Gram matrix is formed for them, and where the configuration allows the K rows are not formed
either (one backward of the weighted loss, or one row summed by the perturbed passes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.dtypes import acc_dtype
from mtlsam_ext.optim.segments import whole

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a * b`` where either factor may be absent (``None`` = 1, and ``None * None = None``
    so that a step without loss scale or clipping multiplies by nothing at all)."""
    if a is None:
        return b
    return a if b is None else a * b


def clip_coef(max_norm: float, total_sq: Tensor) -> Tensor:
    """``clip_grad_norm_``'s factor ``min(1, max_norm / (||d|| + 1e-6))`` (float64)."""
    return (max_norm / (total_sq.sqrt() + 1e-6)).clamp(max=1.0)


class Update:
    """Gram, weights and combine of one step, with ``1/S`` and the clip factor folded in."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.opt = run.opt
        self.be = run.be
        self.shared = run.shared
        self.heads = run.heads
        self.sync = run.sync
        self.scaling = run.scaling
        self.checks = run.checks

    def true_gram(self, grams: list[Tensor], partial: bool = True) -> Tensor:
        """The Gram matrix of the true gradients from per-bucket Grams of the (scaled) rows:
        summed over buckets (and over the shards' ranks, unless ``partial=False`` says they
        were already), divided by ``S^2`` under a loss scale, added to the checks."""
        g = grams[0] if len(grams) == 1 else sum(x.double() for x in grams)
        if partial:
            g = self.run.comm.partial_sum(g)
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
        ``sum_i w_i l_i``, see :meth:`weighted_backward`); ``1/S`` and the clip factor are then
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
            coef = clip_coef(clip, (wd @ gram.double() @ wd).clamp_min(0) + heads_sq)
        mult = times(inv, coef)
        grads = [b.grad for b in self.shared.buckets]
        if rows is not None:
            w_eff = w if mult is None else (w.double() * mult).to(w.dtype)
            for r, g in zip(rows, grads):
                ops.combine_(g, r, w_eff, backend=self.be)
            post = None
        else:
            post = inv  # the update is in .grad already: its 1/S is one multiply
        if clip is not None and gram is None:
            sh_sq = self.run.comm.partial_sum(self._sumsq(grads))
            if post is not None:
                sh_sq = sh_sq * (post * post)
            self.checks.append(sh_sq.reshape(1))
            coef = clip_coef(clip, sh_sq + heads_sq)
            post = times(post, coef)
        elif gram is None:
            self.checks.extend(grads)
        if post is not None:
            for g in grads:
                g.mul_(post.to(acc_dtype(g.dtype)))
        head_mult = times(inv, coef)
        if head_mult is not None:
            for g in heads:
                g.mul_(head_mult.to(acc_dtype(g.dtype)))

    def finish(self, rows: list[Tensor]) -> None:
        """Shared gradient := ``M(rows)``'s combination of the rows (Gram, weights, combine)."""
        self.finish_update(rows, *self.weights(rows))

    def finish_summed(self, sums: list[Tensor]) -> None:
        """Shared gradient := ``w * sum_i g_i^SAM`` (row 0 of ``sums``), ``w`` = 1 (LS) or 1/K
        (mean), then the loss scale and clipping (:meth:`finish_update`)."""
        run = self.run
        k = run.k
        acc = torch.float64 if sums[0].dtype == torch.float64 else torch.float32
        w = torch.full((1,), 1.0 / k if run.opt.constant_weights == "mean" else 1.0, dtype=acc,
                       device=sums[0].device)
        self.finish_update([r[:1] for r in sums], w, None)

    def weighted_backward(self, losses: list[Tensor]) -> None:
        """LS and mean: ``d = sum_i w_i g_i`` with constant ``w`` is the gradient of
        ``sum_i w_i l_i``, so one backward replaces K (and the rows, the combine and the Gram).

        Head i still gets its own ``grad l_i``: with ``mean`` its ``1/K`` is undone on the heads'
        (small) buffers. The result equals the K-row combine to rounding, not to the bit.
        """
        run = self.run
        k = len(losses)
        w = 1.0 / k if run.opt.constant_weights == "mean" else 1.0
        with torch.enable_grad():
            total = sum(losses) if w == 1.0 else sum(w * loss for loss in losses)
        run.passes.backward(total)
        if w != 1.0 and run.heads is not None:
            for b in run.heads.buckets:
                b.grad.mul_(k)

    def finish_weighted(self) -> None:
        """End of a one-backward step: the shared gradient holds the update already."""
        run = self.run
        run.comm.reduce(run.passes.grads(), head_grads=True)
        acc = torch.float64 if run.shared.buckets[0].dtype == torch.float64 else torch.float32
        self.finish_update(None, torch.ones(run.k, dtype=acc, device=run.shared.device), None)
