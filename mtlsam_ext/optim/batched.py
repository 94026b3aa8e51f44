"""Batched passes: the K perturbed points as one vmapped forward and one backward.

Every SAM-MTL method evaluates the model at K points ``theta + eps_i`` that differ only in
their weights (global-local report Alg. 1 line 9; F-MTL Alg. 1 line 4). With
``batched=True`` the K points are written by one op as ``[K, N]`` rows
(:func:`mtlsam_ext.ops.perturb_points_`), the shared modules are re-parametrised with those
rows (the parameters swapped for per-parameter views of a vmapped row, as
``torch.func.functional_call`` does), and ``torch.func.vmap`` runs the closure once over all
points; point ``i`` keeps loss ``i`` (a dot product with the one-hot row ``e_i``, never an
index taken from a batched tensor). One backward of the sum of the K selected losses then
leaves the K SAM gradients in the rows (their ``.grad`` is the row matrix itself) and each
head's SAM gradient in the head (only loss ``i`` at point ``i`` reaches head ``i``; the heads
are perturbed in place, each at its own task's point, before the pass).

The per-task gradients at one point (erm, F-MTL's loss gradients, gl's exact local
gradients, sam's gradients at its perturbed point) use one backward with K batched
cotangents instead (:meth:`mtlsam_ext.optim.passes.Passes.batched_task_grads`).

``batched="auto"`` runs both ways on the first :data:`TRIALS` steps (the sequential result is
the one used), checks on the first that they agree and keeps the batched way only where it was
faster than the sequential way as later steps run it (with LS / mean the summed passes, timed
from the second trial step on);
anything vmap cannot run (``.item()``, data-dependent branching, random ops, in-place updates
of module buffers) makes it fall back to the sequential passes with one warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlsam_ext.optim.closure import call_closure

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run

PHASES = ("points", "grads")

#: Trial steps of ``batched="auto"``: both ways run, the faster one is kept. The first step is
#: also the equivalence check; it carries one-off costs (allocations, first use of kernels) on
#: both sides, so the decision takes the fastest of three samples per way.
TRIALS = 3

#: What the closure must do to run under vmap (the error messages end with it).
RULES = ("in batched mode the closure runs under torch.func.vmap: no .item() / .tolist() / "
         "bool() of a tensor, no Python branching on tensor values, no in-place update of "
         "module buffers other than BatchNorm's, and (under batched='auto') no random ops such "
         "as dropout")

#: Relative agreement (``||batched_i - sequential_i|| / ||sequential_i||`` for each task's
#: gradient i) required by the trial check, per parameter dtype: both ways sum the same
#: products in another order.
AGREE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class BatchedError(ValueError):
    """vmap could not run the closure (or the model) in a batched pass."""


@dataclass
class Phase:
    """The state of one batched phase: ``"batched"``, ``"sequential"`` or ``"trial"``."""

    state: str
    reason: str | None = None
    #: a trial step has compared the batched result with the sequential one (the later trial
    #: steps may then time the sequential way as the steady state runs it, see
    #: :func:`mtlsam_ext.optim.sam_passes.summed_passes`)
    checked: bool = False
    times: dict[str, list[float]] = field(default_factory=lambda: {"batched": [],
                                                                    "sequential": []})


class BatchedPolicy:
    """Which passes of a step run batched, decided once per optimizer."""

    def __init__(self, mode: bool | str, task_chunk: int | None, unsupported: str | None
                 ) -> None:
        if not (mode is True or mode is False or mode in ("auto", "points")):
            raise ValueError(f"batched must be True, False, 'auto' or 'points', got {mode!r}")
        if task_chunk is not None and not (isinstance(task_chunk, int)
                                           and not isinstance(task_chunk, bool)
                                           and task_chunk >= 1):
            raise ValueError(f"task_chunk must be None or a positive int, got {task_chunk!r}")
        if (mode is True or mode == "points") and unsupported is not None:
            raise ValueError(f"batched={mode!r}: {unsupported}")
        self.mode = mode
        self.task_chunk = task_chunk
        first = "trial" if mode == "auto" else "batched" if mode is True else "sequential"
        if unsupported is not None:
            first = "sequential"
        self.phases = {p: Phase(first, unsupported if mode == "auto" else None)
                       for p in PHASES}
        if mode == "points":  # only the K perturbed passes (batched cotangents stay off)
            self.phases["points"].state = "batched"

    def only(self, used: dict[str, bool]) -> None:
        """``"auto"`` decides only the phases this optimizer's method runs every step; the
        others stay sequential (``True`` keeps them batched wherever they do run)."""
        for p, u in used.items():
            ph = self.phases[p]
            if not u and ph.state == "trial":
                ph.state, ph.reason = "sequential", "not a phase of every step of this method"

    def state(self, phase: str) -> str:
        return self.phases[phase].state

    def fall_back(self, phase: str, reason: str) -> None:
        """Sequential from now on (``"auto"`` only), with one warning saying why."""
        ph = self.phases[phase]
        ph.state, ph.reason = "sequential", reason
        warnings.warn(f"batched='auto': {reason}; running the {_WHAT[phase]} sequentially",
                      stacklevel=6)

    def record(self, phase: str, way: str, seconds: float) -> None:
        """One trial timing; after :data:`TRIALS` of each way, keep the faster one."""
        ph = self.phases[phase]
        if ph.state != "trial":
            return
        ph.times[way].append(seconds)
        if min(len(v) for v in ph.times.values()) >= TRIALS:
            b, s = min(ph.times["batched"]), min(ph.times["sequential"])
            ph.state = "batched" if b < s else "sequential"
            ph.reason = f"measured {1e3 * b:.2f} ms batched vs {1e3 * s:.2f} ms sequential"

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "task_chunk": self.task_chunk,
                **{p: {"state": ph.state, "reason": ph.reason} for p, ph in self.phases.items()}}


_WHAT = {"points": "K perturbed passes", "grads": "per-task gradients at one point"}


def unsupported_reason(shared_missing: list[str], head_missing: list[str],
                       bn_all: bool) -> str | None:
    """Why batched passes cannot run for this optimizer's configuration (``None``: they can)."""
    if shared_missing or head_missing:
        names = (shared_missing + head_missing)[:3]
        return (f"parameters {names} are not held by any module given to the optimizer, so they "
                "cannot be swapped for the batched points: pass shared (and heads) as modules, "
                "or the model as bn_modules")
    if bn_all:
        return ("bn_stats='all' updates BatchNorm statistics in every pass, one after another; "
                "batched passes need bn_stats='first'")
    return None


def timer(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for ``device`` (CUDA work is asynchronous)."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def point_losses(run: Run, points: list[Tensor], first: int, randomness: str) -> Tensor:
    """Forward of K' points under vmap, given per parameter as ``[K', *shape]`` leaves (in
    :meth:`~mtlsam_ext.flat.FlatParams.ordered_params` order); returns ``[K']`` losses, point
    ``i`` taking loss ``first + i`` (leaves from
    :meth:`~mtlsam_ext.flat.FlatParams.point_leaves`)."""
    opt = run.opt
    shared = run.shared
    kk = points[0].shape[0]
    eye = torch.eye(run.k, device=points[0].device)[first:first + kk]

    def one(params: list[Tensor], e: Tensor) -> Tensor:
        with shared.reparametrized(params):
            losses = call_closure(opt, run.closure, None, run.task_aware, batched=True)
        # loss i of point i as a dot product with e_i: no indexing by a batched value
        return sum(e[j] * loss.float() if loss.dtype != torch.float64 else e[j].double() * loss
                   for j, loss in enumerate(losses))

    try:
        with torch.enable_grad():
            return torch.func.vmap(one, randomness=randomness)(points, eye)
    except BatchedError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        raise BatchedError(f"vmap could not run the closure over the K perturbed points: "
                           f"{type(err).__name__}: {err} ({RULES})") from err
