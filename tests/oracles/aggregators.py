"""Float64 reference implementations of the aggregators, on stacked gradients.

Each oracle takes the task gradients stacked as ``g`` ([K, n], float64 NumPy array or
tensor) and returns the aggregated update vector ``d`` ([n]) computed literally from the
papers' definitions with explicit vectors.  They are deliberately slow and simple, and they
do not import any of ``mtlsam_ext``'s aggregator code, so that the tests compare two
independent implementations.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.optimize
import torch

__all__ = ["ls", "mean", "mgda", "pcgrad", "cagrad", "imtl", "nash", "mgda_objective",
           "dual_cone_projection", "upgrad", "dualproj", "aligned_mtl", "fairgrad", "gradvac",
           "rlw"]


def _as_array(g: object) -> np.ndarray:
    if isinstance(g, torch.Tensor):
        g = g.detach().cpu().numpy()
    arr = np.array(g, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"oracle expects stacked gradients [K, n], got shape {arr.shape}")
    return arr


def ls(g: object) -> np.ndarray:
    """Linear scalarisation: d = sum_i g_i."""
    g = _as_array(g)
    return g.sum(axis=0)


def mean(g: object) -> np.ndarray:
    """Average gradient: d = (1/K) sum_i g_i."""
    g = _as_array(g)
    return g.mean(axis=0)


def mgda(g: object) -> np.ndarray:
    """Min-norm point of conv{g_1..g_K} (Sener & Koltun 2018), by enumeration.

    For every non-empty subset S, minimise ||sum_{i in S} w_i g_i|| subject to
    sum_{i in S} w_i = 1 (no sign constraint) by least squares in the parametrisation
    w_s0 = 1 - sum_{i != s0} v_i:  min_v ||g_s0 + sum_i v_i (g_i - g_s0)||.  Keep the
    solutions with w >= 0 and return the smallest vector.  The optimum lies in the relative
    interior of some face, where it is the affine minimiser of that face's vertices, so the
    enumeration is exact (2^K - 1 least-squares problems; fine for K <= 8).
    """
    g = _as_array(g)
    K = g.shape[0]
    best = None
    best_norm = np.inf
    for size in range(1, K + 1):
        for S in itertools.combinations(range(K), size):
            s0, rest = S[0], list(S[1:])
            if rest:
                B = (g[rest] - g[s0]).T  # [n, |S|-1]
                v = np.linalg.lstsq(B, -g[s0], rcond=None)[0]
                w = np.concatenate([[1.0 - v.sum()], v])
            else:
                w = np.array([1.0])
            if np.any(w < -1e-12):
                continue
            d = w @ g[list(S)]
            nrm = float(d @ d)
            if nrm < best_norm:
                best, best_norm = d, nrm
    assert best is not None
    return best


def mgda_objective(g: object) -> float:
    """min_{w in simplex} ||sum_i w_i g_i||^2 (via :func:`mgda`)."""
    d = mgda(g)
    return float(d @ d)


def pcgrad(g: object, generator: torch.Generator | None = None) -> np.ndarray:
    """PCGrad (Yu et al. 2020, Algorithm 1), literal loop over vectors.

    Permutations: K consecutive calls ``torch.randperm(K, generator=generator)``, the i-th
    being the visiting order for task i (the documented draw order of the production code).
    d = sum_i g_i^PC (F-MTL appendix B.2).
    """
    g = _as_array(g)
    K = g.shape[0]
    perms = [torch.randperm(K, generator=generator).tolist() for _ in range(K)]
    d = np.zeros(g.shape[1])
    for i in range(K):
        gi = g[i].copy()
        for j in perms[i]:
            dot = float(gi @ g[j])
            sq = float(g[j] @ g[j])
            if sq > 0.0 and dot < 0.0:
                gi = gi - dot / sq * g[j]
        d += gi
    return d


def cagrad(g: object, c: float = 0.4, rescale: bool = True) -> np.ndarray:
    """CAGrad (Liu et al. 2021): the dual solved with SLSQP, then the authors' update.

    Dual over the simplex: min_w <g_w, g0> + c ||g0|| ||g_w|| with g_w = sum_i w_i g_i,
    g0 = mean_i g_i; d = g0 + c ||g0|| / ||g_w|| g_w, divided by (1 + c^2) if rescale.
    SLSQP is run with an analytic gradient and ftol = 1e-15 from a few starting points and
    the best objective is kept.  Degenerate ||g0|| = 0 or ||g_w|| = 0: d = g0 (/ (1+c^2)).
    """
    g = _as_array(g)
    K = g.shape[0]
    g0 = g.mean(axis=0)
    g0_norm = float(np.linalg.norm(g0))
    div = 1.0 + c * c if rescale else 1.0
    if c == 0.0 or g0_norm == 0.0:
        return g0 / div
    A = g @ g.T
    b = g @ g0
    a = c * g0_norm

    def obj(w: np.ndarray) -> float:
        return float(w @ b + a * np.sqrt(max(w @ A @ w, 0.0)))

    def jac(w: np.ndarray) -> np.ndarray:
        q = float(w @ A @ w)
        return b + (a / np.sqrt(q)) * (A @ w) if q > 0 else b

    simplex = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(K)}
    starts = [np.full(K, 1.0 / K)] + [np.eye(K)[i] * 0.5 + 0.5 / K for i in range(K)]
    best_w, best_f = None, np.inf
    for w0 in starts:
        res = scipy.optimize.minimize(
            obj,
            w0,
            jac=jac,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * K,
            constraints=[simplex],
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()
        f = obj(w)
        if f < best_f:
            best_w, best_f = w, f
    gw = best_w @ g
    gw_norm = float(np.linalg.norm(gw))
    if gw_norm == 0.0:
        return g0 / div
    return (g0 + a / gw_norm * gw) / div


def imtl(g: object, rcond: float | None = None) -> np.ndarray:
    """IMTL-G closed form (Liu et al. 2021; F-MTL appendix B.4), with explicit vectors.

    u_i = g_i / ||g_i||, U = [u_1 - u_2, ..., u_1 - u_K], D = [g_1 - g_2, ..., g_1 - g_K],
    alpha_{2..K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2..K}, d = sum alpha_i g_i.
    Conventions shared with the production code (documented there): tasks with g_i = 0 are
    left out (weight 0) and "task 1" is the first nonzero one; if D U^T is numerically
    singular (smallest singular value <= rcond * largest, rcond default 100 K eps) the
    pseudo-inverse with that cutoff replaces the inverse; all-zero g gives d = 0.
    """
    g = _as_array(g)
    K = g.shape[0]
    if rcond is None:
        rcond = 100.0 * K * np.finfo(np.float64).eps
    norms = np.linalg.norm(g, axis=1)
    idx = [i for i in range(K) if norms[i] > 0.0]
    if not idx:
        return np.zeros(g.shape[1])
    gs = g[idx]
    if len(idx) == 1:
        return gs[0].copy()
    u = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    U = u[0] - u[1:]  # rows u_1 - u_i
    D = gs[0] - gs[1:]  # rows g_1 - g_i
    M = D @ U.T
    r = gs[0] @ U.T
    s = np.linalg.svd(M, compute_uv=False)
    if s[-1] <= rcond * s[0]:
        inv = np.linalg.pinv(M, rcond=rcond)
    else:
        inv = np.linalg.inv(M)
    alpha_rest = r @ inv
    alpha = np.concatenate([[1.0 - alpha_rest.sum()], alpha_rest])
    return alpha @ gs


def nash(g: object) -> np.ndarray:
    """Nash-MTL (Navon et al. 2022): alpha > 0 with <g_i, d> alpha_i = 1.

    The literal residual F_i(alpha) = <g_i, sum_j alpha_j g_j> alpha_i - 1 is driven to zero
    by independent scipy solvers and the candidate with the smallest residual is kept
    (it must be below 1e-9): MINPACK hybrd and Levenberg-Marquardt in log-coordinates
    alpha = exp(beta) (which keep alpha > 0), and trust-exact minimisation of the convex
    f(alpha) = 1/2 ||sum_i alpha_i g_i||^2 - sum_i log alpha_i (+inf outside alpha > 0),
    whose result is polished by hybrd started there.
    Zero gradients get alpha_i = 0 (the production code's documented convention).
    Returns d = sum_i alpha_i g_i.
    """
    g = _as_array(g)
    K = g.shape[0]
    idx = [i for i in range(K) if np.linalg.norm(g[i]) > 0.0]
    if not idx:
        return np.zeros(g.shape[1])
    gs = g[idx]
    Gmat = gs @ gs.T

    def residual_alpha(alpha: np.ndarray) -> np.ndarray:
        d = alpha @ gs
        return (gs @ d) * alpha - 1.0

    def residual(beta: np.ndarray) -> np.ndarray:
        return residual_alpha(np.exp(beta))

    def jacobian(beta: np.ndarray) -> np.ndarray:
        alpha = np.exp(beta)
        d = alpha @ gs
        return (Gmat * alpha[None, :]) * alpha[:, None] + np.diag((gs @ d) * alpha)

    def f(alpha: np.ndarray) -> float:
        if np.any(alpha <= 0.0):
            return np.inf
        d = alpha @ gs
        return float(0.5 * d @ d - np.sum(np.log(alpha)))

    beta0 = -np.log(np.linalg.norm(gs, axis=1))
    candidates = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for method, options in (
            ("hybr", {"xtol": 1e-15}),
            ("lm", {"xtol": 1e-15, "ftol": 1e-15}),
        ):
            sol = scipy.optimize.root(residual, beta0, jac=jacobian, method=method, options=options)
            candidates.append(np.exp(sol.x))
        sol = scipy.optimize.minimize(
            f,
            np.exp(beta0),
            jac=lambda a: Gmat @ a - 1.0 / a,
            hess=lambda a: Gmat + np.diag(1.0 / (a * a)),
            method="trust-exact",
            options={"gtol": 1e-14},
        )
        candidates.append(sol.x)
        if np.all(sol.x > 0):
            # trust-exact may stop slightly short (~1e-8); polish its point with hybrd.
            sol = scipy.optimize.root(
                residual, np.log(sol.x), jac=jacobian, method="hybr", options={"xtol": 1e-15}
            )
            candidates.append(np.exp(sol.x))
        errors = [
            float(np.max(np.abs(residual_alpha(a)))) if np.all(a > 0) else np.inf
            for a in candidates
        ]
    best = int(np.argmin(errors))
    if not errors[best] < 1e-9:
        raise RuntimeError(f"nash oracle did not converge (residual {errors[best]:.2e})")
    return candidates[best] @ gs


def normalized(g: object, normalize: str = "l2", scale: str = "tasks", oracle=mgda,
               **kw: object) -> np.ndarray:
    """The F-MTL authors' convention written out on explicit vectors: every task gradient
    divided by its own L2 norm (a zero gradient stays zero) before the aggregator, and the
    aggregated direction times K (``scale="tasks"``)."""
    g = _as_array(g)
    if normalize == "l2":
        n = np.linalg.norm(g, axis=1)
        g = np.where(n[:, None] > 0, g / np.where(n > 0, n, 1.0)[:, None], 0.0)
    d = oracle(g, **kw)
    return d * g.shape[0] if scale == "tasks" else d


# --------------------------------------------------------------------------------------
# Jacobian descent and the later aggregators
# --------------------------------------------------------------------------------------
def dual_cone_projection(g: object, x: np.ndarray) -> np.ndarray:
    """pi_J(x) = argmin_{y : g_j . y >= 0 for all j} ||y - x|| (Quinton & Rey 2024, eq. 3),
    by enumerating the sets S of tight constraints: on S, y = x + g_S^T mu with g_S y = 0
    (stationarity of 1/2 ||y - x||^2 - mu . g_S y); the projection is the candidate with
    mu >= 0 that satisfies every constraint (KKT; it is unique). Least squares handles a
    rank-deficient g_S. Fine for K <= 8."""
    g = _as_array(g)
    K = g.shape[0]
    scale = max(float(np.max(np.abs(g))), 1e-300) * max(float(np.linalg.norm(x)), 1e-300)
    best = None
    for size in range(K + 1):
        for S in itertools.combinations(range(K), size):
            S = list(S)
            if S:
                mu = -np.linalg.lstsq(g[S] @ g[S].T, g[S] @ x, rcond=None)[0]
                y = x + mu @ g[S]
                if np.any(mu < -1e-9 * max(1.0, float(np.abs(mu).max()))):
                    continue
            else:
                y = x.copy()
            if np.all(g @ y >= -1e-9 * scale):
                if best is None or np.linalg.norm(y - x) < np.linalg.norm(best - x) - 1e-12 * \
                        np.linalg.norm(x):
                    best = y
    assert best is not None
    return best


def _regularised(g: np.ndarray, norm_eps: float, reg_eps: float) -> tuple[np.ndarray, float]:
    """TorchJD's normalisation and ridge written on the gradients: G / tr G + reg I is the
    Gram matrix of [g / sqrt(tr G), sqrt(reg) I]. Returns the augmented rows and sqrt(tr G)."""
    K = g.shape[0]
    tr = float(np.sum(g * g))
    t = 0.0 if tr < norm_eps else np.sqrt(tr)
    gn = np.zeros_like(g) if t == 0.0 else g / t
    return np.concatenate([gn, np.sqrt(reg_eps) * np.eye(K)], axis=1), t


def _projected_d(g: np.ndarray, U: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """sum_b of the weights of pi(J'^T u_b) in the regularised problem, mapped back to d =
    J^T w: the last K coordinates of J'^T v are sqrt(reg) v."""
    ga, _ = _regularised(g, norm_eps, reg_eps)
    n = g.shape[1]
    w = np.zeros(g.shape[0])
    for u in U:
        y = dual_cone_projection(ga, u @ ga)
        w += y[n:] / np.sqrt(reg_eps)
    return w @ g


def upgrad(g: object, pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
           ) -> np.ndarray:
    """UPGrad (Quinton & Rey 2024, eq. 5): d = sum_i pi_J(u_i g_i), with the projection of
    eq. 3 on the regularised Jacobian of their reference implementation (G / tr G + reg I)."""
    g = _as_array(g)
    K = g.shape[0]
    u = np.full(K, 1.0 / K) if pref_vector is None else np.asarray(pref_vector, float)
    return _projected_d(g, np.diag(u), norm_eps, reg_eps)


def dualproj(g: object, pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
             ) -> np.ndarray:
    """DualProj: d = pi_J(J^T u) (Quinton & Rey 2024; GEM's eq. 11), regularised as above."""
    g = _as_array(g)
    K = g.shape[0]
    u = np.full(K, 1.0 / K) if pref_vector is None else np.asarray(pref_vector, float)
    return _projected_d(g, u[None, :], norm_eps, reg_eps)


def aligned_mtl(g: object, pref_vector=None, scale_mode: str = "min") -> np.ndarray:
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1) from the SVD of the stacked gradients
    J = P diag(sigma) Q^T: the aligned matrix sigma_s P Q^T has equal singular values, and
    d = (sigma_s P Q^T)^T u. Singular values with sigma^2 <= max sigma^2 * K * eps dropped."""
    g = _as_array(g)
    K = g.shape[0]
    u = np.full(K, 1.0 / K) if pref_vector is None else np.asarray(pref_vector, float)
    P, sig, Qt = np.linalg.svd(g, full_matrices=False)
    lam = sig**2
    keep = lam > (lam.max() if lam.size else 0.0) * K * np.finfo(np.float64).eps
    if not np.any(keep):
        return u @ g
    lam_k = np.sort(lam[keep])
    s = {"min": lam_k[0], "median": lam_k[(len(lam_k) - 1) // 2], "rmse": lam_k.mean()}
    return np.sqrt(s[scale_mode]) * (P[:, keep] @ Qt[keep]).T @ u


def fairgrad(g: object, alpha: float) -> np.ndarray:
    """FairGrad (Ban & Ji 2024, eq. 4): w > 0 with g_i . (sum_j w_j g_j) = w_i^(-1/alpha),
    solved with scipy's hybrid root finder in w = exp(y) (so w stays positive)."""
    g = _as_array(g)
    G = g @ g.T

    def residual(y: np.ndarray) -> np.ndarray:
        w = np.exp(y)
        return (g @ (w @ g)) * w ** (1.0 / alpha) - 1.0

    y0 = -alpha / (alpha + 1.0) * np.log(np.diag(G))
    sol = scipy.optimize.root(residual, y0, method="hybr", tol=1e-15)
    sol = scipy.optimize.root(residual, sol.x, method="lm", tol=1e-15)
    return np.exp(sol.x) @ g


def gradvac(g: object, beta: float = 0.5, eps: float = 1e-8, targets: np.ndarray | None = None,
            generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GradVac (Wang et al. 2021, eq. 2 and Alg. 1), literal loop over vectors; returns
    (d, updated targets). Orders: for i = 0..K-1, ``torch.randperm(K - 1, generator)``
    picks the order of the other tasks [0..i-1, i+1..K-1] (the documented draw order)."""
    g = _as_array(g)
    K = g.shape[0]
    phi_hat = np.zeros((K, K)) if targets is None else np.array(targets, dtype=np.float64)
    d = np.zeros(g.shape[1])
    for i in range(K):
        others = [j for j in range(K) if j != i]
        order = [others[k] for k in torch.randperm(K - 1, generator=generator).tolist()]
        gi = g[i].copy()
        for j in order:
            ni, nj = np.linalg.norm(gi), np.linalg.norm(g[j])
            phi = float(gi @ g[j]) / (ni * nj + eps)
            hat = phi_hat[i, j]
            if phi < hat:
                gi = gi + ni * (hat * np.sqrt(max(1 - phi**2, 0.0))
                                - phi * np.sqrt(max(1 - hat**2, 0.0))) / (
                    nj * np.sqrt(max(1 - hat**2, 0.0)) + eps) * g[j]
            phi_hat[i, j] = (1 - beta) * hat + beta * phi
        d += gi
    return d, phi_hat


def rlw(g: object, generator: torch.Generator | None = None) -> np.ndarray:
    """RLW (Lin et al. 2022, Alg. 2): w = softmax(z), z ~ N(0, I) (torch.randn(K, float64))."""
    g = _as_array(g)
    z = torch.randn(g.shape[0], generator=generator, dtype=torch.float64).numpy()
    w = np.exp(z - z.max())
    return (w / w.sum()) @ g
