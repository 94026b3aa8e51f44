"""IMTL-G: impartial multi-task learning, gradient part (closed form)."""

from __future__ import annotations

import torch

from ._common import check_positive_float, to_output, validate_gram

__all__ = ["imtl"]


def imtl(
    G: torch.Tensor,
    *,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """IMTL-G weights (L. Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021),
    closed form as written in appendix B.4 of the F-MTL paper.

    With ``u_i = g_i / ||g_i||``, ``U = [u_1 - u_2, ..., u_1 - u_K]``,
    ``D = [g_1 - g_2, ..., g_1 - g_K]`` (rows), ``alpha_{2..K} = g_1 U^T (D U^T)^{-1}``,
    ``alpha_1 = 1 - sum_{i>=2} alpha_i`` and ``d = sum_i alpha_i g_i``; this ``d`` has equal
    projections ``<d, u_i>`` on every unit gradient and ``sum alpha = 1``.
    Everything is expressed through G: with ``n_i = sqrt(G_ii)`` and
    ``A[k, i] = <g_k, u_i> = G_ki / n_i`` (r = reference task),
    ``(D U^T)[k, i] = A[r, r] - A[r, i] - A[k, r] + A[k, i]`` and
    ``(g_r U^T)[i] = A[r, r] - A[r, i]``.  We solve ``(D U^T)^T alpha^T = (g_r U^T)^T``.

    Computed in float64 on G's device with no data-dependent Python branching (every
    branch is a ``torch.where``).  Host syncs on CUDA: the finiteness check of the input,
    and ``torch.linalg.svd``, which checks its convergence flag on the host.

    * The linear system is solved by LU (``torch.linalg.solve_ex``), not an explicit
      inverse.  If it is singular or numerically singular (smallest singular value
      ``<= rcond * largest``, ``rcond`` default ``min(100 K eps(G.dtype), 1e-2)``), e.g. when
      the gradients span fewer than K - 1 dimensions or two unit gradients coincide, the
      minimum-norm least-squares solution ``pinv(.) rhs`` (via SVD, same cutoff) is used.
      Both are computed and one is selected on the device.
    * Zero gradients (``G_ii = 0``) have no direction: they get weight 0 and the IMTL
      conditions are imposed on the remaining tasks (their rows/columns are replaced by an
      identity block, which forces ``alpha_i = 0``).  The reference task is the first task
      with a nonzero gradient (task 1 of the paper whenever ``g_1 != 0``).
    * ``G = 0`` returns uniform weights; ``K = 1`` returns ``[1]``.

    ``generator`` is accepted for a uniform signature and ignored.
    """
    G64 = validate_gram(G, "imtl")
    K = G64.shape[0]
    if rcond is None:
        rcond_val = min(100.0 * K * torch.finfo(G.dtype).eps, 1e-2)
    else:
        rcond_val = check_positive_float(rcond, "rcond", "imtl")
    if K == 1:
        return torch.ones(1, dtype=G.dtype, device=G.device)
    dev = G64.device
    norms = G64.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0.0
    any_nonzero = nonzero.any()
    # First nonzero task as reference (argmax returns the first maximal index).  It stays a
    # device tensor: rows/columns are taken with index_select, never with Python ints.
    ref = torch.argmax(nonzero.to(torch.int64)).reshape(1)
    ref_onehot = torch.arange(K, device=dev) == ref
    inv_norms = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
    A = G64 * inv_norms[None, :]  # A[k, i] = <g_k, u_i>
    A_r = A.index_select(0, ref).squeeze(0)  # <g_r, u_i>
    A_kr = A.index_select(1, ref).squeeze(1)  # <g_k, u_r>
    A_rr = A_r.index_select(0, ref).squeeze(0)  # <g_r, u_r> = ||g_r||
    M = A_rr - A_r[None, :] - A_kr[:, None] + A  # M[k, i] = <g_r - g_k, u_r - u_i>
    rhs = A_rr - A_r  # rhs[i] = <g_r, u_r - u_i>
    active = nonzero & ~ref_onehot
    # Inactive tasks (zero gradient, or the reference, whose weight follows from sum = 1)
    # get an identity row/column scaled like M (entries ~ ||g||) so the system keeps a sane
    # condition number and forces alpha_i = 0.
    n_ref = norms.index_select(0, ref).squeeze(0)
    both = active[:, None] & active[None, :]
    system = torch.where(both, M.transpose(0, 1), 0.0) + torch.diag(
        torch.where(active, 0.0, torch.where(any_nonzero, n_ref, 1.0))
    )
    rhs = torch.where(active, rhs, 0.0)

    x_lu, info = torch.linalg.solve_ex(system, rhs.unsqueeze(-1))
    x_lu = x_lu.squeeze(-1)
    Us, S, Vh = torch.linalg.svd(system)
    cutoff = rcond_val * S[0]
    S_inv = torch.where(S > cutoff, 1.0 / torch.where(S > cutoff, S, 1.0), 0.0)
    x_pinv = Vh.transpose(0, 1) @ (S_inv * (Us.transpose(0, 1) @ rhs))
    singular = (S[-1] <= cutoff) | (info != 0) | ~torch.isfinite(x_lu).all()
    alpha = torch.where(singular, x_pinv, x_lu)
    alpha = torch.where(active, alpha, 0.0)
    alpha = alpha + ref_onehot.to(torch.float64) * (1.0 - alpha.sum())
    alpha = torch.where(
        any_nonzero, alpha, torch.full((K,), 1.0 / K, dtype=torch.float64, device=dev)
    )
    return to_output(alpha, G)
