"""Build settings computed by setup.py: version labels, arch lists per toolkit, the nvcc/torch
CUDA check, MAX_JOBS bounded by memory. setup.py is imported as a module (it only calls
setup() when run as __main__)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("mtlsam_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_local_version(setup_py, monkeypatch):
    monkeypatch.delenv("MTLSAM_LOCAL_VERSION", raising=False)
    base = setup_py.package_version()
    assert "+" not in base
    monkeypatch.setenv("MTLSAM_LOCAL_VERSION", "cu130torch2.14")
    assert setup_py.package_version() == base + "+cu130torch2.14"
    monkeypatch.setenv("MTLSAM_LOCAL_VERSION", "CU130-torch")
    with pytest.raises(ValueError, match="local version label"):
        setup_py.package_version()


def test_arch_list_per_toolkit(setup_py):
    assert setup_py.default_arch_list("12.6.85") == "8.0;8.6;8.9;9.0+PTX"
    assert setup_py.default_arch_list("12.8.93") == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert setup_py.default_arch_list("13.0.88") == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def test_nvcc_major_must_match_torch(setup_py):
    setup_py.check_nvcc_matches_torch("13.0.88", "13.0")
    setup_py.check_nvcc_matches_torch("12.8.93", "12.6")  # minor differences are fine
    with pytest.raises(RuntimeError, match="CUDA 13.0.88 but torch was built with CUDA 12.8"):
        setup_py.check_nvcc_matches_torch("13.0.88", "12.8")


def test_max_jobs_bounded_by_memory(setup_py, monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    jobs = setup_py.bounded_max_jobs(1.0)
    assert 1 <= jobs
    # A job size larger than any machine's memory leaves one job, whatever MAX_JOBS asks.
    monkeypatch.setenv("MAX_JOBS", "64")
    assert setup_py.bounded_max_jobs(1e9) == 1
    monkeypatch.setenv("MAX_JOBS", "zero")
    with pytest.raises(ValueError, match="MAX_JOBS"):
        setup_py.bounded_max_jobs(1.0)


def test_build_wheels_plan():
    """The build program's plan mode lists every matrix entry and runs nothing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "python/build_wheels.py"), "--plan"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("cpu:", "cu130-torch2.14:", "cu130-torch2.11:", "cu128-torch2.9:", "cross:"):
        assert name in done.stdout


def test_stable_abi_floor(setup_py):
    # The build's target release and the load guard's floor are one number.
    from mtlsam_ext.kernels import build_record

    assert setup_py.STABLE_ABI_MIN_TORCH == build_record.STABLE_ABI_MIN_TORCH
    major, minor = (int(p) for p in setup_py.STABLE_ABI_MIN_TORCH.split("."))
    assert int(setup_py.STABLE_ABI_TARGET, 16) == (major << 56) | (minor << 48)
    setup_py.check_stable_abi_torch("2.10.0+cpu")
    setup_py.check_stable_abi_torch("2.14.1+cu130")
    with pytest.raises(RuntimeError, match="needs torch >= 2.10"):
        setup_py.check_stable_abi_torch("2.9.1+cu128")


def test_sdist_carries_every_source_file(tmp_path):
    """`pip install mtlsam_ext-*.tar.gz` compiles from the sdist: every header and CUDA source
    under csrc/ must be in it, not only the .cpp files setup.py names."""
    import os
    import subprocess
    import sys
    import tarfile

    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "MTLSAM_SKIP_EXT": "1"})
    (sdist,) = tmp_path.glob("mtlsam_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
              if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu"}}
    assert wanted, "no sources found under csrc/"
    missing = sorted(wanted - names)
    assert not missing, f"not in the sdist: {missing}"


def _fake_cxx(tmp_path, prints: str) -> str:
    path = tmp_path / "fake-c++"
    path.write_text(f"#!/bin/sh\necho '{prints}'\n")
    path.chmod(0o755)
    return str(path)


def test_shared_libstdcxx_where_the_compiler_finds_it(setup_py, tmp_path):
    cxx = _fake_cxx(tmp_path, "/usr/lib/gcc/x86_64-linux-gnu/13/libstdc++.so")
    assert setup_py.libstdcxx_link_args(cxx) == []


def test_torchs_libstdcxx_where_the_compiler_would_link_it_statically(setup_py, tmp_path):
    import torch  # noqa: F401  (maps the shared libstdc++ into this process, as in setup.py)

    loaded = setup_py.loaded_libstdcxx()
    assert loaded is not None and Path(loaded).exists() and "libstdc++.so" in loaded
    cxx = _fake_cxx(tmp_path, "libstdc++.so")  # gcc's answer when only libstdc++.a is found
    assert setup_py.libstdcxx_link_args(cxx) == [loaded]
    assert setup_py.libstdcxx_link_args(str(tmp_path / "no-such-compiler")) == []
