"""Stateful and random aggregators under data parallel (gloo, 2 CPU processes): GradVac's
targets and RLW's draws come from the all-reduced Gram matrix and the shared generator, so
every rank holds the same state and the same parameters, equal to one process on the whole
batch; a state dict saved on rank 0 resumes every rank bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import dist_worker as w
from tests.test_distributed import METHODS, WORLD, _ok, _single_process, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

CASES = [("fmtl", "gradvac"), ("gl-lagged", "gradvac"), ("sam", "gradvac"), ("fmtl", "rlw"),
         ("gl", "rlw")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-agg")
    scenarios = [(f"train-{name}-{agg}", {"kind": "train", "cfg": METHODS[name], "agg": agg})
                 for name, agg in CASES]
    scenarios.append(("resume-fmtl-gradvac", {"kind": "resume", "cfg": METHODS["fmtl"],
                                              "agg": "gradvac",
                                              "path": str(tmp / "state-gradvac.pt")}))
    return _spawn(tmp, scenarios)


@pytest.mark.parametrize("name,agg", CASES)
def test_every_rank_holds_the_same_state_and_parameters(ranks, name, agg):
    r0, r1 = (_ok(r[f"train-{name}-{agg}"]) for r in ranks)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    if agg == "gradvac":
        t0, t1 = r0["agg_state"]["targets"], r1["agg_state"]["targets"]
        assert t0.shape == (3, 3) and bool(t0.abs().sum() > 0)
        assert torch.equal(t0, t1)
    else:
        assert r0["agg_state"] is None
    params, _ = _single_process(METHODS[name], agg, world=WORLD)
    for a, b in zip(r0["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert len(r0["losses"]) == w.STEPS


def test_gradvac_state_saved_on_rank_zero_resumes_every_rank(ranks):
    for r in ranks:
        res = _ok(r["resume-fmtl-gradvac"])
        for a, b in zip(res["resumed"], res["straight"]):
            assert torch.equal(a, b)
