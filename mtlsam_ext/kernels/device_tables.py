"""Device copies of the CPU segment tables, made once per table.

The flat-buffer module keeps its segment tables (int64 offsets, sampled starts / lengths /
local starts) on the CPU, where the ops' validation reads them; kernels of GPU data need them
in device memory. Copying them on every op call put one to four host-to-device copies in each
perturbed pass (from pageable memory: the host waits for each). The tables are few and
long-lived, so each one's device copy is kept: keyed by the table object's id, valid while a
weak reference still finds that object (a new table reusing a dead one's id is not mistaken
for it) and its version counter is unchanged (an in-place edit makes a new copy).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

_COPIES: dict[tuple[int, torch.device], tuple[weakref.ref, int, Tensor]] = {}


def on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` on ``device``: itself when it is there already, else its kept copy."""
    if t is None or t.device == device:
        return t
    key = (id(t), device)
    hit = _COPIES.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    copy = t.to(device)
    # the copy goes with its table (a table made per step does not pile up device memory)
    _COPIES[key] = (weakref.ref(t, lambda _, key=key: _COPIES.pop(key, None)), t._version,
                    copy)
    return copy


def keep(t: Tensor, copy: Tensor) -> None:
    """Make ``copy`` (already on its device, made by the caller, e.g. in one non-blocking
    transfer of several tables) the kept device copy of the CPU table ``t``."""
    key = (id(t), copy.device)
    _COPIES[key] = (weakref.ref(t, lambda _, key=key: _COPIES.pop(key, None)), t._version,
                    copy)
