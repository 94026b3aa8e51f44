"""Argument checks shared by the ops: clear ``ValueError``s before any kernel touches memory."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def flat(name: str, x: Tensor, like: Tensor | None = None) -> None:
    """``x`` must be a contiguous 1-D floating tensor (matching ``like``'s device and dtype)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (a flat buffer), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float16/bfloat16/float32/float64 tensor, "
                         f"got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if like is not None:
        same(name, x, like)


def rows(name: str, x: Tensor, n: int | None = None) -> None:
    """``x`` must be a contiguous ``[R, N]`` floating matrix (with ``N == n`` when given)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, N] matrix, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be floating, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if n is not None and x.shape[1] != n:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {n}")


def same(name: str, x: Tensor, like: Tensor) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, expected {like.device}")
    if x.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, expected {like.dtype}")
    if x.dim() == 1 and like.dim() == 1 and x.numel() != like.numel():
        raise ValueError(f"{name} has {x.numel()} elements, expected {like.numel()}")


# Tables already checked, with the version counter they had: the optimizer passes the same
# table objects every step, and re-checking them cost ~4% of a small model's step.
# Keyed by id; the weak reference tells a live table from a new one that reuses a freed id.
_CHECKED: dict[int, tuple[weakref.ref, tuple]] = {}


def offsets(name: str, off: Tensor, n: int) -> None:
    """A segment table: int64, 1-D, starts at 0, non-decreasing, ends at ``n``."""
    if off.dtype != torch.int64 or off.dim() != 1 or off.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D int64 tensor of segment offsets")
    if off.device.type != "cpu":
        return  # device tables are checked by the kernels that read them
    if _already_checked(off, (off._version, n)):
        return
    if int(off[0]) != 0 or int(off[-1]) != n:
        raise ValueError(f"{name} must start at 0 and end at {n}, got "
                         f"[{int(off[0])}, ..., {int(off[-1])}]")
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    _remember(off, (off._version, n))


def _already_checked(table: Tensor, state: tuple) -> bool:
    seen = _CHECKED.get(id(table))
    return seen is not None and seen[0]() is table and seen[1] == state


def _remember(table: Tensor, state: tuple) -> None:
    if len(_CHECKED) > 4096:  # tables are few and long-lived; drop entries of dead ones
        for key in [k for k, v in _CHECKED.items() if v[0]() is None]:
            del _CHECKED[key]
    _CHECKED[id(table)] = (weakref.ref(table), state)


def sampled(starts: Tensor, lengths: Tensor, local_starts: Tensor, n: int, m: int) -> None:
    """A sampled-segment table: equal-length int64 vectors, every range inside its buffer."""
    for nm, t in (("starts", starts), ("lengths", lengths), ("local_starts", local_starts)):
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"sampled {nm} must be a 1-D int64 tensor")
    if not starts.numel() == lengths.numel() == local_starts.numel():
        raise ValueError("sampled starts, lengths and local_starts must have equal length")
    if starts.device.type != "cpu" or starts.numel() == 0:
        return
    # the same three tables every step (cached per layer selection): checked once, ~0.5 ms of
    # a K = 10 gl step on the MLP went to re-checking them
    # (the compiled kernels check the table again in any case)
    state = (id(lengths), id(local_starts), starts._version, lengths._version,
             local_starts._version, n, m)
    if _already_checked(starts, state):
        return
    if bool((starts < 0).any() or (lengths < 0).any() or (local_starts < 0).any()):
        raise ValueError("sampled segment table has negative entries")
    if bool((starts + lengths > n).any()):
        raise ValueError(f"a sampled segment runs past the flat buffer ({n} elements)")
    if bool((local_starts + lengths > m).any()):
        raise ValueError(f"a sampled segment runs past the local-gradient buffer ({m} columns)")
    if starts.numel() > 1 and bool((starts[:-1] + lengths[:-1] > starts[1:]).any()):
        raise ValueError("sampled segments must be sorted by start and must not overlap")
    _remember(starts, state)
