"""Per-dtype tolerances, kept in one place for every backend-vs-reference comparison.

``rtol``/``atol`` bound the difference between an op computed from ``dtype`` inputs and the
float64 oracle evaluated on the same (rounded) inputs. Reductions accumulate in float32 for
16/32-bit inputs, so their error is that of float32 summation; element-wise results are
rounded back to the storage dtype, so their error is half an ulp of that dtype.
"""

import torch

# Reductions (sums of squares, Gram entries, stats), accumulated in fp32 or fp64.
REDUCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-5),
}

# Element-wise results stored in the parameter dtype (perturb, combine).
ELEMENTWISE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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
