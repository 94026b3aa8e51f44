"""What every benchmark record says about where it ran (mtlsam_ext.benchmark.harness)."""

from mtlsam_ext.benchmark import harness


def test_commit_named_by_the_caller_wins(monkeypatch):
    # a tree copied to another machine may carry a stale .git: the commit it was copied from is
    # named in MTLSAM_COMMIT
    monkeypatch.setenv("MTLSAM_COMMIT", "4cda2ab")
    assert harness.git_commit() == "4cda2ab"
    monkeypatch.setenv("MTLSAM_COMMIT", "  ")
    assert harness.git_commit() != "  "


def test_commit_without_git(monkeypatch, tmp_path):
    monkeypatch.delenv("MTLSAM_COMMIT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert harness.git_commit(tmp_path) == "unknown"


def test_cpu_records_carry_no_gpu_fields():
    env = harness.env_info("cpu")
    assert env["device"] == "cpu" and "gpu_driver" not in env
    assert {"commit", "torch", "python", "device_name"} <= set(env)
