"""mtlsam_ext: sharpness-aware multi-task learning with fused kernels over flat buffers.

Public API: :class:`MTLSAM` (the optimizer), :mod:`mtlsam_ext.aggregators` (``G -> w``
aggregators on the K x K Gram matrix), :class:`FlatParams` (flat parameter buffers) and
:mod:`mtlsam_ext.ops` (the fused ops with backend dispatch).
"""

from mtlsam_ext import aggregators, ops
from mtlsam_ext._version import __version__
from mtlsam_ext.flat import FlatParams
from mtlsam_ext.optim import MTLSAM

__all__ = ["MTLSAM", "FlatParams", "__version__", "aggregators", "ops"]
