"""Mixed precision: ``torch.amp.GradScaler`` with a closure optimizer.

The step runs every backward on ``S * loss`` (S the scaler's current scale), so every gradient
it holds (rows, g0, head gradients) is S times the true one. Nothing is unscaled in a separate
pass; ``1/S`` is folded into coefficients the step applies anyway:

* perturbations ``rho g / ||g||`` are invariant to S (both the direction and the norm carry
  it); a local gradient with another scale (``lagged``/``zo`` are stored unscaled) enters the
  per-layer statistics with the factor S (:class:`Scaling` ``local``);
* the aggregator sees the true Gram matrix ``G / S^2`` (a K x K division) and the combine uses
  ``w / S``; head gradients take ``1/S`` in the copy that moves them into ``.grad``.

A non-finite value anywhere (losses, Gram, weights, combined update) marks ``found_inf``: the
step is skipped with parameters and state unchanged, and ``scaler.update()`` backs off.

Protocol (``GradScaler.step`` with an optimizer that has ``_step_supports_amp_scaling``): a
``step`` whose signature names ``grad_scaler`` would be handed the scaler itself, which torch
(2.x) deprecates with a FutureWarning on every step. MTLSAM's ``step`` takes ``grad_scaler``
only through ``**kwargs``, so the scaler uses the attribute form torch is moving to: it sets
``optimizer.grad_scale`` (its scale) and ``optimizer.found_inf`` before calling ``step`` and
deletes them after. The step reads the scale from there and writes the overflow it finds into
``found_inf`` in place. But today's ``update()`` reads the scaler's per-optimizer record, which
the scaler filled *before* the step from the gradients present then (a closure optimizer has
none yet), so the step also writes its result into that record: the scaler given at
construction, or else the one calling ``step`` (found on the call stack, see
:func:`calling_scaler`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Scaling:
    """The loss scale of one step.

    ``scale`` is a 0-d float32 tensor on the parameters' device (``None``: no scaling, and
    every fold below is skipped so a plain step is bit for bit the unscaled one); ``inv`` is
    ``1/scale`` in float64 for the tiny K x K folds.
    """

    scale: Tensor | None = None
    scaler: Any = None
    found_inf_out: Tensor | None = None
    # Data parallel: the number of ranks W whose gradients a collective summed (see
    # mtlsam_ext.optim.distributed); a summed gradient carries the factor W like a scale.
    world: Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether a loss scaler is in use (overflow reporting, skip instead of raise)."""
        return self.scale is not None

    def factor(self, reduced: bool) -> Tensor | None:
        """The factor a gradient carries: ``S`` (loss scale), times ``W`` if it was summed over
        the ranks (``reduced``); ``None`` when it is 1 (nothing to fold)."""
        w = self.world if reduced else None
        if self.scale is None:
            return w
        return self.scale if w is None else self.scale * w

    def scaled(self, loss: Tensor) -> Tensor:
        """The loss to run backward on: ``S * loss`` (float32 or float64, as GradScaler does)."""
        if self.scale is None:
            return loss
        return loss * (self.scale.double() if loss.dtype == torch.float64 else self.scale)


def init_scaler(scaler: Any, device: torch.device) -> None:
    """Give ``scaler`` its scale tensor on ``device`` if it has none yet (its ``scale()`` does
    this lazily; a closure optimizer never calls it before ``scaler.step``)."""
    if getattr(scaler, "_enabled", True) and getattr(scaler, "_scale", None) is None:
        scaler.scale(torch.zeros((), device=device))


def scaling_for(scaler: Any, grad_scale: Tensor | None, found_inf: Tensor | None,
                device: torch.device) -> Scaling:
    """The step's :class:`Scaling` from a scaler passed by keyword, or from the attributes
    ``grad_scale`` / ``found_inf`` that ``GradScaler`` sets in its attribute form."""
    if scaler is not None:
        if not getattr(scaler, "_enabled", True):
            return Scaling()
        if not hasattr(scaler, "_per_optimizer_states") or not hasattr(scaler, "scale"):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got "
                             f"{type(scaler).__name__}")
        init_scaler(scaler, device)
        # A copy: update() changes the scaler's scale in place, and the lagged gradients
        # remember the scale of the step that computed them.
        scale = scaler._scale.detach().to(device, torch.float32).reshape(()).clone()
        return Scaling(scale=scale, scaler=scaler, found_inf_out=found_inf)
    if grad_scale is not None:
        scale = torch.as_tensor(grad_scale).detach().to(device, torch.float32).reshape(())
        return Scaling(scale=scale.clone(), found_inf_out=found_inf)
    return Scaling()


def report_found_inf(scaling: Scaling, optimizer: object, finite: Tensor) -> None:
    """Tell the scaler whether the step found a non-finite value (``finite`` is a bool
    tensor), so that its ``update()`` backs off or grows the scale."""
    flag = (~finite).to(torch.float32).reshape(())
    if scaling.scaler is not None:
        scaler = scaling.scaler
        dev = scaler._scale.device
        state = scaler._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {dev: flag.to(dev)}
    if scaling.found_inf_out is not None:
        out = scaling.found_inf_out
        out.copy_(torch.maximum(out, flag.to(out.device, out.dtype)))


def calling_scaler(optimizer: object, depth: int = 6) -> Any:
    """The ``GradScaler`` whose ``step(optimizer, ...)`` is running, from the call stack (the
    attribute form gives the optimizer the scale but no handle on the scaler, whose
    ``update()`` still reads its own record of the overflow); ``None`` if there is none within
    ``depth`` frames (``Optimizer``'s step hooks add wrapper frames in between)."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(depth):
            if f is None:
                break
            cand = f.f_locals.get("self")
            states = getattr(cand, "_per_optimizer_states", None)
            if cand is not optimizer and isinstance(states, dict) and id(optimizer) in states \
                    and hasattr(cand, "update"):
                return cand
            f = f.f_back
    finally:
        del frame
    return None


def scale_ratio(scale: Tensor | None, local_scale: Tensor | None) -> Tensor | None:
    """``scale / local_scale`` in float64 (``None`` = 1; ``None`` when both are absent): puts
    gradients computed under the loss scale ``local_scale`` on the scale of this step's."""
    if scale is None and local_scale is None:
        return None
    num = torch.ones((), dtype=torch.float64) if scale is None else scale.double()
    return num if local_scale is None else num / local_scale.double().to(num.device)
