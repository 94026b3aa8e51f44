"""BatchNorm running statistics change only in the first, unperturbed forward of a step
(``bn_stats="first"``), for every method; ``"all"`` lets every forward update them."""

import copy

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import BNNet

METHODS = [dict(method="gl"), dict(method="gl", local_grad="lagged"),
           dict(method="gl", local_grad="zo", n_dirs=2), dict(method="fmtl"),
           dict(method="sam"), dict(method="erm")]
IDS = ["gl", "gl-lagged", "gl-zo", "fmtl", "sam", "erm"]
# Forwards per step at K = 2 with a closure that runs the backbone once per call:
# gl 1 + K, zo adds 2 n_dirs, fmtl 1 + K, sam 2, erm 1.
FORWARDS = {"gl": 3, "gl-lagged": 3, "gl-zo": 7, "fmtl": 3, "sam": 2, "erm": 1}


def _opt(m, cfg, **kw):
    return MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), aggregator="mgda", lr=0.05,
                  backend="torch", generator=torch.Generator().manual_seed(0), **cfg, **kw)


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_running_stats_equal_one_plain_forward(cfg):
    m = BNNet()
    opt = _opt(m, cfg)
    for step in range(3):  # every step, not only the first (lagged changes path after one)
        ref = copy.deepcopy(m)
        opt.step(m.losses)
        with torch.no_grad():
            ref.losses()  # one plain forward on the same batch and parameters, train mode
        want, got = ref.bn_state(), m.bn_state()
        assert want.keys() == got.keys() and len(got) == 4 * 3
        for key in want:
            assert torch.equal(want[key], got[key]), (step, key)
        assert int(m.body[1].num_batches_tracked) == step + 1
        assert int(m.heads[1][1].num_batches_tracked) == step + 1


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_bn_stats_all_updates_in_every_forward(cfg):
    m = BNNet()
    opt = _opt(m, cfg, bn_stats="all")
    opt.step(m.losses)
    name = IDS[METHODS.index(cfg)]
    assert int(m.body[1].num_batches_tracked) == FORWARDS[name]
    assert opt.info()["bn_stats"] == "all"


def test_perturbed_passes_still_normalise_with_batch_statistics():
    """The module stays in train mode: the perturbed forward's losses are those of a model in
    train mode (batch statistics), not eval mode (running statistics)."""
    m = BNNet()
    seen = []

    def closure():
        seen.append(m.training)
        return m.losses()

    opt = _opt(m, dict(method="fmtl"))
    opt.step(closure)
    assert seen == [True, True, True]


def test_momentum_none_and_modules_given_separately():
    """Cumulative averages (momentum=None) depend on num_batches_tracked, which is restored
    too; BatchNorm layers of a model given as parameters come from ``bn_modules``."""
    m = BNNet()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
    opt = MTLSAM(list(m.body.parameters()), torch.optim.SGD,
                 heads=[list(h.parameters()) for h in m.heads], method="gl", lr=0.05,
                 backend="torch", bn_modules=m)
    assert opt.info()["batchnorm_layers"] == 4
    for _ in range(2):
        ref = copy.deepcopy(m)
        opt.step(m.losses)
        with torch.no_grad():
            ref.losses()
    for key, want in ref.bn_state().items():
        assert torch.equal(want, m.bn_state()[key]), key


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_failed_step_leaves_running_stats_unchanged(cfg):
    m = BNNet()
    opt = _opt(m, cfg)
    opt.step(m.losses)
    before = m.bn_state()
    calls = [0]

    def closure():
        calls[0] += 1
        losses = m.losses()
        if calls[0] == FORWARDS[IDS[METHODS.index(cfg)]]:  # the last forward of the step
            losses = [x * float("nan") for x in losses]
        return losses

    with pytest.raises(ValueError, match="not finite"):
        opt.step(closure)
    for key, want in before.items():
        assert torch.equal(want, m.bn_state()[key]), key


def test_dropout_model_trains():
    m = BNNet(dropout=0.2)
    opt = _opt(m, dict(method="gl", local_grad="lagged"))
    first = sum(float(v) for v in opt.step(m.losses))
    for _ in range(30):
        last = sum(float(v) for v in opt.step(m.losses))
    assert last < first


def test_bad_bn_stats():
    m = BNNet()
    with pytest.raises(ValueError, match="bn_stats"):
        _opt(m, dict(method="gl"), bn_stats="none")
    with pytest.raises(ValueError, match="bn_modules"):
        _opt(m, dict(method="gl"), bn_modules=[3])
