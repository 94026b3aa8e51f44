"""One module per method: each ``step_<method>(run)`` reads as its paper's algorithm and
returns the K losses at theta, leaving the shared update in the flat gradient buffer and head
i's gradient in its segment of the heads' buffer, for the base optimizer to apply."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from mtlsam_ext.optim.steps.erm import step_erm
from mtlsam_ext.optim.steps.fmtl import step_fmtl
from mtlsam_ext.optim.steps.gl import step_gl
from mtlsam_ext.optim.steps.sam import step_sam

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run

#: ``method`` name -> its step.
STEPS: dict[str, Callable[[Run], Tensor]] = {
    "gl": step_gl, "fmtl": step_fmtl, "sam": step_sam, "erm": step_erm}

__all__ = ["STEPS", "step_erm", "step_fmtl", "step_gl", "step_sam"]
