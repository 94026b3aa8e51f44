"""Mixed precision: GradScaler through the step (scaled backward, 1/S folded into the step's
coefficients, overflow -> skipped step and back-off), and autocast inside the closure."""

import copy
import warnings

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import BNNet, TwoTask
from tests.tolerances import ELEMENTWISE

METHODS = [dict(method="gl"), dict(method="gl", local_grad="lagged"),
           dict(method="gl", local_grad="zo", n_dirs=1), dict(method="fmtl"),
           dict(method="fmtl", decompose=False), dict(method="sam"), dict(method="erm")]
IDS = ["gl", "gl-lagged", "gl-zo", "fmtl", "fmtl-direct", "sam", "erm"]


def _opt(m, cfg, agg="mgda", **kw):
    return MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), aggregator=agg, lr=1e-2,
                  backend="torch", generator=torch.Generator().manual_seed(0), **cfg, **kw)


def _scaler(**kw):
    kw.setdefault("init_scale", 2.0**10)
    return torch.amp.GradScaler("cpu", **kw)


@pytest.mark.parametrize("agg", ["mgda", "ls", "nash"])
@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_power_of_two_scale_gives_the_unscaled_trajectory(cfg, agg):
    """S = 2^k scales every gradient exactly, and every fold of 1/S is exact: the scaled
    run equals the plain one bit for bit, also while the scale grows between steps (the
    lagged gradients carry the previous step's scale)."""
    plain, scaled = TwoTask(k=3), TwoTask(k=3)
    opt_p = _opt(plain, cfg, agg)
    scaler = _scaler(growth_interval=1)
    opt_s = _opt(scaled, cfg, agg, grad_scaler=scaler)
    for _ in range(4):
        lp = opt_p.step(plain.losses)
        ls = scaler.step(opt_s, scaled.losses)
        scaler.update()
        assert torch.equal(lp, ls)
    assert scaler.get_scale() == 2.0**14  # grew after every step: no overflow was reported
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_overflow_skips_the_step_and_backs_off(cfg):
    m = TwoTask(k=2)
    scaler = _scaler(init_scale=2.0**127, backoff_factor=2.0**-117, growth_interval=2)
    opt = _opt(m, cfg, grad_scaler=scaler)
    params = m.snapshot()
    base = copy.deepcopy(opt.base_optimizer.state_dict())
    gen = opt.generator.get_state()
    losses = scaler.step(opt, m.losses)  # 2^127 * loss overflows float32 in the backward
    scaler.update()
    assert torch.isfinite(losses).all()
    assert scaler.get_scale() == 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert opt.base_optimizer.state_dict()["state"] == base["state"] == {}
    assert torch.equal(gen, opt.generator.get_state())
    assert opt._step_count == 0
    # No overflow now: a normal step, and growth after growth_interval = 2 good steps.
    scaler.step(opt, m.losses)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert scaler.get_scale() == 2.0**10
    scaler.step(opt, m.losses)
    scaler.update()
    assert scaler.get_scale() == 2.0**11


def test_nan_loss_with_a_scaler_skips_instead_of_raising():
    m = TwoTask(k=2)
    scaler = _scaler()
    opt = _opt(m, dict(method="fmtl"), grad_scaler=scaler)
    params = m.snapshot()
    scaler.step(opt, lambda: [m.losses()[0] * float("nan"), m.losses()[1]])
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))


def test_step_with_grad_scaler_keyword_needs_no_prior_scale():
    """``opt.step(closure, grad_scaler=scaler)`` gives a fresh scaler its scale itself."""
    m = TwoTask(k=2)
    scaler = _scaler()
    opt = _opt(m, dict(method="gl", local_grad="lagged"))
    opt.step(m.losses, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**10


def test_attribute_form_scale_and_found_inf():
    """The attribute form of GradScaler's protocol: ``grad_scale`` is used and the overflow is
    written into the ``found_inf`` tensor handed over."""
    plain, scaled = TwoTask(k=2), TwoTask(k=2)
    opt_p = _opt(plain, dict(method="fmtl"))
    opt_s = _opt(scaled, dict(method="fmtl"))
    opt_s.grad_scale = torch.tensor(64.0)
    opt_s.found_inf = torch.tensor(0.0)
    opt_p.step(plain.losses)
    opt_s.step(scaled.losses)
    assert float(opt_s.found_inf) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))
    opt_s.grad_scale = torch.tensor(2.0**127)
    before = scaled.snapshot()
    opt_s.step(scaled.losses)
    assert float(opt_s.found_inf) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))


def test_fp16_parameters_train_with_a_scaler():
    """fp16 parameters, default-sized scale: early steps overflow and are skipped until the
    scale has backed off, then the losses go down."""
    m = BNNet(dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="gl",
                 local_grad="lagged", aggregator="mgda", lr=0.05, backend="torch",
                 grad_scaler=scaler)
    first = None
    for _ in range(40):
        losses = scaler.step(opt, m.losses)
        scaler.update()
        first = first if first is not None else float(losses.float().sum())
    assert scaler.get_scale() < 2.0**24  # it overflowed at first
    assert opt._step_count > 20
    assert float(losses.float().sum()) < first
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_autocast_inside_the_closure(cfg, dtype):
    """fp32 parameters, the forward under CPU autocast: the step runs, its losses are those of
    the autocast forward, and the trajectory stays close to the fp32 one."""
    m32, mac = TwoTask(k=2), TwoTask(k=2)
    opt32, optac = _opt(m32, cfg), _opt(mac, cfg)

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            return mac.losses()

    for _ in range(3):
        opt32.step(m32.losses)
        losses = optac.step(closure)
        assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    for a, b in zip(m32.parameters(), mac.parameters()):
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    assert not all(torch.equal(a, b) for a, b in zip(m32.parameters(), mac.parameters()))


def test_plain_step_is_unchanged_by_the_amp_support():
    """Without a scaler nothing is scaled: losses are the closure's, no scale attributes."""
    m = TwoTask(k=2)
    opt = _opt(m, dict(method="gl"))
    want = torch.stack(m.losses()).detach()
    got = opt.step(m.losses)
    assert torch.equal(want, got)
    assert not hasattr(opt, "grad_scale")


def test_bad_grad_scaler():
    m = TwoTask(k=2)
    with pytest.raises(ValueError, match="GradScaler"):
        _opt(m, dict(method="gl"), grad_scaler=object())


@pytest.mark.parametrize("cfg", [dict(method="gl"), dict(method="gl", local_grad="lagged"),
                                 dict(method="fmtl")], ids=["gl", "gl-lagged", "fmtl"])
def test_batched_points_under_a_scaler_and_autocast(cfg):
    """batched=True with a GradScaler (the one backward of the K points runs on the scaled
    sum): the sequential trajectory in fp32 to its rounding (S = 2^k folds exactly; batched
    GEMMs may sum in another order); with an autocast (bf16) forward, which
    stays in effect under vmap, to bf16 rounding (batched bf16 GEMMs sum in another order).
    SGD, not Adam: Adam's normalisation would blow rounding up to lr-sized steps."""
    for autocast in (False, True):
        runs = []
        for batched in (False, True):
            m = TwoTask(k=3)
            scaler = _scaler(growth_interval=1)
            opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator="mgda",
                         lr=0.1, rho=0.2, backend="torch", grad_scaler=scaler,
                         batched=batched, **cfg)

            def closure(m=m, autocast=autocast):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return m.losses()

            for _ in range(3):
                scaler.step(opt, closure)
                scaler.update()
            assert scaler.get_scale() == 2.0**13
            runs.append([p.detach().clone() for p in m.parameters()])
        tol = ELEMENTWISE[torch.bfloat16 if autocast else torch.float32]
        for a, b in zip(*runs):
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("at_construction", [True, False])
def test_scaler_step_without_warnings_reports_the_overflow(at_construction):
    """scaler.step(opt, closure) uses the attribute form (no FutureWarning about passing
    grad_scaler=), reads the scale from it, and an overflow inside the step reaches
    scaler.update(): with the scaler given at construction, and without it (found as the
    caller), once the scaler has a scale."""
    m = TwoTask(k=2)
    scaler = _scaler(init_scale=2.0**10, growth_interval=1)
    kw = dict(grad_scaler=scaler) if at_construction else {}
    opt = _opt(m, dict(method="fmtl"), **kw)
    if not at_construction:
        scaler.scale(torch.zeros(()))  # torch checks the scale before the step
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scaler.step(opt, m.losses)
        scaler.update()
        assert scaler.get_scale() == 2.0**11  # finite: grew
        before = m.snapshot()
        grads = [p.grad.clone() for p in m.parameters()]
        scaler.step(opt, lambda: [x * float("inf") for x in m.losses()])
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # the overflow backed it off
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters()))  # skipped: same
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], \
        [str(w.message) for w in seen]
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_step_refuses_unknown_keywords():
    m = TwoTask(k=2)
    opt = _opt(m, dict(method="gl"))
    with pytest.raises(ValueError, match="grad_scaler"):
        opt.step(m.losses, scaler=None)
