"""``batched_grads=True``: the K per-task gradients at one point from one backward with K
batched cotangents equal the K sequential backward passes; a model whose backward vmap cannot
run falls back to the sequential passes with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

CONFIGS = {"erm": dict(method="erm"), "sam": dict(method="sam"), "fmtl": dict(method="fmtl"),
           "fmtl-sam-rows": dict(method="fmtl", decompose=False),
           "gl": dict(method="gl"), "gl-all-layers": dict(method="gl", layers=[0, 1, 2])}


def _train(cfg, agg, batched, dtype=torch.float64, steps=4, heads=True):
    m = TwoTask(k=3, dtype=dtype, seed=3)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads) if heads else None, lr=0.05,
                 aggregator=agg, batched_grads=batched, backend="torch",
                 generator=torch.Generator().manual_seed(1), **cfg)
    losses = [opt.step(m.losses) for _ in range(steps)]
    return m.snapshot(), losses, opt


@pytest.mark.parametrize("agg", ["mgda", "pcgrad", "ls"])
@pytest.mark.parametrize("name", CONFIGS)
def test_batched_equals_sequential(name, agg):
    seq, seq_losses, _ = _train(CONFIGS[name], agg, False)
    bat, bat_losses, opt = _train(CONFIGS[name], agg, True)
    assert opt.batched_grads and opt.info()["batched_grads"]
    for a, b in zip(seq, bat):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(seq_losses, bat_losses):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_batched_fp32_within_rounding():
    seq, _, _ = _train(CONFIGS["fmtl"], "mgda", False, dtype=torch.float32)
    bat, _, _ = _train(CONFIGS["fmtl"], "mgda", True, dtype=torch.float32)
    for a, b in zip(seq, bat):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class _ItemInBackward(torch.autograd.Function):
    """tanh whose backward reads a Python number from the gradient: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if float(g.abs().sum()) < 0:  # never true; the .item() is what vmap refuses
            return g
        return g * (1 - y * y)


def test_model_vmap_cannot_batch_falls_back_once():
    m = TwoTask(k=3, dtype=torch.float64, seed=3)

    def losses():
        h = _ItemInBackward.apply(m.body(m.x))
        return [((hd(h).squeeze(1) - m.y[:, i]) ** 2).mean() for i, hd in enumerate(m.heads)]

    ref = TwoTask(k=3, dtype=torch.float64, seed=3)

    def ref_losses():
        h = torch.tanh(ref.body(ref.x))
        return [((hd(h).squeeze(1) - ref.y[:, i]) ** 2).mean()
                for i, hd in enumerate(ref.heads)]

    kw = dict(lr=0.05, method="fmtl", aggregator="mgda", backend="torch")
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), batched_grads=True, **kw)
    ref_opt = MTLSAM(ref.body, torch.optim.SGD, heads=list(ref.heads), **kw)
    with pytest.warns(UserWarning, match="batched_grads: vmap could not run"):
        opt.step(losses)
    assert opt.batched_grads is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(losses)
    for _ in range(3):
        ref_opt.step(ref_losses)
    for a, b in zip(m.snapshot(), ref.snapshot()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_grads_must_be_a_bool():
    m = TwoTask(k=2)
    with pytest.raises(ValueError, match="batched_grads"):
        MTLSAM(m.body, torch.optim.SGD, lr=0.1, batched_grads="auto")


def test_batched_without_heads():
    seq, _, _ = _train(CONFIGS["fmtl"], "mgda", False, heads=False)
    bat, _, _ = _train(CONFIGS["fmtl"], "mgda", True, heads=False)
    for a, b in zip(seq, bat):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_batched_with_batchnorm_keeps_first_forward_statistics():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, dtype=torch.float64, generator=g)
    y = torch.randn(16, 2, dtype=torch.float64, generator=g)
    states = []
    for batched in (False, True):
        torch.manual_seed(0)
        b = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()).double()
        hs = [nn.Linear(8, 1).double() for _ in range(2)]
        opt = MTLSAM(b, torch.optim.SGD, heads=hs, lr=0.05, method="fmtl", aggregator="mgda",
                     batched_grads=batched, backend="torch")

        def closure(b=b, hs=hs):
            h = b(x)
            return [((hd(h).squeeze(1) - y[:, i]) ** 2).mean() for i, hd in enumerate(hs)]

        for _ in range(3):
            opt.step(closure)
        states.append([t.detach().clone() for t in list(b.parameters()) + list(b.buffers())])
    for a, c in zip(*states):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched_grads", [False, True])
def test_local_rows_written_where_a_loss_does_not_reach(batched_grads, monkeypatch):
    """gl's task-local rows are a reused buffer, not zeroed first: each column must be written
    every step, zeros where loss i does not reach a sampled parameter (here a shared branch
    only task 0 uses; with norm="global" its local norm enters task 1's perturbation scale on
    every layer). The buffer is filled with a different finite value before every step of
    two runs: a column left as it was would make them differ (the sequential path fails
    without the zeros; the batched backward returns zeros itself)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.a(x)), torch.tanh(self.b(x))

    def run(fill):
        torch.manual_seed(0)
        body = Branchy().double()
        heads = [nn.Linear(4, 1).double() for _ in range(2)]
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

        def losses():
            ha, hb = body(x)
            return [((heads[0](ha + hb).squeeze(1) - y[:, 0]) ** 2).mean(),
                    ((heads[1](hb).squeeze(1) - y[:, 1]) ** 2).mean()]  # never reaches a

        opt = MTLSAM(body, torch.optim.SGD, heads=heads, lr=0.05, method="gl",
                     layers=["a", "b"], aggregator="mgda", norm="global",
                     batched_grads=batched_grads)
        real = opt.work.scratch

        def poisoned(name, specs):
            bufs = real(name, specs)
            if name == "local":
                for t in bufs:
                    t.fill_(fill)
            return bufs

        monkeypatch.setattr(opt.work, "scratch", poisoned)
        for _ in range(3):
            opt.step(losses)
        return [p.detach().clone() for p in body.parameters()]

    for a, b in zip(run(123.0), run(-7.0), strict=True):
        assert torch.equal(a, b)
