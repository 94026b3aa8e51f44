"""Smoke tests of the runnable programs in python/: they run as a user would run them, produce
their outputs, and training reduces the loss."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_toy_study(tmp_path):
    png = tmp_path / "not" / "there" / "toy.png"  # a folder that does not exist yet
    out = _run([str(ROOT / "python/toy_two_objectives.py"), "--steps", "60",
                "--out", str(png)], tmp_path)
    assert png.stat().st_size > 10_000
    aggs = ("LS ", "MGDA ", "PCGrad ", "CAGrad ", "IMTL ")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(aggs)]
    assert len(rows) == 5 * 4  # every aggregator alone, with SAM, F-MTL and global-local SAM
    for row in rows:  # from (0, 0), where f1 = 4.5 and f2 = 3: every run improves the sum
        assert float(row[-1]) + float(row[-2]) < 7.5, row


@pytest.mark.parametrize("program", ["multi_digits", "multilabel_digits"])
def test_digit_programs_quick(program, tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "new" / program
    _run([str(ROOT / f"python/{program}.py"), "--quick", "--out", str(out)], tmp_path)
    assert out.with_suffix(".png").stat().st_size > 10_000
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert meta["program"] == program and meta["torch"]
    runs = [json.loads(line) for line in lines[1:]]
    # --quick: erm, fmtl, gl-lagged, gl-zo x ls, mgda, one seed
    assert sorted({(r["config"], r["aggregator"]) for r in runs}) == sorted(
        (c, a) for c in ("erm", "fmtl", "gl-lagged", "gl-zo") for a in ("ls", "mgda"))
    k = 2 if program == "multi_digits" else 10
    for r in runs:
        assert r["epoch_loss"][-1] < r["epoch_loss"][0], r  # training reduces the loss
        assert len(r["test_acc"]) == k and all(0.0 <= a <= 1.0 for a in r["test_acc"])
        # measured passes per step: F-MTL runs 1 + K forwards and 2K backwards
        if r["config"] == "fmtl":
            assert r["forwards_per_step"] == 1 + k and r["backwards_per_step"] == 2 * k
    table = out.with_suffix(".md").read_text()
    # one row in the config x aggregator matrix, one per aggregator in the full table
    assert table.count("\n| gl-zo |") == 3 and meta["commit"] in table


def test_two_task_regression():
    out = _run([str(ROOT / "python/two_task_regression.py"), "--steps", "100", "--every", "100"],
               ROOT)
    lines = [ln for ln in out.splitlines() if ln.startswith("step")]

    def total(line: str) -> float:  # "step N  task losses {'sine': a, 'square': b}"
        named = ast.literal_eval(line.split("task losses", 1)[1].strip())
        assert list(named) == ["sine", "square"]
        return sum(named.values())

    assert total(lines[-1]) < total(lines[0])


def test_torchrun_data_parallel_example(tmp_path):
    """The torchrun example: two gloo ranks train, the losses fall and every rank ends with
    the same parameters (the program itself checks that and fails otherwise)."""
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "python/ddp_two_task.py"), "--steps", "30",
                "--every", "30"], tmp_path)
    steps = [ln.split() for ln in out.splitlines() if ln.startswith("step")]
    assert len(steps) == 2
    assert float(steps[-1][3]) + float(steps[-1][5]) < float(steps[0][3]) + float(steps[0][5])
    assert "world 2, ranks identical: True" in out


def test_torchrun_sharded_example(tmp_path):
    """The same program with the backbone sharded by FSDP2 (--fsdp)."""
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "python/ddp_two_task.py"), "--steps", "20", "--every", "20",
                "--fsdp", "--method", "fmtl"], tmp_path)
    steps = [ln.split() for ln in out.splitlines() if ln.startswith("step")]
    assert float(steps[-1][3]) + float(steps[-1][5]) < float(steps[0][3]) + float(steps[0][5])
    assert "world 2, ranks identical: True" in out


SOAK = {"ddp": [], "fsdp": ["--fsdp"], "small-buckets": ["--bucket-cap-mb", "0.001"]}


@pytest.mark.slow
def test_torchrun_example_exits_cleanly_every_time(tmp_path):
    """30 torchrun jobs (10 each: replicated, FSDP2, buckets of a few bytes): every one exits 0.
    A gloo worker freeing the last reference to a Python-made tensor while the interpreter
    finalised aborted 1 in 12-20 such jobs after training had succeeded (SIGABRT, torchrun
    FAILED); MTLSAM's exit hook (mtlsam_ext.optim.distributed.EXIT_DRAIN_S) prevents it."""
    failed = []
    for mode, flags in SOAK.items():
        for i in range(10):
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", str(ROOT / "python/ddp_two_task.py"), "--steps", "10",
                 "--every", "10", *flags], cwd=tmp_path, capture_output=True, text=True,
                timeout=300)
            if done.returncode != 0 or "ranks identical: True" not in done.stdout:
                failed.append((mode, i, done.returncode, done.stderr[-300:]))
    assert not failed, failed


def _record(path: Path, args: dict, runs: list[dict], command: str) -> None:
    meta = {"program": "multi_digits", "title": "t", "command": command, "commit": "abc",
            "torch": "2", "cpus": 2, "jobs": 1, "threads_per_run": 1, "wall_s": 5.0,
            "args": args}
    path.write_text("\n".join(json.dumps(x) for x in [{"meta": meta}, *runs]) + "\n")


def _runs(aggs: list[str]) -> list[dict]:
    return [{"config": c, "aggregator": a, "seed": s, "test_acc_mean": 0.9 + 0.01 * s,
             "s_per_epoch": 1.0, "s_per_step": 0.04, "forwards_per_step": 3.0,
             "backwards_per_step": 4.0} for a in aggs for c in ("fmtl", "gl-lagged")
            for s in (0, 1)]


def test_merge_adds_a_later_sweep_and_refuses_another_protocol(tmp_path):
    """``mtl_runs.py merge BASE NEW``: the new runs join the record (the tables gain their
    aggregators, the header names the added command), the old runs stay; a different
    protocol or a run the record already has is refused and nothing is written."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import mtl_runs
    finally:
        sys.path.pop(0)
    args = {"sizes": "3000,1000,2000", "epochs": 15, "batch": 128, "lr": 1e-3, "rho": 0.05}
    base, new = tmp_path / "base.jsonl", tmp_path / "new.jsonl"
    _record(base, args, _runs(["ls", "mgda"]), "multi_digits.py --out base")
    _record(new, args, _runs(["upgrad"]), "multi_digits.py --aggregators upgrad --out new")
    text = mtl_runs.merge(base, new)
    lines = base.read_text().splitlines()
    assert len(lines) == 1 + 12
    assert "| config | ls | mgda | upgrad |" in text
    assert "Added later under the same protocol: `multi_digits.py --aggregators upgrad" in text
    assert base.with_suffix(".png").stat().st_size > 10_000
    before = base.read_text()
    with pytest.raises(SystemExit, match="already has"):
        mtl_runs.merge(base, new)
    _record(new, {**args, "epochs": 3}, _runs(["nash"]), "x")
    with pytest.raises(SystemExit, match="epochs"):
        mtl_runs.merge(base, new)
    assert base.read_text() == before
