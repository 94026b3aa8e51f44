"""The compiled extension's build record, and the guard that checks it before loading.

``setup.py`` writes ``mtlsam_ext/_build_info.json`` next to ``mtlsam_ext._C`` (and compiles
the same record into the module, ``mtlsam_ext._C.build_info()``). A module built against
another torch release usually fails to import with an "undefined symbol" error, and worse, a
module that does import can crash on the first op call because the C++ ABI of libtorch changed.
So the record is compared with the running torch *before* the import:

- torch ``major.minor`` must be the same (the C++ ABI of libtorch is not stable across minor
  releases), unless the record says the module uses only libtorch's stable ABI;
- a module with CUDA kernels needs a CUDA build of torch of the same CUDA major (it links
  ``libc10_cuda`` and ``libcudart.so.<major>``).

On a mismatch one warning names both versions and the wheel to install; the ``ext`` backend is
then unavailable (``backend="auto"`` runs the pure-torch backend, ``backend="ext"`` raises with
the same reason).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

RECORD_FILE = "_build_info.json"


@dataclass(frozen=True)
class ExtStatus:
    """Outcome of loading ``mtlsam_ext._C``: the module, or why it is not used."""

    module: ModuleType | None
    record: dict | None
    reason: str | None


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_record(package_dir: str | None = None) -> dict | None:
    """The build record next to the compiled module, or None when there is none (no compiled
    module, or one built before records existed)."""
    path = os.path.join(package_dir or _package_dir(), RECORD_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImportError(f"unreadable build record {path}: {e}") from e
    if not isinstance(record, dict) or "torch" not in record:
        raise ImportError(f"build record {path} has no 'torch' entry")
    return record


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"not a torch version: {version!r}") from None


# The first torch release whose stable ABI the stable-ABI wheels (+cpu, +cu130) are built on
# (setup.py's STABLE_ABI_MIN_TORCH).
STABLE_ABI_MIN_TORCH = "2.10"


def wheel_label(torch_version: str, torch_cuda: str | None) -> str:
    """The local version label of the wheel that matches a torch install: the stable-ABI wheels
    ``cpu`` and ``cu130`` (CUDA 13.0) for torch >= 2.10, else the per-torch wheel
    ``cu128torch2.8`` (CUDA 12.8, torch 2.8)."""
    if torch_cuda is None:
        return "cpu"
    cuda = torch_cuda.replace(".", "")
    if _major_minor(torch_version) >= _major_minor(STABLE_ABI_MIN_TORCH):
        return f"cu{cuda}"
    major, minor = _major_minor(torch_version)
    return f"cu{cuda}torch{major}.{minor}"


def incompatibility(record: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a module with this build record must not be loaded under this torch, or None."""
    built = record["torch"]
    if record.get("stable_abi"):
        # Only libtorch's stable C ABI: any torch from the first release that has it.
        floor = record.get("min_torch", built)
        if _major_minor(torch_version) < _major_minor(floor):
            return (f"it uses libtorch's stable ABI from torch {floor} on, "
                    f"but torch {torch_version} is installed")
    elif _major_minor(built) != _major_minor(torch_version):
        return f"it was built against torch {built} but torch {torch_version} is installed"
    if record.get("with_cuda"):
        built_cuda = record.get("torch_cuda")
        if torch_cuda is None:
            return (f"it has CUDA kernels (built against torch {built}, CUDA {built_cuda}) "
                    f"but torch {torch_version} is a CPU-only build")
        if built_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return (f"it was built for CUDA {built_cuda} (torch {built}) but torch "
                    f"{torch_version} uses CUDA {torch_cuda}")
    return None


def mismatch_message(reason: str, torch_version: str, torch_cuda: str | None,
                     package_version: str) -> str:
    base = package_version.split("+")[0]
    label = wheel_label(torch_version, torch_cuda)
    return (f"mtlsam_ext: not loading the compiled extension mtlsam_ext._C: {reason}. "
            f"The pure-torch backend runs instead (backend='auto'); for the compiled kernels "
            f"install the matching wheel, mtlsam_ext=={base}+{label}, or build from source "
            f"(pip install --no-build-isolation .)")


@functools.cache
def ext_status() -> ExtStatus:
    """Check the build record against the running torch, then import ``mtlsam_ext._C``.

    Cached: the check, the warning and the import happen once per process."""
    from mtlsam_ext._version import __version__

    try:
        record = read_record()
    except ImportError as e:
        return ExtStatus(None, None, str(e))
    if record is not None:
        reason = incompatibility(record, torch.__version__, torch.version.cuda)
        if reason is not None:
            msg = mismatch_message(reason, torch.__version__, torch.version.cuda, __version__)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return ExtStatus(None, record, msg)
    try:
        module = importlib.import_module("mtlsam_ext._C")
    except ModuleNotFoundError as e:
        if e.name != "mtlsam_ext._C":
            raise
        return ExtStatus(None, record, "the compiled extension mtlsam_ext._C is not built "
                         "(install with a C++ compiler, and a CUDA toolkit for GPU tensors)")
    except (ImportError, OSError) as e:
        # A library it links is missing or has other symbols (a torch or CUDA other than the
        # record says, or no record at all): refuse it with the loader's own words.
        msg = (f"mtlsam_ext: the compiled extension mtlsam_ext._C failed to load ({e}); "
               "the pure-torch backend runs instead")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return ExtStatus(None, record, msg)
    if record is None and hasattr(module, "build_info"):
        # No record file beside it (copied by hand?): the record compiled into the module is
        # checked instead. It already imported, but its ops must still not run.
        record = json.loads(module.build_info())
        reason = incompatibility(record, torch.__version__, torch.version.cuda)
        if reason is not None:
            msg = mismatch_message(reason, torch.__version__, torch.version.cuda, __version__)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return ExtStatus(None, record, msg)
    return ExtStatus(module, record, None)
