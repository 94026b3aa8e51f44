"""The machinery of the convergence and label-noise study of the digit programs (python/):
early stopping, the training-label noise, resumable records, the paired intervals and
verdicts of the report, and the report's files."""

import json
import math
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
try:
    import mtl_data
    import mtl_records
    import mtl_runs
    import mtl_study
finally:
    sys.path.pop(0)

T_975_4 = 2.7764451051977987  # Student t, 97.5 % quantile, 4 degrees of freedom (tables)


def _program(name: str):
    sys.path.insert(0, str(ROOT / "python"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the single-run path of mtl_runs sets the thread count
    yield
    torch.set_num_threads(n)


def _schedule_problem(schedule: list[float]) -> mtl_runs.Problem:
    """A one-task problem whose validation accuracy after epoch e is ``schedule[e]`` whatever
    the network does (the validation split is the one of 24 examples), and whose test accuracy
    is the epoch's own validation accuracy, so the reported test accuracy names its epoch."""
    calls = {"val": 0}

    def load(seed, sizes):
        g = torch.Generator().manual_seed(seed)
        return {name: (torch.rand(n, 1, 8, 8, generator=g),
                       torch.randint(0, 3, (n, 1), generator=g))
                for name, n in zip(("train", "val", "test"), sizes)}

    def correct(logits, y):
        n = len(y)
        if n == 24:
            calls["val"] += 1
        acc = schedule[calls["val"] - 1]
        return torch.arange(n) < round(acc * n)

    return mtl_runs.Problem(name="schedule", title="t", n_tasks=1, canvas=8, head_out=3,
                            load=load, loss=F.cross_entropy, correct=correct, n_classes=3)


def _spec(epochs: int, patience: int, min_epochs: int = 0) -> mtl_runs.RunSpec:
    return mtl_runs.RunSpec("erm", "ls", 0, (32, 24, 16), epochs, 16, 1e-3, 0.05,
                            patience=patience, min_epochs=min_epochs)


def test_patience_stops_on_a_plateau_and_reports_the_best_epoch():
    sched = [0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    r = mtl_runs.train(_schedule_problem(sched), _spec(epochs=60, patience=3))
    # best at epoch 3; epochs 4, 5, 6 bring nothing: stop after epoch 6, before epoch 7's 1.0
    assert (r["epochs_run"], r["best_epoch"], r["patience"]) == (7, 3, 3)
    assert r["val_curve"] == [pytest.approx(v) for v in sched[:7]]
    assert r["val_acc"] == pytest.approx(0.75) and r["test_acc_mean"] == pytest.approx(0.75)
    assert r["final_val_acc"] == pytest.approx(0.75)
    assert 0 < r["opt_s"] <= r["run_s"] and r["s_per_step"] > 0
    # without patience the fixed number of epochs runs, and the best one is the last
    r = mtl_runs.train(_schedule_problem(sched), _spec(epochs=8, patience=0))
    assert (r["epochs_run"], r["best_epoch"]) == (8, 7)
    assert r["test_acc_mean"] == pytest.approx(1.0)
    # a minimum of 8 epochs rides out the plateau of epochs 4-6; then 8, 9, 10 bring nothing
    r = mtl_runs.train(_schedule_problem(sched), _spec(epochs=60, patience=3, min_epochs=8))
    assert (r["epochs_run"], r["best_epoch"], r["min_epochs"]) == (11, 7, 8)


@pytest.mark.parametrize("n_classes", [2, 10])
def test_noisy_labels_replace_exactly_round_p_n_per_task(n_classes):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, n_classes, (1001, 3), generator=g)
    if n_classes == 2:
        y = y.float()  # binary multi-label targets are floats
    for p in (0.2, 0.4):
        noisy = mtl_data.noisy_labels(y, p, n_classes, torch.Generator().manual_seed(1))
        assert noisy.dtype == y.dtype and noisy.shape == y.shape
        changed = noisy != y
        assert changed.sum(0).tolist() == [round(p * 1001)] * 3
        assert set(noisy.unique().tolist()) <= set(range(n_classes))
        if n_classes == 2:  # flipped
            assert torch.equal(noisy[changed], 1 - y[changed])
        else:  # uniform among the 9 other classes: every one of them is used
            shift = (noisy[:, 0] - y[:, 0]) % n_classes
            assert set(shift[changed[:, 0]].tolist()) == set(range(1, n_classes))
        # the positions are drawn per task, not shared
        assert not torch.equal(changed[:, 0], changed[:, 1])
    with pytest.raises(ValueError, match="p="):
        mtl_data.noisy_labels(y, 1.5, n_classes, g)


@pytest.mark.parametrize("program", ["multi_digits", "multilabel_digits"])
def test_label_noise_touches_training_labels_only(program):
    pytest.importorskip("sklearn")
    problem = _program(program).PROBLEM
    sizes = (300, 100, 100)
    clean = mtl_runs._data(problem, 3, sizes)
    noisy = mtl_runs._data(problem, 3, sizes, 0.2)
    for split in ("val", "test"):
        assert torch.equal(noisy[split][0], clean[split][0])
        assert torch.equal(noisy[split][1], clean[split][1])
    assert torch.equal(noisy["train"][0], clean["train"][0])
    changed = noisy["train"][1] != clean["train"][1]
    assert changed.sum(0).tolist() == [60] * problem.n_tasks
    # seeded per run: the same seed gives the same noisy labels, another seed other ones
    mtl_runs._DATA.clear()
    assert torch.equal(mtl_runs._data(problem, 3, sizes, 0.2)["train"][1], noisy["train"][1])
    other = mtl_runs._data(problem, 4, sizes, 0.2)["train"][1] != \
        mtl_runs._data(problem, 4, sizes)["train"][1]
    assert not torch.equal(other, changed)


def _args(out: Path, **kw) -> Namespace:
    a = dict(configs="erm", aggregators="ls", sweep="", seeds="0", sizes="128,64,64",
             epochs=1, patience=None, max_epochs=60, min_epochs=None, label_noise=0.0,
             batch=64, lr=1e-3, rho=0.05, jobs=1, threads=1, quick=False, plan=False, out=str(out))
    a.update(kw)
    return Namespace(**a)


def test_resume_skips_recorded_runs_and_refuses_another_protocol(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "rec"
    p = _program("multi_digits").PROBLEM
    mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2), "")
    first = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(first) == 2
    # the same command with a second seed and a noise level: only the new runs are made
    mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2, seeds="0,1"), "")
    assert "1 of the 2 runs already recorded" in capsys.readouterr().out
    mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2, seeds="0,1",
                                           label_noise=0.2), "")
    meta, runs = mtl_records.read(out.with_suffix(".jsonl"))
    assert [mtl_records.run_key(r) for r in runs] == [
        ("erm", "ls", 0, 0.0), ("erm", "ls", 1, 0.0), ("erm", "ls", 0, 0.2),
        ("erm", "ls", 1, 0.2)]
    assert json.dumps(runs[0]) == first[1]  # the recorded run is kept as it was
    assert [i["runs"] for i in meta["invocations"]] == [1, 1, 2]
    assert meta["wall_s"] == pytest.approx(sum(i["wall_s"] for i in meta["invocations"]))
    assert "label noise 20 %" in out.with_suffix(".md").read_text()
    # an interrupted write (a cut-off last line) is dropped and that run made again
    path = out.with_suffix(".jsonl")
    path.write_text(path.read_text() + first[1][:40])
    mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2, seeds="0,1,2"), "")
    _, runs = mtl_records.read(path)
    assert len(runs) == 5 and mtl_records.run_key(runs[-1]) == ("erm", "ls", 2, 0.0)
    # another protocol is refused and the record left as it was
    before = path.read_text()
    with pytest.raises(SystemExit, match="lr"):
        mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2, lr=1e-2), "")
    with pytest.raises(SystemExit, match="patience"):
        mtl_runs.main(p, "multi_digits", _args(out, max_epochs=2), "")
    with pytest.raises(SystemExit, match="min_epochs"):
        mtl_runs.main(p, "multi_digits", _args(out, patience=1, max_epochs=2, min_epochs=2), "")
    assert path.read_text() == before


def test_plan_pairs():
    six = {"erm", "sam", "fmtl", "gl-lagged", "gl-autograd", "gl-zo"}
    for noise in (0.0, 0.2, 0.4):  # K = 2: the whole plan at every noise level
        pairs = mtl_runs._pairs(_args("x", plan=True, configs=None, aggregators=None,
                                      label_noise=noise), 2)
        assert len(pairs) == 14 and {c for c, _ in pairs} == six
        assert ("gl-zo", "mgda") not in pairs and ("sam", "upgrad") in pairs
    k10 = mtl_runs._pairs(_args("x", plan=True, configs=None, aggregators=None), 10)
    assert len(k10) == 10 and {a for _, a in k10} == {"ls", "mgda"}
    noisy = mtl_runs._pairs(_args("x", plan=True, configs=None, aggregators=None,
                                  label_noise=0.2), 10)
    assert noisy == [(c, "ls") for c in mtl_study.PLAN]
    assert mtl_runs._pairs(_args("x", plan=True, configs="erm,gl-zo", aggregators=None), 2) == [
        ("erm", "ls"), ("erm", "mgda"), ("erm", "upgrad"), ("gl-zo", "ls")]
    assert mtl_runs._pairs(_args("x", configs="erm,sam", aggregators="ls,nash"), 10) == [
        ("erm", "ls"), ("erm", "nash"), ("sam", "ls"), ("sam", "nash")]
    assert mtl_runs.CONFIGS["sam"] == {"method": "sam"}


@pytest.mark.parametrize("diffs, verdict", [([1, 1, 1, 1, 1], "better"),
                                            ([1, -1, 1, -1, 0], "no difference"),
                                            ([-2, -1, -3, -2, -2], "worse")])
def test_paired_interval_and_verdict_by_hand(diffs, verdict):
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T_975_4 * sd / math.sqrt(n)
    got = mtl_study.paired_interval([float(d) for d in diffs])
    assert got == pytest.approx((mean, mean - half, mean + half), abs=1e-9)
    assert mtl_study.verdict(got[1], got[2]) == verdict
    with pytest.raises(ValueError, match="2 pairs"):
        mtl_study.paired_interval([1.0])


def test_paired_interval_by_hand_numbers():
    # [1, -1, 1, -1, 0]: mean 0, s = 1, half width 2.776445 / sqrt(5) = 1.241664
    assert mtl_study.paired_interval([1.0, -1.0, 1.0, -1.0, 0.0]) == pytest.approx(
        (0.0, -1.241664, 1.241664), abs=1e-6)


def _run(cfg, agg, seed, acc, noise=0.0, k=2):
    return {"config": cfg, "aggregator": agg, "seed": seed, "label_noise": noise,
            "epochs": 60, "epochs_run": 12, "best_epoch": 7, "test_acc": [acc] * k,
            "test_acc_mean": acc, "final_test_acc_mean": acc - 0.01, "s_per_step": 0.02,
            "opt_s": 10.0 + seed, "run_s": 15.0}


def test_report_rows_and_files(tmp_path):
    pytest.importorskip("matplotlib")
    # sam = erm + 1 pp on every seed (better); fmtl = erm + [1, -1, 1, -1, 0] pp (no difference)
    wiggle = [1, -1, 1, -1, 0]
    runs = []
    for noise in (0.0, 0.2):
        for s in range(5):
            base = 0.9 + 0.01 * s
            runs += [_run("erm", "ls", s, base, noise), _run("sam", "ls", s, base + 0.01, noise),
                     _run("fmtl", "ls", s, base + 0.01 * wiggle[s], noise)]
    meta = {"program": "multi_digits", "title": "Multi-digits", "command": "c", "commit": "abc",
            "torch": "2", "cpus": 2, "jobs": 2, "threads_per_run": 1, "wall_s": 7.0,
            "args": {"sizes": "1,1,1", "batch": 1, "lr": 1e-3, "rho": 0.05, "patience": 5,
                     "max_epochs": 60, "epochs": 15},
            "invocations": [{"command": "c", "commit": "abc", "runs": 30, "wall_s": 7.0,
                             "jobs": 2, "threads_per_run": 1}]}
    rec = tmp_path / "r.jsonl"
    mtl_records.write(rec, meta, runs)
    rows = mtl_study.summarise([r for r in runs if r["label_noise"] == 0.0])
    by = {r["config"]: r for r in rows}
    assert [r["config"] for r in rows] == ["erm", "sam", "fmtl"]
    assert by["sam"]["vs_erm"]["verdict"] == "better"
    assert by["sam"]["vs_erm"]["mean"] == pytest.approx(1.0)
    assert by["fmtl"]["vs_erm"]["verdict"] == "no difference"
    assert by["fmtl"]["vs_erm"]["hi"] == pytest.approx(T_975_4 / math.sqrt(5))
    assert by["erm"]["vs_erm"] is None and by["erm"]["vs_fmtl"]["n"] == 5
    assert by["erm"]["acc"] == pytest.approx(100 * statistics.mean(0.9 + 0.01 * s
                                                                   for s in range(5)))
    assert by["sam"]["opt_s"] == pytest.approx(12.0) and by["sam"]["epochs_run"] == 12
    text = mtl_study.report([rec], tmp_path / "study")
    assert (tmp_path / "study.md").read_text() == text
    assert "## multi_digits, K = 2, label noise 0 %" in text
    assert "## multi_digits, K = 2, label noise 20 %" in text
    assert "| sam | ls | 5 | " in text and "+1.00 [+1.00, +1.00] better" in text
    assert "vs ERM (same aggregator): sam/ls better by 1.00 pp; 1 of 2 no difference" in text
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_an_interrupted_sweep_keeps_its_runs_and_continues(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "rec"
    p = _program("multi_digits").PROBLEM
    real = mtl_runs.train

    def stopped_at_seed_1(problem, spec, on_epoch=None):
        if spec.seed == 1:
            raise KeyboardInterrupt  # the sweep is stopped during its second run
        return real(problem, spec, on_epoch)

    monkeypatch.setattr(mtl_runs, "train", stopped_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        mtl_runs.main(p, "multi_digits", _args(out, seeds="0,1,2"), "")
    meta, runs = mtl_records.read(out.with_suffix(".jsonl"))
    assert [r["seed"] for r in runs] == [0]
    assert meta["invocations"][0]["runs"] == 1 and not meta["invocations"][0]["complete"]
    monkeypatch.setattr(mtl_runs, "train", real)
    made = mtl_runs.main(p, "multi_digits", _args(out, seeds="0,1,2"), "")
    assert [r["seed"] for r in made] == [1, 2]
    meta, runs = mtl_records.read(out.with_suffix(".jsonl"))
    assert [r["seed"] for r in runs] == [0, 1, 2] and meta["invocations"][1]["complete"]
