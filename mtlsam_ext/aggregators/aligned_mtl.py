"""Aligned-MTL: the task gradients' singular values equalised, from G's eigendecomposition."""

from __future__ import annotations

import torch

from ._common import check_pref_vector, pref_weights, to_output, validate_gram

__all__ = ["aligned_mtl", "SCALE_MODES", "check_scale_mode"]

SCALE_MODES = ("min", "median", "rmse")


def check_scale_mode(value: object, name: str = "aligned_mtl") -> str:
    if value not in SCALE_MODES:
        raise ValueError(f"{name}: scale_mode must be one of {SCALE_MODES}, got {value!r}")
    return str(value)


def aligned_mtl(
    G: torch.Tensor,
    *,
    pref_vector: object = None,
    scale_mode: str = "min",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Aligned-MTL weights (D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent
    Component Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1 and eq. 9).

    With ``J`` the stacked gradients and ``G = J J^T = V diag(lambda) V^T``, the aligned
    gradient matrix ``sqrt(lambda_s) V diag(lambda)^{-1/2} V^T J`` has all its nonzero
    singular values equal to ``sqrt(lambda_s)`` (the condition number of the linear system
    becomes 1); the update is its preference-weighted sum, so ``w = B u`` with
    ``B = sqrt(lambda_s) V_r diag(lambda_r)^{-1/2} V_r^T`` and ``u`` the ``pref_vector``
    (default ``1/K``). Only the ``r`` eigenvalues above ``max(lambda) K eps`` count (the
    rank test of the authors' code, ``eps`` the machine epsilon of G's dtype); ``r = 0``
    (all gradients zero) gives ``w = u``.

    ``scale_mode`` picks ``lambda_s`` among the kept eigenvalues: ``"min"`` (the smallest,
    default, the paper's choice), ``"median"`` (the lower median, as ``torch.median``) or
    ``"rmse"`` (their mean, as in the authors' code). Everything runs on G's device, in
    float64, with no host read beyond the input check. ``generator`` is ignored.
    """
    pref = check_pref_vector(pref_vector, "aligned_mtl")
    scale_mode = check_scale_mode(scale_mode)
    G64 = validate_gram(G, "aligned_mtl")
    K = G64.shape[0]
    u = pref_weights(pref, K, G64, "aligned_mtl")
    lam, V = torch.linalg.eigh(G64)  # ascending
    tol = lam[-1] * K * torch.finfo(G.dtype).eps
    keep = lam > tol
    r = keep.sum()
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    if scale_mode == "min":
        s = torch.where(keep, lam, torch.inf).min()
    elif scale_mode == "median":
        # the kept eigenvalues are the last r of the ascending list: lower median at index
        # K - r + (r - 1) // 2
        idx = (K - r + torch.div(r - 1, 2, rounding_mode="floor")).clamp(0, K - 1)
        s = lam.gather(0, idx.reshape(1))[0]
    else:
        s = torch.where(keep, lam, 0.0).sum() / r.clamp_min(1)
    s = torch.where(r > 0, s, 1.0).clamp_min(0.0)
    B = s.sqrt() * (V * inv_sqrt) @ V.T
    w = torch.where(r > 0, B @ u, u)
    return to_output(w, G)
