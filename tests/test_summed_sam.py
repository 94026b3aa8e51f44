"""LS and mean take the update from the SAM gradients summed in one buffer (no ``[K, N]`` SAM
rows, no K-row combine): the same update as the row-wise path to rounding, the rows not
allocated, and the non-finite checks the rows gave still made."""

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

K = 3
SUMMED = [dict(method="fmtl"), dict(method="fmtl", decompose=False), dict(method="gl"),
          dict(method="gl", local_grad="zo", n_dirs=2)]
IDS = ["fmtl", "fmtl-nodecomp", "gl-autograd", "gl-zo"]


def _run(cfg, aggregator, steps=4, **kw):
    m = TwoTask(k=K, dtype=torch.float64)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator=aggregator, lr=0.05,
                 rho=0.1, generator=torch.Generator().manual_seed(5), **cfg, **kw)
    for _ in range(steps):
        opt.step(m.losses)
    return m, opt


def _constant(weight):
    # a user aggregator with constant weights: MTLSAM cannot know they are constant, so the
    # step keeps the SAM rows and combines them (the row-wise path)
    return lambda gram, generator=None: torch.full((gram.shape[0],), weight,
                                                   dtype=gram.dtype)


@pytest.mark.parametrize("cfg", SUMMED, ids=IDS)
@pytest.mark.parametrize("agg,weight", [("ls", 1.0), ("mean", 1.0 / K)], ids=["ls", "mean"])
def test_summed_equals_rows(cfg, agg, weight):
    m_sum, opt_sum = _run(cfg, agg)
    m_rows, opt_rows = _run(cfg, _constant(weight))
    assert "sam_sum" in opt_sum.work.bufs and "sam_sum" not in opt_rows.work.bufs
    for a, b in zip(m_sum.parameters(), m_rows.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(m_sum.snapshot()[0], TwoTask(k=K, dtype=torch.float64).snapshot()[0])


@pytest.mark.parametrize("cfg", SUMMED, ids=IDS)
def test_summed_keeps_no_sam_rows(cfg):
    """Besides the backup, K + 1 rows for F-MTL (loss rows and the sum) instead of 2K; gl
    keeps one summed row instead of K."""
    _, opt = _run(cfg, "ls", steps=1)
    n = opt.shared.numel
    # (not counted: the backup, and gl's task-local gradients on the sampled layers, [K, M]
    # whatever the aggregator: here every layer is sampled, so M = N)
    rows = sum(t.numel() for name, bufs in opt.work.bufs.items()
               if name not in ("backup", "local", "zo_local")
               for t in bufs if t.dim() == 2 and t.shape[-1] == opt.shared.buckets[0].numel)
    want = (K + 1) * n if cfg["method"] == "fmtl" else 2 * n  # (gl: the sum and g0)
    assert rows == want, sorted(opt.work.bufs)


@pytest.mark.parametrize("cfg", [dict(method="gl", local_grad="lagged", layers="random"),
                                 dict(method="gl", layers="adaptive")], ids=["lagged", "adaptive"])
def test_rows_kept_where_they_are_read(cfg):
    """gl-lagged with layers that change reads the SAM rows of the next step's layers,
    adaptive layers read per-layer Grams: both keep the K rows (and equal the row-wise path to
    the bit)."""
    m_ls, opt = _run(cfg, "ls")
    m_rows, _ = _run(cfg, _constant(1.0))
    assert "sam_sum" not in opt.work.bufs and opt.work.bufs["rows"][0].shape[0] == K
    for a, b in zip(m_ls.parameters(), m_rows.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_lagged_fixed_layers_keep_only_the_sampled_rows(steps):
    """gl-lagged with LS and fixed layers: per-task SAM gradients only on the sampled layers
    (they become the next step's lag without a copy), the rest summed; the same bits as the
    row-wise path, step after step, and the same lag."""
    cfg = dict(method="gl", local_grad="lagged", layers=[0, 2])
    m_ls, opt = _run(cfg, "ls", steps=steps)
    m_rows, opt_rows = _run(cfg, _constant(1.0), steps=steps)
    assert "rows" not in opt.work.bufs and "rows" in opt_rows.work.bufs
    for a, b in zip(m_ls.parameters(), m_rows.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.work.bufs["lag"], opt_rows.work.bufs["lag"]):
        assert torch.equal(a, b)
    assert opt._lag_layers == opt_rows._lag_layers == (0, 2)
    # and a resumed copy continues the same way
    state = opt.state_dict()
    m2 = TwoTask(k=K, dtype=torch.float64)
    m2.load_state_dict(m_ls.state_dict())
    opt2 = MTLSAM(m2.body, torch.optim.SGD, heads=list(m2.heads), aggregator="ls", lr=0.05,
                  rho=0.1, **cfg)
    opt2.load_state_dict(state)
    opt.step(m_ls.losses)
    opt2.step(m2.losses)
    for a, b in zip(m_ls.parameters(), m2.parameters()):
        assert torch.equal(a, b)


class _InfGradOnce(torch.autograd.Function):
    """Identity whose backward is infinite during the first backward pass of a step only (the
    unperturbed point), so the loss and every later gradient stay finite."""

    armed = [False]

    @staticmethod
    def forward(ctx, x):
        ctx.inf = _InfGradOnce.armed[0]
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf") if ctx.inf else g


@pytest.mark.parametrize("cfg", SUMMED + [dict(method="gl", local_grad="lagged")],
                         ids=IDS + ["gl-lagged"])
@pytest.mark.parametrize("agg", ["ls", "mean", "mgda"])
def test_infinite_gradient_at_the_unperturbed_point_changes_nothing(cfg, agg):
    """A task gradient that is infinite at the unperturbed point only. With the sum, no row
    of it reaches the update; the perturbation still does (its coefficient rho / inf = 0
    times the infinite direction is NaN), so the perturbed losses reveal it: the step fails
    and leaves the parameters as they were."""
    m, opt = _run(cfg, agg, steps=1)
    before = m.snapshot()
    calls = [0]

    def closure():
        _InfGradOnce.armed[0] = calls[0] == 0  # the first (unperturbed) forward of the step
        calls[0] += 1
        losses = m.losses()
        return [_InfGradOnce.apply(losses[0])] + losses[1:]

    with pytest.raises(ValueError, match="non-finite"):
        opt.step(closure)
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)
    _InfGradOnce.armed[0] = False
    opt.step(m.losses)  # and the optimizer still works


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cfg", [dict(method="erm"), dict(method="fmtl")], ids=["erm", "fmtl"])
def test_nonfinite_update_of_a_large_buffer_changes_nothing(cfg, bad):
    """With LS the update is checked as a whole buffer (its min and max, above 4096
    elements): one non-finite element of a 20k-element gradient, of either sign, is found."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(100, 200), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(200, 1) for _ in range(2))
    x, y = torch.randn(32, 100), torch.randn(32, 2)
    opt = MTLSAM(body, torch.optim.SGD, heads=list(heads), aggregator="ls", lr=0.1, **cfg)
    poison = [False]

    def hook(g):
        if poison[0]:
            g = g.clone()
            g[7, 3] = bad
        return g

    body[0].weight.register_hook(hook)

    def closure():
        h = body(x)
        return [((hd(h).squeeze(1) - y[:, i]) ** 2).mean() for i, hd in enumerate(heads)]

    opt.step(closure)
    before = [p.detach().clone() for p in body.parameters()]
    poison[0] = True
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(closure)
    for a, b in zip(before, body.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", SUMMED + [dict(method="gl", local_grad="lagged")],
                         ids=IDS + ["gl-lagged"])
def test_16bit_parameters_keep_the_rows(cfg):
    """bf16 parameters: the K SAM gradients are summed by the combine in float32 from the rows
    (one rounding), not added up in a bf16 gradient (K roundings): the same bits as the
    row-wise path with the same constant weights."""
    def run(agg):
        m = TwoTask(k=K, dtype=torch.bfloat16)
        opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator=agg, lr=0.05,
                     rho=0.1, generator=torch.Generator().manual_seed(5), **cfg)
        for _ in range(3):
            opt.step(m.losses)
        return m, opt

    m_ls, opt = run("ls")
    m_rows, _ = run(_constant(1.0))
    assert "sam_sum" not in opt.work.bufs
    for a, b in zip(m_ls.parameters(), m_rows.parameters()):
        assert torch.equal(a, b)
