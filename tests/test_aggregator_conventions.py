"""Aggregator conventions (normalize="l2", scale="tasks") from G alone, against a literal
implementation on stacked gradients, and F-MTL with the authors' NYUv2 MGDA convention."""

import numpy as np
import pytest
import torch

from mtlsam_ext import MTLSAM
from mtlsam_ext.aggregators import get_aggregator
from tests.models import TwoTask
from tests.oracles import aggregators as oracle

ORACLES = {"ls": oracle.ls, "mean": oracle.mean, "mgda": oracle.mgda, "pcgrad": oracle.pcgrad,
           "cagrad": oracle.cagrad, "imtl": oracle.imtl, "nash": oracle.nash}


def _rows(k: int, n: int, seed: int, zero: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, n, generator=g, dtype=torch.float64)
    rows *= torch.logspace(-2, 1, k, dtype=torch.float64)[:, None]  # very unequal norms
    if zero is not None:
        rows[zero] = 0
    return rows


@pytest.mark.parametrize("scale", ["none", "tasks"])
@pytest.mark.parametrize("name", sorted(ORACLES))
@pytest.mark.parametrize("seed", [0, 1])
def test_l2_normalisation_matches_the_literal_version(name, scale, seed):
    rows = _rows(3, 11, seed)
    agg = get_aggregator(name, normalize="l2", scale=scale)
    kw = {"generator": torch.Generator().manual_seed(4)} if name == "pcgrad" else {}
    w = agg(rows @ rows.T, torch.Generator().manual_seed(4) if name == "pcgrad" else None)
    got = (w @ rows).numpy()
    want = oracle.normalized(rows, "l2", scale, ORACLES[name], **kw)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["mgda", "ls", "cagrad"])
def test_scale_alone_multiplies_by_k(name):
    rows = _rows(4, 9, 2)
    G = rows @ rows.T
    plain = get_aggregator(name)(G, None)
    scaled = get_aggregator(name, scale="tasks")(G, None)
    torch.testing.assert_close(scaled, 4 * plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_a_zero_gradient_stays_zero_without_nan(name):
    rows = _rows(3, 7, 3, zero=1)
    w = get_aggregator(name, normalize="l2")(rows @ rows.T,
                                             torch.Generator().manual_seed(0))
    assert torch.isfinite(w).all() and float(w[1]) == 0.0


def test_bad_values_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"normalize must be one of \('none', 'l2'\)"):
        get_aggregator("mgda", normalize="loss")
    with pytest.raises(ValueError, match=r"scale must be one of \('none', 'tasks'\)"):
        get_aggregator("mgda", scale=2)
    with pytest.raises(ValueError, match="normalize"):
        MTLSAM(TwoTask().body, torch.optim.SGD, lr=0.1, aggregator="mgda",
               aggregator_options={"normalize": "L2"})


def test_user_callable_keeps_its_own_scale_option():
    def mine(G, scale=1.0):
        return scale * torch.ones(G.shape[0], dtype=G.dtype)

    G = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(get_aggregator(mine, scale=3.0)(G, None),
                               torch.full((2,), 3.0, dtype=torch.float64))


def test_fmtl_with_the_authors_nyuv2_mgda():
    """F-MTL decomposed, MGDA on L2-normalised loss and flat gradients, times K: the update
    of one MTLSAM step equals the literal computation on stacked gradients."""
    m = TwoTask(k=3, dtype=torch.float64, seed=2)
    params = list(m.body.parameters())
    rho = 0.05

    def flat_grad(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    loss_rows = torch.stack([flat_grad(loss) for loss in m.losses()])
    sam_rows = []
    for i in range(3):
        eps = rho * loss_rows[i] / loss_rows[i].norm()
        with torch.no_grad():
            off = 0
            for p in params:
                p.add_(eps[off:off + p.numel()].view_as(p))
                off += p.numel()
        sam_rows.append(flat_grad(m.losses()[i]))
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(theta[off:off + p.numel()].view_as(p))
                off += p.numel()
    flat_rows = torch.stack(sam_rows) - loss_rows
    want = oracle.normalized(loss_rows, "l2", "tasks") + oracle.normalized(flat_rows, "l2",
                                                                            "tasks")
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="fmtl",
                 aggregator="mgda", aggregator_options={"normalize": "l2", "scale": "tasks"},
                 rho=rho, rho_heads=0.0, lr=1.0, backend="torch")  # heads unperturbed
    opt.step(m.losses)
    got = (theta - torch.cat([p.detach().reshape(-1) for p in params])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
