"""Smoke tests of the runnable programs in python/: they run as a user would run them, produce
their outputs, and training reduces the loss."""

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
    out = _run([str(ROOT / "python/toy_two_objectives.py"), "--steps", "60",
                "--out", str(tmp_path / "toy.png")], tmp_path)
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("LS ", "MGDA "))]
    assert len(rows) == 2
    for row in rows:  # from (0, 0), where f1 = 4.5 and f2 = 3: both runs improve the sum
        assert float(row[-1]) + float(row[-2]) < 7.5


def test_multi_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    _run([str(ROOT / "python/multi_digits.py"), "--quick", "--out", str(tmp_path / "md")],
         tmp_path)
    assert (tmp_path / "md.png").stat().st_size > 10_000
    runs = [json.loads(line) for line in (tmp_path / "md.jsonl").read_text().splitlines()]
    assert len(runs) == 6
    for r in runs:
        assert r["last_loss"] < r["first_loss"], r
        assert 0.0 <= r["test_acc_mean"] <= 1.0


def test_two_task_regression():
    out = _run([str(ROOT / "python/two_task_regression.py"), "--steps", "100", "--every", "100"],
               ROOT)
    lines = [ln for ln in out.splitlines() if ln.startswith("step")]
    first = sum(float(v) for v in lines[0].split("[")[1].rstrip("]").split(","))
    last = sum(float(v) for v in lines[-1].split("[")[1].rstrip("]").split(","))
    assert last < first
