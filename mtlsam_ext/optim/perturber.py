"""``Perturber``: the perturbation radii and the perturbed points of one step.

Shared parameters: ``theta + eps`` written in place by the fused mix-perturb op, which saves
``theta`` in the backup the first time; restored bit for bit from it. Heads: every head i at
its own point ``theta_i + rho_heads T^2 g_i / ||T g_i||`` (plain SAM, Foret et al. eq. 2) for
the whole set of perturbed passes (head i reaches loss i only), restored at once after them.
The radii are ``rho / ||T v||`` (``T = |theta|`` with ASAM's ``adaptive``, else 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.perturbation import safe_scale
from mtlsam_ext.optim.segments import by_rows, whole

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


class Perturber:
    """Radii, save / perturb / restore of the shared parameters and of the heads."""

    def __init__(self, run: Run) -> None:
        opt = run.opt
        self.run = run
        self.opt = opt
        self.be = run.be
        self.shared = run.shared
        self.heads = run.heads
        self.shared_saved = False
        self.heads_saved = False
        self.backup = opt.work.buffers("backup", 1)
        self.head_backup = opt.work.buffers("head_backup", 1, self.heads) if self.heads else []
        # Head directions and head results live outside .grad: a closure that zeroes the
        # model's gradients between tasks must not wipe another head's values.
        self.head_dir = opt.work.buffers("head_dir", 1, self.heads) if self.heads else []
        self.head_out = opt.work.buffers("head_out", 1, self.heads) if self.heads else []

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
        return safe_scale(rho, self.run.comm.partial_sum(sq).sqrt())

    def row_coefs(self, rows: list[Tensor], k: int, rho: float) -> Tensor:
        """``[K]``: :meth:`global_coef` of rows ``0..K-1`` of the ``[R, N_b]`` row matrices,
        one fused read of the K rows per bucket (each row one segment: the same bits as one
        call per row) instead of K calls."""
        if self.opt.adaptive:  # (the scale has one row's length)
            return self.global_coefs([[r[i] for r in rows] for i in range(k)], rho)
        sq = sum(ops.segment_sumsq(r[:k].reshape(-1), by_rows(k, r.shape[1]), None,
                                   backend=self.be).double() for r in rows)
        return safe_scale(rho, self.run.comm.partial_sum(sq).sqrt())

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
        dst, src = self.opt.work.head_views(self.head_out, i)
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
