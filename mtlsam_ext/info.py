"""``python -m mtlsam_ext.info``: versions, the compiled extension's build record (or why it is
not loaded), and which op backend each device would use.

``python -m mtlsam_ext.info --selfcheck`` also checks every compiled op on every available
device, backend and dtype against the pure-torch reference (the check that otherwise runs on
first use, :mod:`mtlsam_ext.ops.selfcheck`) and prints a verdict table: the first command to
run on a new GPU. Exits with status 1 when an op fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from mtlsam_ext import __version__
from mtlsam_ext.kernels.build_record import ext_status
from mtlsam_ext.ops import selfcheck
from mtlsam_ext.ops.dispatch import _interpreted_triton, available_backends, resolve_backend
from mtlsam_ext.ops.tolerances import DTYPES

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
    devices = _devices()
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


def _devices() -> list[str]:
    return ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())]
                      if torch.cuda.is_available() else [])


def compiled_backends(device: str) -> list[str]:
    """The compiled backends that can run on ``device``: those ``auto`` may use, and on the
    CPU Triton's interpreter when ``TRITON_INTERPRET=1`` makes it available."""
    found = [b for b in available_backends(device) if b != "torch"]
    if torch.device(device).type == "cpu" and "triton" not in found and _interpreted_triton():
        found.append("triton")
    return found


def selfcheck_table(backends: tuple[str, ...] | None = None) -> tuple[str, bool]:
    """Every compiled op on every device, backend (or those of ``backends``) and dtype: the
    verdict table, and whether every op passed."""
    lines: list[str] = []
    all_ok = True
    names = {d: str(d).removeprefix("torch.") for d in DTYPES}
    for device in _devices():
        dev = torch.device(device)
        for backend in compiled_backends(device):
            if backends is not None and backend not in backends:
                continue
            results = {dt: selfcheck.verdicts(backend, dev, dt) for dt in DTYPES}
            lines.append(f"{backend} on {selfcheck.where(dev, backend)}: "
                         + ", ".join(f"{names[dt]} checked in "
                                     f"{next(iter(v.values())).seconds * 1e3:.1f} ms"
                                     for dt, v in results.items() if v))
            width = max(len(op) for op in selfcheck.OPS)
            lines.append(f"  {'op':{width}}  " + "  ".join(f"{names[dt]:>14}" for dt in DTYPES))
            failed = []
            for op in selfcheck.OPS:
                cells = []
                for dt in DTYPES:
                    v = results[dt][op]
                    if v.ok:
                        cells.append(f"{v.error:7.1e} ({v.ratio:.0%})")
                    else:
                        cells.append("falls back")
                        failed.append(v)
                lines.append(f"  {op:{width}}  " + "  ".join(f"{c:>14}" for c in cells))
            for v in failed:
                all_ok = False
                lines.append(f"  FAILED {v.reason()}: backend='auto' runs it on the reference, "
                             f"backend={backend!r} raises")
            lines.append("")
    if not lines:
        lines.append("no compiled backend is available: every op runs on the pure-torch "
                     "reference, which needs no check")
    lines.append("cells: |compiled - reference| at the op's worst element (reductions in "
                 "the accumulation dtype) and, in brackets, its share of the tolerance there "
                 "(the element nearest its tolerance; ok up to 100%), or 'falls back' (failed)")
    return "\n".join(lines), all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlsam_ext.info", description=__doc__)
    parser.add_argument("--selfcheck", action="store_true",
                        help="check every compiled op against the pure-torch reference on "
                             "every available device, backend and dtype, and print a table")
    args = parser.parse_args(argv)
    for key, value in describe().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, v in value.items():
                print(f"  {sub}: {v}")
        else:
            print(f"{key}: {value}")
    if not args.selfcheck:
        return 0
    print("\nself-check of the compiled kernels against the pure-torch reference:")
    table, ok = selfcheck_table()
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
