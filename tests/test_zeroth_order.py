"""local_grad="zo": the forward-only estimator against finite differences on a quadratic."""

import pytest
import torch

from mtlsam_ext import MTLSAM
from mtlsam_ext.optim.run import Run
from mtlsam_ext.optim.zeroth_order import direction_seed, directions, zo_local_grads

F64 = torch.float64


def _quadratic(k: int = 2, seed: int = 0):
    """Three layers (tensors of 3, 4 and 5 entries) and K quadratic losses of all of them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g, dtype=F64, requires_grad=True) for n in (3, 4, 5)]
    mats = []
    for _ in range(k):
        a = torch.randn(12, 12, generator=g, dtype=F64)
        mats.append((a @ a.T / 12 + torch.eye(12, dtype=F64), torch.randn(12, generator=g,
                                                                          dtype=F64)))

    def losses_at(theta):
        return [0.5 * theta @ a @ theta + b @ theta for a, b in mats]

    def closure():
        return losses_at(torch.cat(params))

    return params, mats, losses_at, closure


def _estimate(opt, closure):
    run = Run(opt, closure)
    run.passes.first_losses()
    tables = opt.shared.sampled_tables(opt.sampled_layers, compact=True)
    before = [p.detach().clone() for p in opt.shared.params]
    local = zo_local_grads(run, tables)
    for a, b in zip(before, opt.shared.params):
        assert torch.equal(a, b)  # restored bit-exactly
    return local[0]


@pytest.mark.parametrize("n_dirs", [1, 3])
def test_matches_explicit_central_differences(n_dirs):
    params, mats, losses_at, closure = _quadratic()
    mu = 1e-2
    opt = MTLSAM(params, torch.optim.SGD, method="gl", local_grad="zo", layers=[0, 2],
                 n_dirs=n_dirs, mu=mu, lr=0.1, generator=torch.Generator().manual_seed(4))
    got = _estimate(opt, closure)
    theta = torch.cat([p.detach() for p in params])
    sampled = torch.cat([torch.arange(0, 3), torch.arange(7, 12)])
    want = torch.zeros(2, 8, dtype=F64)
    for j in range(n_dirs):
        (z,) = directions([8], [F64], torch.device("cpu"), direction_seed(opt.zo_seed, 0, j))
        dz = torch.zeros(12, dtype=F64)
        dz[sampled] = z
        plus, minus = losses_at(theta + mu * dz), losses_at(theta - mu * dz)
        for i in range(2):
            want[i] += (plus[i] - minus[i]) / (2 * mu) * z / n_dirs
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # On a quadratic the central difference is exact: the projection of the true gradient.
    grads = [a @ theta + b for a, b in mats]
    proj = torch.zeros(2, 8, dtype=F64)
    for j in range(n_dirs):
        (z,) = directions([8], [F64], torch.device("cpu"), direction_seed(opt.zo_seed, 0, j))
        for i in range(2):
            proj[i] += (grads[i][sampled] @ z) * z / n_dirs
    torch.testing.assert_close(got, proj, rtol=1e-8, atol=1e-10)


def test_many_directions_approach_the_gradient():
    params, mats, _, closure = _quadratic(seed=1)
    opt = MTLSAM(params, torch.optim.SGD, method="gl", local_grad="zo", layers=[1],
                 n_dirs=4000, mu=1e-3, lr=0.1, generator=torch.Generator().manual_seed(0))
    got = _estimate(opt, closure)
    theta = torch.cat([p.detach() for p in params])
    for i, (a, b) in enumerate(mats):
        true = (a @ theta + b)[3:7]
        assert float((got[i] - true).norm() / true.norm()) < 0.1


def test_zo_step_counts_forwards_and_trains():
    params, _, _, closure = _quadratic(seed=2)
    calls = [0]

    def counting():
        calls[0] += 1
        return closure()

    opt = MTLSAM(params, torch.optim.SGD, method="gl", local_grad="zo", n_dirs=3, lr=0.05)
    first = opt.step(counting)
    assert calls[0] == 1 + 2 * 3 + 2  # unperturbed, 2 n_dirs zo forwards, K SAM forwards
    for _ in range(100):
        last = opt.step(closure)
    assert float(last.sum()) < float(first.sum())


@pytest.mark.parametrize("kw, msg", [(dict(n_dirs=0), "n_dirs"), (dict(mu=0.0), "mu")])
def test_bad_zo_options(kw, msg):
    params, _, _, _ = _quadratic()
    with pytest.raises(ValueError, match=msg):
        MTLSAM(params, torch.optim.SGD, local_grad="zo", lr=0.1, **kw)
