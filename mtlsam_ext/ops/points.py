"""The K perturbed points of one call through a kernel module, fused or one row at a time.

Shared by the op entry point (:func:`mtlsam_ext.ops.core.perturb_points_`) and the kernels'
self-check, which must run the op exactly as the entry point does.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor


def perturb_points(mod: ModuleType, out: Tensor, theta: Tensor, directions: Tensor,
                   coefs: Tensor, offsets: Tensor, local: Tensor | None = None,
                   local_coefs: Tensor | None = None, starts: Tensor | None = None,
                   lengths: Tensor | None = None, local_starts: Tensor | None = None,
                   adaptive: bool = False) -> None:
    """``out[i] = theta + T^2 (A_i d_i + B_i ghat_i)`` with ``mod``'s kernels (arguments
    validated by the caller)."""
    fused = getattr(mod, "perturb_points_", None)
    if fused is not None:
        fused(out, theta, directions, coefs, offsets, local, local_coefs, starts, lengths,
              local_starts, adaptive)
        return
    # No fused kernel in this backend: its single-point kernel once per row (same bits).
    for i in range(out.shape[0]):
        mod.mix_perturb_(out[i], theta, directions[0 if directions.shape[0] == 1 else i],
                         coefs[i], offsets, None if local is None else local[i],
                         None if local_coefs is None else local_coefs[i], starts, lengths,
                         local_starts, adaptive, False)
