"""Sampled-layer modes of gl: "adaptive" (largest change of the task cosine per layer, report
§V) and "random" (drawn from the optimizer's generator); a string is a mode or one name."""

import copy
import math

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

LOCAL = ["autograd", "lagged", "zo"]


class Planted:
    """Six shared layers (vectors) and two tasks. On every layer but ``planted`` both tasks
    pull towards the same target (task cosine 1, constant); on ``planted`` their targets
    rotate against each other a little more every step, so the cosine there keeps changing."""

    def __init__(self, planted: int = 3, n: int = 6, dim: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.layers = [torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
                       for _ in range(n)]
        self.planted = planted
        self.t = 0

    def closure(self):
        losses = []
        for task in range(2):
            total = 0.0
            for j, w in enumerate(self.layers):
                if j == self.planted:
                    ang = (1 if task else -1) * 0.4 * self.t
                    target = torch.zeros_like(w)
                    target[0], target[1] = 3 * math.cos(ang), 3 * math.sin(ang)
                else:
                    target = torch.full_like(w, 0.5)
                total = total + ((w - target) ** 2).sum()
            losses.append(total)
        return losses


def _planted_opt(sys_, **kw):
    return MTLSAM({f"l{j}": [w] for j, w in enumerate(sys_.layers)}, torch.optim.SGD, lr=0.01,
                  method="gl", backend="torch", generator=torch.Generator().manual_seed(0),
                  **kw)


@pytest.mark.parametrize("local_grad", LOCAL)
def test_adaptive_selects_the_planted_layer(local_grad):
    sys_ = Planted(planted=3)
    opt = _planted_opt(sys_, layers="adaptive", n_sampled=1, resample_every=3,
                       local_grad=local_grad)
    assert opt.sampled_layers == [0]  # the default until a measurement
    for _ in range(8):
        opt.step(sys_.closure)
        sys_.t += 1
    assert opt.sampled_layers == [3]
    assert opt.info()["sampled_layers"] == ["l3"] and opt.info()["layer_mode"] == "adaptive"
    scores = opt.layer_selector.score
    assert int(scores.argmax()) == 3 and float(scores[3]) > 0
    assert float(torch.cat([scores[:3], scores[4:]]).abs().max()) < 1e-12


def test_adaptive_reselects_only_every_resample_every_steps():
    sys_ = Planted(planted=4)
    opt = _planted_opt(sys_, layers="adaptive", n_sampled=2, resample_every=5)
    seen = []
    for _ in range(7):
        seen.append(list(opt.sampled_layers))
        opt.step(sys_.closure)
        sys_.t += 1
    # First measurement after step 2 (a change needs two steps), re-selection after 5 of them.
    assert all(s == seen[0] for s in seen[:6]) and 4 in opt.sampled_layers


@pytest.mark.parametrize("local_grad", LOCAL)
def test_random_layers_are_reproducible_and_vary(local_grad):
    runs = []
    for _ in range(2):
        m = TwoTask(k=2)
        opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.01, method="gl",
                     layers="random", n_sampled=2, local_grad=local_grad, aggregator="pcgrad",
                     backend="torch", generator=torch.Generator().manual_seed(5))
        picks = []
        for _ in range(8):
            picks.append(tuple(opt.sampled_layers))
            opt.step(m.losses)
        runs.append((picks, m.snapshot()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert len(set(runs[0][0])) > 1 and all(len(p) == 2 for p in runs[0][0])


@pytest.mark.parametrize("mode", ["adaptive", "random"])
def test_state_dict_resumes_the_selection_bit_for_bit(mode):
    def make(m):
        return MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, momentum=0.9,
                      method="gl", layers=mode, n_sampled=2, resample_every=2,
                      local_grad="lagged", aggregator="mgda", backend="torch",
                      generator=torch.Generator().manual_seed(1))

    a = TwoTask(k=3)
    opt_a = make(a)
    for _ in range(9):
        opt_a.step(a.losses)
    b = TwoTask(k=3)
    opt_b = make(b)
    for _ in range(4):
        opt_b.step(b.losses)
    state, model_state = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(b.state_dict())
    c = TwoTask(k=3)  # the same data; parameters from the checkpoint
    with torch.no_grad():
        for p in c.parameters():
            p.zero_()
    c.load_state_dict(model_state)
    opt_c = make(c)
    opt_c.load_state_dict(state)
    for _ in range(5):
        opt_c.step(c.losses)
    assert opt_c.sampled_layers == opt_a.sampled_layers
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("mode", ["adaptive", "random"])
def test_failed_step_leaves_the_selection_unchanged(mode):
    m = TwoTask(k=2)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="gl",
                 layers=mode, n_sampled=2, resample_every=1, backend="torch")
    for _ in range(3):
        opt.step(m.losses)
    before = copy.deepcopy(opt.layer_selector.state_dict())
    gen = opt.generator.get_state()
    with pytest.raises(ValueError, match="not finite"):
        opt.step(lambda: [x * float("nan") for x in m.losses()])
    after = opt.layer_selector.state_dict()
    assert after["selection"] == before["selection"] and after["measured"] == before["measured"]
    assert torch.equal(after["score"], before["score"])
    assert torch.equal(gen, opt.generator.get_state())


def test_a_string_is_one_layer_name_or_a_mode():
    m = TwoTask(k=2)
    opt = MTLSAM(m.body, torch.optim.SGD, lr=0.1, method="gl", layers="2")
    assert opt.info()["sampled_layers"] == ["2"]
    with pytest.raises(ValueError, match="unknown layer 'last'"):
        MTLSAM(m.body, torch.optim.SGD, lr=0.1, method="gl", layers="last")


@pytest.mark.parametrize("kw,msg", [(dict(n_sampled=0), "n_sampled"),
                                    (dict(n_sampled=4), "n_sampled"),
                                    (dict(resample_every=0), "resample_every"),
                                    (dict(layer_ema=1.0), "layer_ema")])
def test_bad_mode_options(kw, msg):
    m = TwoTask(k=2)  # 3 shared layers
    with pytest.raises(ValueError, match=msg):
        MTLSAM(m.body, torch.optim.SGD, lr=0.1, method="gl", layers="adaptive", **kw)


def test_adaptive_needs_two_tasks():
    m = TwoTask(k=1)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.1, method="gl",
                 layers="adaptive")
    with pytest.raises(ValueError, match="at least 2 tasks"):
        opt.step(m.losses)


@pytest.mark.parametrize("mode", ["adaptive", "random"])
def test_default_n_sampled_fits_a_small_backbone(mode):
    """The default number of sampled layers is at most the backbone's: a two-layer backbone
    takes both; only an explicit n_sampled out of range is refused."""
    body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4))
    opt = MTLSAM(body, torch.optim.SGD, lr=0.1, method="gl", layers=mode)
    assert opt.layer_selector.n_sampled == 2
    with pytest.raises(ValueError, match="n_sampled"):
        MTLSAM(body, torch.optim.SGD, lr=0.1, method="gl", layers=mode, n_sampled=3)
