"""RLW: random loss weighting."""

from __future__ import annotations

import torch

from ._common import to_output, validate_gram

__all__ = ["rlw"]


def rlw(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random loss weights (B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, eq. 3 and
    Algorithm 2): ``w = softmax(z)``, ``z ~ N(0, I_K)`` drawn anew at every call.

    ``z`` is drawn on the CPU in float64 as ``torch.randn(K, generator=generator)`` (one call
    per step; ``None``: torch's global RNG), so MTLSAM's ``generator`` makes the draws
    reproducible, part of ``state_dict``, and equal on every rank. ``G`` is only validated.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"rlw: generator must be a CPU torch.Generator, got one on "
                         f"{generator.device}")
    G64 = validate_gram(G, "rlw")
    z = torch.randn(G64.shape[0], generator=generator, dtype=torch.float64)
    return to_output(torch.softmax(z, dim=0), G)
