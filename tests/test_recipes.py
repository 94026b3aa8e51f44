"""The recipes the documentation includes (docs/recipes/*.md show these files as they are) run
as a user would run them, and do what their pages say."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def _losses(out: str) -> list[float]:
    """Sum of the task losses on each ``step N ...`` line."""
    sums = []
    for line in out.splitlines():
        if line.startswith("step"):
            sums.append(sum(float(v) for v in re.findall(r"-?\d+\.\d+", line.split(None, 2)[2])))
    return sums


def test_lightning_manual_optimization_resumes_bit_for_bit(tmp_path):
    """MTLSAM under Lightning's manual optimization trains, and a run resumed from a Lightning
    checkpoint ends with exactly the parameters of the uninterrupted run (the program checks
    and fails otherwise)."""
    pytest.importorskip("lightning")
    out = _run([str(ROOT / "python/lightning_two_task.py"), "--epochs", "4", "--check-resume",
                "--out", str(tmp_path / "ckpt")], tmp_path)
    assert "parameters identical to the uninterrupted run: True" in out
    assert (tmp_path / "ckpt" / "epoch2.ckpt").stat().st_size > 10_000


@pytest.mark.parametrize("weighting", ["AlignedMTLWeighting", "UPGradWeighting"])
def test_torchjd_weighting_as_aggregator(weighting, tmp_path):
    """A TorchJD weighting passed as ``aggregator=``: the erm update equals TorchJD's own
    aggregator on the Jacobian (checked by the program), and fmtl training lowers the losses."""
    pytest.importorskip("torchjd")
    out = _run([str(ROOT / "python/torchjd_weighting.py"), "--weighting", weighting,
                "--steps", "60", "--check"], tmp_path)
    assert "largest relative difference" in out
    losses = _losses(out)
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_recipe(precision, tmp_path):
    """bf16 autocast without a scaler and fp16 autocast with GradScaler('cpu') both train; the
    fp16 run's first step overflows at the scaler's initial 2**16 and the scaler backs off."""
    out = _run([str(ROOT / "python/amp_two_task.py"), "--precision", precision, "--steps", "40",
                "--device", "cpu"], tmp_path)
    losses = _losses(out)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], out
    assert "parameters stay torch.float32" in out
    if precision == "fp16":
        scales = [float(s) for s in re.findall(r"scale (\d+)", out)]
        assert scales and max(scales) < 2.0 ** 16, out
