"""The batched dual-cone QP solver (UPGrad, DualProj) against a brute-force solution that
enumerates every active set (K <= 6), and its KKT conditions on larger, ill-conditioned and
rank-deficient problems, through each of its stages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtlsam_ext.aggregators.dual_cone import solve_nonneg_qp

EXACT = 1e-10  # well-conditioned A: the active set is found, the rest is one solve


def brute_force(A: np.ndarray, q: np.ndarray) -> np.ndarray:
    """argmin_{x >= 0} 1/2 x^T A x + q^T x: the free set F whose equality solution
    x_F = -A_FF^{-1} q_F is >= 0 with multipliers (A x + q) >= 0 off F (KKT, unique for A
    positive definite), found by trying all 2^K free sets."""
    K = len(q)
    found = []
    for size in range(K + 1):
        for F in itertools.combinations(range(K), size):
            x = np.zeros(K)
            if F:
                x[list(F)] = np.linalg.solve(A[np.ix_(F, F)], -q[list(F)])
            lam = A @ x + q
            tol = 1e-12 * (np.abs(A).max() + np.abs(q).max())
            if np.all(x >= -tol) and np.all(lam >= -tol):
                found.append(x)
    assert found, "no KKT point: A is not positive definite"
    return found[0]


def problem(K: int, seed: int, kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """A = G / tr G + 1e-4 I (as UPGrad builds it) and UPGrad's q = A diag(1/K)."""
    rng = np.random.default_rng(seed)
    n = {"random": 3 * K, "rank": max(1, K // 3), "ill": 3 * K}[kind]
    J = rng.standard_normal((K, n))
    if kind == "ill":
        J = J * np.logspace(0, -4, K)[:, None]
    G = J @ J.T
    A = G / np.trace(G) + 1e-4 * np.eye(K)
    return A, A / K


def run(A: np.ndarray, q: np.ndarray, **kw) -> np.ndarray:
    return solve_nonneg_qp(torch.from_numpy(A), torch.from_numpy(q), **kw).numpy()


@pytest.mark.parametrize("K", (1, 2, 3, 4, 5, 6))
def test_matches_brute_force_on_upgrad_problems(K: int) -> None:
    for seed in range(20):
        A, Q = problem(K, seed)
        X = run(A, Q)
        for b in range(K):
            x = brute_force(A, Q[b])
            assert np.abs(X[b] - x).max() <= EXACT * max(1.0, np.abs(x).max()), (K, seed, b)


@pytest.mark.parametrize("K", (2, 3, 5, 6))
def test_matches_brute_force_on_random_qps(K: int) -> None:
    """Random positive definite A and right-hand sides of both signs."""
    rng = np.random.default_rng(K)
    for _ in range(30):
        M = rng.standard_normal((K, K))
        A = M @ M.T + 0.1 * np.eye(K)
        Q = rng.standard_normal((7, K))
        X = run(A, Q)
        for b in range(7):
            x = brute_force(A, Q[b])
            assert np.abs(X[b] - x).max() <= EXACT * max(1.0, np.abs(x).max())


@pytest.mark.parametrize("kw", [dict(pdas_chunks=0), dict(chunk=1, pdas_chunks=1)],
                         ids=["primal-active-set-only", "one-pdas-iteration-then-fallback"])
def test_fallback_stage_alone_matches_brute_force(kw: dict) -> None:
    """The primal active-set stage, which takes over where the primal-dual one cycles, is
    exact by itself (and from a primal-dual iterate that has not converged)."""
    for K in (2, 4, 6):
        for seed in range(10):
            for kind in ("random", "ill", "rank"):
                A, Q = problem(K, seed, kind)
                X = run(A, Q, fallback_chunks=6, **kw)
                for b in range(K):
                    x = brute_force(A, Q[b])
                    tol = EXACT if kind == "random" else 1e-8
                    assert np.abs(X[b] - x).max() <= tol * max(1.0, np.abs(x).max())


def kkt_residual(A: np.ndarray, Q: np.ndarray, X: np.ndarray) -> float:
    lam = X @ A + Q
    scale = np.abs(A).max() * max(np.abs(X).max(), np.abs(Q).max() / np.abs(A).max())
    return float(max(np.max(-X, initial=0), np.max(-lam, initial=0),
                     np.max(np.minimum(np.abs(X), np.abs(lam)))) / scale)


@pytest.mark.parametrize("kind", ("random", "ill", "rank"))
@pytest.mark.parametrize("K", (10, 40))
def test_kkt_conditions_on_large_problems(K: int, kind: str) -> None:
    for seed in range(5):
        A, Q = problem(K, seed, kind)
        assert kkt_residual(A, Q, run(A, Q)) <= 1e-11, (K, kind, seed)


def test_fixed_point_and_no_host_read_inside_a_chunk(monkeypatch) -> None:
    """A converged problem stays put under further iterations, and inside a chunk the solver
    reads nothing on the host (bool/item on a tensor would raise here)."""
    import mtlsam_ext.aggregators.dual_cone as dc

    A, Q = problem(8, 3)
    At, Qt = torch.from_numpy(A), torch.from_numpy(Q)
    x1, act = dc._pdas(At, Qt, Qt > 0, 20)
    x2, _ = dc._pdas(At, Qt, act, 5)
    assert torch.equal(x1, x2)

    def refuse(*_a, **_k):
        raise AssertionError("host read inside an iteration")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    dc._pdas(At, Qt, Qt > 0, 6)
    dc._primal_active_set(At, Qt, torch.zeros_like(Qt), 6, torch.full((8,), 1e-12))
