"""Linear scalarisation (LS) and its averaged variant (mean)."""

from __future__ import annotations

import torch

from ._common import uniform_weights, validate_gram

__all__ = ["ls", "mean"]


def ls(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Linear scalarisation: ``d = sum_i g_i``, i.e. ``w = ones(K)``.

    This is the unweighted sum of the task losses' gradients, the "LS" baseline as the F-MTL
    (flat multi-task learning with sharpness-aware minimisation) paper defines it:
    ``L(theta) = sum_i L_i(theta)``.  ``G`` is only validated (its values do not matter);
    ``generator`` is accepted for a uniform aggregator signature and ignored.
    """
    validate_gram(G, "ls")
    return torch.ones(G.shape[0], dtype=G.dtype, device=G.device)


def mean(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of the task gradients: ``d = (1/K) sum_i g_i``, i.e. ``w = ones(K) / K``.

    ``generator`` is accepted for a uniform aggregator signature and ignored.
    """
    validate_gram(G, "mean")
    return uniform_weights(G.shape[0], G)
