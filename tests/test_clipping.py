"""``max_grad_norm``: the final update (shared and heads as one vector) is clipped with
``torch.nn.utils.clip_grad_norm_``'s semantics."""

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

METHODS = [dict(method="gl"), dict(method="gl", local_grad="zo", n_dirs=1),
           dict(method="fmtl"), dict(method="fmtl", decompose=False), dict(method="sam"),
           dict(method="erm")]
IDS = ["gl", "gl-zo", "fmtl", "fmtl-direct", "sam", "erm"]


def _update(cfg, agg, heads=True, **kw):
    """The first step's update (SGD with lr 1: parameter change = -update), and the model's
    parameters in order [shared..., heads...]."""
    m = TwoTask(k=3, dtype=torch.float64)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads) if heads else None,
                 aggregator=agg, lr=1.0, backend="torch",
                 generator=torch.Generator().manual_seed(0), **cfg, **kw)
    before = m.snapshot()
    if heads:
        opt.step(m.losses)
    else:
        opt.step(lambda: [(m.body(m.x).sum(1) - m.y[:, i]).pow(2).mean() for i in range(3)])
    params = list(m.body.parameters()) + (list(m.heads.parameters()) if heads else [])
    all_before = dict(zip(m.parameters(), before))
    return [all_before[p] - p.detach() for p in params]


@pytest.mark.parametrize("agg", ["mgda", "ls", "pcgrad"])
@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
@pytest.mark.parametrize("heads", [True, False], ids=["heads", "no-heads"])
def test_clipped_update_is_the_scaled_unclipped_one(cfg, agg, heads):
    free = _update(cfg, agg, heads)
    total = torch.cat([d.flatten() for d in free]).norm()
    for max_norm in (0.25 * float(total), 4.0 * float(total)):
        clipped = _update(cfg, agg, heads, max_grad_norm=max_norm)
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for a, b in zip(free, clipped):
            torch.testing.assert_close(b, a * coef, rtol=1e-10, atol=1e-12)
        got = float(torch.cat([d.flatten() for d in clipped]).norm())
        assert got == pytest.approx(min(float(total), max_norm), rel=1e-6)


def test_matches_clip_grad_norm_on_erm():
    """ERM with LS and clipping equals SGD on the summed loss after clip_grad_norm_."""
    m1, m2 = TwoTask(k=2, dtype=torch.float64), TwoTask(k=2, dtype=torch.float64)
    opt = MTLSAM(m1.body, torch.optim.SGD, heads=list(m1.heads), method="erm", aggregator="ls",
                 lr=0.1, backend="torch", max_grad_norm=0.05)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1)
    for _ in range(3):
        opt.step(m1.losses)
        sgd.zero_grad()
        sum(m2.losses()).backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05)
        sgd.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_bad_max_grad_norm(bad):
    m = TwoTask(k=2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1, max_grad_norm=bad)
