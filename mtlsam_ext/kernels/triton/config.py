"""Launch constants of the Triton backend and the rule that picks them.

Reductions (``segment_sumsq``, ``gl_layer_stats``, ``gram``) are cut into fixed *chunks* of
``REDUCE_CHUNK`` elements, each chunk belonging to exactly one segment (or, for ``gram``, one
column range). A program sums its chunk with a ``[REDUCE_BLOCK]`` accumulator vector that is
reduced once at the end (``tl.sum``) and writes one partial per chunk; a second kernel sums
each segment's partials ``PARTIAL_BLOCK`` at a time, in chunk order. No atomics are used, so a
result depends only on the data and on these constants, never on the grid, the GPU or the
number of segments around it. The reductions therefore use FIXED constants (and a fixed
``num_warps``, which on a GPU decides the in-block reduction tree); the only data-dependent
choice is ``gram``'s tile width ``gram_block(R)``, a function of the row count alone.

Element-wise ops (``mix_perturb_``, ``restore_``, ``combine_``, ``sub_``) give the same bits
for any block size, so their block follows :func:`elementwise_block`, a small function of N.
There is no autotuning: the rule is cheap, needs no warm-up and behaves the same under the
interpreter (where ``triton.autotune``/``do_bench`` must not run) and on a GPU.

Tests may shrink the constants with :func:`override` to make a short segment span many
chunks; results then change only by summation order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's numpy interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

REDUCE_BLOCK = 1024      # vector width of a reduction program (power of two)
REDUCE_CHUNK = 16384     # elements per reduction program (a multiple of REDUCE_BLOCK)
PARTIAL_BLOCK = 256      # partials summed per step in the second stage (power of two)
REDUCE_WARPS = 4         # fixed: on a GPU num_warps shapes the tl.sum tree
GRAM_TILE = 8192         # max elements of gram's [R_pad, BLOCK] tile per program


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def elementwise_block(n: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for an element-wise op over ``n`` elements.

    ``BLOCK = clamp(next_pow2(n / 2048), 256, 2048)``: small buffers get small blocks (many
    programs for the SMs), large ones 2048 elements per program; ``num_warps = BLOCK / 256``
    (8 elements per thread, one 16/32-byte vector access per thread for fp16/fp32).
    """
    block = min(2048, max(256, next_pow2(-(-int(n) // 2048))))
    return block, max(1, block // 256)


def gram_block(r: int) -> int:
    """Tile width of ``gram``: ``min(REDUCE_BLOCK, GRAM_TILE / next_pow2(R))``, at least 16."""
    return max(16, min(REDUCE_BLOCK, GRAM_TILE // next_pow2(r)))


@contextlib.contextmanager
def override(block: int | None = None, chunk: int | None = None,
             partial_block: int | None = None) -> Iterator[None]:
    """Temporarily change the reduction constants (tests: many chunks from short segments)."""
    global REDUCE_BLOCK, REDUCE_CHUNK, PARTIAL_BLOCK
    saved = REDUCE_BLOCK, REDUCE_CHUNK, PARTIAL_BLOCK
    if block is not None:
        REDUCE_BLOCK = block
    if chunk is not None:
        REDUCE_CHUNK = chunk
    if partial_block is not None:
        PARTIAL_BLOCK = partial_block
    if REDUCE_BLOCK & (REDUCE_BLOCK - 1) or PARTIAL_BLOCK & (PARTIAL_BLOCK - 1) \
            or REDUCE_CHUNK % REDUCE_BLOCK:
        REDUCE_BLOCK, REDUCE_CHUNK, PARTIAL_BLOCK = saved
        raise ValueError("blocks must be powers of two and the chunk a multiple of the block")
    try:
        yield
    finally:
        REDUCE_BLOCK, REDUCE_CHUNK, PARTIAL_BLOCK = saved
