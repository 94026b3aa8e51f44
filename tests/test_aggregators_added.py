"""UPGrad, DualProj, Aligned-MTL, FairGrad, GradVac and RLW: against the float64 oracles
written from the papers (tests/oracles/aggregators.py), their defining properties, bad
options, and GradVac's state inside MTLSAM (saved, resumed bit for bit, restored by a failed
step). Same metric as tests/test_aggregators.py: ``||d - d_ref|| <= rtol ||d_ref|| + atol
max_i ||g_i||`` on ``d = w @ g``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mtlsam_ext import MTLSAM
from mtlsam_ext.aggregators import (
    AGGREGATORS,
    GradVac,
    aggregator_state,
    aligned_mtl,
    dualproj,
    fairgrad,
    get_aggregator,
    gradvac,
    nash,
    rlw,
    upgrad,
)
from tests.models import TwoTask
from tests.oracles import aggregators as oracle
from tests.test_aggregators import CASES, SEEDS, assert_close_d, gram, make_grads

NEW = ("upgrad", "dualproj", "aligned_mtl", "fairgrad", "gradvac", "rlw")
TOL = {
    # the oracle enumerates the tight constraints of the primal projection (1e-9 slack)
    "upgrad": (1e-9, 1e-11), "dualproj": (1e-9, 1e-11),
    "aligned_mtl": (1e-10, 1e-12),
    # the oracle is scipy's root finder at tol 1e-15
    "fairgrad": (1e-9, 1e-11),
    "gradvac": (1e-11, 1e-12), "rlw": (1e-12, 1e-13),
    "float32": (2e-4, 2e-5),
}
OPTIONS = {"fairgrad": {"alpha": 2.0}}


def run(name: str, G: torch.Tensor, seed: int = 0, **options: object) -> torch.Tensor:
    opts = {**OPTIONS.get(name, {}), **options}
    return AGGREGATORS[name](G, generator=torch.Generator().manual_seed(seed), **opts)


def reference(name: str, g: np.ndarray, seed: int = 0, **options: object) -> np.ndarray:
    opts = {**OPTIONS.get(name, {}), **options}
    if name == "gradvac":
        return oracle.gradvac(g, generator=torch.Generator().manual_seed(seed), **opts)[0]
    if name == "rlw":
        return oracle.rlw(g, generator=torch.Generator().manual_seed(seed))
    return getattr(oracle, name)(g, **opts)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("K,n", CASES)
def test_matches_oracle_float64(name: str, K: int, n: int) -> None:
    for seed in SEEDS:
        g = make_grads(K, n, seed)
        w = run(name, gram(g), seed)
        assert w.dtype == torch.float64 and w.shape == (K,)
        assert_close_d(w.numpy() @ g, reference(name, g, seed), g, TOL[name],
                       f"{name} K={K} n={n} s={seed}")


@pytest.mark.parametrize("name", NEW)
def test_matches_oracle_float32_input(name: str) -> None:
    for K, n in ((2, 6), (3, 8), (5, 12)):
        g = make_grads(K, n, 1)
        w = run(name, gram(g, torch.float32), 1)
        assert w.dtype == torch.float32
        assert_close_d(w.double().numpy() @ g, reference(name, g, 1), g, TOL["float32"], name)


@pytest.mark.parametrize("name,options", [
    ("upgrad", {"pref_vector": [0.5, 1.0, 2.0, 0.0]}),
    ("dualproj", {"pref_vector": [3.0, 1.0, 0.0, 1.0]}),
    ("upgrad", {"norm_eps": 0.0, "reg_eps": 1e-2}),
    ("aligned_mtl", {"scale_mode": "median"}),
    ("aligned_mtl", {"scale_mode": "rmse"}),
    ("aligned_mtl", {"pref_vector": [1.0, 2.0, 3.0, 4.0]}),
    ("fairgrad", {"alpha": 0.5}),
    ("fairgrad", {"alpha": 1.0}),
    ("fairgrad", {"alpha": 7.0}),
    ("gradvac", {"beta": 0.1}),
    ("gradvac", {"beta": 1.0, "eps": 0.0}),
])
def test_options_match_oracle(name: str, options: dict) -> None:
    for seed in SEEDS:
        g = make_grads(4, 9, seed, shift=0.5)
        w = run(name, gram(g), seed, **options)
        assert_close_d(w.numpy() @ g, reference(name, g, seed, **options), g, TOL[name],
                       f"{name} {options} s={seed}")


def test_gradvac_targets_follow_the_oracle_over_calls() -> None:
    """The EMA of targets carried over several calls, as the paper's Algorithm 1 does."""
    agg = GradVac(beta=0.3)
    gen_ours, gen_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    targets = None
    for step in range(4):
        g = make_grads(5, 8, step, shift=0.0)
        w = agg(gram(g), gen_ours)
        d_ref, targets = oracle.gradvac(g, beta=0.3, targets=targets, generator=gen_ref)
        assert_close_d(w.numpy() @ g, d_ref, g, TOL["gradvac"], f"step {step}")
        np.testing.assert_allclose(agg.targets.numpy(), targets, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------
def test_upgrad_and_dualproj_keep_the_preference_without_conflict() -> None:
    g = np.abs(make_grads(5, 7, 0))  # all inner products >= 0: nothing to project
    u = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4], dtype=torch.float64)
    for fn in (upgrad, dualproj):
        assert torch.equal(fn(gram(g)), torch.full((5,), 0.2, dtype=torch.float64))
        assert torch.equal(fn(gram(g), pref_vector=u), u)


def test_upgrad_and_dualproj_do_not_conflict() -> None:
    """The update is in the dual cone: <g_j, d> >= 0 for every task (with a negligible ridge;
    the default reg_eps relaxes this by ~1e-4 of the scale)."""
    for K, n in ((3, 8), (6, 10), (10, 30), (40, 100)):
        for seed in SEEDS:
            g = make_grads(K, n, seed, shift=0.0)
            for fn in (upgrad, dualproj):
                d = fn(gram(g), reg_eps=1e-12).numpy() @ g
                assert np.min(g @ d) >= -1e-8 * np.max(np.sum(g * g, axis=1)) * np.abs(d).max()


def test_aligned_mtl_equalises_the_singular_values() -> None:
    for K, n in ((3, 8), (5, 3), (10, 40)):
        g = make_grads(K, n, 0)
        G = gram(g)
        lam, V = torch.linalg.eigh(G)
        keep = lam > lam[-1] * K * torch.finfo(torch.float64).eps
        # column k of the balance matrix B: the weights for pref_vector = e_k
        eye = torch.eye(K, dtype=torch.float64)
        B = torch.stack([aligned_mtl(G, pref_vector=e) for e in eye], dim=1)
        aligned = B.T @ torch.from_numpy(g)  # rows: the aligned gradients
        sv = torch.linalg.svdvals(aligned)[: int(keep.sum())]
        torch.testing.assert_close(sv, torch.full_like(sv, float(lam[keep].min().sqrt())),
                                   rtol=1e-9, atol=0)


def test_fairgrad_solves_its_equation_and_alpha_one_is_nash() -> None:
    for K, n in ((2, 5), (5, 12), (10, 30), (40, 100), (5, 3)):
        for seed in SEEDS:
            G = gram(make_grads(K, n, seed))
            for alpha in (0.5, 1.0, 2.0, 10.0):
                w = fairgrad(G, alpha=alpha)
                assert torch.all(w > 0)
                rhs = w ** (-1.0 / alpha)
                assert float((G @ w - rhs).norm() / rhs.norm()) <= 1e-11
            torch.testing.assert_close(fairgrad(G, alpha=1.0), nash(G), rtol=1e-9, atol=0)


def test_fairgrad_scale_and_zero_gradients() -> None:
    G = gram(make_grads(4, 7, 3))
    for alpha in (0.5, 2.0):
        torch.testing.assert_close(fairgrad(37.0 * G, alpha=alpha),
                                   37.0 ** (-alpha / (alpha + 1)) * fairgrad(G, alpha=alpha),
                                   rtol=1e-10, atol=0)
    g = make_grads(4, 6, 0)
    g[2] = 0.0
    w = fairgrad(gram(g), alpha=2.0)
    assert w[2].item() == 0.0 and torch.all(w[[0, 1, 3]] > 0)
    assert torch.equal(fairgrad(torch.zeros(3, 3, dtype=torch.float64), alpha=2.0),
                       torch.full((3,), 1 / 3, dtype=torch.float64))


def test_fairgrad_without_a_solution_stays_finite() -> None:
    g = np.array([[1.0, 0.0], [-1.0, 0.1], [0.0, -1.0]])  # 0 in the hull
    w = fairgrad(gram(g), alpha=2.0)
    assert torch.all(torch.isfinite(w)) and torch.all(w > 0)
    d = w.numpy() @ g
    assert np.isfinite(d).all()


@pytest.mark.parametrize("K", (1, 2, 5))
def test_all_zero_gradients(K: int) -> None:
    G = torch.zeros(K, K, dtype=torch.float64)
    mean = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for name in ("upgrad", "dualproj", "aligned_mtl", "fairgrad"):
        torch.testing.assert_close(run(name, G), mean, msg=name)
    assert torch.equal(run("gradvac", G), torch.ones(K, dtype=torch.float64))


@pytest.mark.parametrize("name", ("upgrad", "dualproj", "aligned_mtl", "fairgrad"))
def test_permutation_equivariance(name: str) -> None:
    rng = np.random.default_rng(42)
    for K, n in ((3, 6), (5, 9), (8, 20)):
        G = gram(make_grads(K, n, 1))
        w = run(name, G).numpy()
        perm = rng.permutation(K)
        np.testing.assert_allclose(run(name, G[perm][:, perm]).numpy(), w[perm], rtol=1e-8,
                                   atol=1e-12 * np.abs(w).max())


def test_rlw_distribution_and_draws() -> None:
    """softmax of a standard normal: positive, summing to 1, E[w_i] the same for every task
    (E = E[softmax(z)_1], about 0.245 for K = 3 by quadrature), reproducible from the
    generator and independent of G."""
    K = 3
    G = gram(make_grads(K, 5, 0))
    gen = torch.Generator().manual_seed(0)
    W = torch.stack([rlw(G, generator=gen) for _ in range(4000)])
    assert torch.all(W > 0) and torch.allclose(W.sum(1), torch.ones(4000, dtype=W.dtype))
    z = torch.randn(200_000, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expect = torch.softmax(z, dim=1).mean(0)
    assert torch.allclose(W.mean(0), expect, atol=0.015)
    same = torch.Generator().manual_seed(5)
    want = torch.softmax(torch.randn(K, generator=same, dtype=torch.float64), 0)
    assert torch.equal(rlw(7.0 * G, generator=torch.Generator().manual_seed(5)), want)


# --------------------------------------------------------------------------------------
# Bad options: ValueError naming the option, at resolve time (so MTLSAM's constructor
# raises) and nothing changed
# --------------------------------------------------------------------------------------
BAD = [
    ("upgrad", {"pref_vector": [1.0, -1.0, 1.0]}, "pref_vector"),
    ("upgrad", {"pref_vector": [[1.0, 1.0]]}, "pref_vector"),
    ("upgrad", {"pref_vector": [0.0, 0.0]}, "pref_vector"),
    ("upgrad", {"reg_eps": 0.0}, "reg_eps"),
    ("upgrad", {"norm_eps": -1.0}, "norm_eps"),
    ("dualproj", {"pref_vector": [float("nan"), 1.0]}, "pref_vector"),
    ("dualproj", {"projector": None}, "projector"),
    ("aligned_mtl", {"scale_mode": "max"}, "scale_mode"),
    ("aligned_mtl", {"pref_vector": [1.0, -2.0]}, "pref_vector"),
    ("fairgrad", {}, "alpha"),
    ("fairgrad", {"alpha": 0.0}, "alpha"),
    ("fairgrad", {"alpha": -1.0}, "alpha"),
    ("fairgrad", {"alpha": "two"}, "alpha"),
    ("fairgrad", {"alpha": 1.0, "max_iter": 0}, "max_iter"),
    ("gradvac", {"beta": 1.5}, "beta"),
    ("gradvac", {"beta": -0.1}, "beta"),
    ("gradvac", {"eps": -1.0}, "eps"),
    ("gradvac", {"gamma": 0.5}, "gamma"),
    ("rlw", {"temperature": 2.0}, "temperature"),
]


@pytest.mark.parametrize("name,options,option", BAD)
def test_bad_options_raise_at_resolve_and_in_the_constructor(name, options, option) -> None:
    with pytest.raises(ValueError, match=option):
        get_aggregator(name, **options)
    m = TwoTask(k=3, seed=0)
    with pytest.raises(ValueError, match=option):
        MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator=name,
               aggregator_options=options, lr=0.1)


@pytest.mark.parametrize("name", ("upgrad", "dualproj", "aligned_mtl"))
def test_pref_vector_of_the_wrong_length_fails_the_step_and_changes_nothing(name) -> None:
    m = TwoTask(k=3, seed=0)
    opt = MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), aggregator=name, lr=1e-2,
                 aggregator_options={"pref_vector": [1.0, 1.0]}, method="fmtl")
    params = [p.detach().clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="pref_vector has 2 entries for 3 tasks"):
        opt.step(m.losses)
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    after = opt.state_dict()
    assert after["mtlsam"]["step"] == state["mtlsam"]["step"]
    assert torch.equal(after["mtlsam"]["generator"], state["mtlsam"]["generator"])
    assert after["base"]["state"] == state["base"]["state"] == {}


# --------------------------------------------------------------------------------------
# GradVac's state in MTLSAM
# --------------------------------------------------------------------------------------
def _make(agg: str, seed_gen: int = 5, **opts: object):
    m = TwoTask(k=3, seed=2)
    opt = MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), method="fmtl", aggregator=agg,
                 aggregator_options=opts or None, lr=1e-2,
                 generator=torch.Generator().manual_seed(seed_gen))
    return m, opt


@pytest.mark.parametrize("agg", ("gradvac", "rlw"))
def test_resume_bit_for_bit(agg: str) -> None:
    m, opt = _make(agg)
    for _ in range(3):
        opt.step(m.losses)
    saved_params = {k: v.clone() for k, v in m.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())
    if agg == "gradvac":
        targets = saved["mtlsam"]["aggregator"]["targets"]
        assert targets.shape == (3, 3) and bool(targets.abs().sum() > 0)
    for _ in range(3):
        opt.step(m.losses)
    want = [p.detach().clone() for p in m.parameters()]

    m2, opt2 = _make(agg, seed_gen=99)
    m2.load_state_dict(saved_params)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(m2.losses)
    assert all(torch.equal(a, b) for a, b in zip(want, m2.parameters()))
    if agg == "gradvac":
        assert torch.equal(aggregator_state(opt._aggregate)["targets"],
                           aggregator_state(opt2._aggregate)["targets"])


def test_gradvac_state_matters_and_old_state_dicts_load() -> None:
    """Dropping the targets from the state dict (as saved before they were stored) still
    loads, and then the trajectory differs: the state is really used."""
    m, opt = _make("gradvac", beta=0.5)
    for _ in range(3):
        opt.step(m.losses)
    saved_params = {k: v.clone() for k, v in m.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())
    opt.step(m.losses)
    want = [p.detach().clone() for p in m.parameters()]
    del saved["mtlsam"]["aggregator"]
    m2, opt2 = _make("gradvac", beta=0.5)
    m2.load_state_dict(saved_params)
    opt2.load_state_dict(saved)
    opt2.step(m2.losses)
    assert not all(torch.equal(a, b) for a, b in zip(want, m2.parameters()))


def test_failed_step_puts_the_targets_back() -> None:
    m, opt = _make("gradvac")
    opt.step(m.losses)
    before = aggregator_state(opt._aggregate)["targets"].clone()
    real = opt.aggregate
    calls = []

    def aggregate_then_fail(G: torch.Tensor) -> torch.Tensor:
        w = real(G)  # the targets move here
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure after the aggregator ran")
        return w

    opt.aggregate = aggregate_then_fail
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(m.losses)
    assert len(calls) == 2
    assert torch.equal(aggregator_state(opt._aggregate)["targets"], before)


def test_gradvac_object_state_round_trip_and_bad_input() -> None:
    agg = GradVac(beta=0.5)
    G = gram(make_grads(4, 6, 0, shift=0.0))
    agg(G, torch.Generator().manual_seed(0))
    state = agg.state_dict()
    other = GradVac(beta=0.5)
    other.load_state_dict(state)
    assert torch.equal(agg(G, torch.Generator().manual_seed(1)),
                       other(G, torch.Generator().manual_seed(1)))
    kept = agg.state_dict()["targets"]
    with pytest.raises(ValueError):
        agg(torch.full((4, 4), float("nan"), dtype=torch.float64))
    assert torch.equal(agg.targets, kept)
    with pytest.raises(ValueError):
        agg.load_state_dict({"phi": 1})
    with pytest.raises(ValueError):
        gradvac(G, beta=2.0)
    assert math.isclose(float(gradvac(torch.tensor([[4.0]]))[0]), 1.0)
