"""User layer: the ``MTLSAM`` optimizer."""

from mtlsam_ext.optim.mtlsam import MTLSAM

__all__ = ["MTLSAM"]
