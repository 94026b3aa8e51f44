"""Deterministic two-stage reductions: per-chunk partials, then per-segment sums in order.

Stage 1 programs each own one chunk (``tables.py``) and write one partial per output they
touch; stage 2 (:func:`segment_sum_kernel`) sums a segment's partials in chunk order. Neither
stage uses atomics, so the bits depend only on the data and the constants of ``config.py``.
Inputs are cast to the accumulation dtype (``ACC``: fp32, or fp64 for fp64 data) right after
the load, before any arithmetic (bf16/fp16 arithmetic is not reliable under the interpreter).
All offsets are int64: program ids are cast before they multiply anything.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sumsq_partial_kernel(x_ptr, scale_ptr, table_ptr, partial_ptr,
                         HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """partial[c] = sum over chunk c of (x * scale)^2 (the sign of scale cancels)."""
    c = tl.program_id(0).to(tl.int64)
    start = tl.load(table_ptr + 2 * c)
    n = tl.load(table_ptr + 2 * c + 1)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, n, BLOCK):
        idx = i + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n
        v = tl.load(x_ptr + start + idx, mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + start + idx, mask=m, other=0.0).to(ACC)
        acc += v * v
    tl.store(partial_ptr + c, tl.sum(acc, axis=0))


@triton.jit
def gl_partial_kernel(g0_ptr, local_ptr, scale_ptr, table_ptr, dots_ptr, sq_ptr,
                      local_stride, n_chunks,
                      HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """For chunk c (axis 0) and task k (axis 1): <T g0, T local_k> and ||T local_k||^2."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    start = tl.load(table_ptr + 3 * c)
    n = tl.load(table_ptr + 3 * c + 1)
    lstart = tl.load(table_ptr + 3 * c + 2)
    row = local_ptr + k * local_stride + lstart
    dot = tl.zeros([BLOCK], dtype=ACC)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, n, BLOCK):
        idx = i + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n
        a = tl.load(g0_ptr + start + idx, mask=m, other=0.0).to(ACC)
        b = tl.load(row + idx, mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            t = tl.load(scale_ptr + start + idx, mask=m, other=0.0).to(ACC)
            a = a * t
            b = b * t
        dot += b * a
        sq += b * b
    tl.store(dots_ptr + k * n_chunks + c, tl.sum(dot, axis=0))
    tl.store(sq_ptr + k * n_chunks + c, tl.sum(sq, axis=0))


@triton.jit
def gram_partial_kernel(rows_ptr, table_ptr, partial_ptr, R, row_stride, n_chunks,
                        R_PAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """For chunk c (axis 0) and row i (axis 1): partial[i, j, c] = <m_i, m_j> over the chunk,
    for every j at once from a [R_PAD, BLOCK] tile."""
    c = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    start = tl.load(table_ptr + 2 * c)
    n = tl.load(table_ptr + 2 * c + 1)
    rr = tl.arange(0, R_PAD).to(tl.int64)
    rmask = rr < R
    acc = tl.zeros([R_PAD, BLOCK], dtype=ACC)
    for s in range(0, n, BLOCK):
        idx = s + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n
        xi = tl.load(rows_ptr + i * row_stride + start + idx, mask=m, other=0.0).to(ACC)
        tile = tl.load(rows_ptr + rr[:, None] * row_stride + (start + idx)[None, :],
                       mask=rmask[:, None] & m[None, :], other=0.0).to(ACC)
        acc += tile * xi[None, :]
    tl.store(partial_ptr + (i * R + rr) * n_chunks + c, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def segment_sum_kernel(partial_ptr, chunk_ptr, out_ptr, partial_stride, out_stride,
                       ACC: tl.constexpr, PBLOCK: tl.constexpr):
    """out[r, s] = sum of partial[r, chunk_ptr[s]:chunk_ptr[s + 1]] (0 for no chunks), for
    segment s (axis 0) and row r (axis 1), PBLOCK partials at a time in chunk order."""
    s = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    c0 = tl.load(chunk_ptr + s)
    c1 = tl.load(chunk_ptr + s + 1)
    acc = tl.zeros([PBLOCK], dtype=ACC)
    for c in range(c0, c1, PBLOCK):
        idx = c + tl.arange(0, PBLOCK).to(tl.int64)
        acc += tl.load(partial_ptr + r * partial_stride + idx, mask=idx < c1, other=0.0)
    tl.store(out_ptr + r * out_stride + s, tl.sum(acc, axis=0))
