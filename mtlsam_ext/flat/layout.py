"""The layout of a set of parameters: its layers, its buckets (one per dtype) and where every
parameter and layer sits in its bucket's flat buffer, with the tables the fused ops read.

The layer rule (docs/design.md §1: a layer is a contiguous segment of the flat shared buffer):

* ``nn.Module``: every submodule that directly owns trainable parameters is one layer, in
  ``named_modules()`` registration order, its tensors in its own registration order
  (so a ``Linear`` is one layer holding weight and bias);
* an iterable of tensors (or ``(name, tensor)`` pairs): every tensor is its own layer;
* a ``dict`` mapping layer names to iterables of tensors: user-named layers.

Frozen parameters (``requires_grad=False``) are left out; a parameter reached twice (tied
weights) belongs to its first layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlsam_ext.flat.sharded import local_shard, sharded_kind
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

    def data_views(self) -> list[Tensor]:
        """Every parameter's view of the flat data, in its local shape (a shard's if
        sharded)."""
        return [self.data[s:s + math.prod(sh)].view(sh)
                for s, sh in zip(self.starts, self.shapes)]


def layers_from(shared: nn.Module | Iterable | dict, prefix: str) -> list[Layer]:
    """The layers of ``shared`` by the layer rule (see the module docstring)."""
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


def _check_params(layers: list[Layer], prefix: str, allow_sharded: bool) -> bool:
    """Raise ``ValueError`` for a parameter the flat buffers cannot hold: mixed devices, a
    dtype other than the four float ones, a non-leaf or sparse tensor, a sharded parameter
    other than FSDP2's dim-0 shards (and those only where ``allow_sharded``). Returns whether
    the parameters are sharded (all of them FSDP2's dim-0 shards)."""
    params = [p for la in layers for p in la.params]
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"{prefix}: parameters are on mixed devices "
                         f"{sorted(str(d) for d in devices)}; put them on one device")
    for la in layers:
        for p, n in zip(la.params, la.param_names):
            if p.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{prefix}: parameter {n!r} has dtype {p.dtype}; only "
                                 f"float16/bfloat16/float32/float64 are supported")
            if not p.is_leaf:
                raise ValueError(f"{prefix}: parameter {n!r} is not a leaf tensor")
            if p.is_sparse:
                raise ValueError(f"{prefix}: parameter {n!r} is sparse")
    kinds = {sharded_kind(p) for p in params}
    for la in layers:
        for p, n in zip(la.params, la.param_names):
            kind = sharded_kind(p)
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
    return kinds == {"dim0"}


class FlatLayout:
    """The layers of a set of parameters and their place in flat per-dtype buckets.

    Builds the tables only; :class:`~mtlsam_ext.flat.FlatParams` allocates the buffers.

    Args:
        params: an ``nn.Module``, an iterable of tensors or ``(name, tensor)`` pairs, or a
            dict of user-named layers (see the module docstring for the layer rule).
        prefix: used in names and error messages (``"shared"``, ``"heads"``).
        allow_sharded: accept parameters sharded by FSDP2's ``fully_shard`` (all of them).
    """

    def __init__(self, params: nn.Module | Iterable | dict, prefix: str = "params",
                 allow_sharded: bool = False) -> None:
        self.prefix = prefix
        self.layers = layers_from(params, prefix)
        self.params: list[Tensor] = [p for la in self.layers for p in la.params]
        if not self.params:
            raise ValueError(f"{prefix}: no trainable parameters")
        sharded = _check_params(self.layers, prefix, allow_sharded)
        self.device = self.params[0].device
        self.sharded = sharded
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
                shape = local_shard(p).shape if self.sharded else p.shape
                b.params.append(p)
                b.shapes.append(shape)
                b.names.append(n)
                b.starts.append(b.numel)
                b.layer_of.append(li)
                b.numel += math.prod(shape)
        for b in self.buckets:  # a segment starts where the layer changes
            bounds = [s for j, s in enumerate(b.starts)
                      if j == 0 or b.layer_of[j] != b.layer_of[j - 1]]
            b.seg_offsets = torch.tensor(bounds + [b.numel], dtype=torch.int64)
        self.numel = sum(b.numel for b in self.buckets)
        self.layer_names = [la.name for la in self.layers]
        self.params_flat_order = [p for b in self.buckets for p in b.params]
        self._seg_layers: list[Tensor] | None = None

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

    def layer_params(self, layer_ids: Sequence[int]) -> list[Tensor]:
        """The parameters of the given layers in flat order (bucket by bucket)."""
        wanted = set(layer_ids)
        return [p for b in self.buckets for p, li in zip(b.params, b.layer_of) if li in wanted]

    def segment_layers(self) -> list[Tensor]:
        """Per bucket: the global layer index of each segment (int64, for ``index_add_``);
        built once, the layout is fixed (read it, never write it)."""
        if self._seg_layers is None:
            self._seg_layers = [torch.tensor(b.seg_layers, dtype=torch.int64, device=self.device)
                                for b in self.buckets]
        return self._seg_layers

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

    # -- rows laid out like the buckets ---------------------------------------------------------
    def new_rows(self, k: int) -> list[Tensor]:
        """Per bucket an uninitialised ``[k, N_b]`` matrix: one row per task gradient."""
        return [torch.empty(k, b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]

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

    # -- parameters -----------------------------------------------------------------------------
    def ordered_params(self) -> list[Tensor]:
        """Every parameter in flat order (bucket by bucket)."""
        return list(self.params_flat_order)

    def global_numels(self) -> list[int]:
        """Per bucket the number of elements over all shards (the local count if not
        sharded): what every rank agrees on."""
        return [sum(p.numel() for p in b.params) for b in self.buckets]

    def names_not_in(self, reached: set[int]) -> list[str]:
        """Names of parameters whose ``id`` is not in ``reached`` (a set of tensor ids)."""
        return [n for b in self.buckets for p, n in zip(b.params, b.names) if id(p) not in reached]

    def ids(self) -> set[int]:
        return {id(p) for p in self.params}

    def layer_param_ids(self, layer: int) -> set[int]:
        return {id(p) for p in self.layers[layer].params}
