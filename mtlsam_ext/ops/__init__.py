"""Ops: validated, backend-dispatched entry points over flat buffers.

Each op has one pure-torch reference in :mod:`mtlsam_ext.kernels.torch_ref`; ``backend``
selects who runs it (see :mod:`mtlsam_ext.ops.dispatch`); a compiled kernel is checked against
the reference on its first use per device and dtype (:mod:`mtlsam_ext.ops.selfcheck`).
"""

from mtlsam_ext.ops.core import (
    combine_,
    flat_gram_,
    gl_layer_stats,
    gram,
    mix_perturb_,
    perturb_points_,
    restore_,
    segment_gram,
    segment_sumsq,
    sub_,
)
from mtlsam_ext.ops.dispatch import BACKENDS, available_backends, resolve_backend
from mtlsam_ext.ops.selfcheck import SelfCheckWarning

__all__ = [
    "BACKENDS",
    "SelfCheckWarning",
    "available_backends",
    "combine_",
    "flat_gram_",
    "gl_layer_stats",
    "gram",
    "mix_perturb_",
    "perturb_points_",
    "resolve_backend",
    "restore_",
    "segment_gram",
    "segment_sumsq",
    "sub_",
]
