"""The flat buffers: a :class:`FlatParams` packs its parameters into one contiguous buffer per
dtype (all on one device) and re-points every parameter to a view of it; gradients get the
same treatment, so autograd accumulates straight into the flat gradient buffer and the fused
ops see one 1-D tensor instead of a Python list (docs/design.md §1).

The layout (layers, buckets, tables) is :class:`~mtlsam_ext.flat.layout.FlatLayout`, which
:class:`FlatParams` extends with the buffers; its collaborators hold the other concerns:
:class:`~mtlsam_ext.flat.grads.GradViews` (where ``p.grad`` points),
:class:`~mtlsam_ext.flat.sharded.ShardCopies` (FSDP2's shards) and
:class:`~mtlsam_ext.flat.reparam.Reparametrization` (batched points). The methods below that
only forward to them keep one object for the optimizer to call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from mtlsam_ext.flat.grads import GradViews
from mtlsam_ext.flat.layout import Bucket, FlatLayout
from mtlsam_ext.flat.reparam import Reparametrization
from mtlsam_ext.flat.sharded import ShardCopies, local_shard


def _pack(b: Bucket, sharded: bool) -> None:
    """Allocate ``b``'s flat data and gradient, copy the parameters (and any gradients they
    hold) in, and re-point ``p.data`` and ``p.grad`` at their views (sharded: copies only,
    see :class:`~mtlsam_ext.flat.sharded.ShardCopies`)."""
    b.data = torch.empty(b.numel, dtype=b.dtype, device=b.device)
    b.grad = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
    for p, s, shape in zip(b.params, b.starts, b.shapes):
        n = math.prod(shape)
        view = b.data[s:s + n]
        g = b.grad[s:s + n].view(shape)
        b.grad_views.append(g)
        if sharded:  # copies of the shards (pull/push), gradients taken after backward
            view.copy_(local_shard(p).reshape(-1))
            continue
        with torch.no_grad():
            view.copy_(p.detach().reshape(-1))
        p.data = view.view(p.shape)
        if p.grad is not None:
            g.copy_(p.grad.detach().reshape(-1).view(shape))
        p.grad = g


class FlatParams(FlatLayout):
    """Parameters packed into flat per-dtype buffers, with a segment table of layers.

    Args:
        params: an ``nn.Module``, an iterable of tensors or ``(name, tensor)`` pairs, or a
            dict of user-named layers (the layer rule: :mod:`mtlsam_ext.flat.layout`).
        prefix: used in names and error messages (``"shared"``, ``"heads"``).
        allow_sharded: accept parameters sharded by FSDP2's ``fully_shard`` (all of them);
            the buffers then hold this rank's local shards, copied to and from the shards
            (:class:`~mtlsam_ext.flat.sharded.ShardCopies`).
    """

    def __init__(self, params: nn.Module | Iterable | dict, prefix: str = "params",
                 allow_sharded: bool = False) -> None:
        super().__init__(params, prefix, allow_sharded)
        for b in self.buckets:
            _pack(b, self.sharded)
        self.grad_targets = GradViews(self)
        self.shards = ShardCopies(self)
        self.reparam = Reparametrization(self)

    # -- the buffers ----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad.zero_()

    def check_data_attached(self) -> None:
        """Raise if a parameter was re-pointed away from its flat view (``p.data = ...``)."""
        if self.sharded:  # (copies, see pull/push)
            return
        for b in self.buckets:
            base = b.data.data_ptr()
            item = b.data.element_size()
            for p, s, n in zip(b.params, b.starts, b.names):
                if p.data_ptr() != base + s * item:
                    raise RuntimeError(f"{self.prefix}: parameter {n!r} no longer lives in the "
                                       "flat buffer (was p.data reassigned?)")

    # -- gradient views: GradViews ----------------------------------------------------------------
    def attach_grads(self) -> None:
        """:meth:`GradViews.attach_grads <mtlsam_ext.flat.grads.GradViews.attach_grads>`."""
        self.grad_targets.attach_grads()

    def attach_layer_grads(self, layer: int) -> None:
        """:meth:`GradViews.attach_layer_grads
        <mtlsam_ext.flat.grads.GradViews.attach_layer_grads>`."""
        self.grad_targets.attach_layer_grads(layer)

    def point_grads(self, rows: list[Tensor], i: int) -> None:
        """:meth:`GradViews.point_grads <mtlsam_ext.flat.grads.GradViews.point_grads>`."""
        self.grad_targets.point_grads(rows, i)

    def point_grads_split(self, sums: list[Tensor], locals_: list[Tensor], i: int,
                          layer_ids: Sequence[int]) -> None:
        """:meth:`GradViews.point_grads_split
        <mtlsam_ext.flat.grads.GradViews.point_grads_split>`."""
        self.grad_targets.point_grads_split(sums, locals_, i, layer_ids)

    def copy_batched(self, rows: list[Tensor], first_row: int, k: int,
                     grads: Sequence[Tensor | None]) -> None:
        """:meth:`GradViews.copy_batched <mtlsam_ext.flat.grads.GradViews.copy_batched>`."""
        self.grad_targets.copy_batched(rows, first_row, k, grads)

    def add_summed_batched(self, grads: Sequence[Tensor | None]) -> None:
        """:meth:`GradViews.add_summed_batched
        <mtlsam_ext.flat.grads.GradViews.add_summed_batched>`."""
        self.grad_targets.add_summed_batched(grads)

    # -- sharded parameters: ShardCopies ----------------------------------------------------------
    def pull(self) -> None:
        """:meth:`ShardCopies.pull <mtlsam_ext.flat.sharded.ShardCopies.pull>`."""
        self.shards.pull()

    def push(self) -> None:
        """:meth:`ShardCopies.push <mtlsam_ext.flat.sharded.ShardCopies.push>`."""
        self.shards.push()

    def take_grads(self, dsts: Sequence[Tensor], scale: float = 1.0,
                   layer_ids: Sequence[int] | None = None) -> None:
        """:meth:`ShardCopies.take_grads <mtlsam_ext.flat.sharded.ShardCopies.take_grads>`."""
        self.shards.take_grads(dsts, scale, layer_ids)

    def has_grads(self) -> bool:
        """:meth:`ShardCopies.has_grads <mtlsam_ext.flat.sharded.ShardCopies.has_grads>`."""
        return self.shards.has_grads()

    def grads_to_params(self) -> None:
        """:meth:`ShardCopies.grads_to_params
        <mtlsam_ext.flat.sharded.ShardCopies.grads_to_params>`."""
        self.shards.grads_to_params()

    # -- batched points: Reparametrization --------------------------------------------------------
    def find_owners(self, roots: Iterable[object]) -> list[str]:
        """:meth:`Reparametrization.find_owners
        <mtlsam_ext.flat.reparam.Reparametrization.find_owners>`."""
        return self.reparam.find_owners(roots)

    def point_leaves(self, points: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`Reparametrization.point_leaves
        <mtlsam_ext.flat.reparam.Reparametrization.point_leaves>`."""
        return self.reparam.point_leaves(points, grads)

    def reparametrized(self, tensors: Sequence[Tensor]) -> AbstractContextManager[None]:
        """:meth:`Reparametrization.reparametrized
        <mtlsam_ext.flat.reparam.Reparametrization.reparametrized>`."""
        return self.reparam.reparametrized(tensors)
