"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import check_nonneg_float, from_numpy, to_cpu_numpy, validate_gram
from .mgda import min_norm_simplex

__all__ = ["cagrad"]

# ||g0|| and ||g_w|| at or below this fraction of max_i ||g_i|| are treated as zero: their
# directions are then pure rounding noise, so the g0 weights are returned instead.
_ZERO_REL = 1e-12
# The root bracket in log(s) is shrunk to this width (relative precision of s ~ 1e-14).
_LOG_S_TOL = 1e-14
_MAX_ROOT_ITERS = 200
# |rho(s)| = |q(s) / s^2 - 1| at this level is rounding noise of q: s is then a root to
# working precision.
_RHO_TOL = 8 * 2.0**-52


def _shifted_gram(G: np.ndarray, b: np.ndarray, gamma: float, t: float) -> np.ndarray:
    """Gram matrix of the shifted points ``g_i + t g0`` (b_i = <g_i, g0>, gamma = ||g0||^2)."""
    return G + t * (b[:, None] + b[None, :]) + (t * t) * gamma


def _solve_dual(G: np.ndarray, c: float) -> tuple[np.ndarray, float] | None:
    """Minimise ``F(w) = w^T G 1/K + c ||g0|| sqrt(w^T G w)`` over the simplex.

    ``G`` is normalised so that ``max_i G_ii = 1``.  Returns ``(w, ||g_w||)`` or ``None`` when
    ``g_w = 0`` is (numerically) optimal.

    Method (exact up to rounding, no step sizes).  With ``a = c ||g0||`` and
    ``sqrt(q) = min_{s > 0} q / (2 s) + s / 2``,
    ``min_w F(w) = min_{s > 0} h(s)``, ``h(s) = a s / 2 + min_w [<g0, g_w> + a ||g_w||^2 / (2 s)]``.
    Completing the square, the inner problem is ``min_w ||g_w + (s / a) g0||^2`` (constant
    terms aside; ``sum w = 1`` moves the shift inside the sum), i.e. the min-norm point of
    the hull of the shifted points ``g_i + (s/a) g0``: solved exactly by Wolfe's algorithm.
    Its ``g_w`` is unique, ``h`` is convex (partial minimisation of the jointly convex
    perspective), and by the envelope theorem ``h'(s) = a/2 (1 - q(s) / s^2)`` with
    ``q(s) = ||g_w(s)||^2``, so ``rho(s) = q(s) / s^2 - 1`` is non-increasing and its root
    ``s* = ||g_w*||`` gives the optimal ``w* = w(s*)``.
    Bracket: ``rho >= 0`` at ``s = ||g_mgda||`` (q(s) >= q_min = ||g_mgda||^2) and ``rho <= 0``
    at ``s = max_i ||g_i|| = 1`` (q <= 1 on the simplex).  The root is found in ``log s`` by
    the Illinois variant of regula falsi with a bisection safeguard (a bisection step
    follows any step that fails to halve the best residual so far).  Stopping rule:
    ``|rho| <= 8 eps`` (rounding level of q) or bracket width in ``log s`` below ``1e-14``
    (at most 200 iterations).
    """
    K = G.shape[0]
    m = np.full(K, 1.0 / K)
    b = G @ m  # b_i = <g_i, g0>
    gamma = float(m @ b)  # ||g0||^2
    a = c * math.sqrt(gamma)

    def evaluate(log_s: float) -> tuple[float, np.ndarray, float]:
        s = math.exp(log_s)
        w = min_norm_simplex(_shifted_gram(G, b, gamma, s / a))
        q = float(w @ G @ w)
        return q / (s * s) - 1.0, w, q

    w_min = min_norm_simplex(G)
    q_min = float(w_min @ G @ w_min)
    lo = math.log(max(math.sqrt(max(q_min, 0.0)), _ZERO_REL))
    hi = 0.0  # log(max_i ||g_i||) = log 1
    r_lo, w_lo, q_lo = evaluate(lo)
    if r_lo <= 0.0:
        if q_lo <= _ZERO_REL**2:
            return None  # optimum at ||g_w|| <= 1e-12 max||g_i||: direction is noise
        return w_lo, math.sqrt(q_lo)
    r_hi, w_hi, q_hi = evaluate(hi)
    if r_hi >= 0.0:
        return w_hi, math.sqrt(q_hi)
    side = 0  # which end was replaced last (for the Illinois down-weighting)
    f_lo, f_hi = r_lo, r_hi  # possibly down-weighted copies used by regula falsi
    best = min(abs(r_lo), abs(r_hi))
    bisect = False
    for _ in range(_MAX_ROOT_ITERS):
        if hi - lo <= _LOG_S_TOL * max(1.0, abs(lo)):
            break
        x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)  # regula falsi in log s
        if bisect or not (lo < x < hi):
            x = 0.5 * (lo + hi)
            side = 0
            f_lo, f_hi = r_lo, r_hi
        r, w, q = evaluate(x)
        if abs(r) <= _RHO_TOL:
            return w, math.sqrt(q)
        # Safeguard: if the best residual did not at least halve, the next step bisects, so
        # in every two iterations either the bracket or the best residual halves.
        bisect = abs(r) > 0.5 * best
        best = min(best, abs(r))
        if r > 0.0:
            lo, r_lo, w_lo, q_lo, f_lo = x, r, w, q, r
            if side == +1:
                f_hi *= 0.5  # Illinois: the stale end is down-weighted to force a switch
            side = +1
        else:
            hi, r_hi, w_hi, q_hi, f_hi = x, r, w, q, r
            if side == -1:
                f_lo *= 0.5
            side = -1
    # Both ends are within rounding of s*; keep the one with the smaller residual.
    if abs(r_lo) <= abs(r_hi):
        return w_lo, math.sqrt(q_lo)
    return w_hi, math.sqrt(q_hi)


def cagrad(
    G: torch.Tensor,
    *,
    c: float = 0.4,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CAGrad weights (B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient
    Descent for Multi-task Learning", NeurIPS 2021).

    The update maximises the worst task improvement in a ball around the average gradient
    ``g0 = (1/K) sum_i g_i``: ``max_d min_i <g_i, d>`` s.t. ``||d - g0|| <= c ||g0||``
    (the CAGrad objective, paper section 3).  Its dual (used by the paper's Algorithm 1) is
    ``min_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||`` with ``g_w = sum_i w_i g_i``, i.e.
    ``w^T G (1/K) 1 + c ||g0|| sqrt(w^T G w)``; then
    ``d = g0 + (c ||g0|| / ||g_w||) g_w``, and with ``rescale=True``
    ``d <- d / (1 + c^2)`` as in the authors' public code.  The returned weights are those of
    ``d`` over the g_i: ``(1/K) 1 + (c ||g0|| / ||g_w||) w``, divided by ``1 + c^2`` if
    ``rescale``.

    The dual is solved in float64 on the CPU (one copy of the K x K matrix) by a 1-D root
    search over ``s = ||g_w||`` whose every evaluation is an exact min-norm-point problem;
    see :func:`_solve_dual` for the derivation and the stopping rule.

    Degenerate cases (no division by zero): ``c = 0``, ``G = 0``, ``||g0|| <= 1e-12 max||g_i||``
    or an optimal ``||g_w|| <= 1e-12 max||g_i||`` return the g0 weights ``(1/K) 1``
    (divided by ``1 + c^2`` if ``rescale``, i.e. the formula with the g_w term dropped).
    ``generator`` is accepted for a uniform signature and ignored.
    """
    c = check_nonneg_float(c, "c", "cagrad")
    G64 = validate_gram(G, "cagrad")
    K = G64.shape[0]
    divisor = 1.0 + c * c if rescale else 1.0
    base = np.full(K, 1.0 / K)
    if c == 0.0:
        return from_numpy(base / divisor, G)
    Gc = to_cpu_numpy(G64)
    scale = float(np.max(np.diag(Gc)))
    if not scale > 0.0:
        return from_numpy(base / divisor, G)
    Gn = Gc / scale  # every quantity below is scale-free
    g0_norm = math.sqrt(max(float(base @ Gn @ base), 0.0))
    if g0_norm <= _ZERO_REL:
        return from_numpy(base / divisor, G)
    solved = _solve_dual(Gn, c)
    if solved is None:
        return from_numpy(base / divisor, G)
    w, gw_norm = solved
    lam = c * g0_norm / gw_norm
    return from_numpy((base + lam * w) / divisor, G)
