"""Batched points: the model run at R parameter points at once (``torch.func.vmap`` over a
functional call), by swapping the modules' parameter slots for ``[R, *shape]`` tensors cut
from ``[R, N_b]`` point matrices laid out like the flat buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from mtlsam_ext.flat.layout import FlatLayout


class Reparametrization:
    """The module slots that hold the parameters of one :class:`~mtlsam_ext.flat.FlatParams`,
    and the per-parameter views and leaves that take their place in a batched pass."""

    def __init__(self, layout: FlatLayout) -> None:
        # The layout's lists, not the layout: the FlatParams holding this object is the layout,
        # and a reference back would keep its buffers alive until the garbage collector ran.
        self.buckets = layout.buckets
        self.params = layout.params
        self.params_flat_order = layout.params_flat_order
        self._slots: list[list[tuple[nn.Module, str]]] = []

    def find_owners(self, roots: Iterable[object]) -> list[str]:
        """Find, under the given root modules, every ``(module, attribute)`` slot that holds one
        of these parameters (a tied parameter has several), for :meth:`reparametrized`.

        Returns the names of parameters no module holds (empty when all are found): those
        were given as bare tensors, so no module attribute can be swapped for them."""
        slots: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for p in self.params}
        seen: set[int] = set()
        for root in roots:
            if not isinstance(root, nn.Module):
                continue
            for mod in root.modules():
                if id(mod) in seen:
                    continue
                seen.add(id(mod))
                for name, p in mod._parameters.items():
                    if p is not None and id(p) in slots:
                        slots[id(p)].append((mod, name))
        self._slots = [slots[id(p)] for p in self.params_flat_order]
        return [n for b in self.buckets for p, n in zip(b.params, b.names) if not slots[id(p)]]

    def batched_param_views(self, mats: Sequence[Tensor]) -> list[Tensor]:
        """``[R, *shape]`` views of the parameters' columns of one ``[R, N_b]`` matrix per
        bucket, in :meth:`~mtlsam_ext.flat.FlatLayout.ordered_params` order (R points or R
        gradients at once)."""
        return [m[:, s:s + p.numel()].view(m.shape[0], *p.shape)
                for b, m in zip(self.buckets, mats) for p, s in zip(b.params, b.starts)]

    def point_leaves(self, points: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        """Per parameter a ``[R, *shape]`` autograd leaf over its columns of the ``[R, N_b]``
        point matrices, whose ``.grad`` is the same columns of ``grads``: a backward through
        them accumulates straight into the gradient rows. One leaf per parameter, not per
        bucket: the backward of a slice of a flat leaf would fill and add a zero ``[R, N]``
        gradient per parameter (on the benchmark's MLP, K = 10: 8 fills of 8.5 MB per pass,
        the batched pass 2x slower)."""
        leaves = []
        for p, g in zip(self.batched_param_views(points), self.batched_param_views(grads)):
            leaf = p.detach().requires_grad_(True)
            leaf.grad = g
            leaves.append(leaf)
        return leaves

    @contextlib.contextmanager
    def reparametrized(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """Within the block every module slot found by :meth:`find_owners` holds the given
        tensor instead of its parameter (``tensors`` in
        :meth:`~mtlsam_ext.flat.FlatLayout.ordered_params` order), the way
        ``torch.func.functional_call`` swaps them; the parameters are put back on exit, also
        when the block raises."""
        saved: list[tuple[nn.Module, str, Tensor]] = []
        try:
            for slots, t in zip(self._slots, tensors):
                for mod, name in slots:
                    saved.append((mod, name, mod._parameters[name]))
                    mod._parameters[name] = t
            yield
        finally:
            for mod, name, p in reversed(saved):
                mod._parameters[name] = p
