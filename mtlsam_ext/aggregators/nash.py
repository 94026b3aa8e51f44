"""Nash-MTL: the Nash bargaining solution over the task gradients."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ._common import (
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    from_numpy,
    to_cpu_numpy,
    uniform_weights,
    validate_gram,
)
from .mgda import min_norm_simplex

__all__ = ["nash"]

# ||min-norm point of the hull||^2 / max_i ||g_i||^2 at or below this: 0 is (numerically)
# in the hull, i.e. ||d_min|| <= 1e-7 max_i ||g_i||, and the ridge is needed.
_HULL_ZERO = 1e-14


def _objective(G: np.ndarray, a: np.ndarray) -> float:
    return float(0.5 * a @ G @ a - np.sum(np.log(a)))


def _newton(G: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """Damped Newton on ``f(a) = 1/2 a^T G a - sum log a`` (G normalised, PD after ridge).

    Returns ``(a, converged)``.  ``f`` is strictly convex and self-concordant, so the Newton
    decrement ``lam^2 = grad^T H^{-1} grad`` is affine-invariant and, for ``lam^2 < 0.1``,
    the full step stays inside the domain (Dikin ellipsoid, lam < 1) and converges
    quadratically; it is then taken without line search (f-differences there are below
    rounding).  Otherwise the step is first shortened to keep ``a > 0`` and then backtracked
    (halving) until the Armijo condition ``f(a + t p) <= f(a) - t lam^2 / 4`` holds.

    Stopping rule: ``lam^2 <= tol`` (one last full step is taken), or, in the quadratic
    phase (previous ``lam^2 < 1e-3``, where exact arithmetic would shrink it by far more than
    4x per step), ``lam^2`` no longer dropping 4x: the float64 rounding floor is reached.
    That floor is ~1e-30 for well-conditioned G, but it is what stops the iteration when a
    ridge-regularised singular problem makes H ill-conditioned.
    """
    a = 1.0 / np.sqrt(np.diag(G))  # exact when G is diagonal; a good start otherwise
    prev_lam2 = np.inf
    for _ in range(max_iter):
        grad = G @ a - 1.0 / a
        H = G + np.diag(1.0 / (a * a))
        try:
            L = np.linalg.cholesky(H)
            p = -np.linalg.solve(L.T, np.linalg.solve(L, grad))
        except np.linalg.LinAlgError:  # H is PD in exact arithmetic; rounding fallback
            p = -np.linalg.lstsq(H, grad, rcond=None)[0]
        lam2 = float(-grad @ p)
        if prev_lam2 < 1e-3 and lam2 > 0.25 * prev_lam2:
            return a, True  # rounding floor: further steps only move a by noise
        prev_lam2 = lam2
        if lam2 < 0.1 and np.all(a + p > 0.0):
            a = a + p
            if lam2 <= tol:
                return a, True
            continue
        t = 1.0
        neg = p < 0.0
        if np.any(neg):
            t = min(1.0, 0.99 * float(np.min(-a[neg] / p[neg])))
        f0 = _objective(G, a)
        while t > 1e-20 and _objective(G, a + t * p) > f0 - 0.25 * t * lam2:
            t *= 0.5
        a = a + t * p
    return a, False


def nash(
    G: torch.Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-20,
    ridge: float = 1e-12,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nash-MTL weights (A. Navon et al., "Multi-Task Learning as a Bargaining Game",
    ICML 2022, section 3).

    The Nash bargaining direction is ``d = sum_i alpha_i g_i`` with ``alpha > 0`` solving
    ``G alpha = 1 / alpha`` elementwise, i.e. ``<g_i, d> alpha_i = 1``.  This is the
    stationarity condition of the strictly convex ``f(alpha) = 1/2 alpha^T G alpha -
    sum_i log alpha_i``, minimised by damped Newton with a positivity-keeping backtracking
    line search in float64 on the CPU (one copy of the K x K matrix per call); see
    :func:`_newton` for the stopping rule (Newton decrement ``lam^2 <= tol``, at most
    ``max_iter`` iterations).  The solution is computed for ``G / max_i G_ii`` and rescaled
    by ``1 / sqrt(max_i G_ii)``, which is exact because ``alpha`` scales like ``G^{-1/2}``.

    Degenerate cases:

    * Zero gradients (``G_ii = 0``): ``<g_i, d> alpha_i = 1`` has no solution, so such tasks
      get weight 0 and the bargaining problem is solved over the others.  ``G = 0`` returns
      uniform weights (d = 0 for any weights).
    * Singular G needs no special care when a solution exists (the Newton Hessian
      ``G + diag(1/alpha^2)`` is PD regardless).  No solution exists exactly when 0 lies in
      the convex hull of the nonzero gradients (then ``f`` is unbounded below along a
      nonnegative null vector of G).  This is tested with the min-norm point of the hull
      (Wolfe's algorithm, as in :func:`mgda`): if ``||d_min||^2 <= 1e-14 max_i ||g_i||^2``
      a ridge ``ridge * max_i G_ii`` (default 1e-12) is added to G's diagonal, which makes
      the answer finite; the weights are then large (~ ridge^{-1/2} / ||g||) but
      ``||d||^2 = sum_i alpha_i <g_i, d> <= K`` stays bounded.  Otherwise G is used as is.
    * If Newton has not met the tolerance after ``max_iter`` iterations a ``RuntimeWarning``
      is issued and the last (positive, finite) iterate is returned.

    ``generator`` is accepted for a uniform signature and ignored.
    """
    max_iter = check_positive_int(max_iter, "max_iter", "nash")
    tol = check_positive_float(tol, "tol", "nash")
    ridge = check_nonneg_float(ridge, "ridge", "nash")
    G64 = validate_gram(G, "nash")
    K = G64.shape[0]
    Gc = to_cpu_numpy(G64)
    diag = np.diag(Gc)
    scale = float(np.max(diag))
    if not scale > 0.0:
        return uniform_weights(K, G)
    active = np.flatnonzero(diag > 0.0)
    Gn = Gc[np.ix_(active, active)] / scale
    # f is bounded below (a solution exists) iff 0 is not in the convex hull of the active
    # gradients, i.e. iff their min-norm point (MGDA's problem) is nonzero.  Only then is
    # the problem solved exactly; otherwise the ridge makes it solvable.
    w_min = min_norm_simplex(Gn)
    if float(w_min @ Gn @ w_min) <= _HULL_ZERO:
        Gn = Gn + ridge * np.eye(active.size)
    a, converged = _newton(Gn, max_iter, tol)
    if not converged:
        warnings.warn(
            f"nash: Newton did not reach tol={tol:g} in max_iter={max_iter} iterations; "
            "returning the last iterate",
            RuntimeWarning,
            stacklevel=2,
        )
    w = np.zeros(K)
    w[active] = a / np.sqrt(scale)
    return from_numpy(w, G)
