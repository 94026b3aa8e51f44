"""The naive F-MTL baseline of ``mtlsam_ext/benchmark/naive_fmtl.py`` makes the same update as
``MTLSAM(method="fmtl")``, so the benchmarks compare equal work.

One step of ``torch.optim.SGD(lr=1)`` on two copies of a small float64 model; the parameter
deltas (= the gradients each implementation produced, shared and heads) are compared.

Tolerances (why they differ by aggregator):

* LS, IMTL-G: same formulas, different evaluation order (per-parameter lists vs flat
  buffers; ``torch.inverse`` vs an LU solve) -> float64 rounding, ``rtol=1e-9``.
* MGDA: K = 2 with an interior solution, where Sener's solver returns the closed-form
  2-point solution, which is exact (``rtol=1e-9``). For K = 3 its Frank-Wolfe loop stops when
  the L1 change of the weights is < 1e-5; FW converges sublinearly, so the weights can be
  further off than the stop threshold: that case is compared at ``1e-4`` relative to the
  largest update entry (observed <= 1.3e-5; a wrong formula changes it at the 1e-1 level).
* CAGrad: SciPy SLSQP (default ``ftol=1e-6``, absolute, on the dual objective) plus the
  reference's ``1e-8`` safety terms vs MTLSAM's root search to rounding -> ``2e-4``
  relative to the largest update entry, on losses scaled x10 (with O(0.1) gradients the
  absolute ``ftol`` leaves up to ~2e-2 relative error in the update: the reference's own
  accuracy; with the x10 scale observed <= 2.6e-5).
* PCGrad: MTLSAM draws its visiting orders from a ``torch.Generator``, the naive loop from
  Python ``random``; the two RNG streams cannot be matched, so PCGrad is compared on K = 2,
  where the order does not matter (projecting g_i on itself is a no-op before or after
  the projection on g_j, by Cauchy-Schwarz), once with conflicting tasks (projection taken)
  and once without; both sides are seeded anyway. ``rtol=1e-9``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from mtlsam_ext.benchmark.naive_fmtl import NaiveFMTL, NaiveSAMPerTask

F64 = torch.float64
EXACT = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 models: one intra-op thread is faster and immune to a busy machine
    (OpenMP threads spinning against other processes made these tests 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    """A tanh MLP backbone; K linear heads (``heads=True``) or one shared K-output layer."""

    def __init__(self, k: int, heads: bool, seed: int = 0, conflict: bool | None = None,
                 n: int = 24, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.loss_scale = loss_scale
        torch.manual_seed(seed)
        self.k = k
        layers: list[nn.Module] = [nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh()]
        if not heads:
            layers.append(nn.Linear(8, k))
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k)) if heads else None
        self.to(F64)
        g = torch.Generator().manual_seed(seed + 7)
        self.x = torch.randn(n, 5, generator=g, dtype=F64)
        w = torch.randn(5, k, generator=g, dtype=F64)
        y = torch.sin(self.x @ w) + 0.3 * torch.randn(n, k, generator=g, dtype=F64)
        if conflict is not None and k == 2:
            # Opposite targets make the shared gradients conflict; equal targets align them.
            y[:, 1] = -y[:, 0] if conflict else y[:, 0] + 0.05 * y[:, 1]
        self.y = y

    def losses(self) -> list[torch.Tensor]:
        h = self.body(self.x)
        outs = [hd(h)[:, 0] for hd in self.heads] if self.heads is not None \
            else [h[:, i] for i in range(self.k)]
        return [self.loss_scale * ((o - self.y[:, i]) ** 2).mean() for i, o in enumerate(outs)]


def _delta(model: Net, step) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in model.parameters()]
    step(model.losses)
    return [b - p.detach() for b, p in zip(before, model.parameters())]


def _ours(model: Net, aggregator: str, adaptive: bool, decompose: bool = True):
    heads = list(model.heads) if model.heads is not None else None
    return MTLSAM(model.body, torch.optim.SGD, heads=heads, method="fmtl",
                  aggregator=aggregator, rho=0.05, rho_heads=0.03 if heads else None,
                  adaptive=adaptive, decompose=decompose, lr=1.0,
                  generator=torch.Generator().manual_seed(3))


def _naive(model: Net, aggregator: str, adaptive: bool, cls=NaiveFMTL, **kw):
    heads = list(model.heads) if model.heads is not None else None
    return cls(model.body, torch.optim.SGD, heads=heads, aggregator=aggregator, rho=0.05,
               rho_heads=0.03 if heads else None, adaptive=adaptive, lr=1.0, seed=3, **kw)


def _compare(k: int, heads: bool, aggregator: str, adaptive: bool, tol: dict,
             relative_to_max: bool = False, seed: int = 0, conflict: bool | None = None,
             loss_scale: float = 1.0, **naive_kw) -> float:
    a = Net(k, heads, seed=seed, conflict=conflict, loss_scale=loss_scale)
    b = copy.deepcopy(a)
    d_ours = _delta(a, _ours(a, aggregator, adaptive).step)
    d_naive = _delta(b, _naive(b, aggregator, adaptive, **naive_kw).step)
    scale = max(float(t.abs().max()) for t in d_ours) if relative_to_max else 1.0
    worst = 0.0
    for x, y in zip(d_ours, d_naive):
        assert torch.isfinite(y).all()
        if relative_to_max:
            err = float((x - y).abs().max()) / scale
            assert err <= tol["rtol"], f"max |diff| / max |update| = {err:.2e}"
            worst = max(worst, err)
        else:
            torch.testing.assert_close(y, x, **tol)
    return worst


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "noheads"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("aggregator", ["ls", "imtl"])
def test_closed_form_aggregators(aggregator: str, adaptive: bool, heads: bool) -> None:
    _compare(3, heads, aggregator, adaptive, EXACT)


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "noheads"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_mgda_k2_exact(adaptive: bool, heads: bool) -> None:
    # seed chosen so that both the loss and the flat Gram matrices have interior MGDA
    # solutions (Sener's 2-point solver clamps a boundary solution to 0.999 / 0.001).
    _compare(2, heads, "mgda", adaptive, EXACT, seed=1)


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "noheads"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_mgda_k3_frank_wolfe(adaptive: bool, heads: bool) -> None:
    # observed: <= 1.3e-5 of the largest update entry
    _compare(3, heads, "mgda", adaptive, dict(rtol=1e-4), relative_to_max=True)


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "noheads"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_cagrad_slsqp(adaptive: bool, heads: bool) -> None:
    # SLSQP's ftol is absolute on the dual objective, whose scale is ||g||^2: with O(0.1)
    # gradients its weights are only ~1e-3 accurate (that is the reference's accuracy, not a
    # formula difference). Losses x10 (G x100) make the comparison meaningful at 2e-4.
    _compare(3, heads, "cagrad", adaptive, dict(rtol=2e-4), relative_to_max=True,
             loss_scale=10.0)


@pytest.mark.parametrize("conflict", [True, False], ids=["conflict", "aligned"])
@pytest.mark.parametrize("heads", [True, False], ids=["heads", "noheads"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_pcgrad_k2(adaptive: bool, heads: bool, conflict: bool) -> None:
    net = Net(2, heads, conflict=conflict)
    g = [torch.autograd.grad(loss, list(net.body.parameters()), allow_unused=True,
                             retain_graph=True) for loss in net.losses()]
    dot = sum(float((a * b).sum()) for a, b in zip(*g) if a is not None and b is not None)
    assert (dot < 0) == conflict  # the case really is (non-)conflicting at the start point
    _compare(2, heads, "pcgrad", adaptive, EXACT, conflict=conflict)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_recompute_variant(adaptive: bool) -> None:
    """The many-task layout (2K forwards) makes the same update."""
    _compare(3, True, "ls", adaptive, EXACT, recompute=True)
    _compare(3, False, "imtl", adaptive, EXACT, recompute=True)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("aggregator", ["ls", "imtl"])
def test_sam_per_task_is_direct_fmtl(aggregator: str, adaptive: bool) -> None:
    """Without heads, the per-task SAM loop is F-MTL's direct variant M(g^SAM)."""
    a = Net(3, heads=False)
    b = copy.deepcopy(a)
    d_ours = _delta(a, _ours(a, aggregator, adaptive, decompose=False).step)
    d_naive = _delta(b, _naive(b, aggregator, adaptive, cls=NaiveSAMPerTask).step)
    for x, y in zip(d_ours, d_naive):
        torch.testing.assert_close(y, x, **EXACT)


def test_naive_state_restored_and_losses() -> None:
    """Parameters are back to their values before the update (up to the SGD step) and the
    returned losses are the unperturbed ones."""
    net = Net(3, True)
    want = torch.stack([x.detach() for x in net.losses()])
    opt = NaiveFMTL(net.body, torch.optim.SGD, heads=list(net.heads), lr=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    got = opt.step(net.losses)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for p, q in zip(before, net.parameters()):
        assert torch.equal(p, q.detach())
