"""Segment tables the step hands to the fused ops for buffers read as a whole or by rows.

Cached: the same few tables come back every step, and the ops only read them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=256)
def whole(n: int) -> Tensor:
    """The one-segment table ``[0, n]``."""
    return torch.tensor([0, n], dtype=torch.int64)


@functools.lru_cache(maxsize=256)
def by_rows(k: int, n: int) -> Tensor:
    """The table of ``k`` rows of ``n`` elements read as one flat buffer, one row a segment."""
    return torch.arange(0, (k + 1) * n, n, dtype=torch.int64)
