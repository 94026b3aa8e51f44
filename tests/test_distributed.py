"""Data parallel on torch.distributed (gloo, 2 and 3 CPU processes): with perturb_sync="global"
the ranks on equal shards equal one process on the whole batch; perturb_sync="local" equals a
float64 oracle in which every rank perturbs with its own gradients; every rank ends identical; a
non-finite value on one rank skips the step everywhere; a rank with another K fails
clearly on every rank; state dicts saved on rank 0 resume every rank; a DDP-wrapped backbone
runs without DDP's own all-reduce."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlsam_ext import MTLSAM
from tests import dist_worker as w
from tests.models import TwoTask

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

METHODS = {"gl": dict(method="gl"), "gl-lagged": dict(method="gl", local_grad="lagged"),
           "gl-zo": dict(method="gl", local_grad="zo", n_dirs=2), "fmtl": dict(method="fmtl"),
           "sam": dict(method="sam"), "erm": dict(method="erm")}
AGGS = ["mgda", "ls", "pcgrad", "nash"]
WORLD = 2
LOCAL_ORACLE = ["sam", "fmtl", "gl"]  # the methods whose local perturbation differs
ROW_BYTES = 344 * 8  # one shared gradient row of TwoTask(width=12) in float64
CAPS = {"rows": ROW_BYTES / 2**20,  # one row per bucket: a bucket leaves after each pass
        "pieces": 1000 / 2**20}  # rows sent in pieces of 125 elements
BATCHED = ["gl", "gl-lagged", "fmtl"]  # batched=True: the K perturbed passes in one vmap


def _spawn(tmp_path, scenarios, world=WORLD):
    init = tmp_path / "init"
    mp.spawn(w.run_scenarios, args=(world, str(init), str(tmp_path), scenarios), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """All scenarios in one pair of processes (starting them costs seconds)."""
    tmp = tmp_path_factory.mktemp("dist")
    scenarios = []
    for name, cfg in METHODS.items():
        for agg in AGGS:
            scenarios.append((f"train-{name}-{agg}", {"kind": "train", "cfg": cfg, "agg": agg}))
        scenarios.append((f"local-{name}", {"kind": "train", "cfg": cfg, "agg": "mgda",
                                            "sync": "local"}))
        if name in LOCAL_ORACLE:
            scenarios.append((f"local1-{name}", {"kind": "train", "cfg": cfg, "agg": "mgda",
                                                 "sync": "local", "steps": 1}))
        scenarios.append((f"nonfinite-{name}", {"kind": "nonfinite", "cfg": cfg}))
        for sync in ("global", "local"):
            for cap, mb in CAPS.items():
                scenarios.append((f"cap-{cap}-{name}-{sync}", {
                    "kind": "train", "cfg": cfg, "agg": "mgda", "sync": sync, "cap": mb}))
    for name in BATCHED:
        for sync in ("global", "local"):
            scenarios.append((f"batched-{name}-{sync}", {
                "kind": "train", "cfg": dict(METHODS[name], batched=True), "agg": "mgda",
                "sync": sync}))
    for name in ("gl", "fmtl", "sam"):  # a closure failing on the last pass of step 3
        scenarios.append((f"fail-{name}", {"kind": "train", "cfg": METHODS[name], "agg": "mgda",
                                            "cap": CAPS["rows"], "steps": w.STEPS + 1,
                                            "fail_at": (3, 4 if name != "sam" else 2)}))
    scenarios.append(("wrong_k", {"kind": "wrong_k"}))
    for wrapper in ("fsdp1", "fsdp2-heads", "fsdp2-part"):
        scenarios.append((f"sharded-{wrapper}", {"kind": "sharded", "wrapper": wrapper}))
    for name in ("gl-lagged", "fmtl"):
        scenarios.append((f"resume-{name}", {"kind": "resume", "cfg": METHODS[name],
                                             "path": str(tmp / f"state-{name}.pt")}))
        scenarios.append((f"ddp-{name}", {"kind": "ddp", "cfg": METHODS[name]}))
    return _spawn(tmp, scenarios)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    """Every method x aggregator again on 3 ranks (shards of 21 of the 64 samples)."""
    tmp = tmp_path_factory.mktemp("dist3")
    scenarios = [(f"train-{name}-{agg}", {"kind": "train", "cfg": cfg, "agg": agg})
                 for name, cfg in METHODS.items() for agg in AGGS]
    scenarios += [(f"cap-pieces-{name}", {"kind": "train", "cfg": cfg, "agg": "mgda",
                                          "cap": CAPS["pieces"]}) for name, cfg in METHODS.items()]
    return _spawn(tmp, scenarios, world=3)


def _single_process(cfg, agg, world=WORLD):
    m = TwoTask(k=3, dtype=torch.float64, seed=1, width=12)
    n = m.x.shape[0] // world * world  # the samples the ranks' shards cover
    opt = w.make(m, cfg, aggregator=agg)
    losses = [opt.step(w.closure_for(m, m.x[:n], m.y[:n])) for _ in range(w.STEPS)]
    return [p.detach() for p in m.parameters()], losses


def _ok(res):
    assert "error" not in res, res.get("error")
    return res


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", METHODS)
def test_global_sync_equals_one_process_on_the_whole_batch(ranks, name, agg):
    r0, r1 = (_ok(r[f"train-{name}-{agg}"]) for r in ranks)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # identical on every rank, bit for bit
    params, losses = _single_process(METHODS[name], agg)
    for a, b in zip(r0["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(r0["losses"], losses):  # step returns the mean of the ranks' losses
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    comm = r0["info"]["communication"]
    assert r0["info"]["world_size"] == WORLD and comm["collectives"] > 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", METHODS)
def test_three_ranks_equal_one_process(three_ranks, name, agg):
    res = [_ok(r[f"train-{name}-{agg}"]) for r in three_ranks]
    for r in res[1:]:
        for a, b in zip(res[0]["params"], r["params"]):
            assert torch.equal(a, b)
    params, losses = _single_process(METHODS[name], agg, world=3)
    for a, b in zip(res[0]["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(res[0]["losses"], losses):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", METHODS)
def test_three_ranks_with_rows_in_pieces_equal_one_process(three_ranks, name):
    res = [_ok(r[f"cap-pieces-{name}"]) for r in three_ranks]
    for r in res[1:]:
        for a, b in zip(res[0]["params"], r["params"]):
            assert torch.equal(a, b)
    params, _ = _single_process(METHODS[name], "mgda", world=3)
    for a, b in zip(res[0]["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("sync", ["global", "local"])
@pytest.mark.parametrize("name", METHODS)
def test_bucketed_rows_give_the_same_bits(ranks, name, sync, cap):
    """Rows sent bucket by bucket (a row each, or pieces of rows) as the passes write them:
    on two ranks every sum is a + b whatever the cut, so the parameters are bit-equal to one
    collective per phase; the same bytes travel, in more collectives."""
    r0, r1 = (_ok(r[f"cap-{cap}-{name}-{sync}"]) for r in ranks)
    one = _ok(ranks[0][f"train-{name}-mgda" if sync == "global" else f"local-{name}"])
    for a, b, c in zip(r0["params"], r1["params"], one["params"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    got, want = r0["info"]["communication"], one["info"]["communication"]
    assert got["bytes"] == want["bytes"] and got["collectives"] > want["collectives"]
    assert r0["info"]["bucket_cap_mb"] == pytest.approx(CAPS[cap])
    for launches in r0["trace"]:
        if cap == "pieces":
            assert max(n for _, n in launches) <= 125


@pytest.mark.parametrize("sync", ["global", "local"])
@pytest.mark.parametrize("name", ["gl", "fmtl", "gl-lagged", "erm"])
def test_rows_leave_while_later_passes_run(ranks, name, sync):
    """One row per bucket: a row's all-reduce is launched before the step's last closure call
    (gl, fmtl: the SAM rows during the perturbed passes) or between the backward passes of
    one forward (erm: the trace shows rows launched one by one); with the default cap the rows
    of a small model leave once, after the passes."""
    for key, overlapped in ((f"cap-rows-{name}-{sync}", True),
                            (f"train-{name}-mgda" if sync == "global" else f"local-{name}",
                             False)):
        trace = _ok(ranks[0][key])["trace"][-1]
        n_calls = max(c for c, _ in trace)
        if name == "erm":  # one forward; the rows leave one by one between the backwards
            assert len([c for c, n in trace if n == 344]) == (3 if overlapped else 0), trace
        else:  # closure calls 2..K+1 are the perturbed passes: rows leave between them
            # (fmtl local: task i's loss row too, once its own pass has read it)
            per_pass = 2 if (name, sync) == ("fmtl", "local") else 1
            during = [n for c, n in trace if 1 < c < n_calls]
            assert during == ([344] * per_pass * (3 - 1) if overlapped else []), trace


@pytest.mark.parametrize("name", ["gl", "fmtl", "sam"])
def test_failed_step_waits_for_its_buckets_and_changes_nothing(ranks, name):
    """A closure raising during the passes after some rows have left: the step is undone on
    every rank, and the run goes on as if it had not happened."""
    for r in ranks:
        res = _ok(r[f"fail-{name}"])
        assert res["failed"] == ["closure failed on purpose"]
        straight = _ok(r[f"cap-rows-{name}-global"])
        for a, b in zip(res["params"], straight["params"]):
            assert torch.equal(a, b)


def test_phase_buckets_cover_every_element_once():
    """The bucket plan on its own (no processes): whole rows up to the cap, larger rows in
    pieces, each bucket launched by the ready() of its last row, nothing twice."""
    from mtlsam_ext.optim.distributed import Phase

    class FakeSync:
        def __init__(self, cap_bytes):
            self.cap_bytes, self.group, self.collectives, self.bytes = cap_bytes, None, 0, 0
            self.launched = []
            self.dist = self

        def all_reduce(self, t, group=None, async_op=False):
            t.add_(1)
            self.launched.append((len(self.events), t.numel()))
            return self

        def wait(self):
            pass

    for cap, rows_per, pieces in ((4 * 10 * 3, 3, 1), (4 * 10, 1, 1), (4 * 4, 1, 3),
                                  (10**9, 7, 1)):
        blocks = [torch.zeros(7, 10), torch.zeros(7, 3, dtype=torch.float64)]
        sync = FakeSync(cap)
        sync.events = []
        ph = Phase(sync, blocks)
        for i in range(7):
            ph.ready(i)
            sync.events.append(i)
        head = torch.zeros(5)
        ph.finish([head])
        for b in blocks + [head]:
            assert torch.equal(b, torch.ones_like(b))  # every element summed exactly once
        first = [n for when, n in sync.launched if when == 0]  # launched by ready(0)
        if rows_per == 1:
            assert sum(first[:pieces]) == 10  # row 0 of the fp32 block left after ready(0)
        elif rows_per < 7:
            assert not [n for when, n in sync.launched if when < rows_per - 1 and n >= 10]
        else:  # everything fits one bucket per block: launched when the last row is ready
            assert [n for when, n in sync.launched if when < 6] == []
        assert sync.bytes == 7 * 10 * 4 + 7 * 3 * 8 + 5 * 4


def _local_oracle(name):
    """One step of perturb_sync="local" from the method formulas (tests/oracles/methods.py):
    each rank's SAM rows (and F-MTL's loss rows) at its own perturbation on its own shard,
    averaged over the ranks; M on the averaged rows; heads get the mean of their ranks' SAM
    gradients; then SGD's first step (p -= lr d)."""
    from mtlsam_ext.aggregators import get_aggregator
    from tests.oracles.methods import oracle_step

    m = TwoTask(k=3, dtype=torch.float64, seed=1, width=12)
    body = [mod for mod in m.body if isinstance(mod, torch.nn.Linear)]
    shared_layers = [[mod.weight, mod.bias] for mod in body]
    heads = [[hd.weight, hd.bias] for hd in m.heads]

    def loss_fn_for(x, y):
        def loss_fn(shared, hs):
            h = x
            for j in range(0, len(shared), 2):
                h = torch.tanh(h @ shared[j].T + shared[j + 1])
            return [((h @ wt.T + b).squeeze(1) - y[:, i]).pow(2).mean()
                    for i, (wt, b) in enumerate(hs)]
        return loss_fn

    mgda = get_aggregator("mgda")
    k = len(heads)
    sam_rows, loss_rows, head_vecs = [], [], []
    for rank in range(WORLD):
        x, y = w.shard(m, rank, WORLD)
        fn = loss_fn_for(x, y)
        res = oracle_step(fn, shared_layers, heads, method=name, aggregate=mgda)
        sam_rows.append(res.sam_rows)
        head_vecs.append(res.head_vec)
        if name == "fmtl":  # loss rows: ERM with the one-hot "aggregator" e_i gives row i
            loss_rows.append(torch.stack([oracle_step(
                fn, shared_layers, heads, method="erm",
                aggregate=lambda g, i=i: torch.eye(k, dtype=torch.float64)[i]).shared_vec
                for i in range(k)]))
    sam = torch.stack(sam_rows).mean(0)
    if name == "fmtl":
        loss = torch.stack(loss_rows).mean(0)
        flat = sam - loss
        d = mgda(loss @ loss.T).double() @ loss + mgda(flat @ flat.T).double() @ flat
    else:
        d = mgda(sam @ sam.T).double() @ sam
    update = torch.cat([d, torch.stack(head_vecs).mean(0)])
    before = torch.cat([t.detach().reshape(-1) for layer in shared_layers for t in layer]
                       + [t.detach().reshape(-1) for h in heads for t in h])
    return before - 0.05 * update


@pytest.mark.parametrize("sync", ["global", "local"])
@pytest.mark.parametrize("name", BATCHED)
def test_batched_passes_sync_once_per_phase_like_sequential(ranks, name, sync):
    """batched=True under data parallelism: ranks identical, equal to the sequential passes,
    and the same collectives (one per phase) and bytes."""
    bat = [_ok(r[f"batched-{name}-{sync}"]) for r in ranks]
    seq = _ok(ranks[0][f"train-{name}-mgda" if sync == "global" else f"local-{name}"])
    for a, b in zip(bat[0]["params"], bat[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(bat[0]["params"], seq["params"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert bat[0]["info"]["communication"] == seq["info"]["communication"]
    assert bat[0]["info"]["batched"]["points"]["state"] == "batched"


@pytest.mark.parametrize("name", LOCAL_ORACLE)
def test_local_sync_equals_the_per_rank_perturbation_oracle(ranks, name):
    r0, r1 = (_ok(r[f"local1-{name}"]) for r in ranks)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    got = torch.cat([p.reshape(-1) for p in r0["params"]])
    torch.testing.assert_close(got, _local_oracle(name), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", METHODS)
def test_local_sync_keeps_ranks_identical_and_sends_no_more(ranks, name):
    r0, r1 = (_ok(r[f"local-{name}"]) for r in ranks)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    glob = ranks[0][f"train-{name}-mgda"]["info"]["communication"]
    loc = r0["info"]["communication"]
    assert loc["bytes"] <= glob["bytes"]
    if name in ("gl", "sam"):  # g0 (and exact local rows) are not sent with local perturbations
        assert loc["bytes"] < glob["bytes"]
    if name != "erm":  # local perturbations differ from the global ones
        params, _ = _single_process(METHODS[name], "mgda")
        assert not all(torch.allclose(a, b, rtol=1e-9, atol=1e-11)
                       for a, b in zip(r0["params"], params))


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_on_one_rank_skips_everywhere(ranks, name):
    for r in ranks:
        res = _ok(r[f"nonfinite-{name}"])
        assert res["error_msg"] is not None and "non-finite values" in res["error_msg"]
        for a, b in zip(res["before"], res["after_skip"]):
            assert torch.equal(a, b)
        assert torch.isfinite(res["losses"]).all()
    for a, b in zip(ranks[0][f"nonfinite-{name}"]["params"],
                    ranks[1][f"nonfinite-{name}"]["params"]):
        assert torch.equal(a, b)


def test_rank_with_another_task_count_fails_clearly_everywhere(ranks):
    for r in ranks:
        msg = r["wrong_k"]["error_msg"]
        assert msg is not None and "ranks disagree on the number of tasks" in msg


@pytest.mark.parametrize("wrapper,needle", [("fsdp1", "FlatParameter"),
                                            ("fsdp2-heads", "for `shared` only"),
                                            ("fsdp2-part", "all of them")])
def test_unsupported_sharding_is_refused_with_the_reason(ranks, wrapper, needle):
    """FSDP1's flat parameters, sharded heads, a partly sharded backbone: a clear error at
    construction (not a failure inside the first step), the model untouched."""
    for r in ranks:
        res = _ok(r[f"sharded-{wrapper}"])
        assert res["error_msg"] is not None, res
        assert needle in res["error_msg"] and "process_group" in res["error_msg"]
        assert res["out_shape"] == (32, 1) and res["heads_same"]


@pytest.mark.parametrize("name", ["gl-lagged", "fmtl"])
def test_state_dict_from_rank_zero_resumes_every_rank(ranks, name):
    for r in ranks:
        res = _ok(r[f"resume-{name}"])
        for a, b in zip(res["resumed"], res["straight"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gl-lagged", "fmtl"])
def test_ddp_wrapped_backbone_runs_under_no_sync(ranks, name):
    r0, r1 = (_ok(r[f"ddp-{name}"]) for r in ranks)
    assert r0["ddp_allreduce_calls"] == r1["ddp_allreduce_calls"] == 0
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    m = TwoTask(k=2, dtype=torch.float64, seed=1)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, backend="torch",
                 method=METHODS[name]["method"], aggregator="mgda",
                 generator=torch.Generator().manual_seed(7))
    for _ in range(w.STEPS):
        opt.step(w.closure_for(m, m.x, m.y))
    for a, b in zip(r0["params"], m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_process_group_without_initialised_distributed_is_an_error():
    m = TwoTask(k=2)
    with pytest.raises(ValueError, match="not initialised"):
        MTLSAM(m.body, torch.optim.SGD, lr=0.1, process_group=object())
    with pytest.raises(ValueError, match="perturb_sync"):
        MTLSAM(m.body, torch.optim.SGD, lr=0.1, perturb_sync="both")
    for bad in (0, -1.0, float("inf"), True, "25"):
        with pytest.raises(ValueError, match="bucket_cap_mb"):
            MTLSAM(m.body, torch.optim.SGD, lr=0.1, bucket_cap_mb=bad)
    opt = MTLSAM(m.body, torch.optim.SGD, lr=0.1, process_group=False)
    assert opt.info()["world_size"] == 1


# -- sharded parameters (FSDP2 fully_shard) ------------------------------------------------------
SHARDED = ["erm", "sam", "fmtl", "gl", "gl-lagged"]
SHARDED_EXTRA = {  # one configuration each for the paths the plain matrix does not take
    "fmtl-clip-ls": (METHODS["fmtl"], "ls", dict(max_grad_norm=0.05)),
    "gl-clip-mgda": (METHODS["gl"], "mgda", dict(max_grad_norm=0.05)),
    "fmtl-adaptive": (METHODS["fmtl"], "mgda", dict(adaptive=True)),
    "gl-layer-scores": (METHODS["gl-lagged"], "mgda", dict(layers="adaptive", n_sampled=1,
                                                         resample_every=2)),
    "sam-mean": (METHODS["sam"], "mean", {}),
}


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    scenarios = [(f"fsdp-{name}-{agg}", {"kind": "fsdp", "cfg": METHODS[name], "agg": agg})
                 for name in SHARDED for agg in ("mgda", "ls", "pcgrad")]
    scenarios += [(f"fsdp-{key}", {"kind": "fsdp", "cfg": cfg, "agg": agg, "kw": kw})
                  for key, (cfg, agg, kw) in SHARDED_EXTRA.items()]
    for name in ("fmtl", "gl"):  # a NaN on rank 1 in step 3 of 6
        scenarios.append((f"fsdp-nan-{name}", {"kind": "fsdp", "cfg": METHODS[name],
                                               "agg": "mgda", "steps": w.STEPS + 1,
                                               "nan_at": 2}))
    for name in ("gl-lagged", "fmtl", "sam"):
        scenarios.append((f"fsdp-scaler-{name}", {"kind": "fsdp", "cfg": METHODS[name],
                                                  "agg": "mgda", "scaler": True}))
    for name in ("gl-lagged", "fmtl"):
        scenarios.append((f"fsdp-resume-{name}", {"kind": "fsdp", "cfg": METHODS[name],
                                                  "agg": "pcgrad", "resume": True}))
    for name in ("fmtl", "gl-lagged"):
        for sharded in (False, True):
            scenarios.append((f"bn-{name}-{sharded}", {"kind": "bn", "cfg": METHODS[name],
                                                       "sharded": sharded}))
    refused = {"zo": (METHODS["gl-zo"], {}), "local": (METHODS["fmtl"], {"perturb_sync": "local"}),
               "batched": (METHODS["fmtl"], {"batched": True}),
               "off": (METHODS["fmtl"], {"process_group": False})}
    scenarios += [(f"fsdp-refuse-{key}", {"kind": "fsdp", "cfg": cfg, "refuse": kw})
                  for key, (cfg, kw) in refused.items()]
    return _spawn(tmp, scenarios)


@pytest.fixture(scope="module")
def fsdp_three_ranks(tmp_path_factory):
    """Width 2 over 3 ranks: the first two layers' shards are empty on rank 2."""
    tmp = tmp_path_factory.mktemp("fsdp3")
    scenarios = [(f"fsdp-{name}", {"kind": "fsdp", "cfg": METHODS[name], "agg": "mgda",
                                   "width": 2}) for name in ("fmtl", "gl", "gl-lagged")]
    return _spawn(tmp, scenarios, world=3)


def _reference(cfg, agg, world=WORLD, width=12, steps=w.STEPS, **kw):
    m = TwoTask(k=3, dtype=torch.float64, seed=1, width=width)
    n = m.x.shape[0] // world * world
    opt = w.make(m, cfg, aggregator=agg, **kw)
    losses = [opt.step(w.closure_for(m, m.x[:n], m.y[:n])) for _ in range(steps)]
    return [p.detach() for p in m.parameters()], losses


def _check_sharded(res_all, want_params, want_losses=None):
    res = [_ok(r) for r in res_all]
    for r in res[1:]:  # identical on every rank: the gathered parameters and the heads
        for a, b in zip(res[0]["params"], r["params"]):
            assert torch.equal(a, b)
    for a, b in zip(res[0]["params"], want_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(res[0]["losses"], want_losses or []):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert res[0]["info"]["sharded"]
    return res[0]


@pytest.mark.parametrize("agg", ["mgda", "ls", "pcgrad"])
@pytest.mark.parametrize("name", SHARDED)
def test_fsdp2_sharded_backbone_equals_one_process(fsdp_ranks, name, agg):
    """fully_shard'ed backbone: each rank holds its shards, FSDP2 averages each backward's
    gradient into them, MTLSAM all-reduces only partial sums and the heads; five steps equal
    one process on the whole batch, every rank the same parameters."""
    r0 = _check_sharded([r[f"fsdp-{name}-{agg}"] for r in fsdp_ranks],
                        *_reference(METHODS[name], agg))
    # Never a row: scalars, K x K Grams, per-layer statistics and the heads' gradients only.
    heads_bytes = 3 * 9 * 8
    assert r0["info"]["communication"]["bytes"] < 4 * heads_bytes + 2048


@pytest.mark.parametrize("key", SHARDED_EXTRA)
def test_fsdp2_clip_adaptive_layer_scores_constant_weights(fsdp_ranks, key):
    cfg, agg, kw = SHARDED_EXTRA[key]
    _check_sharded([r[f"fsdp-{key}"] for r in fsdp_ranks], *_reference(cfg, agg, **kw))


@pytest.mark.parametrize("name", ["fmtl", "gl"])
def test_fsdp2_nonfinite_on_one_rank_skips_everywhere(fsdp_ranks, name):
    res = [_ok(r[f"fsdp-nan-{name}"]) for r in fsdp_ranks]
    for r in res:
        assert len(r["skipped"]) == 1
        msg, unchanged = r["skipped"][0]
        assert "non-finite" in msg and unchanged
    _check_sharded([r[f"fsdp-nan-{name}"] for r in fsdp_ranks],
                   _reference(METHODS[name], "mgda")[0])


@pytest.mark.parametrize("key,needle", [("zo", "zo"), ("local", "perturb_sync"),
                                        ("batched", "batched"), ("off", "process_group")])
def test_fsdp2_unsupported_options_fail_at_construction(fsdp_ranks, key, needle):
    for r in fsdp_ranks:
        msg = r[f"fsdp-refuse-{key}"]["error_msg"]
        assert msg is not None and "fully_shard" in msg and needle in msg


@pytest.mark.parametrize("name", ["fmtl", "gl", "gl-lagged"])
def test_fsdp2_three_ranks_with_empty_shards(fsdp_three_ranks, name):
    _check_sharded([r[f"fsdp-{name}"] for r in fsdp_three_ranks],
                   *_reference(METHODS[name], "mgda", world=3, width=2))


@pytest.mark.parametrize("name", ["gl-lagged", "fmtl"])
def test_fsdp2_per_rank_state_dicts_resume(fsdp_ranks, name):
    """Sharded: each rank's own state dicts (model and MTLSAM: the shards' momentum and
    lagged gradients) resume a fresh sharded copy to the same trajectory, bit for bit."""
    for r in fsdp_ranks:
        res = _ok(r[f"fsdp-resume-{name}"])
        for a, b in zip(res["resumed"], res["straight"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gl-lagged", "fmtl", "sam"])
def test_fsdp2_with_grad_scaler_equals_the_unscaled_single_process(fsdp_ranks, name):
    """Sharded + GradScaler (a power-of-two scale growing every step): every backward on the
    scaled losses, 1/S folded into the coefficients; equal to one process without scaling."""
    r0 = _check_sharded([r[f"fsdp-scaler-{name}"] for r in fsdp_ranks],
                        *_reference(METHODS[name], "mgda"))
    assert r0["scale"] == 2.0**15  # grew after each of the 5 steps: no overflow reported


@pytest.mark.parametrize("name", ["fmtl", "gl-lagged"])
def test_fsdp2_batchnorm_backbone_equals_the_replicated_run(fsdp_ranks, name):
    """BatchNorm in a sharded backbone: its running statistics stay each rank's own (as with
    replicated data parallelism, no SyncBatchNorm) and change only in the first forward of a
    step; parameters and statistics equal the replicated 2-rank run's."""
    for r in fsdp_ranks:
        shd, rep = _ok(r[f"bn-{name}-True"]), _ok(r[f"bn-{name}-False"])
        for a, b in zip(shd["params"], rep["params"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        assert shd["stats"].keys() == rep["stats"].keys() and shd["stats"]
        for key in rep["stats"]:
            torch.testing.assert_close(shd["stats"][key], rep["stats"][key], rtol=1e-9,
                                       atol=1e-11)
    for a, b in zip(_ok(fsdp_ranks[0][f"bn-{name}-True"])["params"],
                    _ok(fsdp_ranks[1][f"bn-{name}-True"])["params"]):
        assert torch.equal(a, b)
