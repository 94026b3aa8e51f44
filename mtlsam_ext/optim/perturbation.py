"""Perturbation coefficients from per-layer statistics (tiny tensors, no kernels, no syncs).

Every perturbation the optimizer applies has the per-layer form ``eps_l = a_l g0_l + b_l ghat_l``
(times ``T^2`` in the adaptive case), so the fused perturb kernel only needs the vectors
``a`` and ``b``; this module turns norms and inner products into them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_scale(rho: float, norm: Tensor) -> Tensor:
    """``rho / norm``, or 0 where ``norm == 0``: a zero gradient gives a zero perturbation."""
    return torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                       torch.zeros_like(norm))


def global_local_coefs(layer_sq: Tensor, dots: Tensor, local_sq: Tensor, sampled: Tensor,
                       rho: float, alpha: float, norm: str) -> tuple[Tensor, Tensor]:
    """Coefficients ``(A, B)``, both ``[K, L]``, of ``eps_il = A_il g0_l + B_il ghat_il``.

    Implements the global-local sampled perturbation (report, eq. for ``eps_hat_{i,sh}``;
    docs/design.md §1a step 3) with ``m_il = alpha g0_l + (1 - alpha) ghat_il`` on sampled layers:

    * ``norm="match"``: ``eps_il = ||eps0_l|| m_il / ||m_il||`` on sampled layers and
      ``eps0_l = rho g0_l / ||g0||`` elsewhere, so ``||eps_i|| = rho``. A sampled layer whose
      ``m_il`` vanishes falls back to ``eps0_l``.
    * ``norm="global"``: ``eps_i = rho m_i / ||m_i||`` with ``m_il = alpha g0_l`` outside
      the sampled set.

    Args:
        layer_sq: ``[L]`` squared norms ``||T g0_l||^2``.
        dots, local_sq: ``[K, L]`` ``<T g0_l, T ghat_il>`` and ``||T ghat_il||^2`` (zero on
            layers that are not sampled).
        sampled: ``[L]`` bool mask of sampled layers.
    """
    a = alpha
    m_sq = (a * a * layer_sq + 2 * a * (1 - a) * dots + (1 - a) ** 2 * local_sq).clamp_min(0)
    g_norm = layer_sq.sum().sqrt()
    base = safe_scale(rho, g_norm)
    if norm == "match":
        # ||eps0_l|| / ||m_il|| = rho ||g0_l|| / (||g0|| ||m_il||)
        c = base * layer_sq.sqrt() * safe_scale(1.0, m_sq.sqrt())
        use_local = sampled & (m_sq > 0)
        coef_a = torch.where(use_local, c * a, base.expand_as(c))
        coef_b = torch.where(use_local, c * (1 - a), torch.zeros_like(c))
        return coef_a, coef_b
    if norm == "global":
        outside = (a * a * layer_sq * (~sampled)).sum()
        total = outside + (m_sq * sampled).sum(dim=1)
        c = safe_scale(rho, total.sqrt()).unsqueeze(1)
        coef_a = (c * a).expand_as(m_sq).clone()
        coef_b = torch.where(sampled, c * (1 - a), torch.zeros_like(m_sq))
        return coef_a, coef_b
    raise ValueError(f"norm must be 'match' or 'global', got {norm!r}")
