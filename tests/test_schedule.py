"""rho, rho_heads and alpha are scheduled through ``param_groups``: each step reads them there,
so a schedule (or a hand edit) between steps is the same, bit for bit, as building the
optimizer with that step's values and stepping it from the same state; bad values raise before
the step changes anything; the state dict carries them."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import TwoTask
from tests.test_bad_input import _assert_unchanged, _state

SCHEDULED = ("rho", "rho_heads", "alpha")
CONFIGS = {
    "gl": dict(method="gl", aggregator="pcgrad"),
    "gl-lagged": dict(method="gl", local_grad="lagged", aggregator="mgda", norm="global"),
    "fmtl": dict(method="fmtl", aggregator="mgda"),
    "fmtl-ls": dict(method="fmtl", aggregator="ls", decompose=False, adaptive=True),
    "sam": dict(method="sam", aggregator="imtl"),
}
# a warm-up of rho (0 on the first step), then a decay
RHO_SCHEDULE = [{"rho": 0.0}, {"rho": 0.1}, {"rho": 0.2}, {"rho": 0.07}]


def _build(cfg: dict, m: TwoTask, **kw) -> MTLSAM:
    args = dict(rho=0.05, rho_heads=0.03, alpha=0.5, **cfg)
    args.update(kw)
    return MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), lr=1e-2, backend="torch",
                  generator=torch.Generator().manual_seed(11), **args)


def _set(opt: MTLSAM, values: dict) -> None:
    for g in opt.param_groups:
        g.update(values)


def _without_scheduled(sd: dict) -> dict:
    """A state dict whose groups lack the scheduled keys (as one saved before rho_heads was
    scheduled, and without rho / alpha): loading fills them from the optimizer's values."""
    sd = copy.deepcopy(sd)
    for g in sd["base"]["param_groups"]:
        for k in SCHEDULED:
            g.pop(k, None)
    return sd


def _run_scheduled(cfg: dict, schedule: list[dict]) -> tuple[list, list]:
    m = TwoTask(k=3, seed=4)
    opt = _build(cfg, m)
    losses = []
    for values in schedule:
        _set(opt, values)
        losses.append(opt.step(m.losses))
        assert all(getattr(opt, k) == v for k, v in values.items())  # the values it used
    return m.snapshot(), losses


def _run_rebuilt(cfg: dict, schedule: list[dict]) -> tuple[list, list]:
    """Each step on an optimizer built with that step's values (the constructor's path), from
    the previous optimizer's state."""
    m = TwoTask(k=3, seed=4)
    in_use = dict(rho=0.05, rho_heads=0.03, alpha=0.5)
    sd, losses = None, []
    for values in schedule:
        in_use.update(values)
        opt = _build(cfg, m, **in_use)
        if sd is not None:
            opt.load_state_dict(_without_scheduled(sd))
        assert all(g[k] == v for g in opt.param_groups for k, v in in_use.items())
        losses.append(opt.step(m.losses))
        sd = copy.deepcopy(opt.state_dict())
    return m.snapshot(), losses


def _equal(a: tuple[list, list], b: tuple[list, list]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("name", CONFIGS)
def test_rho_schedule_equals_rebuilding_with_each_steps_rho(name):
    got = _run_scheduled(CONFIGS[name], RHO_SCHEDULE)
    assert _equal(got, _run_rebuilt(CONFIGS[name], RHO_SCHEDULE))
    # and the schedule mattered: a constant rho gives other parameters
    assert not _equal(got, _run_scheduled(CONFIGS[name], [{}] * len(RHO_SCHEDULE)))


@pytest.mark.parametrize("name, schedule", [
    ("gl", [{}, {"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 0.3}]),
    ("gl-lagged", [{}, {"alpha": 0.9}, {"alpha": 0.2}]),
    ("fmtl", [{}, {"rho_heads": 0.0}, {"rho_heads": 0.2}]),
    ("sam", [{"rho_heads": 0.2}, {"rho": 0.0, "rho_heads": 0.1}, {}]),
], ids=["gl-alpha", "gl-lagged-alpha", "fmtl-rho_heads", "sam-rho_heads"])
def test_alpha_and_rho_heads_edits_take_effect(name, schedule):
    got = _run_scheduled(CONFIGS[name], schedule)
    assert _equal(got, _run_rebuilt(CONFIGS[name], schedule))
    assert not _equal(got, _run_scheduled(CONFIGS[name], [{}] * len(schedule)))


@pytest.mark.parametrize("agg", ["mgda", "cagrad", "imtl", "upgrad"])  # (PCGrad: fmtl draws
# its random task orders twice per step, ERM once, so their later draws differ)
def test_fmtl_with_rho_set_to_zero_takes_erms_update_exactly(agg):
    """F-MTL's M(loss) + M(flat) with rho = 0 (flat = 0) is ERM's update: its loss block is
    ERM's Gram, bit for bit. Built with rho = 0.05, set to 0 before the steps."""
    m1, m2 = TwoTask(k=3, seed=1), TwoTask(k=3, seed=1)
    fmtl = _build(dict(method="fmtl", aggregator=agg), m1)
    erm = _build(dict(method="erm", aggregator=agg), m2)
    _set(fmtl, {"rho": 0.0, "rho_heads": 0.0})
    for _ in range(3):
        assert torch.equal(fmtl.step(m1.losses), erm.step(m2.losses))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    _set(fmtl, {"rho": 0.05})  # and rho > 0 again departs from ERM
    fmtl.step(m1.losses)
    erm.step(m2.losses)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_edited_values_round_trip_through_the_state_dict():
    m = TwoTask(k=3, seed=4)
    opt = _build(CONFIGS["gl"], m)
    opt.step(m.losses)
    _set(opt, {"rho": 0.12, "rho_heads": 0.01, "alpha": 0.8})
    sd = copy.deepcopy(opt.state_dict())
    assert all(g["rho"] == 0.12 and g["rho_heads"] == 0.01 and g["alpha"] == 0.8
               for g in sd["base"]["param_groups"])
    params = {k: v.clone() for k, v in m.state_dict().items()}
    opt.step(m.losses)
    want = m.snapshot()

    m2 = TwoTask(k=3, seed=4)
    m2.load_state_dict(params)
    opt2 = _build(CONFIGS["gl"], m2)  # built with rho 0.05: the state dict's values win
    opt2.load_state_dict(sd)
    info = opt2.info()
    assert (info["rho"], info["rho_heads"], info["alpha"]) == (0.12, 0.01, 0.8)
    opt2.step(m2.losses)
    assert all(torch.equal(a, b) for a, b in zip(want, m2.parameters()))


def test_an_old_state_dict_without_rho_heads_loads():
    m = TwoTask(k=3, seed=4)
    opt = _build(CONFIGS["fmtl"], m)
    opt.step(m.losses)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["base"]["param_groups"]:
        del g["rho_heads"]  # saved before rho_heads was in the groups
    opt2 = _build(CONFIGS["fmtl"], TwoTask(k=3, seed=4), rho_heads=0.02)
    opt2.load_state_dict(sd)
    assert [g["rho_heads"] for g in opt2.param_groups] == [0.02, 0.02]  # the value in use
    assert [g["rho"] for g in opt2.param_groups] == [0.05, 0.05]  # the dict's own
    assert opt2.info()["rho_heads"] == 0.02


def test_info_reports_the_values_the_next_step_uses():
    m = TwoTask(k=2)
    opt = _build(CONFIGS["gl"], m)
    assert (opt.info()["rho"], opt.info()["rho_heads"], opt.info()["alpha"]) == (0.05, 0.03, 0.5)
    opt.param_groups[0]["rho"] = 0.5
    opt.param_groups[1]["rho_heads"] = 0.25
    opt.param_groups[0]["alpha"] = 0.125
    assert (opt.info()["rho"], opt.info()["rho_heads"], opt.info()["alpha"]) == (0.5, 0.25, 0.125)
    assert all("rho_heads" in g for g in opt.param_groups)
    assert opt.defaults["rho_heads"] == 0.03


def test_which_group_holds_what():
    """Group 0 (shared) gives rho and alpha, group 1 (heads) gives rho_heads; without heads,
    rho_heads is read from group 0."""
    m = TwoTask(k=2)
    opt = _build(CONFIGS["gl"], m)
    opt.param_groups[1]["rho"] = 0.9  # the heads' group's rho is not the shared radius
    opt.param_groups[0]["rho_heads"] = 0.9  # nor the shared group's rho_heads the heads'
    opt.step(m.losses)
    assert (opt.rho, opt.rho_heads) == (0.05, 0.03)
    opt.param_groups[0]["rho"] = 0.2
    opt.param_groups[1]["rho_heads"] = 0.4
    opt.step(m.losses)
    assert (opt.rho, opt.rho_heads) == (0.2, 0.4)
    alone = MTLSAM(m.body, torch.optim.SGD, lr=0.1, rho=0.1)  # no heads: one group
    alone.param_groups[0]["rho_heads"] = 0.3
    assert alone.info()["rho_heads"] == 0.3


BAD_EDITS = [
    (0, "rho", -0.1, "rho must be a finite number >= 0, got -0.1"),
    (0, "rho", float("nan"), "rho must be a finite number >= 0, got nan"),
    (0, "rho", "0.1", "rho must be a finite number >= 0, got '0.1'"),
    (1, "rho_heads", float("inf"), "rho_heads must be a finite number >= 0, got inf"),
    (1, "rho", -1.0, "rho must be a finite number >= 0"),  # checked in every group
    (0, "alpha", 1.5, r"alpha must be in \[0, 1\], got 1.5"),
    (0, "alpha", float("nan"), r"alpha must be in \[0, 1\], got nan"),
]


@pytest.mark.parametrize("group, key, value, msg", BAD_EDITS,
                         ids=[f"{k}={v!r}" for _, k, v, _ in BAD_EDITS])
@pytest.mark.parametrize("name", ["gl-lagged", "fmtl"])
def test_a_bad_edit_raises_and_changes_nothing(name, group, key, value, msg):
    m = TwoTask(k=2)
    opt = _build(CONFIGS[name], m)
    opt.step(m.losses)  # so that the base optimizer and the lagged history have state
    before = _state(m, opt)
    used = (opt.rho, opt.rho_heads, opt.alpha)
    good = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    with pytest.raises(ValueError, match=msg):
        opt.step(m.losses)
    _assert_unchanged(before, m, opt)
    assert (opt.rho, opt.rho_heads, opt.alpha) == used
    with pytest.raises(ValueError, match=msg):
        opt.info()
    opt.param_groups[group][key] = good
    opt.step(m.losses)  # fixed, it steps again


def test_a_group_without_a_key_is_refused():
    m = TwoTask(k=2)
    opt = _build(CONFIGS["fmtl"], m)
    del opt.param_groups[1]["rho_heads"]
    with pytest.raises(ValueError, match="a param group has no 'rho_heads'"):
        opt.step(m.losses)


class SplitSGD(torch.optim.SGD):
    """A base optimizer that regroups: matrices and vectors of each group apart (as code that
    exempts biases from weight decay does), so the shared parameters span two groups."""

    def __init__(self, groups, **kw):
        split = []
        for g in groups:
            for part in ([p for p in g["params"] if p.ndim > 1],
                         [p for p in g["params"] if p.ndim <= 1]):
                if part:
                    split.append({**g, "params": part})
        super().__init__(split, **kw)


def _split(cfg: dict, m: TwoTask, base=SplitSGD) -> MTLSAM:
    return MTLSAM(m.body, base, heads=list(m.heads), lr=0.05, backend="torch",
                  generator=torch.Generator().manual_seed(2), **cfg)


@pytest.mark.parametrize("name", ["gl", "fmtl"])
def test_shared_parameters_over_several_groups(name):
    """Groups that agree are one radius (the same bits as one group); groups of the shared
    parameters that disagree on a value the method reads are refused, nothing changed."""
    cfg = CONFIGS[name]
    m1, m2 = TwoTask(k=2, seed=3), TwoTask(k=2, seed=3)
    split, plain = _split(cfg, m1), _split(cfg, m2, base=torch.optim.SGD)
    assert len(split.param_groups) == 4 and len(plain.param_groups) == 2
    for rho in (0.05, 0.3):
        _set(split, {"rho": rho})
        _set(plain, {"rho": rho})
        split.step(m1.losses)
        plain.step(m2.losses)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))

    split.param_groups[0]["rho"] = 0.1  # matrices of the backbone only
    before = _state(m1, split)
    with pytest.raises(ValueError, match=r"param_groups \[0, 1\] hold the shared parameters "
                                         r"but disagree on 'rho' \(\[0.1, 0.3\]\)"):
        split.step(m1.losses)
    _assert_unchanged(before, m1, split)
    _set(split, {"rho": 0.3})
    split.param_groups[2]["rho_heads"] = 0.2  # one of the heads' two groups
    with pytest.raises(ValueError, match="hold the heads but disagree on 'rho_heads'"):
        split.step(m1.losses)
    _set(split, {"rho_heads": 0.2})
    split.param_groups[1]["alpha"] = 0.9  # read by gl only
    if name == "gl":
        with pytest.raises(ValueError, match="disagree on 'alpha'"):
            split.step(m1.losses)
    else:
        split.step(m1.losses)


def test_erm_reads_no_radius():
    m = TwoTask(k=2)
    opt = _split(dict(method="erm"), m)
    opt.param_groups[0]["rho"] = 0.5
    opt.step(m.losses)  # the groups disagree on a value ERM never uses
