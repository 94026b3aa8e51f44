"""``python -m mtlsam_ext.info``: versions, the compiled extension's build record (or why it is
not loaded), and which op backend each device would use."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from mtlsam_ext import __version__
from mtlsam_ext.kernels.build_record import ext_status
from mtlsam_ext.ops.dispatch import available_backends, resolve_backend

# Dispatch keys the compiled ops may have kernels for.
_KEYS = ("CPU", "CUDA")


def _kernel_keys() -> list[str]:
    """Dispatch keys with a registered kernel of the compiled ops (checked on one op)."""
    return [k for k in _KEYS
            if torch._C._dispatch_has_kernel_for_dispatch_key("mtlsam::segment_sumsq", k)]


def installed_version() -> str:
    """The installed distribution's full version (``0.1.0+cpu`` for the CPU wheel: the local
    label says which wheel it is), or the source tree's when the package is not installed."""
    try:
        return importlib.metadata.version("mtlsam_ext")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def describe() -> dict[str, object]:
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())]
                         if torch.cuda.is_available() else [])
    status = ext_status()
    record = status.record or {}
    ext: dict[str, object] = {
        "loaded": status.module is not None,
        "why_not": status.reason,
        "file": getattr(status.module, "__file__", None),
        "kernels_for": _kernel_keys() if status.module is not None else [],
        "built_against_torch": record.get("torch"),
        "built_against_cuda": record.get("torch_cuda"),
        "nvcc": record.get("nvcc"),
        "cuda_archs": record.get("cuda_archs"),
        "compiler": record.get("compiler"),
        "py_limited_api": record.get("py_limited_api"),
        "stable_abi": record.get("stable_abi"),
        "built_version": record.get("mtlsam_ext"),
    }
    if status.module is not None and hasattr(status.module, "cpu_isa"):
        ext["cpu_isa"] = status.module.cpu_isa()
    return {
        "mtlsam_ext": installed_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "extension": ext,
        "backends": {d: {"available": available_backends(d), "auto": resolve_backend("auto", d)}
                     for d in devices},
    }


def main() -> None:
    for key, value in describe().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, v in value.items():
                print(f"  {sub}: {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
