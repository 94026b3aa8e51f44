"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import numpy as np
import torch

from ._common import from_numpy, to_cpu_numpy, to_output, uniform_weights, validate_gram

__all__ = ["mgda", "min_norm_simplex"]

# Optimality slack of Wolfe's test, relative to max_i ||g_i||^2 (G is normalised to that).
# Rounding in (G w)_j is about K * 1e-16, so 1e-13 stops at rounding level without stalling.
_WOLFE_TOL = 1e-13
# Weights below this (relative, on the simplex) are treated as exactly zero when a point
# leaves the active set ("corral") during a minor cycle.
_ZERO_W = 1e-15


def _affine_minimizer(Gs: np.ndarray) -> np.ndarray:
    """Minimiser of ``v^T Gs v`` subject to ``sum(v) = 1`` (no sign constraint).

    Solves the KKT system ``[[Gs, 1], [1^T, 0]] [v; mu] = [0; 1]``.  Wolfe's algorithm keeps
    the active points affinely independent, so the system is non-singular in exact
    arithmetic; ``lstsq`` (SVD) still returns the minimum-norm solution if rounding makes it
    numerically singular, which is a valid affine minimiser because the system is consistent.
    """
    m = Gs.shape[0]
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = Gs
    kkt[:m, m] = 1.0
    kkt[m, :m] = 1.0
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:m]


def min_norm_simplex(
    G: np.ndarray, *, tol: float = _WOLFE_TOL, max_iter: int | None = None
) -> np.ndarray:
    """Wolfe's minimum-norm-point algorithm, expressed through the Gram matrix only.

    Finds ``w`` on the probability simplex minimising ``w^T G w = ||sum_i w_i g_i||^2``
    (P. Wolfe, "Finding the nearest point in a polytope", Math. Programming 11, 1976).
    The points p_i are implicit: ``<x, p_j> = (G w)_j`` and ``||x||^2 = w^T G w``.

    Major cycle: with x the current point, pick ``j = argmin_j (G w)_j``; stop if
    ``(G w)_j >= ||x||^2 - tol * max_i G_ii`` (Wolfe's optimality test: x is then within
    ``sqrt(tol) * max_i ||g_i||`` of the true min-norm point, and in practice exact to
    rounding because the final corral is solved exactly), else add j to the corral S.
    Minor cycle: move towards the affine minimiser of S; while it leaves the simplex,
    step to the boundary and drop the points whose weight reached zero.

    The method terminates finitely in exact arithmetic; ``max_iter`` (default ``50 K + 50``
    major+minor steps) only guards against rounding-induced cycling.  ``G`` must be a
    symmetric PSD float64 NumPy array with ``max_i G_ii > 0``.
    """
    K = G.shape[0]
    scale = float(np.max(np.diag(G)))
    Gn = G / scale  # scale-free tolerances
    if max_iter is None:
        max_iter = 50 * K + 50
    w = np.zeros(K)
    # Start at the vertex of smallest norm, as in Wolfe's paper.
    first = int(np.argmin(np.diag(Gn)))
    w[first] = 1.0
    active = [first]
    steps = 0
    while steps < max_iter:
        Gw = Gn @ w
        xx = float(w @ Gw)
        j = int(np.argmin(Gw))
        if Gw[j] >= xx - tol or j in active:
            # Optimal, or rounding made the best candidate one we already hold (no progress
            # possible): either way w is the answer to working precision.
            break
        active.append(j)
        # Minor cycles.
        while steps < max_iter:
            steps += 1
            idx = np.asarray(active)
            v = _affine_minimizer(Gn[np.ix_(idx, idx)])
            if np.all(v > _ZERO_W):
                w[:] = 0.0
                w[idx] = v
                break
            cur = w[idx]
            neg = v <= _ZERO_W
            # Largest step from cur towards v that keeps every weight >= 0.
            ratios = cur[neg] / np.maximum(cur[neg] - v[neg], np.finfo(np.float64).tiny)
            theta = float(np.clip(np.min(ratios), 0.0, 1.0))
            new = cur + theta * (v - cur)
            leave = int(np.flatnonzero(neg)[np.argmin(ratios)])
            keep = new > _ZERO_W
            keep[leave] = False  # guarantee progress: at least one point leaves
            if not np.any(keep):  # cannot happen in exact arithmetic; stay on a vertex
                keep[int(np.argmax(new))] = True
            active = [a for a, k in zip(active, keep) if k]
            w[:] = 0.0
            w[np.asarray(active)] = new[keep]
            w /= w.sum()
        steps += 1
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def mgda(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """MGDA weights: ``w = argmin_{w in simplex} w^T G w``.

    The common descent direction of the multiple-gradient descent algorithm is the
    minimum-norm element of the convex hull of the task gradients (J.-A. Desideri, "Multiple-
    gradient descent algorithm (MGDA) for multiobjective optimization", C. R. Math. 350, 2012;
    O. Sener & V. Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018, section 3): ``min_{alpha} ||sum_i alpha_i g_i||^2`` s.t. ``alpha >= 0, sum alpha = 1``.

    * K = 1: ``[1]``.
    * K = 2: the closed form of Sener & Koltun (Algorithm 1):
      ``alpha_1 = clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0, 1)``, computed on G's device
      without further syncs; if ``g_1 = g_2`` (every alpha gives the same d) ``alpha = [1/2, 1/2]``.
    * K > 2: Wolfe's min-norm-point active-set algorithm (:func:`min_norm_simplex`) in
      float64. It is iterative with data-dependent branching, so the K x K matrix is moved
      to the CPU once per call (a single small sync) instead of syncing every iteration.

    ``G = 0`` returns uniform weights.  For singular G (rank-deficient, duplicated or zero
    gradients) the min-norm point ``d`` is still unique but ``w`` need not be; one optimal
    ``w`` is returned.  ``generator`` is accepted for a uniform signature and ignored.
    """
    G64 = validate_gram(G, "mgda")
    K = G64.shape[0]
    if K == 1:
        return torch.ones(1, dtype=G.dtype, device=G.device)
    if K == 2:
        a, b, c = G64[0, 0], G64[1, 1], G64[0, 1]
        denom = a + b - 2.0 * c  # ||g_1 - g_2||^2
        # Treat ||g_1 - g_2||^2 at rounding level of ||g_1||^2 + ||g_2||^2 as "equal
        # gradients"; then any alpha gives the same d and the symmetric [1/2, 1/2] is chosen.
        distinct = denom > 64.0 * torch.finfo(torch.float64).eps * (a + b)
        safe = torch.where(distinct, denom, torch.ones_like(denom))
        alpha = torch.where(distinct, ((b - c) / safe).clamp(0.0, 1.0), torch.full_like(denom, 0.5))
        return to_output(torch.stack([alpha, 1.0 - alpha]), G)
    Gc = to_cpu_numpy(G64)
    if not np.max(np.diag(Gc)) > 0.0:
        return uniform_weights(K, G)
    return from_numpy(min_norm_simplex(Gc), G)
