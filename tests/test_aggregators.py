"""Tests of the Gram-matrix aggregators against float64 oracles on stacked gradients.

Production code maps G = g g^T to weights w; the oracle (tests/oracles/aggregators.py) maps
the stacked gradients g to the update d directly, from the papers' definitions.  We compare
``w @ g`` with the oracle's ``d`` using
``||d - d_ref|| <= rtol * ||d_ref|| + atol * max_i ||g_i||``
(the ``atol`` term covers answers that are legitimately ~0, e.g. MGDA when 0 is in the hull).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlsam_ext.aggregators import (
    AGGREGATORS,
    cagrad,
    check_weights,
    draw_permutations,
    get_aggregator,
    imtl,
    mgda,
    nash,
    pcgrad,
)

try:  # tests/ on sys.path (pytest rootdir-less layout) or the repo root (tests as a package)
    from tests.oracles import aggregators as oracle
except ImportError:  # pragma: no cover - depends on how pytest was invoked
    from oracles import aggregators as oracle

# --------------------------------------------------------------------------------------
# Tolerances, all in one place.  (rtol, atol) pairs for the d-vs-oracle metric above.
# --------------------------------------------------------------------------------------
TOL = {
    # float64 G, exact formulas: rounding only.
    "ls": (1e-12, 1e-13),
    "mean": (1e-12, 1e-13),
    "pcgrad": (1e-10, 1e-12),
    "imtl": (1e-8, 1e-10),
    # Wolfe's active set is exact once the face is found; the oracle enumerates faces.
    "mgda": (1e-9, 1e-10),
    # The oracle is SLSQP with ftol=1e-15 (observed agreement ~1e-11); 1e-7 leaves margin.
    "cagrad": (1e-7, 1e-9),
    # Production adds a 1e-12 relative ridge (observed agreement ~1e-12).
    "nash": (1e-9, 1e-11),
    # float32 G input (G rounded to ~6e-8 relative, weights returned in float32).
    "float32": (2e-4, 2e-5),
    # MGDA objective: w^T G w within this relative slack of the true minimum / any v.
    "mgda_objective": 1e-10,
    # Generic property checks in float64 (inner products relative to max ||g||^2).
    "property": 1e-9,
}

NAMES = ("ls", "mean", "mgda", "pcgrad", "cagrad", "imtl", "nash")
# (K, n): n < K makes G singular (rank n).
CASES = ((1, 4), (2, 6), (3, 8), (5, 12), (5, 40), (2, 1), (3, 2), (5, 3), (6, 2))
SEEDS = (0, 1, 2)


def make_grads(K: int, n: int, seed: int, shift: float | None = None) -> np.ndarray:
    """Random stacked gradients [K, n] with a shared component along e_0.

    The shift makes 0 lie outside the convex hull (needed for Nash-MTL to have a solution
    and for CAGrad's dual to be smooth at the optimum) while leaving conflicts between tasks.
    Singular cases (n < K) get a bigger shift because few dimensions make 0 in the hull
    likely.
    """
    rng = np.random.default_rng(1000 * K + 10 * n + seed)
    g = rng.standard_normal((K, n))
    if shift is None:
        shift = 1.0 if n >= K else 3.0
    g[:, 0] += shift
    return g


def gram(g: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gt = torch.from_numpy(g)
    return (gt @ gt.T).to(dtype)


def run(name: str, G: torch.Tensor, seed: int = 0, **options: object) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return AGGREGATORS[name](G, generator=gen, **options)


def reference(name: str, g: np.ndarray, seed: int = 0, **options: object) -> np.ndarray:
    if name == "pcgrad":
        return oracle.pcgrad(g, torch.Generator().manual_seed(seed))
    return getattr(oracle, name)(g, **options)


def assert_close_d(d: np.ndarray, d_ref: np.ndarray, g: np.ndarray, tol: tuple, what: str):
    rtol, atol = tol
    scale = float(np.max(np.linalg.norm(g, axis=1))) if g.size else 0.0
    err = float(np.linalg.norm(d - d_ref))
    bound = rtol * float(np.linalg.norm(d_ref)) + atol * scale
    assert err <= bound, f"{what}: ||d - d_ref|| = {err:.3e} > {bound:.3e}"


# --------------------------------------------------------------------------------------
# Oracle comparisons
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("K,n", CASES)
def test_matches_oracle_float64(name: str, K: int, n: int) -> None:
    for seed in SEEDS:
        g = make_grads(K, n, seed)
        w = run(name, gram(g), seed)
        assert w.dtype == torch.float64 and w.shape == (K,)
        d = w.numpy() @ g
        assert_close_d(d, reference(name, g, seed), g, TOL[name], f"{name} K={K} n={n} s={seed}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("K,n", ((2, 6), (3, 8), (5, 12)))
def test_matches_oracle_float32_input(name: str, K: int, n: int) -> None:
    for seed in SEEDS:
        g = make_grads(K, n, seed)
        G32 = gram(g, torch.float32)
        w = run(name, G32, seed)
        assert w.dtype == torch.float32 and w.shape == (K,)
        d = w.double().numpy() @ g
        assert_close_d(d, reference(name, g, seed), g, TOL["float32"], f"{name} f32 s={seed}")


@pytest.mark.parametrize("c", (0.1, 0.4, 0.8))
@pytest.mark.parametrize("rescale", (True, False))
def test_cagrad_options_match_oracle(c: float, rescale: bool) -> None:
    for seed in SEEDS:
        g = make_grads(4, 10, seed)
        w = cagrad(gram(g), c=c, rescale=rescale)
        d_ref = oracle.cagrad(g, c=c, rescale=rescale)
        assert_close_d(w.numpy() @ g, d_ref, g, TOL["cagrad"], f"cagrad c={c} s={seed}")


def test_cagrad_conflicting_gradients_match_oracle() -> None:
    # No shared component: strongly conflicting tasks (0 is not in the hull for n >> K).
    for seed in SEEDS:
        g = make_grads(3, 30, seed, shift=0.0)
        d = cagrad(gram(g)).numpy() @ g
        assert_close_d(d, oracle.cagrad(g), g, TOL["cagrad"], f"cagrad conflict s={seed}")


def test_mgda_zero_in_hull_matches_oracle() -> None:
    # Opposite gradients: 0 is in the hull and the min-norm point is exactly 0.
    for seed in SEEDS:
        g = make_grads(4, 2, seed, shift=0.0)
        g = np.concatenate([g, -g[:1]])
        d = mgda(gram(g)).numpy() @ g
        d_ref = oracle.mgda(g)
        assert np.linalg.norm(d_ref) < 1e-12
        assert_close_d(d, d_ref, g, TOL["mgda"], f"mgda zero-in-hull s={seed}")


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True)
@given(K=st.integers(2, 7), n=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_mgda_simplex_and_minimal(K: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((K, n)) + rng.uniform(0.0, 2.0) * rng.standard_normal(n)
    G = gram(g)
    w = mgda(G).numpy()
    assert np.all(w >= 0.0) and abs(w.sum() - 1.0) < 1e-12
    Gn = G.numpy()
    f = float(w @ Gn @ w)
    scale = float(np.max(np.diag(Gn)))
    slack = TOL["mgda_objective"] * scale
    V = np.concatenate([rng.dirichlet(np.ones(K), size=500), np.eye(K)])
    assert f <= float(np.min(np.einsum("ij,jk,ik->i", V, Gn, V))) + slack
    if K <= 6:
        f_true = oracle.mgda_objective(g)
        assert abs(f - f_true) <= TOL["mgda_objective"] * max(f_true, scale)


def test_mgda_optimality_certificate_large_k() -> None:
    # Wolfe's optimality test is a certificate: with x = sum_i w_i g_i, w on the simplex and
    # min_j <x, g_j> >= ||x||^2 - gap, ||x||^2 exceeds the true minimum by at most gap.
    rng = np.random.default_rng(11)
    for K, n in ((10, 50), (20, 8), (40, 100), (40, 3)):
        g = rng.standard_normal((K, n)) + rng.uniform(0.0, 1.0) * rng.standard_normal(n)
        G = gram(g).numpy()
        w = mgda(torch.from_numpy(G)).numpy()
        assert np.all(w >= 0.0) and abs(w.sum() - 1.0) < 1e-12
        gap = float(w @ G @ w - np.min(G @ w))
        assert gap <= TOL["mgda_objective"] * float(np.max(np.diag(G)))


def test_pcgrad_two_tasks_no_conflict_left() -> None:
    scale = TOL["property"]
    for seed in range(20):
        g = make_grads(2, 5, seed, shift=0.0)
        d = pcgrad(gram(g), generator=torch.Generator().manual_seed(seed)).numpy() @ g
        sq = float(np.max(np.sum(g * g, axis=1)))
        assert np.all(g @ d >= -scale * sq), (seed, g @ d)


def test_pcgrad_without_conflict_is_sum() -> None:
    g = np.abs(make_grads(4, 6, 0))  # all inner products >= 0
    w = pcgrad(gram(g))
    torch.testing.assert_close(w, torch.ones(4, dtype=torch.float64), rtol=0, atol=0)


def test_pcgrad_reproducible_and_documented_draw_order() -> None:
    g = make_grads(5, 4, 7, shift=0.0)
    G = gram(g)
    w1 = pcgrad(G, generator=torch.Generator().manual_seed(123))
    w2 = pcgrad(G, generator=torch.Generator().manual_seed(123))
    assert torch.equal(w1, w2)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    perms = draw_permutations(5, gen_a)
    expected = torch.stack([torch.randperm(5, generator=gen_b) for _ in range(5)])
    assert torch.equal(perms, expected)
    # Exactly K randperm(K) calls are consumed: both generators are in the same state.
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    # The global RNG path (generator=None) works and is reproducible under manual_seed.
    torch.manual_seed(9)
    w3 = pcgrad(G)
    torch.manual_seed(9)
    assert torch.equal(w3, pcgrad(G))


@pytest.mark.parametrize("name", ("ls", "mean", "mgda", "imtl", "nash", "cagrad"))
def test_permutation_equivariance(name: str) -> None:
    rng = np.random.default_rng(42)
    for K, n in ((2, 5), (3, 6), (5, 9)):
        for seed in SEEDS:
            g = make_grads(K, n, seed)
            G = gram(g)
            w = run(name, G).numpy()
            perm = rng.permutation(K)
            wp = run(name, G[perm][:, perm]).numpy()
            np.testing.assert_allclose(wp, w[perm], rtol=1e-8, atol=1e-10 * np.abs(w).max())


@pytest.mark.parametrize("name", ("mgda", "pcgrad", "cagrad", "imtl", "nash"))
def test_scale_behaviour(name: str) -> None:
    # Weights depend on directions only (nash: alpha scales like ||g||^-1).
    g = make_grads(4, 7, 3)
    G = gram(g)
    w = run(name, G).numpy()
    ws = run(name, 37.0 * G).numpy()
    factor = 1.0 / math.sqrt(37.0) if name == "nash" else 1.0
    np.testing.assert_allclose(ws, factor * w, rtol=1e-9, atol=1e-12)


def test_imtl_equal_projections() -> None:
    for K, n in ((2, 3), (3, 8), (5, 12), (6, 6)):
        for seed in SEEDS:
            g = make_grads(K, n, seed, shift=0.0)
            w = imtl(gram(g)).numpy()
            assert abs(w.sum() - 1.0) < 1e-10
            d = w @ g
            proj = (g @ d) / np.linalg.norm(g, axis=1)
            np.testing.assert_allclose(proj, proj[0], rtol=TOL["property"], atol=1e-12)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_nash_stationarity() -> None:
    for K, n in ((2, 4), (3, 9), (5, 12), (5, 3), (8, 20)):
        for seed in SEEDS:
            G = gram(make_grads(K, n, seed))
            a = nash(G).numpy()
            assert np.all(a > 0.0)
            np.testing.assert_allclose((G.numpy() @ a) * a, np.ones(K), rtol=0, atol=1e-9)


def test_cagrad_c_zero_is_mean() -> None:
    G = gram(make_grads(5, 8, 0, shift=0.0))
    for rescale in (True, False):
        w = cagrad(G, c=0.0, rescale=rescale)
        torch.testing.assert_close(w, torch.full((5,), 0.2, dtype=torch.float64))


def test_cagrad_primal_optimality() -> None:
    # d (before rescale) maximises min_i <g_i, d> over the ball ||d - g0|| <= c ||g0||
    # (Liu et al. 2021, the CAGrad objective); so it beats g0 itself (the mean) and random
    # points of the ball, and it lies on the sphere ||d - g0|| = c ||g0||.
    rng = np.random.default_rng(0)
    c = 0.4
    for K, n in ((2, 5), (3, 8), (5, 12), (4, 3)):
        for seed in SEEDS:
            g = make_grads(K, n, seed, shift=0.5)
            d = cagrad(gram(g), c=c, rescale=False).numpy() @ g
            g0 = g.mean(axis=0)
            r = c * np.linalg.norm(g0)
            tol = TOL["property"] * float(np.max(np.sum(g * g, axis=1)))
            assert abs(np.linalg.norm(d - g0) - r) <= 1e-9 * max(r, 1.0)
            worst = float(np.min(g @ d))
            assert worst >= float(np.min(g @ g0)) - tol
            dirs = rng.standard_normal((200, n))
            dirs *= (r * rng.uniform(0, 1, (200, 1)) ** (1 / n)) / np.linalg.norm(
                dirs, axis=1, keepdims=True
            )
            assert worst >= float(np.max(np.min((g0 + dirs) @ g.T, axis=1))) - tol


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------
def test_single_task() -> None:
    G = torch.tensor([[4.0]], dtype=torch.float64)
    for name in ("ls", "mean", "mgda", "pcgrad", "imtl"):
        assert torch.equal(run(name, G), torch.ones(1, dtype=torch.float64)), name
    c = 0.4
    torch.testing.assert_close(cagrad(G, c=c), torch.tensor([(1 + c) / (1 + c * c)]).double())
    torch.testing.assert_close(nash(G), torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("K", (1, 2, 3, 5))
def test_all_zero_gradients(K: int) -> None:
    G = torch.zeros(K, K, dtype=torch.float64)
    expected = {
        "ls": torch.ones(K),
        "mean": torch.full((K,), 1.0 / K),
        "mgda": torch.full((K,), 1.0 / K) if K > 1 else torch.ones(1),
        "pcgrad": torch.ones(K),
        "cagrad": torch.full((K,), 1.0 / K) / (1 + 0.4**2),
        "imtl": torch.full((K,), 1.0 / K) if K > 1 else torch.ones(1),
        "nash": torch.full((K,), 1.0 / K),
    }
    for name in NAMES:
        w = run(name, G)
        torch.testing.assert_close(w, expected[name].double(), msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_one_zero_gradient(name: str) -> None:
    for seed in SEEDS:
        g = make_grads(4, 6, seed)
        g[2] = 0.0
        w = run(name, gram(g), seed)
        check_weights(w, 4, name)
        if name in ("imtl", "nash"):
            assert w[2].item() == 0.0  # documented: no direction -> weight 0
        if name == "cagrad":
            continue  # 0 is a hull vertex: the dual is non-smooth there; finiteness only
        d = w.numpy() @ g
        assert_close_d(d, reference(name, g, seed), g, TOL[name], f"{name} zero-task s={seed}")


@pytest.mark.parametrize("name", NAMES)
def test_duplicated_gradients(name: str) -> None:
    for seed in SEEDS:
        g = make_grads(3, 6, seed)
        g = np.concatenate([g, g[1:2]])  # task 3 duplicates task 1
        w = run(name, gram(g), seed)
        check_weights(w, 4, name)
        d = w.numpy() @ g
        assert_close_d(d, reference(name, g, seed), g, TOL[name], f"{name} dup s={seed}")


def test_mgda_two_equal_gradients_uniform() -> None:
    g = np.array([[1.0, 2.0], [1.0, 2.0]])
    torch.testing.assert_close(mgda(gram(g)), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_nash_no_solution_is_finite() -> None:
    # 0 inside the hull: G alpha = 1/alpha has no solution; the documented ridge keeps the
    # answer finite and d keeps its exact-solution norm ||d||^2 = sum_i alpha_i <g_i, d> ~ K.
    g = np.array([[1.0, 0.0], [-1.0, 0.1], [0.0, -1.0]])
    w = nash(gram(g))
    check_weights(w, 3, "nash")
    assert torch.all(w > 0)
    d = w.numpy() @ g
    assert float(d @ d) <= 3.0 + 1e-6


# --------------------------------------------------------------------------------------
# Bad input, registry, check_weights
# --------------------------------------------------------------------------------------
BAD_G = {
    "1-D": torch.ones(3, dtype=torch.float64),
    "non-square": torch.ones(2, 3, dtype=torch.float64),
    "3-D": torch.ones(2, 2, 2, dtype=torch.float64),
    "empty": torch.ones(0, 0, dtype=torch.float64),
    "NaN": torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64),
    "inf": torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]),
    "integer": torch.eye(2, dtype=torch.int64),
    "ndarray": np.eye(2),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", sorted(BAD_G))
def test_bad_gram_raises(name: str, bad: str) -> None:
    with pytest.raises(ValueError):
        run(name, BAD_G[bad])


def test_bad_options_raise() -> None:
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError):
        cagrad(G, c=-0.1)
    with pytest.raises(ValueError):
        cagrad(G, c=float("nan"))
    with pytest.raises(ValueError):
        nash(G, max_iter=0)
    with pytest.raises(ValueError):
        nash(G, tol=0.0)
    with pytest.raises(ValueError):
        imtl(G, rcond=-1.0)


def test_registry_names_and_unknown() -> None:
    added = {"upgrad", "dualproj", "aligned_mtl", "fairgrad", "gradvac", "rlw"}
    assert set(AGGREGATORS) == set(NAMES) | added  # (the added ones: test_aggregators_added)
    with pytest.raises(ValueError, match="mgda"):
        get_aggregator("does-not-exist")
    with pytest.raises(ValueError, match="c"):
        get_aggregator("cagrad", not_an_option=1)
    with pytest.raises(ValueError):
        get_aggregator(42)  # type: ignore[arg-type]


def test_get_aggregator_binds_options_and_generator() -> None:
    G = gram(make_grads(4, 3, 1, shift=0.0))
    agg = get_aggregator("CAGrad", c=0.0)
    torch.testing.assert_close(agg(G, None), torch.full((4,), 0.25, dtype=torch.float64))
    pc = get_aggregator("pcgrad")
    w1 = pc(G, torch.Generator().manual_seed(3))
    w2 = pcgrad(G, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2)
    for name in AGGREGATORS:
        opts = {"alpha": 1.0} if name == "fairgrad" else {}
        w = get_aggregator(name, **opts)(G, torch.Generator().manual_seed(0))
        check_weights(w, 4, name)


def test_get_aggregator_user_callables() -> None:
    G = torch.eye(3, dtype=torch.float64)
    seen = {}

    def plain(G: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.ones(G.shape[0], dtype=G.dtype)

    def with_gen(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        seen["generator"] = generator
        return torch.ones(G.shape[0], dtype=G.dtype)

    torch.testing.assert_close(
        get_aggregator(plain, scale=2.0)(G, None), 2.0 * torch.ones(3).double()
    )
    gen = torch.Generator()
    get_aggregator(with_gen)(G, gen)
    assert seen["generator"] is gen


def test_check_weights() -> None:
    w = torch.ones(3)
    assert check_weights(w, 3, "x") is w
    for bad in (
        torch.ones(2),
        torch.ones(1, 3),
        torch.tensor([1.0, float("nan"), 1.0]),
        torch.tensor([1.0, float("inf"), 1.0]),
        torch.ones(3, dtype=torch.int64),
        [1.0, 1.0, 1.0],
    ):
        with pytest.raises(ValueError):
            check_weights(bad, 3, "x")


# --------------------------------------------------------------------------------------
# Device (runs only where CUDA is available)
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name: str) -> None:
    for K, n in ((2, 5), (5, 12), (5, 3)):
        G = gram(make_grads(K, n, 0))
        for dtype in (torch.float64, torch.float32):
            w_cpu = run(name, G.to(dtype))
            w_gpu = run(name, G.to(dtype).cuda())
            assert w_gpu.device.type == "cuda" and w_gpu.dtype == dtype
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=tol, atol=tol)


def test_user_weights_follow_the_gram_device() -> None:
    """A user aggregator may build its weights on the CPU (torch.ones(K)) while G sits on a
    GPU: they are moved to G's device. "meta" stands in for the GPU."""
    agg = get_aggregator(lambda G: torch.ones(G.shape[0]))
    w = agg(torch.empty(3, 3, device="meta"))
    assert w.device.type == "meta" and w.shape == (3,)
