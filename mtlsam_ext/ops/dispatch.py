"""Backend resolution: which kernel module runs an op on given tensors.

``auto`` picks the compiled extension, then Triton, then torch on CUDA tensors, and the
compiled extension, then torch on CPU tensors (DESIGN.md §2). The environment variable
``MTLSAM_BACKEND`` overrides ``auto``; an explicit backend that is not available is an error,
never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "ext", "triton")


def _load_ext() -> ModuleType | None:
    try:
        return importlib.import_module("mtlsam_ext.kernels.ext")
    except ImportError:
        return None


def ext_unavailable_reason() -> str | None:
    """Why the compiled extension is not loaded (not built, built against another torch,
    failed to load), or None when it is."""
    from mtlsam_ext.kernels.build_record import ext_status

    return ext_status().reason


def _load_triton() -> ModuleType | None:
    try:
        return importlib.import_module("mtlsam_ext.kernels.triton_kernels")
    except ImportError:
        return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order ``auto`` tries them."""
    return list(_available(torch.device(device)))


@functools.cache
def _available(device: torch.device) -> tuple[str, ...]:
    # Cached: op calls resolve their backend on every call, and the answer for a device does
    # not change within a process (the extension and triton are imported once).
    found = []
    ext = _load_ext()
    if ext is not None and ext.supports(device):
        found.append("ext")
    if device.type == "cuda":
        tri = _load_triton()
        if tri is not None and tri.supports(device):
            found.append("triton")
    found.append("torch")
    return tuple(found)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn ``requested`` (or ``MTLSAM_BACKEND`` when ``auto``) into a concrete backend name."""
    check_backend_name(requested)
    if requested == "auto":
        env = os.environ.get("MTLSAM_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"MTLSAM_BACKEND must be one of {BACKENDS}, got {env!r}")
        requested = env
    device = torch.device(device)
    usable = available_backends(device)
    if requested == "auto":
        return usable[0]
    if requested == "triton" and device.type == "cpu" and _interpreted_triton():
        # Explicit request only (never "auto"): Triton's interpreter runs the kernels on CPU
        # tensors, slowly, so that whole steps through this backend can be tested without a GPU.
        return requested
    if requested not in usable:
        why = {
            "ext": ext_unavailable_reason()
                   or "the compiled extension mtlsam_ext._C has no kernels for this device "
                      "(build it with a CUDA toolkit and a CUDA build of torch for GPU tensors)",
            "triton": "Triton kernels need CUDA tensors and the optional 'triton' package "
                      "(pip install mtlsam_ext[triton])",
        }[requested]
        raise RuntimeError(f"backend={requested!r} is not available on {device}: {why}")
    return requested


def _interpreted_triton() -> bool:
    """``TRITON_INTERPRET=1`` and the Triton kernels import."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    return _load_triton() is not None


def kernels(backend: str) -> ModuleType:
    """The kernel module implementing ``backend`` (already resolved)."""
    if backend == "torch":
        from mtlsam_ext.kernels import torch_ref

        return torch_ref
    if backend == "ext":
        mod = _load_ext()
    elif backend == "triton":
        mod = _load_triton()
    else:
        raise ValueError(f"unresolved backend {backend!r}")
    if mod is None:
        raise RuntimeError(f"backend {backend!r} is not available")
    return mod
