"""Gradient normalisation and output scaling around any aggregator, from ``G`` alone.

Published multi-task code often normalises each task gradient before the aggregator and
rescales the combined direction afterwards. Both stay functions of the Gram matrix:

* ``normalize="l2"``: ``g_i / ||g_i||`` enters the aggregator, i.e. it sees
  ``G'_ij = G_ij / (n_i n_j)`` with ``n_i = sqrt(G_ii)``, and its weights ``w'`` on the
  normalised gradients are weights ``w_i = w'_i / n_i`` on the original ones. A zero gradient
  (``n_i = 0``) stays a zero gradient: its row and column of ``G'`` are 0 and ``w_i = 0``.
* ``scale="tasks"``: the combined direction is multiplied by K (``w *= K``).

The F-MTL authors' scripts (Phan et al.; repository VietHoang1512/FS-MTL) use, for their
decomposed ``mgda`` (M(g_loss) + M(g_flat)): ``nyuv2/train.py`` L2-normalises every task's loss
gradient and every flat gradient over the whole shared part and multiplies the combined
direction by the number of tasks (``normalize="l2", scale="tasks"``); ``city2scape/train.py``
has the normalisation commented out and keeps the ``* N_TASKS`` (``scale="tasks"``); their
direct variants (``a-mgda``) run MGDA on the unnormalised SAM gradients times the number of
tasks. Their PCGrad, CAGrad and IMTL branches use neither. The MGDA reference code they import
also offers ``loss`` and ``loss+`` normalisations, which divide by the task losses: those need
more than ``G`` and are not offered here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NORMALIZE = ("none", "l2")
SCALE = ("none", "tasks")


def check_convention(normalize: str, scale: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if scale not in SCALE:
        raise ValueError(f"scale must be one of {SCALE}, got {scale!r}")


def with_convention(agg: Callable[..., torch.Tensor], normalize: str = "none",
                    scale: str = "none") -> Callable[..., torch.Tensor]:
    """``agg`` (``G, generator -> w``) with the gradient normalisation and output scaling
    above applied through ``G`` and ``w``; ``agg`` itself when both are ``"none"``."""
    check_convention(normalize, scale)
    if normalize == "none" and scale == "none":
        return agg

    def conv(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = G.shape[0]
        if normalize == "l2":
            g = G.double()
            n = g.diagonal().clamp_min(0).sqrt()
            alive = n > 0
            inv = torch.where(alive, 1.0 / n.clamp_min(torch.finfo(torch.float64).tiny),
                              torch.zeros_like(n))
            gn = g * inv[:, None] * inv[None, :]
            w = agg(gn.to(G.dtype), generator).double() * inv
        else:
            w = agg(G, generator).double()
        if scale == "tasks":
            w = w * k
        return w.to(G.dtype)

    conv.__name__ = getattr(agg, "__name__", "aggregator")
    conv.__doc__ = getattr(agg, "__doc__", None)
    for attr in ("state_dict", "load_state_dict"):  # a stateful aggregator's state
        if hasattr(agg, attr):
            setattr(conv, attr, getattr(agg, attr))
    return conv
