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


def test_main_job_help_names_the_program_its_defaults_and_columns(capsys):
    import pytest

    from mtlsam_ext import bench

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m mtlsam_ext.bench")
    assert "(default: 10)" in text and "(default: ls)" in text
    for column in ("full", "eff", "own ms", "outside", "/naive"):
        assert f"\n  {column}" in text, column


def test_info_shows_the_installed_distributions_version(monkeypatch):
    import importlib.metadata

    from mtlsam_ext import __version__, info

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0+cpu")
    assert info.describe()["mtlsam_ext"] == "0.1.0+cpu"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert info.describe()["mtlsam_ext"] == __version__


def test_results_files_do_not_make_the_commit_dirty(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.delenv("MTLSAM_COMMIT", raising=False)

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    clean = harness.git_commit(tmp_path)
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "step.jsonl").write_text("{}\n")
    assert harness.git_commit(tmp_path) == clean  # a run's own records
    (tmp_path / "a.py").write_text("x = 2\n")
    assert harness.git_commit(tmp_path) == clean + "+dirty"
