"""Sharded parameters (FSDP2's ``fully_shard``): copies between the shards and the flat buffers.

With ``allow_sharded=True`` every parameter is a DTensor sharded on dim 0 over a 1-D mesh and
the flat buffers hold this rank's local shards, laid out as usual. FSDP2 keeps each shard in
storage of its own, so the shards cannot be views of the flat buffer: :meth:`ShardCopies.pull`
and :meth:`ShardCopies.push` copy between them, and :meth:`ShardCopies.take_grads` moves the
gradient shards FSDP2 leaves in ``p.grad`` after a backward into a flat buffer or a row
(docs/design.md, the sharded design).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mtlsam_ext.flat.layout import FlatLayout


def sharded_kind(p: Tensor) -> str:
    """What shards ``p`` across processes: ``""`` for a plain tensor, ``"dim0"`` for a DTensor
    sharded on dim 0 over a 1-D mesh (FSDP2's ``fully_shard``), else a description (another
    DTensor layout: tensor parallelism, HSDP; FSDP1's ``FlatParameter``)."""
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        return "an FSDP FlatParameter (FullyShardedDataParallel)"
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(p, DTensor):
            if p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),):
                return "dim0"
            return (f"a DTensor with placements {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-D mesh")
    return ""


def local_shard(p: Tensor) -> Tensor:
    """This rank's shard of a sharded parameter, as a plain tensor sharing its storage."""
    with torch.no_grad():
        return p.to_local()


class ShardCopies:
    """The copies between sharded parameters (and their gradient shards) and the flat buffers
    of one :class:`~mtlsam_ext.flat.FlatParams`; every method but :meth:`take_grads` does
    nothing when the parameters are not sharded."""

    def __init__(self, layout: FlatLayout) -> None:
        # The layout's lists, not the layout: the FlatParams holding this object is the layout,
        # and a reference back would keep its buffers alive until the garbage collector ran.
        self.buckets = layout.buckets
        self.params = layout.params
        self.sharded = layout.sharded

    def pull(self) -> None:
        """Sharded: the flat buffers := the parameters' local shards (at the start of a step;
        the base optimizer updated the shards)."""
        if self.sharded:
            for b in self.buckets:
                torch._foreach_copy_(b.data_views(), [local_shard(p) for p in b.params])

    def push(self) -> None:
        """Sharded: the parameters' local shards := the flat buffers, before a forward sees
        them (the next all-gather reads the shards) and after a restore."""
        if self.sharded:
            for b in self.buckets:
                torch._foreach_copy_([local_shard(p) for p in b.params], b.data_views())

    def take_grads(self, dsts: Sequence[Tensor], scale: float = 1.0,
                   layer_ids: Sequence[int] | None = None) -> None:
        """Sharded: ``dst += scale * p.grad`` (the local shard a backward left) for every
        parameter, into one 1-D buffer per bucket (the flat gradient or a row); ``p.grad`` is
        cleared. ``layer_ids``: only those layers, into compact ``[M_b]`` buffers laid out as
        :meth:`~mtlsam_ext.flat.FlatLayout.sampled_tables` with ``compact=True`` (the other
        gradients are dropped)."""
        wanted = None if layer_ids is None else set(layer_ids)
        for b, dst in zip(self.buckets, dsts):
            m = 0
            for p, s, sh, li in zip(b.params, b.starts, b.shapes, b.layer_of):
                n = math.prod(sh)
                g, p.grad = p.grad, None
                if wanted is not None:
                    if li not in wanted:
                        continue
                    at, m = m, m + n
                else:
                    at = s
                if g is not None:
                    dst[at:at + n].add_(local_shard(g).reshape(-1), alpha=scale)

    def has_grads(self) -> bool:
        """Sharded: whether any parameter holds a gradient (a closure that ran backward)."""
        return any(p.grad is not None for p in self.params)

    def grads_to_params(self) -> None:
        """Sharded: ``p.grad`` := a DTensor over this rank's slice of the flat gradient (no
        copy), for the base optimizer's step on the sharded parameters."""
        if not self.sharded:
            return
        from torch.distributed.tensor import DTensor

        for b in self.buckets:
            for p, g in zip(b.params, b.grad_views):
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
