"""``batched=True | "auto"``: the K perturbed passes as one vmapped pass over the K points.

Batched must equal the sequential passes (float64 to 1e-10, lower precisions per the
tolerance table) for every method and aggregator, with heads, BatchNorm, adaptive
perturbations, 16-bit parameters and chunks of points; ``"auto"`` must fall back (with one
warning) where vmap cannot run the closure, and ``task_chunk`` must bound the activations a
batched pass holds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from mtlsam_ext.optim.batched import TRIALS
from tests.models import BNNet, TwoTask
from tests.tolerances import ELEMENTWISE

METHODS = {
    "gl": dict(method="gl"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
    "gl-zo": dict(method="gl", local_grad="zo", n_dirs=2),
    "gl-all-layers": dict(method="gl", layers=[0, 1, 2], alpha=0.3),
    "fmtl": dict(method="fmtl"),
    "fmtl-sam-rows": dict(method="fmtl", decompose=False),
    "sam": dict(method="sam"),
    "erm": dict(method="erm"),
}
AGGREGATORS = ["ls", "mgda", "pcgrad", "nash"]


def _train(cfg, batched, agg="mgda", dtype=torch.float64, steps=4, k=3, heads=True,
           closure=None, model=None, **more):
    m = model or TwoTask(k=k, dtype=dtype, seed=3)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads) if heads else None, lr=0.05,
                 aggregator=agg, batched=batched, backend="torch",
                 generator=torch.Generator().manual_seed(1), **cfg, **more)
    losses = [opt.step(closure or m.losses) for _ in range(steps)]
    return m, losses, opt


def _assert_same(a, b, **tol):
    tol = tol or dict(rtol=1e-10, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, **tol)


@pytest.mark.parametrize("agg", AGGREGATORS)
@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_sequential_mlp(name, agg):
    seq, seq_losses, _ = _train(METHODS[name], False, agg)
    bat, bat_losses, opt = _train(METHODS[name], "points" if agg == "ls" else True, agg)
    assert opt.info()["batched"]["points"]["state"] == "batched"
    _assert_same(seq.snapshot(), bat.snapshot())
    _assert_same(seq_losses, bat_losses)


@pytest.mark.parametrize("agg", ["mgda", "cagrad", "imtl"])
@pytest.mark.parametrize("name", ["gl", "gl-lagged", "fmtl"])
def test_batched_equals_sequential_cnn_with_batchnorm(name, agg):
    """Conv backbone and heads with BatchNorm: the batched passes normalise with batch
    statistics and leave the running statistics to the first forward, as the sequential
    passes do (bn_stats="first")."""
    runs = []
    for batched in (False, True):
        m = BNNet(k=3, seed=2, dtype=torch.float64)
        _train(METHODS[name], batched, agg, model=m)
        runs.append(([p.detach().clone() for p in m.parameters()], m.bn_state()))
    _assert_same(runs[0][0], runs[1][0])
    _assert_same(list(runs[0][1].values()), list(runs[1][1].values()))


@pytest.mark.parametrize("name", ["gl", "fmtl"])
def test_batched_adaptive(name):
    cfg = dict(METHODS[name], adaptive=True, rho=0.5)
    _assert_same(_train(cfg, False)[0].snapshot(), _train(cfg, True)[0].snapshot())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gl", "gl-lagged", "fmtl"])
def test_batched_lower_precision(name, dtype):
    """The points are the same bits (one op writes them as the sequential passes do); the
    gradients come from batched matmuls that may sum in another order: one step agrees to
    the element-wise tolerance of the dtype."""
    seq = _train(METHODS[name], False, dtype=dtype, steps=1)[0].snapshot()
    bat = _train(METHODS[name], True, dtype=dtype, steps=1)[0].snapshot()
    _assert_same(seq, bat, **ELEMENTWISE[dtype])


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("name", ["gl", "fmtl"])
def test_task_chunk_same_result(name, chunk):
    seq = _train(METHODS[name], False, k=4)[0].snapshot()
    bat, _, opt = _train(METHODS[name], True, k=4, task_chunk=chunk)
    assert opt.info()["batched"]["task_chunk"] == chunk
    _assert_same(seq, bat.snapshot())


def test_batched_without_heads_and_task_aware_closure():
    m0 = TwoTask(k=3, dtype=torch.float64, seed=3)
    seq = _train(METHODS["gl"], False, model=m0, heads=False)[0].snapshot()
    m1 = TwoTask(k=3, dtype=torch.float64, seed=3)

    def aware(task=None):  # the batched pass asks for all K losses (task=None)
        out = m1.losses()
        return out if task is None else out[task]

    bat = _train(METHODS["gl"], True, model=m1, heads=False, closure=aware)[0].snapshot()
    _assert_same(seq, bat)


def test_named_losses_batched():
    m = TwoTask(k=3, dtype=torch.float64, seed=3)
    ref = TwoTask(k=3, dtype=torch.float64, seed=3)
    _train(METHODS["fmtl"], True, model=m,
           closure=lambda: dict(zip("abc", m.losses())))
    _train(METHODS["fmtl"], False, model=ref)
    _assert_same(ref.snapshot(), m.snapshot())


class _Peak:
    """Bytes of tensors saved for backward alive at once (the activations a pass holds)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        peak = self
        nbytes = t.numel() * t.element_size()

        class Held:
            def __init__(self) -> None:
                peak.live += nbytes
                peak.peak = max(peak.peak, peak.live)
                self.t = t

            def __del__(self) -> None:
                peak.live -= nbytes

        return Held()

    @staticmethod
    def unpack(h):
        return h.t


def test_task_chunk_caps_activation_memory():
    """A batched pass holds the activations of ``task_chunk`` points: with one point per
    pass the peak of saved activations is about 1/K of the all-K pass."""
    k = 6
    peaks = {}
    for chunk in (None, 1):
        m = TwoTask(k=k, dtype=torch.float32, seed=0, width=64)
        m.x = torch.randn(512, 6)
        m.y = torch.randn(512, k)
        opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="fmtl",
                     batched=True, task_chunk=chunk, backend="torch")
        opt.step(m.losses)
        p = _Peak()
        with torch.autograd.graph.saved_tensors_hooks(p.pack, p.unpack):
            opt.step(m.losses)
        peaks[chunk] = p.peak
    assert peaks[1] < 0.4 * peaks[None], peaks


def _item_closure(m):
    def closure():
        h = m.body(m.x)
        if float(h.abs().max()) > 1e6:  # a Python branch on a value: vmap refuses .item()
            h = h / 2
        return [((hd(h).squeeze(1) - m.y[:, i]) ** 2).mean() for i, hd in enumerate(m.heads)]
    return closure


def test_auto_falls_back_once_on_item():
    m = TwoTask(k=3, dtype=torch.float64, seed=3)
    ref = TwoTask(k=3, dtype=torch.float64, seed=3)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="gl",
                 batched="auto", backend="torch")
    ref_opt = MTLSAM(ref.body, torch.optim.SGD, heads=list(ref.heads), lr=0.05, method="gl",
                     backend="torch")
    with pytest.warns(UserWarning, match="batched='auto'.*item"):
        opt.step(_item_closure(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(_item_closure(m))
    for _ in range(4):
        ref_opt.step(ref.losses)
    info = opt.info()["batched"]["points"]
    assert info["state"] == "sequential" and "vmap could not run" in info["reason"]
    _assert_same(ref.snapshot(), m.snapshot(), rtol=0, atol=0)


def test_true_raises_clearly_and_changes_nothing():
    m = TwoTask(k=3, dtype=torch.float64, seed=3)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="fmtl",
                 batched=True, backend="torch")
    before = m.snapshot()
    with pytest.raises(ValueError, match=r"vmap could not run the closure.*\.item\(\)"):
        opt.step(_item_closure(m))
    _assert_same(before, m.snapshot(), rtol=0, atol=0)
    assert all(float(p.grad.abs().sum()) == 0 for p in m.heads.parameters())
    opt.step(m.losses)  # the optimizer still works with a vmappable closure


def test_auto_dropout_falls_back_true_runs():
    m = BNNet(k=2, seed=0, dropout=0.3, dtype=torch.float64)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="fmtl",
                 batched="auto", backend="torch")
    with pytest.warns(UserWarning, match="batched='auto'.*random"):
        opt.step(m.losses)
    assert opt.info()["batched"]["points"]["state"] == "sequential"
    m2 = BNNet(k=2, seed=0, dropout=0.3, dtype=torch.float64)
    opt2 = MTLSAM(m2.body, torch.optim.SGD, heads=list(m2.heads), lr=0.05, method="fmtl",
                  batched=True, backend="torch")
    for _ in range(2):  # independent dropout masks per point, as K sequential passes draw
        losses = opt2.step(m2.losses)
    assert bool(torch.isfinite(losses).all())


def test_auto_trials_use_sequential_results_then_decide():
    seq = _train(METHODS["fmtl"], False, steps=TRIALS)[0].snapshot()
    m, _, opt = _train(METHODS["fmtl"], "auto", steps=TRIALS)
    _assert_same(seq, m.snapshot(), rtol=0, atol=0)  # the trial steps use the sequential rows
    info = opt.info()["batched"]
    for phase in ("points", "grads"):
        assert info[phase]["state"] in ("batched", "sequential")
        assert info[phase]["reason"].startswith("measured")
    assert "rows_trial" not in opt.work.bufs  # trial buffers freed once decided


def test_unsupported_configurations():
    m = TwoTask(k=2, dtype=torch.float64)
    params = list(m.body.parameters())  # bare tensors: no module slot to swap
    with pytest.raises(ValueError, match="batched=True: parameters .* not held by any module"):
        MTLSAM(params, torch.optim.SGD, heads=list(m.heads), lr=0.1, batched=True)
    opt = MTLSAM(params, torch.optim.SGD, heads=list(m.heads), lr=0.1, batched="auto")
    assert opt.info()["batched"]["points"]["state"] == "sequential"
    # the model given as bn_modules supplies the slots
    MTLSAM(params, torch.optim.SGD, heads=list(m.heads), lr=0.1, batched=True, bn_modules=m)
    b = BNNet(k=2)
    with pytest.raises(ValueError, match="bn_stats='first'"):
        MTLSAM(b.body, torch.optim.SGD, heads=list(b.heads), lr=0.1, batched=True,
               bn_stats="all")
    for bad in ("yes", "point", 1, None):
        with pytest.raises(ValueError, match="batched must be"):
            MTLSAM(m.body, torch.optim.SGD, lr=0.1, batched=bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="task_chunk"):
            MTLSAM(m.body, torch.optim.SGD, lr=0.1, batched=True, task_chunk=bad)


def test_tied_weights_are_swapped_everywhere():
    """A parameter held by two modules is replaced in both slots for the batched pass."""
    torch.manual_seed(0)
    a = nn.Linear(5, 5).double()
    body = nn.Sequential(a, nn.Tanh(), nn.Linear(5, 5).double(), nn.Tanh())
    body[2].weight = a.weight  # tied
    heads = [nn.Linear(5, 1).double() for _ in range(2)]
    x = torch.randn(8, 5, dtype=torch.float64)
    snaps = []
    for batched in (False, True):
        torch.manual_seed(0)
        b = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh()).double()
        b[2].weight = b[0].weight
        hs = [nn.Linear(5, 1).double() for _ in range(2)]
        for src, dst in zip(list(body.parameters()) + [p for h in heads for p in h.parameters()],
                            list(b.parameters()) + [p for h in hs for p in h.parameters()]):
            dst.data.copy_(src.data)
        opt = MTLSAM(b, torch.optim.SGD, heads=hs, lr=0.1, method="gl", batched=batched,
                     backend="torch")
        for _ in range(3):
            opt.step(lambda b=b, hs=hs: [(h(b(x)) ** 2).mean() for h in hs])
        snaps.append([p.detach().clone() for p in b.parameters()])
    _assert_same(*snaps)


@pytest.mark.parametrize("name", ["fmtl", "gl", "gl-lagged", "gl-zo"])
def test_auto_times_the_summed_passes_with_constant_weights(name, monkeypatch):
    """With LS the sequential steps sum the SAM gradients in one buffer (faster than the rows):
    ``"auto"`` compares batched and sequential rows on its first step only, then times the
    summed passes it would run instead, so the decision weighs the batched pass against the
    sequential way as it really runs. The update stays equal to the sequential optimizer's."""
    from mtlsam_ext.optim import sam_passes
    from mtlsam_ext.optim.steps import fmtl, gl

    calls = []
    real = sam_passes.sam_passes

    def spy(run, *a, summed=False, **kw):
        calls.append((run.opt.batched.state("points"), summed))
        return real(run, *a, summed=summed, **kw)

    for step_module in (fmtl, gl):  # (each step calls the passes by the name it imported)
        monkeypatch.setattr(step_module, "sam_passes", spy)
    seq = _train(METHODS[name], False, agg="ls", steps=TRIALS + 2)[0].snapshot()
    calls.clear()
    m, _, opt = _train(METHODS[name], "auto", agg="ls", steps=TRIALS + 2)
    assert calls[:TRIALS + 1] == [("trial", False)] + [("trial", True)] * TRIALS
    ph = opt.batched.phases["points"]
    # (decided at the last sequential sample: the first three batched ones suffice)
    assert len(ph.times["sequential"]) == TRIALS == len(ph.times["batched"])
    assert ph.state in ("batched", "sequential") and ph.reason.startswith("measured")
    assert calls[TRIALS + 1] == (ph.state, ph.state == "sequential")
    assert "rows_trial" not in opt.work.bufs
    _assert_same(seq, m.snapshot())


@pytest.mark.parametrize("batched", [False, True, "points"])
@pytest.mark.parametrize("name", ["gl", "gl-zo", "gl-lagged", "fmtl", "sam", "erm"])
def test_clock_read_only_in_auto_trials(name, batched, monkeypatch):
    """The trial clock waits for the device (torch.cuda.synchronize on a GPU): steps that are
    not an "auto" trial must never read it."""
    from mtlsam_ext.optim import run as run_module

    reads = []

    def counting(device):
        def now():
            reads.append(device)
            return 0.0
        return now

    monkeypatch.setattr(run_module, "timer", counting)
    _train(METHODS[name], batched, steps=2)
    assert reads == []
    _train(METHODS[name], "auto", steps=1)
    assert reads  # (the trial does time both ways)


def test_auto_agreement_is_per_task_norm_wise():
    """The trial check compares each task's gradient by norm: one element off by rounding in
    another summation order (fp32 grouped convolutions) keeps the batched way, a different
    computation (a closure whose result changes from call to call) turns it off."""
    from types import SimpleNamespace

    from mtlsam_ext.optim.batched import BatchedPolicy
    from mtlsam_ext.optim.task_rows import agree

    def run():
        return SimpleNamespace(opt=SimpleNamespace(batched=BatchedPolicy("auto", None, None),
                                                   work=SimpleNamespace(bufs={})), heads=None)

    g = torch.Generator().manual_seed(0)
    a = 0.03 * torch.randn(3, 1000, generator=g)
    b = a.clone()
    b[1, 7] += 4e-5  # 4e-4 of the largest element, 4e-5 of the row's norm
    r = run()
    agree(r, "points", [a], [b])
    assert r.opt.batched.state("points") == "trial"
    r = run()
    with pytest.warns(UserWarning, match="differ from the sequential"):
        agree(r, "points", [a], [a * 1.01])
    assert r.opt.batched.state("points") == "sequential"


def test_auto_falls_back_when_the_closure_changes_between_calls():
    m = TwoTask(k=3, dtype=torch.float64, seed=3)
    calls = [0]

    def drifting():  # the loss scale grows with every call: K sequential calls, one batched
        calls[0] += 1
        return [loss * (1 + 0.1 * calls[0]) for loss in m.losses()]

    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, method="fmtl",
                 batched="auto", backend="torch")
    with pytest.warns(UserWarning, match="differ from the sequential"):
        opt.step(drifting)
    assert opt.info()["batched"]["points"]["state"] == "sequential"
