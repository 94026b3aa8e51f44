"""Element-wise kernels: the perturbation (one point, or K points in one launch), the bit
copy, the weighted row sum and ``sub_``.

Values are cast to the accumulation dtype (``ACC``) right after the load and rounded to the
storage dtype once, at the store, by :func:`to_storage`. Under the interpreter the fp32 ->
bf16 conversion truncates (Triton 3.9's numpy emulation ignores the rounding mode, and its
"rtne" path rounds ties away), so there ``ROUND_BF16`` rounds to nearest-even with integer
bit operations instead; on a GPU the native conversion (round-to-nearest-even) is used.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bf16_rtne(v):
    """fp32 -> bf16, round to nearest even, by integer arithmetic on the bits (NaN stays NaN)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF  # rounding the magnitude: no uint32 overflow
    rounded = ((mag + 0x7FFF + ((mag >> 16) & 1)) >> 16) | sign
    out = tl.where(v != v, sign | 0x7FC0, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(v, OUT: tl.constexpr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        return _bf16_rtne(v)
    else:
        return v.to(OUT)


@triton.jit
def _mix_block(param_ptr, backup_ptr, g0_ptr, coef_ptr, local_ptr, lcoef_ptr, table_ptr, b,
               HAS_LOCAL: tl.constexpr, ADAPTIVE: tl.constexpr, SAVE: tl.constexpr,
               ACC: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """theta = theta0 + T^2 (a g0 + b local) on block ``b`` (int64) of the block table (see
    tables.py) for ONE point: the pointers address that point's rows. The single-point and
    the K-point kernels both run this, so a fused point has the single-point bits."""
    start = tl.load(table_ptr + 5 * b)
    n = tl.load(table_ptr + 5 * b + 1)
    seg = tl.load(table_ptr + 5 * b + 2)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.arange(0, BLOCK).to(tl.int64) < n
    if SAVE:
        theta0 = tl.load(param_ptr + idx, mask=m)
        tl.store(backup_ptr + idx, theta0, mask=m)
    else:
        theta0 = tl.load(backup_ptr + idx, mask=m)
    base = theta0.to(ACC)
    a = tl.load(coef_ptr + seg)
    eps = a * tl.load(g0_ptr + idx, mask=m, other=0.0).to(ACC)
    if HAS_LOCAL:
        samp = tl.load(table_ptr + 5 * b + 3)
        if samp >= 0:
            shift = tl.load(table_ptr + 5 * b + 4)
            bc = tl.load(lcoef_ptr + samp)
            eps = eps + bc * tl.load(local_ptr + idx + shift, mask=m, other=0.0).to(ACC)
    if ADAPTIVE:
        eps = eps * (base * base)
    out = base + eps
    tl.store(param_ptr + idx, to_storage(out, param_ptr.dtype.element_ty, ROUND_BF16), mask=m)


@triton.jit
def mix_perturb_kernel(param_ptr, backup_ptr, g0_ptr, coef_ptr, local_ptr, lcoef_ptr,
                       table_ptr, HAS_LOCAL: tl.constexpr, ADAPTIVE: tl.constexpr,
                       SAVE: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One point in place: program ``b`` does block ``b`` (see :func:`_mix_block`)."""
    _mix_block(param_ptr, backup_ptr, g0_ptr, coef_ptr, local_ptr, lcoef_ptr, table_ptr,
               tl.program_id(0).to(tl.int64), HAS_LOCAL, ADAPTIVE, SAVE, ACC, ROUND_BF16, BLOCK)


@triton.jit
def perturb_points_kernel(out_ptr, theta_ptr, dir_ptr, coef_ptr, local_ptr, lcoef_ptr,
                          table_ptr, R, N, S, M, P, HAS_LOCAL: tl.constexpr,
                          SHARED_DIR: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr,
                          ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """R points ``out[r] = theta + T^2 (A_r d_r + B_r local_r)`` in one launch, rows of
    ``out`` [R, N], ``dir`` [R or 1, N], ``coef`` [R, S], ``local`` [R, M], ``lcoef`` [R, P].

    Program ``pid`` does block ``pid // R`` of row ``pid % R``: the rows are folded into the
    grid's first axis (up to 2^31 - 1 programs on CUDA; the second allows only 65535), row
    index fastest, so the R programs of one block run together and share its ``theta`` (and
    shared direction) reads in L2. ``theta`` is only read (``SAVE=False``).
    """
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = (pid % R).to(tl.int64)
    if SHARED_DIR:
        d_ptr = dir_ptr
    else:
        d_ptr = dir_ptr + r * N
    _mix_block(out_ptr + r * N, theta_ptr, d_ptr, coef_ptr + r * S, local_ptr + r * M,
               lcoef_ptr + r * P, table_ptr, b, HAS_LOCAL, ADAPTIVE, False, ACC, ROUND_BF16,
               BLOCK)


@triton.jit
def copy_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr):
    """dst = src (called on integer views: a bit copy)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = idx < n
    tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=m), mask=m)


@triton.jit
def combine_kernel(out_ptr, rows_ptr, w_ptr, R, n, ACC: tl.constexpr,
                   ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum_i w_i rows_i, accumulated in ACC in row order 0..R-1, rounded once."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = idx < n
    acc = tl.zeros([BLOCK], dtype=ACC)
    row_ptr = rows_ptr  # advanced by n per row: 64-bit pointer arithmetic, no i32 product
    for i in range(0, R):
        w = tl.load(w_ptr + i)
        x = tl.load(row_ptr + idx, mask=m, other=0.0).to(ACC)
        acc += x * w
        row_ptr += n
    tl.store(out_ptr + idx, to_storage(acc, out_ptr.dtype.element_ty, ROUND_BF16), mask=m)


@triton.jit
def sub_kernel(a_ptr, b_ptr, n, ACC: tl.constexpr, ROUND_BF16: tl.constexpr,
               BLOCK: tl.constexpr):
    """a -= b (computed in ACC, rounded once, as torch does for 16-bit types)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = idx < n
    a = tl.load(a_ptr + idx, mask=m, other=0.0).to(ACC)
    b = tl.load(b_ptr + idx, mask=m, other=0.0).to(ACC)
    tl.store(a_ptr + idx, to_storage(a - b, a_ptr.dtype.element_ty, ROUND_BF16), mask=m)
