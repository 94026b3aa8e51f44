"""Batched projection onto the dual cone of the task gradients, from G alone.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), eq. 3 defines the
projection ``pi_J(x) = argmin_{y : J y >= 0} ||y - x||`` onto the dual cone of the rows of
the Jacobian ``J`` (the task gradients), and their Proposition 1 shows that for
``x = J^T u`` it is ``pi_J(J^T u) = J^T v`` with

    v = argmin_{v >= u} v^T G v,        G = J J^T.

UPGrad and DualProj need one such quadratic program per projected vector (K of them for
UPGrad, one for DualProj). With ``x = v - u >= 0`` each is a nonnegative QP
``min 1/2 x^T A x + q^T x`` s.t. ``x >= 0``, ``q = A u``, solved here for a whole batch at
once, in float64, on A's device:

1. **Primal-dual active set** (Hintermüller, Ito & Kunisch, SIAM J. Optim. 13, 2002): guess the
   active set ``{i : lam_i > x_i}`` (``lam = A x + q`` the multipliers), solve the equality
   QP on the free set, repeat. A guess that repeats is the exact KKT point, and a converged
   problem is a fixed point, so a fixed number of iterations runs with no host sync (every
   branch is a ``torch.where``). It usually settles in a handful of iterations, but may cycle
   when A is not an M-matrix.
2. One host read then checks the KKT conditions of the whole batch. Problems that did not
   converge get more chunks of primal-dual iterations, and those that still cycle continue
   with a **primal active-set method** in the style of Lawson & Hanson
   (Solving Least Squares Problems, 1974, ch. 23), warm-started from the clamped iterate:
   it keeps ``x`` feasible, adds the most negative-gradient coordinate when the free-set
   solution is feasible and otherwise moves to the boundary and drops the blocking
   coordinates; each iteration is one batched masked solve, again in chunks of a fixed
   size with no host sync inside.

The masked solve embeds the free block in an identity (``A_FF`` on the free set, 1 on the
diagonal elsewhere, right-hand side 0 there) so that every problem of the batch uses one
``cholesky_ex``/``cholesky_solve`` of the same shape. ``A`` must be positive definite (the
callers add ``reg_eps I``), so every principal block is too.
"""

from __future__ import annotations

import torch

__all__ = ["solve_nonneg_qp", "project_weights"]

# KKT tolerance relative to the problem's scale (max |A_ij| * max(|u|, |x|)): rounding of a
# K-term inner product in float64 is ~K * 1e-16; 1e-12 leaves margin for K up to ~1000.
_KKT_REL = 1e-12


def _masked_solve(A: torch.Tensor, q: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """``x_F = -A_FF^{-1} q_F``, ``x = 0`` off ``F``, for every row of the batch at once."""
    f = free.to(A.dtype)
    M = A.unsqueeze(0) * (f.unsqueeze(2) * f.unsqueeze(1))
    M = M + torch.diag_embed(1.0 - f)
    L, _ = torch.linalg.cholesky_ex(M)  # no error check: that would be a host sync
    return torch.cholesky_solve((-q * f).unsqueeze(2), L).squeeze(2)


def _pdas(A: torch.Tensor, q: torch.Tensor, active: torch.Tensor, iters: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal-dual active-set iterations from the guess ``active`` (fixed count, no host
    sync); returns the last solution and active set."""
    x = torch.zeros_like(q)
    for _ in range(iters):
        x = _masked_solve(A, q, ~active)
        lam = torch.where(active, x @ A + q, torch.zeros_like(q))
        active = lam > x
    return x, active


def _primal_active_set(A: torch.Tensor, q: torch.Tensor, x: torch.Tensor, iters: int,
                       tol: torch.Tensor) -> torch.Tensor:
    """Feasible active-set iterations from a feasible ``x`` (fixed count, no host sync)."""
    free = x > 0.0
    rows = torch.arange(q.shape[0], device=q.device)
    big = torch.finfo(q.dtype).max
    for _ in range(iters):
        s = _masked_solve(A, q, free)
        blocked = free & (s <= 0.0)
        feasible = ~blocked.any(dim=1)
        # Infeasible: step from x towards s up to the first coordinate that hits 0.
        ratio = torch.where(blocked, x / (x - s).clamp_min(torch.finfo(q.dtype).tiny), big)
        alpha, first = ratio.min(dim=1)
        alpha = alpha.clamp(0.0, 1.0)
        x_step = x + alpha.unsqueeze(1) * (s - x)
        hit = torch.zeros_like(free)
        hit[rows, first] = True
        x_step = torch.where(hit | (x_step <= 0.0), torch.zeros_like(x_step), x_step)
        free_step = free & (x_step > 0.0)
        # Feasible: take s, then free the coordinate whose gradient is most negative.
        grad = s @ A + q
        cand = torch.where(~free & (-grad > tol.unsqueeze(1)), -grad, torch.zeros_like(grad))
        best, j = cand.max(dim=1)
        add = torch.zeros_like(free)
        add[rows, j] = best > 0.0
        x = torch.where(feasible.unsqueeze(1), torch.where(free, s, 0.0), x_step)
        free = torch.where(feasible.unsqueeze(1), free | add, free_step)
    return x


def _kkt_ok(A: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
            tol: torch.Tensor) -> torch.Tensor:
    lam = x @ A + q
    t = tol.unsqueeze(1)
    # x >= 0, lam >= 0, and complementarity (lam = 0 where x > 0) up to rounding
    return ((x >= -t) & (lam >= -t) & ((x <= t) | (lam.abs() <= t))).all(dim=1)


def solve_nonneg_qp(A: torch.Tensor, q: torch.Tensor, *, chunk: int | None = None,
                    pdas_chunks: int | None = None, fallback_chunks: int = 4,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x_b = argmin_{x >= 0} 1/2 x^T A x + q_b^T x`` for every row ``q_b`` of ``q`` [B, K].

    ``A`` [K, K] must be symmetric positive definite; both float64 on the same device.
    The iterations run in chunks of ``chunk`` (default ``2 + bit_length(K - 1) // 2``: 2 at
    K = 2, 4 at K = 10, 5 at K = 40) with no host sync inside a chunk; after each chunk one
    host read of the KKT test drops the rows that have converged. First come at most
    ``pdas_chunks`` (default ``1 + bit_length(K)``) chunks of primal-dual active-set
    iterations from the active set ``{q_i > 0}`` of ``x = 0`` (on random and ill-conditioned
    Gram matrices nearly every problem settles within the first chunk: one host read per
    call), then, for rows where that method cycles, at most ``fallback_chunks`` chunks of
    ``K + 1`` primal active-set iterations. The iteration count is therefore capped at
    ``chunk * pdas_chunks + fallback_chunks * (K + 1)``.

    ``scale`` [B] sets the KKT tolerance ``1e-12 * scale`` (default ``max|A| + max|q_b|``).
    A row still failing the test after the last chunk (not seen in the tests) keeps its
    last feasible iterate.
    """
    K = A.shape[0]
    if chunk is None:
        chunk = 2 + (K - 1).bit_length() // 2
    if pdas_chunks is None:
        pdas_chunks = 1 + K.bit_length()
    if scale is None:
        scale = A.abs().max() + q.abs().amax(dim=1)
    x = torch.zeros_like(q)
    active = q > 0.0
    rows = torch.arange(q.shape[0], device=q.device)
    for _ in range(pdas_chunks):
        xb, ab = _pdas(A, q[rows], active[rows], chunk)
        x, active = x.index_copy(0, rows, xb), active.index_copy(0, rows, ab)
        ok = _kkt_ok(A, q[rows], xb, _KKT_REL * scale[rows])
        if bool(ok.all()):  # one host read per chunk
            return x
        rows = rows[~ok]
    x = x.index_copy(0, rows, x[rows].clamp_min(0.0))  # a feasible start
    for _ in range(fallback_chunks):
        tol = _KKT_REL * scale[rows]
        xb = _primal_active_set(A, q[rows], x[rows], K + 1, tol)
        x = x.index_copy(0, rows, xb)
        ok = _kkt_ok(A, q[rows], xb, tol)
        if bool(ok.all()):
            return x
        rows = rows[~ok]
    return x


def project_weights(G64: torch.Tensor, U: torch.Tensor, norm_eps: float, reg_eps: float
                    ) -> torch.Tensor:
    """Weights ``V`` [B, K] with ``J^T v_b = pi_J(J^T u_b)`` for every row ``u_b >= 0`` of
    ``U``, from ``G = J J^T`` (Quinton & Rey 2024, Proposition 1).

    As in the authors' reference implementation, G is first normalised by its trace (the
    squared Frobenius norm of J; a trace below ``norm_eps`` gives the zero matrix) and
    ``reg_eps I`` is added, so that the QP is strictly convex even for a singular G: the
    solution is then that of ``min_{v >= u} v^T (G / tr G + reg_eps I) v``.
    """
    K = G64.shape[0]
    trace = G64.diagonal().sum()
    Gn = torch.where(trace < norm_eps, torch.zeros_like(G64),
                     G64 / torch.where(trace > 0.0, trace, 1.0))
    A = Gn + reg_eps * torch.eye(K, dtype=G64.dtype, device=G64.device)
    q = U @ A  # gradient of 1/2 x^T A x + (A u)^T x at x = 0 (A symmetric)
    scale = A.abs().max() * U.abs().amax(dim=1).clamp_min(torch.finfo(G64.dtype).tiny)
    return U + solve_nonneg_qp(A, q, scale=scale)
