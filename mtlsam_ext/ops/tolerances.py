"""Per-dtype tolerances: the one table every backend-vs-reference comparison uses.

The test suite (``tests/tolerances.py`` re-exports these) and the first-use self-check of the
compiled kernels (:mod:`mtlsam_ext.ops.selfcheck`) both read them, so a kernel is held to the
same bound in a user's process as in CI.

``rtol``/``atol`` bound the difference between an op computed from ``dtype`` inputs and the
float64 oracle evaluated on the same (rounded) inputs. Reductions accumulate in float32 for
16/32-bit inputs, so their error is that of float32 summation; element-wise results are
rounded back to the storage dtype, so their error is half an ulp of that dtype.
"""

from __future__ import annotations

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

# A compiled kernel is held to the pure-torch reference's own error (against the float64 oracle)
# times two, plus this many ulps of the accumulation dtype at the result's magnitude: where the
# reference happens to be correctly rounded (on a GPU torch sums fp16/bf16 Gram entries of 257
# columns exactly to half an fp32 ulp), "twice its error" alone would demand better than one ulp
# of any other summation order. Seen on an H200: fp16 Gram entries of ~270 off by 6.6e-5 (2.2
# ulps) against the reference's 1.5e-5; fp16 sums of squares of ~4300 off by 3.7e-4 (0.8 ulp).
REFERENCE_ULPS = 4


def accumulation_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype reductions accumulate in for ``dtype`` inputs."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
