"""The dtype coefficients are computed and applied in, for a buffer of a given dtype."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of coefficients applied to a buffer of ``dtype`` (float32 unless float64:
    bf16/fp16 buffers are combined and perturbed with float32 coefficients, as the kernels
    accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
