"""Backend resolution: which kernel module runs an op on given tensors.

``auto`` picks the compiled extension, then torch on CPU tensors. On CUDA tensors it picks,
per op, the compiled backend measured fastest for that op (``ext+triton``, see ``CUDA_AUTO``)
when both the extension and Triton are there, else the one that is, else torch. The
environment variable ``MTLSAM_BACKEND`` overrides ``auto``; an explicit backend that is not
available is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

# "ext+triton": every op on the backend CUDA_AUTO names for it (what "auto" resolves to on CUDA
# where both are available); it can also be asked for by name.
MIXED = "ext+triton"
BACKENDS = ("auto", "torch", "ext", "triton", MIXED)

# The ops that backend="auto" runs through Triton rather than the compiled extension on CUDA
# tensors; every other op runs on the extension. Keys are ops_bench's op names ("_local": the
# global-local form, with the sampled layers' task-gradient rows). Chosen from
# `python -m bench.ops_bench --device cuda` on an H200 (torch 2.11.0+cu130, triton 3.6.0,
# bench/results/ops_cuda.jsonl, the run at 2cf2a30): ext vs triton GB/s on ResNet-18's layout,
# fp32 and bf16, and on 2,000 tiny tensors (fp32). The extension wins every other op there:
# gram 2732 vs 727, 1720 vs 484, tiny 473 vs 60 (since its row-block kernel; the first CUDA
# gram ran at 471 GB/s and Triton had these two), flat_gram_ 2691 vs 1444, 2180 vs 1206, tiny
# 760 vs 184; mix_perturb_ 2701 vs 1524; segment_sumsq 789 vs 339; combine_ 3494 vs 2491;
# gl_layer_stats 1017 vs 849, 628 vs 535, tiny 91 vs 55.
CUDA_AUTO: dict[str, str] = {
    "mix_perturb_local": "triton",     # 1250 vs 1584, 728 vs 920; tiny 47 vs 88
    "perturb_points_local": "triton",  # 805 vs 1654, 417 vs 970; tiny 78 vs 130
    "segment_gram": "triton",          # no CUDA kernel in ext (its torch fallback: 34 vs 674)
}


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
    mixed = device.type == "cuda" and "ext" in usable and "triton" in usable
    if requested == "auto":
        return MIXED if mixed else usable[0]
    if requested == MIXED:
        if mixed:
            return MIXED
        raise RuntimeError(f"backend={MIXED!r} is not available on {device}: it needs CUDA "
                           f"tensors, the compiled extension and Triton (available: {usable})")
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


# What an optimizer built with backend="auto" passes to the ops: "auto:" + the backend "auto"
# resolved to at its construction (so its op calls read no environment variable), keeping
# auto's answer to a kernel that fails its self-check: run that op on the reference.
AUTO_PINNED = "auto:"


def pin(requested: str, device: torch.device | str) -> tuple[str, str]:
    """``(resolved backend, the name to pass to the ops)`` for a backend asked for by name:
    ``auto`` (with ``MTLSAM_BACKEND`` unset or ``auto``) is pinned to what it resolves to now,
    other requests are passed as resolved."""
    resolved = resolve_backend(requested, device)
    auto = requested == "auto" and os.environ.get("MTLSAM_BACKEND", "auto") == "auto"
    return resolved, AUTO_PINNED + resolved if auto else resolved


def request_policy(backend: str) -> tuple[str, bool]:
    """``(the backend to resolve, whether a compiled op that fails its self-check falls back to
    the reference)``: it does for ``auto`` (and a pinned auto), never for a backend asked for
    by name (``ext``, ``triton``, ``ext+triton``, or ``MTLSAM_BACKEND`` naming one)."""
    if backend.startswith(AUTO_PINNED):
        return backend[len(AUTO_PINNED):], True
    return backend, backend == "auto" and os.environ.get("MTLSAM_BACKEND", "auto") == "auto"


def _interpreted_triton() -> bool:
    """``TRITON_INTERPRET=1`` and the Triton kernels import."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    return _load_triton() is not None


def op_backend(resolved: str, op: str) -> str:
    """The single backend that runs ``op`` (an ops_bench op name) under a resolved backend."""
    return CUDA_AUTO.get(op, "ext") if resolved == MIXED else resolved


def kernels(backend: str) -> ModuleType:
    """The kernel module implementing ``backend`` (resolved, and per op: see op_backend)."""
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
