"""Flat parameter and gradient buffers: the only module that iterates over parameters.

A :class:`FlatParams` packs a set of parameters into one contiguous buffer per dtype (all on
one device) and re-points every parameter to a view of it; gradients get the same treatment,
so autograd accumulates straight into the flat gradient buffer and the fused ops see one
1-D tensor instead of a Python list.

The layer rule (docs/design.md §1: a layer is a contiguous segment of the flat shared buffer):

* ``nn.Module``: every submodule that directly owns trainable parameters is one layer, in
  ``named_modules()`` registration order, its tensors in its own registration order
  (so a ``Linear`` is one layer holding weight and bias);
* an iterable of tensors (or ``(name, tensor)`` pairs): every tensor is its own layer;
* a ``dict`` mapping layer names to iterables of tensors: user-named layers.

Frozen parameters (``requires_grad=False``) are left out; a parameter reached twice (tied
weights) belongs to its first layer.

Sharded parameters (``allow_sharded=True``: every parameter a DTensor sharded on dim 0 over a
1-D mesh, as FSDP2's ``fully_shard`` makes them): the buffers hold this rank's local shards,
laid out the same way. FSDP2 keeps each shard in storage of its own, so the shards cannot be
views of the flat buffer: :meth:`FlatParams.pull` and :meth:`FlatParams.push` copy between
them, and :meth:`FlatParams.take_grads` moves the gradient shards FSDP2 leaves in ``p.grad``
after a backward into a flat buffer or a row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlsam_ext.ops.validate import FLOAT_DTYPES


@dataclass
class Layer:
    name: str
    params: list[Tensor]
    param_names: list[str]


@dataclass
class Bucket:
    """All parameters of one dtype: the flat data, the flat grad and the segment tables."""

    dtype: torch.dtype
    device: torch.device
    params: list[Tensor] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)  # local shapes (shards if sharded)
    names: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # element offset of each param
    layer_of: list[int] = field(default_factory=list)  # global layer index of each param
    numel: int = 0
    data: Tensor | None = None
    grad: Tensor | None = None
    # Layer segments present in this bucket, in flat order: seg_layers[s] is the global layer
    # index of segment s, which spans [seg_offsets[s], seg_offsets[s + 1]).
    seg_layers: list[int] = field(default_factory=list)
    seg_offsets: Tensor | None = None
    grad_views: list[Tensor] = field(default_factory=list)
    _ranges: dict[int, tuple[int, int]] | None = None

    def layer_range(self, layer: int) -> tuple[int, int]:
        """``(start, end)`` of ``layer`` in this bucket (``(0, 0)`` when absent)."""
        if self._ranges is None:  # Python ints, built once: asked for per task per step
            off = self.seg_offsets.tolist()
            self._ranges = {li: (off[s], off[s + 1]) for s, li in enumerate(self.seg_layers)}
        return self._ranges.get(layer, (0, 0))


def _layers_from(shared: nn.Module | Iterable | dict, prefix: str) -> list[Layer]:
    seen: set[int] = set()
    layers: list[Layer] = []

    def add(name: str, named: Iterable[tuple[str, Tensor]]) -> None:
        ps, ns = [], []
        for pname, p in named:
            if not isinstance(p, Tensor):
                raise ValueError(f"{prefix}: expected tensors, got {type(p).__name__} "
                                 f"for {pname!r}")
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            ps.append(p)
            ns.append(pname)
        if ps:
            layers.append(Layer(name, ps, ns))

    if isinstance(shared, nn.Module):
        for mname, mod in shared.named_modules():
            add(mname or "<root>",
                ((f"{mname}.{n}" if mname else n, p) for n, p in mod.named_parameters(
                    recurse=False)))
    elif isinstance(shared, dict):
        for lname, group in shared.items():
            if isinstance(group, nn.Module):
                group = group.parameters()
            elif isinstance(group, Tensor):
                group = [group]
            add(str(lname), ((f"{lname}[{j}]", p) for j, p in enumerate(group)))
    else:
        for j, item in enumerate(shared):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                add(item[0], [item])
            else:
                add(f"{prefix}[{j}]", [(f"{prefix}[{j}]", item)])
    return layers


def _sharded_kind(p: Tensor) -> str:
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


def _local(p: Tensor) -> Tensor:
    """This rank's shard of a sharded parameter, as a plain tensor sharing its storage."""
    with torch.no_grad():
        return p.to_local()


def copy_or_zero(views: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``views := grads`` in one foreach copy, zeros where a gradient is ``None`` (a parameter
    the loss does not reach), so the destination needs no zeroing first."""
    torch._foreach_copy_([v for v, g in zip(views, grads) if g is not None],
                         [g for g in grads if g is not None])
    for v, g in zip(views, grads):
        if g is None:
            v.zero_()


class FlatParams:
    """Parameters packed into flat per-dtype buffers, with a segment table of layers.

    Args:
        params: an ``nn.Module``, an iterable of tensors or ``(name, tensor)`` pairs, or a
            dict of user-named layers (see the module docstring for the layer rule).
        prefix: used in names and error messages (``"shared"``, ``"heads"``).
    """

    def __init__(self, params: nn.Module | Iterable | dict, prefix: str = "params",
                 allow_sharded: bool = False) -> None:
        self.prefix = prefix
        self.layers = _layers_from(params, prefix)
        self.params: list[Tensor] = [p for la in self.layers for p in la.params]
        if not self.params:
            raise ValueError(f"{prefix}: no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"{prefix}: parameters are on mixed devices "
                             f"{sorted(str(d) for d in devices)}; put them on one device")
        self.device = self.params[0].device
        for la in self.layers:
            for p, n in zip(la.params, la.param_names):
                if p.dtype not in FLOAT_DTYPES:
                    raise ValueError(f"{prefix}: parameter {n!r} has dtype {p.dtype}; only "
                                     f"float16/bfloat16/float32/float64 are supported")
                if not p.is_leaf:
                    raise ValueError(f"{prefix}: parameter {n!r} is not a leaf tensor")
                if p.is_sparse:
                    raise ValueError(f"{prefix}: parameter {n!r} is sparse")
        kinds = {_sharded_kind(p) for p in self.params}
        for la in self.layers:
            for p, n in zip(la.params, la.param_names):
                kind = _sharded_kind(p)
                if kind and not (kind == "dim0" and allow_sharded and kinds == {"dim0"}):
                    what = "a DTensor (FSDP2 fully_shard)" if kind == "dim0" else kind
                    raise ValueError(
                        f"{prefix}: parameter {n!r} is {what}. "
                        + ("Sharded parameters are supported for `shared` only, all of them "
                           "sharded by FSDP2's fully_shard (dim-0 shards on a 1-D mesh); "
                           if kind == "dim0" else
                           "MTLSAM supports FSDP2's fully_shard (dim-0 shards on a 1-D mesh) "
                           "for `shared`; ")
                        + "or train data-parallel: pass the plain module (replicated on every "
                        "rank) and let MTLSAM synchronise it (process_group=; see "
                        "docs/distributed.md)")
        self.sharded = kinds == {"dim0"}
        self.buckets: list[Bucket] = []
        by_dtype: dict[torch.dtype, Bucket] = {}
        for li, la in enumerate(self.layers):
            for p, n in zip(la.params, la.param_names):
                b = by_dtype.get(p.dtype)
                if b is None:
                    b = by_dtype[p.dtype] = Bucket(p.dtype, self.device)
                    self.buckets.append(b)
                if not b.seg_layers or b.seg_layers[-1] != li:
                    b.seg_layers.append(li)
                shape = _local(p).shape if self.sharded else p.shape
                b.params.append(p)
                b.shapes.append(shape)
                b.names.append(n)
                b.starts.append(b.numel)
                b.layer_of.append(li)
                b.numel += math.prod(shape)
        for b in self.buckets:
            self._pack(b, self.sharded)
        self.numel = sum(b.numel for b in self.buckets)
        self.layer_names = [la.name for la in self.layers]
        self.params_flat_order = [p for b in self.buckets for p in b.params]
        self._row_views: dict[tuple, list[Tensor]] = {}
        self._slots: list[list[tuple[nn.Module, str]]] = []
        self._seg_layers: list[Tensor] | None = None
        self._layer_views: list[list[tuple[Tensor, Tensor]]] | None = None

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _pack(b: Bucket, sharded: bool) -> None:
        b.data = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        b.grad = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
        seg_bounds: list[int] = []
        for j, (p, s, shape) in enumerate(zip(b.params, b.starts, b.shapes)):
            if j == 0 or b.layer_of[j] != b.layer_of[j - 1]:
                seg_bounds.append(s)
            n = math.prod(shape)
            view = b.data[s:s + n]
            g = b.grad[s:s + n].view(shape)
            b.grad_views.append(g)
            if sharded:  # copies of the shards (pull/push), gradients taken after backward
                view.copy_(_local(p).reshape(-1))
                continue
            with torch.no_grad():
                view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)
            if p.grad is not None:
                g.copy_(p.grad.detach().reshape(-1).view(shape))
            p.grad = g
        seg_bounds.append(b.numel)
        b.seg_offsets = torch.tensor(seg_bounds, dtype=torch.int64)

    # -- gradients ----------------------------------------------------------------------------
    def attach_grads(self) -> None:
        """Re-point ``p.grad`` to the flat views if anything replaced or dropped them.

        ``model.zero_grad()`` (``set_to_none=True``) inside a closure would otherwise make
        autograd write fresh tensors that the flat buffer never sees. Sharded: ``p.grad`` is
        cleared instead, so that the next backward leaves exactly its own gradient shard
        there for :meth:`take_grads`.
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
        of the compact ``[K, M_b]`` local buffers (laid out as :meth:`sampled_tables` with
        ``compact=True``), every other parameter into row 0 of ``sums`` (``[1, N_b]``), where
        successive backwards add up. Views built once per (buffers, i, layers)."""
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

    # -- sharded parameters ---------------------------------------------------------------------
    def pull(self) -> None:
        """Sharded: the flat buffers := the parameters' local shards (at the start of a step;
        the base optimizer updated the shards)."""
        if self.sharded:
            for b in self.buckets:
                torch._foreach_copy_(self._data_views(b), [_local(p) for p in b.params])

    def push(self) -> None:
        """Sharded: the parameters' local shards := the flat buffers, before a forward sees
        them (the next all-gather reads the shards) and after a restore."""
        if self.sharded:
            for b in self.buckets:
                torch._foreach_copy_([_local(p) for p in b.params], self._data_views(b))

    @staticmethod
    def _data_views(b: Bucket) -> list[Tensor]:
        return [b.data[s:s + math.prod(sh)].view(sh) for s, sh in zip(b.starts, b.shapes)]

    def take_grads(self, dsts: Sequence[Tensor], scale: float = 1.0,
                   layer_ids: Sequence[int] | None = None) -> None:
        """Sharded: ``dst += scale * p.grad`` (the local shard a backward left) for every
        parameter, into one 1-D buffer per bucket (the flat gradient or a row); ``p.grad`` is
        cleared. ``layer_ids``: only those layers, into compact ``[M_b]`` buffers laid out as
        :meth:`sampled_tables` with ``compact=True`` (the other gradients are dropped)."""
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
                    dst[at:at + n].add_(_local(g).reshape(-1), alpha=scale)

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

    def global_numels(self) -> list[int]:
        """Per bucket the number of elements over all shards (the local count if not
        sharded): what every rank agrees on."""
        return [sum(p.numel() for p in b.params) for b in self.buckets]

    def ordered_params(self) -> list[Tensor]:
        """Every parameter in flat order (bucket by bucket)."""
        return list(self.params_flat_order)

    def copy_batched(self, rows: list[Tensor], first_row: int, k: int,
                     grads: Sequence[Tensor | None]) -> None:
        """Rows ``first_row .. first_row + k - 1`` := per-parameter ``[k, *shape]`` gradients
        given in :meth:`ordered_params` order (``None``: the parameter was not reached, 0)."""
        dsts = [r[first_row:first_row + k, s:s + p.numel()].view(k, *p.shape)
                for b, r in zip(self.buckets, rows) for p, s in zip(b.params, b.starts)]
        copy_or_zero(dsts, grads)

    def add_summed_batched(self, grads: Sequence[Tensor | None]) -> None:
        """``p.grad += sum_k g[k]`` for per-parameter ``[K, *shape]`` gradients in
        :meth:`ordered_params` order (the heads: only task i's row reaches head i)."""
        it = iter(grads)
        for b in self.buckets:
            for g_view in b.grad_views:
                g = next(it)
                if g is not None:
                    g_view.add_(g.sum(0))

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

    def new_rows(self, k: int) -> list[Tensor]:
        """Per bucket an uninitialised ``[k, N_b]`` matrix: one row per task gradient."""
        return [torch.empty(k, b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]

    # -- re-parametrisation (batched points) --------------------------------------------------
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
        bucket, in :meth:`ordered_params` order (R points or R gradients at once)."""
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
        tensor instead of its parameter (``tensors`` in :meth:`ordered_params` order), the way
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

    # -- layers -------------------------------------------------------------------------------
    def layer_index(self, spec: int | str) -> int:
        """Index of a layer given by position (negative allowed) or by name."""
        n = len(self.layers)
        if isinstance(spec, bool):
            raise ValueError(f"layer spec must be an int or a name, got {spec!r}")
        if isinstance(spec, int):
            if not -n <= spec < n:
                raise ValueError(f"layer index {spec} out of range for {n} layers")
            return spec % n
        if isinstance(spec, str):
            if spec in self.layer_names:
                return self.layer_names.index(spec)
            raise ValueError(f"unknown layer {spec!r}; layers are {self.layer_names}")
        raise ValueError(f"layer spec must be an int or a name, got {spec!r}")

    def sampled_tables(self, layer_ids: Sequence[int], compact: bool
                       ) -> list[tuple[Tensor, Tensor, Tensor, int]]:
        """Per bucket ``(starts, lengths, local_starts, M)`` for the sampled layers.

        ``compact=True`` lays the sampled layers out back to back in an ``[K, M]`` local
        buffer; ``compact=False`` addresses them at their flat offsets (local rows are full
        ``[K, N]`` rows, e.g. the previous step's SAM gradients).
        """
        out = []
        wanted = set(layer_ids)
        for b in self.buckets:
            starts, lengths, lstarts, m = [], [], [], 0
            for s, li in enumerate(b.seg_layers):
                if li in wanted:
                    a, e = int(b.seg_offsets[s]), int(b.seg_offsets[s + 1])
                    starts.append(a)
                    lengths.append(e - a)
                    lstarts.append(m if compact else a)
                    m += e - a
            t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
            out.append((t(starts), t(lengths), t(lstarts), m if compact else b.numel))
        return out

    def layer_params(self, layer_ids: Sequence[int]) -> list[Tensor]:
        """The parameters of the given layers in flat order (bucket by bucket)."""
        wanted = set(layer_ids)
        return [p for b in self.buckets for p, li in zip(b.params, b.layer_of) if li in wanted]

    def local_views(self, locals_: list[Tensor], task: int, layer_ids: Sequence[int]
                    ) -> list[Tensor]:
        """Views into row ``task`` of the compact local buffers, aligned with
        :meth:`layer_params` (so a list of per-parameter gradients can be copied in at once)."""
        return [v[task] for v in self.local_batched_views(locals_, layer_ids)]

    def local_batched_views(self, locals_: list[Tensor], layer_ids: Sequence[int]
                            ) -> list[Tensor]:
        """``[K, *shape]`` views of all K rows of the compact local buffers, aligned with
        :meth:`layer_params` (for gradients computed with batched cotangents)."""
        wanted = set(layer_ids)
        views = []
        for b, loc in zip(self.buckets, locals_):
            m = 0
            for sh, li in zip(b.shapes, b.layer_of):
                if li in wanted:
                    n = math.prod(sh)
                    views.append(loc[:, m:m + n].view(loc.shape[0], *sh))
                    m += n
        return views

    def segment_layers(self) -> list[Tensor]:
        """Per bucket: the global layer index of each segment (int64, for ``index_add_``);
        built once, the layout is fixed (read it, never write it)."""
        if self._seg_layers is None:
            self._seg_layers = [torch.tensor(b.seg_layers, dtype=torch.int64, device=self.device)
                                for b in self.buckets]
        return self._seg_layers

    # -- checks ---------------------------------------------------------------------------------
    def names_not_in(self, reached: set[int]) -> list[str]:
        """Names of parameters whose ``id`` is not in ``reached`` (a set of tensor ids)."""
        return [n for b in self.buckets for p, n in zip(b.params, b.names) if id(p) not in reached]

    def ids(self) -> set[int]:
        return {id(p) for p in self.params}

    def layer_param_ids(self, layer: int) -> set[int]:
        return {id(p) for p in self.layers[layer].params}
