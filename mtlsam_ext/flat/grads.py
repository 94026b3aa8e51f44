"""Where the parameters' gradients go: ``p.grad`` as views of the flat gradient buffer or of a
task's row, and per-parameter gradients written into rows.

Autograd accumulates into ``p.grad``; pointing ``p.grad`` at a view of a flat buffer makes a
backward write that buffer directly (docs/design.md §1, "Rows": a backward of task i writes
row i of the ``[K, N]`` row matrix, with no zero + backward + copy of the whole buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mtlsam_ext.flat.layout import FlatLayout


def copy_or_zero(views: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``views := grads`` in one foreach copy, zeros where a gradient is ``None`` (a parameter
    the loss does not reach), so the destination needs no zeroing first."""
    torch._foreach_copy_([v for v, g in zip(views, grads) if g is not None],
                         [g for g in grads if g is not None])
    for v, g in zip(views, grads):
        if g is None:
            v.zero_()


class GradViews:
    """The gradient views of one :class:`~mtlsam_ext.flat.FlatParams`: re-points ``p.grad``
    (at the flat gradient buffer, at a row, at a compact local row) and writes per-parameter
    gradients into rows. The views of a row are built once per row matrix and row."""

    def __init__(self, layout: FlatLayout) -> None:
        # The layout's lists, not the layout: the FlatParams holding this object is the layout,
        # and a reference back would keep its buffers alive until the garbage collector ran.
        self.buckets = layout.buckets
        self.layers = layout.layers
        self.params = layout.params
        self.params_flat_order = layout.params_flat_order
        self.sharded = layout.sharded
        self._row_views: dict[tuple, list[Tensor]] = {}
        self._layer_views: list[list[tuple[Tensor, Tensor]]] | None = None

    def attach_grads(self) -> None:
        """Re-point ``p.grad`` to the flat views if anything replaced or dropped them.

        ``model.zero_grad()`` (``set_to_none=True``) inside a closure would otherwise make
        autograd write fresh tensors that the flat buffer never sees. Sharded: ``p.grad`` is
        cleared instead, so that the next backward leaves exactly its own gradient shard
        there for :meth:`~mtlsam_ext.flat.sharded.ShardCopies.take_grads`.
        """
        if self.sharded:
            for p in self.params:
                p.grad = None
            return
        for b in self.buckets:
            for p, g in zip(b.params, b.grad_views):
                if p.grad is not g:
                    p.grad = g

    def attach_layer_grads(self, layer: int) -> None:
        """:meth:`attach_grads` for one layer's parameters only (a head before the backward
        that reaches it alone: with K = 40 heads, re-checking all 2K head parameters after
        each of the 41 forwards was the largest bookkeeping item of a task-aware step)."""
        if self.sharded:
            for p in self.layers[layer].params:
                p.grad = None
            return
        views = self._layer_grad_views(layer)
        for p, g in views:
            if p.grad is not g:
                p.grad = g

    def _layer_grad_views(self, layer: int) -> list[tuple[Tensor, Tensor]]:
        if self._layer_views is None:
            self._layer_views = [[] for _ in self.layers]
            for b in self.buckets:
                for p, g, li in zip(b.params, b.grad_views, b.layer_of):
                    self._layer_views[li].append((p, g))
        return self._layer_views[layer]

    def point_grads(self, rows: list[Tensor], i: int) -> None:
        """Re-point every ``p.grad`` to its slice of row ``i`` of the ``[K, N]`` row matrices,
        so that a backward accumulates straight into that row (no zero + backward + copy of
        the whole buffer per task). :meth:`attach_grads` points them back. The views are
        built once per (row matrix, i)."""
        key = (tuple((r.data_ptr(), r.shape) for r in rows), i)
        views = self._row_views.get(key)
        if views is None:
            if len(self._row_views) > 1024:  # row matrices are few and persistent
                self._row_views.clear()
            views = self._row_views[key] = [
                r[i, s:s + p.numel()].view(p.shape)
                for b, r in zip(self.buckets, rows) for p, s in zip(b.params, b.starts)]
        for p, v in zip(self.params_flat_order, views):
            p.grad = v

    def point_grads_split(self, sums: list[Tensor], locals_: list[Tensor], i: int,
                          layer_ids: Sequence[int]) -> None:
        """:meth:`point_grads` with two targets: the parameters of ``layer_ids`` into row ``i``
        of the compact ``[K, M_b]`` local buffers (laid out as
        :meth:`~mtlsam_ext.flat.FlatLayout.sampled_tables` with ``compact=True``), every other
        parameter into row 0 of ``sums`` (``[1, N_b]``), where successive backwards add up.
        Views built once per (buffers, i, layers)."""
        key = ("split", tuple(t.data_ptr() for t in sums + locals_), i, tuple(layer_ids))
        views = self._row_views.get(key)
        if views is None:
            if len(self._row_views) > 1024:
                self._row_views.clear()
            wanted = set(layer_ids)
            views = []
            for b, r, loc in zip(self.buckets, sums, locals_):
                m = 0
                for p, s, li in zip(b.params, b.starts, b.layer_of):
                    n = p.numel()
                    if li in wanted:
                        views.append(loc[i, m:m + n].view(p.shape))
                        m += n
                    else:
                        views.append(r[0, s:s + n].view(p.shape))
            self._row_views[key] = views
        for p, v in zip(self.params_flat_order, views):
            p.grad = v

    def copy_batched(self, rows: list[Tensor], first_row: int, k: int,
                     grads: Sequence[Tensor | None]) -> None:
        """Rows ``first_row .. first_row + k - 1`` := per-parameter ``[k, *shape]`` gradients
        given in :meth:`~mtlsam_ext.flat.FlatLayout.ordered_params` order (``None``: the
        parameter was not reached, 0)."""
        dsts = [r[first_row:first_row + k, s:s + p.numel()].view(k, *p.shape)
                for b, r in zip(self.buckets, rows) for p, s in zip(b.params, b.starts)]
        copy_or_zero(dsts, grads)

    def add_summed_batched(self, grads: Sequence[Tensor | None]) -> None:
        """``p.grad += sum_k g[k]`` for per-parameter ``[K, *shape]`` gradients in
        :meth:`~mtlsam_ext.flat.FlatLayout.ordered_params` order (the heads: only task i's
        row reaches head i)."""
        it = iter(grads)
        for b in self.buckets:
            for g_view in b.grad_views:
                g = next(it)
                if g is not None:
                    g_view.add_(g.sum(0))
