"""The load guard of the compiled extension: build records compared with the running torch, and
what a mismatch does (one warning, ``auto`` -> torch, ``ext`` -> a clear error).

The cross-torch test with real wheels (a torch 2.14 wheel under torch 2.13) is in
python/build_wheels.py; here the record is faked."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtlsam_ext.kernels import build_record as br

ROOT = Path(__file__).resolve().parents[1]


def _rec(torch_v="2.14.1+cu130", cuda="13.0", with_cuda=True, **kw):
    return {"torch": torch_v, "torch_cuda": cuda, "with_cuda": with_cuda, **kw}


def test_same_minor_is_compatible():
    assert br.incompatibility(_rec(), "2.14.0+cu130", "13.0") is None
    assert br.incompatibility(_rec("2.13.0+cpu", None, False), "2.13.0", None) is None


def test_other_minor_names_both_versions():
    why = br.incompatibility(_rec(), "2.13.0+cpu", None)
    assert "2.14.1+cu130" in why and "2.13.0+cpu" in why


def test_cuda_module_under_cpu_torch():
    why = br.incompatibility(_rec(), "2.14.1+cpu", None)
    assert "CPU-only" in why and "2.14.1+cpu" in why


def test_cpu_module_under_cuda_torch_is_fine():
    # CPU kernels only: they link libtorch_cpu/libc10, which a CUDA build of torch also has.
    assert br.incompatibility(_rec("2.13.0+cpu", None, False), "2.13.0+cu130", "13.0") is None


def test_cuda_major_mismatch():
    why = br.incompatibility(_rec("2.11.0+cu128", "12.8"), "2.11.0+cu130", "13.0")
    assert "12.8" in why and "13.0" in why


def test_stable_abi_record_spans_releases():
    rec = _rec("2.14.1+cu130", stable_abi=True, min_torch="2.10")
    assert br.incompatibility(rec, "2.11.0+cu130", "13.0") is None
    assert "2.10" in br.incompatibility(rec, "2.9.1+cu130", "13.0")


def test_wheel_label():
    assert br.wheel_label("2.13.0+cpu", None) == "cpu"
    assert br.wheel_label("2.14.1+cu130", "13.0") == "cu130"  # the stable-ABI wheel
    assert br.wheel_label("2.9.1", "12.8") == "cu128torch2.9"
    assert br.wheel_label("2.8.0", "12.8") == "cu128torch2.8"


def test_message_names_the_wheel():
    msg = br.mismatch_message("it was built against torch 2.14.1", "2.13.0+cpu", None, "0.1.0")
    assert "mtlsam_ext==0.1.0+cpu" in msg and "2.14.1" in msg


def test_unreadable_record(tmp_path):
    (tmp_path / br.RECORD_FILE).write_text("{not json")
    with pytest.raises(ImportError, match="unreadable build record"):
        br.read_record(str(tmp_path))
    assert br.read_record(str(tmp_path / "missing")) is None


_MISMATCH = textwrap.dedent("""
    import warnings
    import torch
    from mtlsam_ext.kernels import build_record as br
    br.read_record = lambda package_dir=None: {
        "torch": "1.99.0+cu999", "torch_cuda": "99.9", "with_cuda": True}
    from mtlsam_ext import MTLSAM, ops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = ops.resolve_backend("auto", "cpu")
        ops.available_backends("cpu")
        ops.resolve_backend("auto", "cpu")
    try:
        ops.resolve_backend("ext", "cpu")
        err = None
    except RuntimeError as e:
        err = str(e)
    body = torch.nn.Linear(3, 2)
    opt = MTLSAM(body, torch.optim.SGD, method="sam", lr=0.1, backend="auto")
    x = torch.randn(4, 3)
    opt.step(lambda: [body(x).pow(2).mean(), body(x).sum().abs()])
    import json
    print(json.dumps({"auto": auto, "err": err, "backend": opt.backend,
                      "warnings": [str(w.message) for w in caught]}))
""")


def test_mismatch_falls_back_to_torch(tmp_path):
    """A faked record of another torch: one warning with both versions and the wheel to install,
    ``auto`` picks torch (and a step runs), ``ext`` raises with the same reason."""
    done = subprocess.run([sys.executable, "-c", _MISMATCH], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["auto"] == "torch" and out["backend"] == "torch"
    assert len(out["warnings"]) == 1, out["warnings"]
    warning = out["warnings"][0]
    assert "1.99.0+cu999" in warning and torch_version() in warning
    assert "mtlsam_ext==" in warning
    assert out["err"] and "1.99.0+cu999" in out["err"]


def torch_version() -> str:
    import torch

    return torch.__version__


def test_module_links_the_shared_libstdcxx():
    """A module with a private static libstdc++ crashed on failed argument checks whose message
    formats a number (setup.py's libstdcxx_link_args); the built module must need the shared
    one."""
    status = br.ext_status()
    if status.module is None or shutil.which("readelf") is None:
        pytest.skip("needs the compiled extension and readelf")
    dyn = subprocess.run(["readelf", "-d", status.module.__file__], capture_output=True,
                         text=True, check=True).stdout
    assert "[libstdc++.so" in dyn, dyn
