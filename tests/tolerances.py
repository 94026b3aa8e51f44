"""Per-dtype tolerances for the tests: the package's one table
(:mod:`mtlsam_ext.ops.tolerances`, which the compiled kernels' first-use self-check reads too)
and the reduction assertion built on it."""

import torch

from mtlsam_ext.ops.tolerances import (  # noqa: F401  (re-exported for the tests)
    DTYPES,
    ELEMENTWISE,
    REDUCE,
    REFERENCE_ULPS,
    accumulation_eps,
)


def assert_reduction_close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor,
                           dtype: torch.dtype) -> None:
    """``|got - want| <= rtol * bound + atol`` for an inner product or sum of squares.

    ``bound`` is the sum of the absolute values of the terms (``||a|| ||b||`` for a dot
    product): summation error scales with it, not with the possibly cancelled result.
    """
    tol = REDUCE[dtype]
    err = (got.double() - want).abs()
    limit = tol["rtol"] * bound.double() + tol["atol"]
    bad = err > limit
    if bool(bad.any()):
        raise AssertionError(f"reduction error {float(err.max()):.3g} exceeds the limit "
                             f"{float(limit[bad].min()):.3g} at {int(bad.sum())} entries")
