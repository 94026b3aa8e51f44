"""Bad input gets a clear error, and a failed step changes nothing: parameters, the base
optimizer's state, the lagged history and the random generator stay as they were."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

METHODS = [dict(method="gl", local_grad="lagged"), dict(method="fmtl"), dict(method="sam"),
           dict(method="erm"), dict(method="gl", local_grad="zo", n_dirs=1)]
IDS = ["gl", "fmtl", "sam", "erm", "gl-zo"]


def _make(cfg=None, agg="pcgrad", **kw):
    m = TwoTask(k=2)
    opt = MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), aggregator=agg, lr=1e-2,
                 generator=torch.Generator().manual_seed(3), backend="torch",
                 **(cfg or METHODS[0]), **kw)
    opt.step(m.losses)  # so that the base optimizer and the lagged history have state
    return m, opt


def _state(m, opt):
    return (m.snapshot(), copy.deepcopy(opt.base_optimizer.state_dict()),
            opt.generator.get_state().clone(),
            [t.clone() for t in opt.work.bufs.get("lag", [])], opt._step_count,
            [p.grad.clone() for p in m.parameters()])


def _assert_unchanged(before, m, opt):
    params, base, gen, lag, steps, grads = before
    for a, b in zip(params, m.parameters()):
        assert torch.equal(a, b)
    for g, p in zip(grads, m.parameters()):  # .grad too (the step's passes overwrite it)
        assert p.grad is not None and torch.equal(g, p.grad)
    assert any(bool(g.abs().sum() > 0) for g in grads)  # (a step left real gradients)
    now = opt.base_optimizer.state_dict()
    for pid, st in base["state"].items():
        for key, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(now["state"][pid][key]))
    assert torch.equal(gen, opt.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(lag, opt.work.bufs.get("lag", [])))
    assert steps == opt._step_count


def _calls(m, bad_call, make_bad):
    """A closure whose ``bad_call``-th call (0 = the unperturbed one) returns ``make_bad``."""
    n = [0]

    def closure():
        losses = m.losses()
        out = make_bad(losses) if n[0] == bad_call else losses
        n[0] += 1
        return out

    return closure


BAD = {
    "wrong_count": (lambda ls: ls + [ls[0]], ValueError, "returned 3 losses, expected 2"),
    "non_scalar": (lambda ls: [ls[0].expand(3), ls[1]], ValueError, "must be a scalar"),
    "nan": (lambda ls: [ls[0] * float("nan"), ls[1]], ValueError, "not finite"),
    "inf": (lambda ls: [ls[0] + float("inf"), ls[1]], ValueError, "not finite"),
    "no_graph": (lambda ls: [ls[0].detach(), ls[1]], ValueError, "no autograd graph"),
    "not_a_list": (lambda ls: 3.0, ValueError, "K task losses"),
    "raises": (lambda ls: 1 / 0, ZeroDivisionError, "division"),
}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
@pytest.mark.parametrize("call", [0, 1], ids=["unperturbed", "perturbed"])
def test_bad_closure_changes_nothing(cfg, bad, call):
    make_bad, exc, msg = BAD[bad]
    if cfg["method"] == "erm" and call == 1:
        pytest.skip("erm calls the closure once")
    m, opt = _make(cfg)
    before = _state(m, opt)
    with pytest.raises(exc, match=msg):
        opt.step(_calls(m, call, make_bad))
    _assert_unchanged(before, m, opt)
    opt.step(m.losses)  # and the optimizer still works afterwards


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_closure_calling_backward_leaves_the_gradients(cfg):
    """A closure that runs backward() itself is refused on the first step (where the check
    runs: it zeroes the gradients to see whether the closure wrote any); the gradients the
    user had before the step are back afterwards, as are the parameters."""
    m = TwoTask(k=2)
    opt = MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), aggregator="pcgrad", lr=1e-2,
                 generator=torch.Generator().manual_seed(3), backend="torch", **cfg)
    sum(m.losses()).backward()  # gradients from the user's own code, before the first step
    before = _state(m, opt)

    def closure():
        losses = m.losses()
        losses[0].backward(retain_graph=True)
        return losses

    with pytest.raises(ValueError, match="backward"):
        opt.step(closure)
    _assert_unchanged(before, m, opt)
    opt.step(m.losses)


def test_nonfinite_gradient_with_finite_loss():
    m, opt = _make()
    before = _state(m, opt)

    def closure():
        losses = m.losses()
        # sqrt at 0 has an infinite derivative: finite loss, non-finite gradient
        return [losses[0] + torch.sqrt((m.body[0].weight * 0).sum()), losses[1]]

    with pytest.raises(ValueError, match="non-finite"):
        opt.step(closure)
    _assert_unchanged(before, m, opt)


def test_bad_aggregator_weights_change_nothing():
    m, opt = _make()
    opt._aggregate = lambda g, gen: torch.ones(5)
    before = _state(m, opt)
    with pytest.raises(ValueError):
        opt.step(m.losses)
    _assert_unchanged(before, m, opt)


def test_shared_parameter_without_gradient():
    m = TwoTask()
    shared = nn.ModuleList([m.body, nn.Linear(8, 8)])  # the Linear is never used
    opt = MTLSAM(shared, torch.optim.SGD, heads=list(m.heads), lr=0.1)
    with pytest.raises(ValueError, match=r"'1.weight', '1.bias'.*receive no gradient"):
        opt.step(m.losses)


def test_head_used_by_another_loss():
    m = TwoTask()
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1)

    def closure():
        a, b = m.losses()
        return [a, b + 0.1 * m.heads[0].weight.sum()]

    with pytest.raises(ValueError, match="head 0's parameters receive gradient from loss 1"):
        opt.step(closure)


def test_closure_none():
    m, opt = _make()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
@pytest.mark.parametrize("agg", ["ls", "mgda", "pcgrad", "cagrad", "imtl", "nash"])
def test_zero_gradient_task_is_finite(cfg, agg):
    """A task whose loss does not depend on the parameters (zero gradient): documented
    behaviour is a zero perturbation for it and finite weights, never a division by zero."""
    m = TwoTask()
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator=agg, lr=0.1,
                 backend="torch", **cfg)

    def closure():
        a, b = m.losses()
        return [a, b * 0.0]

    for _ in range(2):
        opt.step(closure)
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_reassigned_parameter_data():
    m, opt = _make()
    m.body[0].weight.data = m.body[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        opt.step(m.losses)


@pytest.mark.parametrize("kw, msg", [
    (dict(method="adam"), "method must be one of"),
    (dict(alpha=1.5), "alpha"),
    (dict(rho=-1.0), "rho"),
    (dict(rho_heads=float("nan")), "rho_heads"),
    (dict(local_grad="exact"), "local_grad"),
    (dict(norm="l1"), "norm"),
    (dict(backend="cuda"), "backend"),
    (dict(backend="triton"), "not available"),
    (dict(layers=["nope"]), "unknown layer"),
    (dict(layers=[]), "at least one layer"),
    (dict(aggregator="adam"), "aggregator"),
    # a CUDA generator (stood in for by its device attribute: no GPU here) cannot draw the
    # CPU-side layer selections
    (dict(generator=SimpleNamespace(device=torch.device("cuda", 0))),
     "generator must be a CPU torch.Generator"),
])
def test_bad_constructor_arguments(kw, msg, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would allow triton on CPU
    m = TwoTask()
    with pytest.raises((ValueError, RuntimeError), match=msg):
        MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1, **kw)


def test_bad_task_weights():
    m = TwoTask()
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1, task_weights=[1.0])
    with pytest.raises(ValueError, match="task_weights has 1 entries for 2 tasks"):
        opt.step(m.losses)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1, task_weights=[1, -1])
    with pytest.raises(ValueError, match="non-negative"):
        opt.step(m.losses)


def test_bad_structure():
    m = TwoTask()
    with pytest.raises(ValueError, match="torch.optim.Optimizer class"):
        MTLSAM(m.body, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="both shared and heads"):
        MTLSAM(m.body, torch.optim.SGD, heads=[m.body[0], m.heads[1]], lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MTLSAM(m.body, torch.optim.SGD, heads=[m.heads[0], nn.ReLU()], lr=0.1)
    meta = nn.Linear(8, 1, device="meta")
    with pytest.raises(ValueError, match="mixed devices"):
        MTLSAM(m.body, torch.optim.SGD, heads=[m.heads[0], meta], lr=0.1)


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
@pytest.mark.parametrize("call", [0, 1], ids=["unperturbed", "perturbed"])
def test_nonfinite_loss_with_ls_changes_nothing(cfg, call):
    """LS skips the Gram matrix, so its finiteness check is on the combined gradient."""
    if cfg["method"] == "erm" and call == 1:
        pytest.skip("erm calls the closure once")
    m, opt = _make(cfg, agg="ls")
    before = _state(m, opt)
    with pytest.raises(ValueError, match="not finite"):
        opt.step(_calls(m, call, BAD["nan"][0]))
    _assert_unchanged(before, m, opt)
