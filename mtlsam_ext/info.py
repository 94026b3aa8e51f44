"""``python -m mtlsam_ext.info``: versions and which op backend each device would use."""

from __future__ import annotations

import platform

import torch

from mtlsam_ext import __version__
from mtlsam_ext.ops.dispatch import available_backends, resolve_backend


def describe() -> dict[str, object]:
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())]
                         if torch.cuda.is_available() else [])
    return {
        "mtlsam_ext": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "backends": {d: {"available": available_backends(d), "auto": resolve_backend("auto", d)}
                     for d in devices},
    }


def main() -> None:
    for key, value in describe().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
