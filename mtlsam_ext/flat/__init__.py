"""Flat parameter and gradient buffers: the only package that iterates over parameters.

A :class:`FlatParams` packs a set of parameters into one contiguous buffer per dtype (all on
one device) and re-points every parameter to a view of it; gradients get the same treatment,
so autograd accumulates straight into the flat gradient buffer and the fused ops see one
1-D tensor instead of a Python list. Its modules:

* :mod:`~mtlsam_ext.flat.layout`: the layer rule, the buckets and the tables
  (:class:`FlatLayout`, :class:`Bucket`, :class:`Layer`);
* :mod:`~mtlsam_ext.flat.params`: :class:`FlatParams`, the layout with its buffers;
* :mod:`~mtlsam_ext.flat.grads`: where ``p.grad`` points (:class:`GradViews`) and
  :func:`copy_or_zero`;
* :mod:`~mtlsam_ext.flat.sharded`: FSDP2's shards copied to and from the buffers
  (:class:`ShardCopies`);
* :mod:`~mtlsam_ext.flat.reparam`: batched points, the module slots swapped for
  ``[R, *shape]`` tensors (:class:`Reparametrization`).
"""

from mtlsam_ext.flat.grads import GradViews, copy_or_zero
from mtlsam_ext.flat.layout import Bucket, FlatLayout, Layer, layers_from
from mtlsam_ext.flat.params import FlatParams
from mtlsam_ext.flat.reparam import Reparametrization
from mtlsam_ext.flat.sharded import ShardCopies, local_shard, sharded_kind

__all__ = ["Bucket", "FlatLayout", "FlatParams", "GradViews", "Layer", "Reparametrization",
           "ShardCopies", "copy_or_zero", "layers_from", "local_shard", "sharded_kind"]
