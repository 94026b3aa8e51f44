"""FairGrad: alpha-fair allocation of the update among the tasks."""

from __future__ import annotations

import torch

from ._common import check_positive_float, check_positive_int, to_output, validate_gram

__all__ = ["fairgrad", "check_fairgrad_options"]

# Relative ridge on G / max_i G_ii, added only when the equation has no solution (Newton did
# not converge without it): the answer is then finite, as in nash.
_RIDGE = 1e-12
# Newton iterations between two host reads of the convergence test.
_CHUNK = 5
# Converged when the Newton decrement^2 before the last (full) step is below this: the step
# then leaves an error ~(1e-10)^2 in the Hessian norm. (A residual test would stall at the
# rounding floor of G w on ill-conditioned G, ~1e-13 relative at cond 1e8.)
_LAM2_TOL = 1e-20
# Backtracking candidates t = 2^0 .. 2^-(_STEPS - 1), all evaluated at once.
_STEPS = 40


def check_fairgrad_options(alpha: object = None, max_iter: object = 60) -> tuple[float, int]:
    if alpha is None:
        raise ValueError("fairgrad: alpha is required (a real number > 0), e.g. "
                         "aggregator_options={'alpha': 2.0}")
    return (check_positive_float(alpha, "alpha", "fairgrad"),
            check_positive_int(max_iter, "max_iter", "fairgrad"))


def _h(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """An antiderivative of ``w^(-1/alpha)``."""
    if alpha == 1.0:
        return torch.log(w)
    e = 1.0 - 1.0 / alpha
    return w.pow(e) / e


def _objective(Gn: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f(w) = 1/2 w^T G w - sum_i h(w_i)`` for every row of ``W`` (inf where w <= 0)."""
    quad = 0.5 * ((W @ Gn) * W).sum(dim=-1)
    val = quad - _h(W.clamp_min(torch.finfo(W.dtype).tiny), alpha).sum(dim=-1)
    return torch.where((W > 0).all(dim=-1), val, torch.inf)


def _newton(Gn: torch.Tensor, w: torch.Tensor, alpha: float, iters: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Newton steps on the strictly convex ``f`` (fixed count, no host read); returns
    ``w`` and the Newton decrement^2 at the start of the last step."""
    lam2 = torch.full((), torch.inf, dtype=w.dtype, device=w.device)
    ts = 2.0 ** -torch.arange(_STEPS, dtype=w.dtype, device=w.device)
    for _ in range(iters):
        rhs = w.pow(-1.0 / alpha)
        grad = Gn @ w - rhs
        H = Gn + torch.diag(rhs / (alpha * w))
        L, _ = torch.linalg.cholesky_ex(H)
        p = -torch.cholesky_solve(grad.unsqueeze(1), L).squeeze(1)
        lam2 = -(grad @ p)  # Newton decrement^2
        # Largest step keeping w > 0 (with margin), then Armijo over halvings of it.
        neg = p < 0
        tmax = torch.where(neg, -0.99 * w / torch.where(neg, p, -1.0), torch.inf).min()
        tmax = tmax.clamp(max=1.0)
        cand = w + (tmax * ts).unsqueeze(1) * p
        f0 = _objective(Gn, w.unsqueeze(0), alpha)[0]
        okay = _objective(Gn, cand, alpha) <= f0 - 1e-4 * tmax * ts * lam2
        first = torch.where(okay.any(), okay.to(torch.int64).argmax(), _STEPS - 1)
        t = tmax * ts[first]
        # Close to the solution (lam2 < 0.1) the full step is taken: f-differences are then
        # at rounding level and the quadratic model is accurate.
        full = (lam2 < 0.1) & (w + p > 0).all()
        w = torch.where(full, w + p, w + t * p)
    return w, lam2


def _solve(Gn: torch.Tensor, alpha: float, max_iter: int) -> tuple[torch.Tensor, bool]:
    """Newton from the diagonal solution, with a host read of the residual every _CHUNK
    iterations; returns ``(w, converged)``."""
    w = Gn.diagonal().clamp_min(_RIDGE).pow(-alpha / (alpha + 1.0))  # exact for diagonal G
    done = 0
    while done < max_iter:
        n = min(_CHUNK, max_iter - done)
        w, lam2 = _newton(Gn, w, alpha, n)
        done += n
        if bool(lam2 <= _LAM2_TOL):
            return w, True
    return w, False


def fairgrad(
    G: torch.Tensor,
    *,
    alpha: float | None = None,
    max_iter: int = 60,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FairGrad weights (H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning",
    ICML 2024, eq. 4 / Algorithm 1): ``w > 0`` solving ``G w = w^(-1/alpha)`` elementwise,
    i.e. ``<g_i, d> = w_i^(-1/alpha)`` for ``d = sum_i w_i g_i``. ``alpha`` (required,
    > 0) sets the fairness: ``alpha = 1`` is proportional fairness (Nash-MTL's equation),
    larger values favour the worst-off task.

    The equation is the stationarity condition of the strictly convex ``f(w) = 1/2 w^T G w -
    sum_i h(w_i)``, ``h' = w^(-1/alpha)``, minimised by damped Newton on G's device in float64:
    Armijo backtracking over 40 halvings of the largest positivity-keeping step, all evaluated
    at once, so an iteration needs no host read; one read every 5 iterations tests the Newton
    decrement (``lam^2 <= 1e-20``), at most ``max_iter`` (default 60) iterations. The problem is
    solved for ``G / max_i G_ii`` and rescaled by ``(max_i G_ii)^(-alpha / (alpha + 1))``, exact
    because w scales like that. A singular G needs no care when a solution exists; none exists
    when a nonnegative null vector of G makes ``f`` unbounded below (0 in the hull of the
    gradients): when Newton has not converged in ``max_iter`` iterations, the solve is repeated
    with a ridge ``1e-12 max_i G_ii`` on G's diagonal, whose solution exists; its weights are
    large along the null vector but d stays finite.

    Zero gradients (``G_ii = 0``) get weight 0 (their equation has no solution), the others
    are solved for; ``G = 0`` gives uniform weights. ``generator`` is ignored.
    """
    alpha, max_iter = check_fairgrad_options(alpha, max_iter)
    G64 = validate_gram(G, "fairgrad")
    K = G64.shape[0]
    diag = G64.diagonal()
    s = diag.max()
    alive = diag > 0.0
    Gn = G64 / torch.where(s > 0.0, s, 1.0)
    # Zero-gradient tasks become the decoupled equation w_i = w_i^(-1/alpha) (w_i = 1),
    # then get weight 0.
    both = alive.unsqueeze(0) & alive.unsqueeze(1)
    Gn = torch.where(both, Gn, 0.0) + torch.diag((~alive).to(Gn.dtype))
    w, ok = _solve(Gn, alpha, max_iter)
    if not ok:  # no solution: 0 is (numerically) in the hull of the nonzero gradients
        w, _ = _solve(Gn + _RIDGE * torch.diag(alive.to(Gn.dtype)), alpha, max_iter)
    c = torch.where(s > 0.0, s, 1.0).pow(-alpha / (alpha + 1.0))
    w = torch.where(alive, w * c, 0.0)
    w = torch.where(alive.any(), w, torch.full_like(w, 1.0 / K))
    return to_output(w, G)
