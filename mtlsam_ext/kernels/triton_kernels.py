"""The Triton backend: every op of :mod:`mtlsam_ext.kernels.torch_ref` as Triton kernels.

Same signatures and results as the reference (within the test suite's per-dtype tolerances;
under the interpreter the element-wise ops match it bit for bit). Importing this module raises
``ImportError`` when ``triton`` is not installed, which the dispatcher reads as "backend not
available".

Design (details in ``mtlsam_ext/kernels/triton/``):

* fp16/bf16/fp32 inputs accumulate in fp32 and fp64 inputs in fp64, as in the reference;
  values are cast right after the load and rounded to the storage dtype once;
* segment tables stay int64 tensors; from them small chunk/block tables are built on the CPU
  (cached by content) and copied to the device; all kernel offsets are int64;
* reductions are deterministic two-stage sums (fixed chunks -> partials -> per-segment sums
  in chunk order), with no atomics; block constants are fixed (``triton/config.py``);
* ``gram`` mirrors its upper triangle, so it is exactly symmetric; ``combine_`` adds rows in
  order 0..R-1 in the accumulation dtype; ``restore_`` (and the backup in ``mix_perturb_``)
  copy bits;
* ``perturb_points_`` writes all K points in one launch (rows folded into the grid's first
  axis) with the block function of ``mix_perturb_``, so each row has the single-point bits.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The one
case delegated to the reference is ``mix_perturb_`` (and ``perturb_points_``, its K-row form)
with overlapping sampled segments (the reference adds both local terms there), which the
block decomposition does not express.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import triton  # noqa: F401  (ImportError here means: backend not available)
import triton.language as tl
from torch import Tensor

from mtlsam_ext.kernels import torch_ref
from mtlsam_ext.kernels.triton import config, tables
from mtlsam_ext.kernels.triton.elementwise import (
    combine_kernel,
    copy_kernel,
    mix_perturb_kernel,
    perturb_points_kernel,
    sub_kernel,
)
from mtlsam_ext.kernels.triton.reduce import (
    gl_partial_kernel,
    gram_partial_kernel,
    segment_sum_kernel,
    sumsq_partial_kernel,
)

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# CUDA's limit on a grid's first axis (the others allow 65535): perturb_points_ folds its rows
# into that axis and launches again per group of rows only past it.
_MAX_PROGRAMS = 2**31 - 1


def supports(device: torch.device | str) -> bool:
    """True for CUDA devices when a GPU driver is usable (never under the interpreter, which
    is for tests on CPU tensors and is far too slow for training)."""
    device = torch.device(device)
    if device.type != "cuda" or config.INTERPRET or not torch.cuda.is_available():
        return False
    try:
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception:  # no usable driver / backend for this GPU
        return False
    return True


def _on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with its first tensor's GPU as the current device: Triton launches on the
    current device and stream, not on the tensors' (the compiled extension sets the device
    itself), so parameters on ``cuda:1`` while ``cuda:0`` is current would fail or run on the
    wrong stream. One comparison when the device is already current (the usual case)."""
    @functools.wraps(fn)
    def run(first: Tensor, *args: Any, **kwargs: Any) -> Any:
        dev = first.device
        if dev.type == "cuda" and dev.index is not None \
                and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)
    return run


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in _TL:
            raise ValueError(f"triton kernels take float16/bfloat16/float32/float64 tensors, "
                             f"got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("triton kernels need contiguous tensors")
        if t.device.type != "cuda" and not config.INTERPRET:
            raise ValueError(f"triton kernels need CUDA tensors (got {t.device}); CPU tensors "
                             f"run only under TRITON_INTERPRET=1")


def _round_bf16(dtype: torch.dtype) -> bool:
    return config.INTERPRET and dtype == torch.bfloat16


def _segment_sums(partial: Tensor, chunk_ptr: Tensor, n_seg: int, rows: int,
                  partial_stride: int, out: Tensor) -> Tensor:
    """Stage 2: ``out[r, s] = sum(partial[r, chunk_ptr[s]:chunk_ptr[s+1]])`` in chunk order."""
    if n_seg and rows:
        segment_sum_kernel[(n_seg, rows)](partial, chunk_ptr, out, partial_stride, n_seg,
                                          ACC=_TL[out.dtype], PBLOCK=config.PARTIAL_BLOCK,
                                          num_warps=config.REDUCE_WARPS)
    return out


# ---------------------------------------------------------------- reductions

@_on_device
def segment_sumsq(x: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
    _check(x, scale)
    acc = _acc(x.dtype)
    n_seg = offsets.numel() - 1
    out = torch.zeros(n_seg, dtype=acc, device=x.device)
    table, chunk_ptr, n_chunks = tables.segment_chunks(offsets, config.REDUCE_CHUNK, x.device)
    if n_chunks == 0:
        return out
    partial = torch.empty(n_chunks, dtype=acc, device=x.device)
    sumsq_partial_kernel[(n_chunks,)](x, x if scale is None else scale, table, partial,
                                      HAS_SCALE=scale is not None, ACC=_TL[acc],
                                      BLOCK=config.REDUCE_BLOCK, num_warps=config.REDUCE_WARPS)
    return _segment_sums(partial, chunk_ptr, n_seg, 1, n_chunks, out)


@_on_device
def gl_layer_stats(g0: Tensor, local: Tensor, starts: Tensor, lengths: Tensor,
                   local_starts: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    _check(g0, local, scale)
    acc = _acc(g0.dtype)
    k, p = local.shape[0], starts.numel()
    table, chunk_ptr, n_chunks = tables.sampled_chunks(starts, lengths, local_starts,
                                                       config.REDUCE_CHUNK, g0.device)
    if n_chunks == 0 or k == 0 or p == 0:
        dots = torch.zeros(k, p, dtype=acc, device=g0.device)
        return dots, torch.zeros_like(dots)
    # Partials of dots (rows 0..K-1) and squares (rows K..2K-1): one second-stage launch.
    partial = torch.empty(2, k, n_chunks, dtype=acc, device=g0.device)
    gl_partial_kernel[(n_chunks, k)](g0, local, g0 if scale is None else scale, table,
                                     partial[0], partial[1], local.stride(0), n_chunks,
                                     HAS_SCALE=scale is not None, ACC=_TL[acc],
                                     BLOCK=config.REDUCE_BLOCK, num_warps=config.REDUCE_WARPS)
    both = torch.empty(2, k, p, dtype=acc, device=g0.device)
    _segment_sums(partial, chunk_ptr, p, 2 * k, n_chunks, both)
    return both[0], both[1]


@_on_device
def gram(rows: Tensor) -> Tensor:
    _check(rows)
    if rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D [R, N] matrix, got shape {tuple(rows.shape)}")
    acc = _acc(rows.dtype)
    r, n = rows.shape
    g = torch.zeros(r, r, dtype=acc, device=rows.device)
    if r == 0 or n == 0:
        return g
    block = config.gram_block(r)
    chunk = max(block, config.REDUCE_CHUNK // block * block)
    table, n_chunks = tables.uniform_chunks(n, chunk, rows.device)
    partial = torch.empty(r * r, n_chunks, dtype=acc, device=rows.device)
    gram_partial_kernel[(n_chunks, r)](rows, table, partial, r, rows.stride(0), n_chunks,
                                       R_PAD=config.next_pow2(r), ACC=_TL[acc], BLOCK=block,
                                       num_warps=config.REDUCE_WARPS)
    _segment_sums(partial, tables.whole_range(n_chunks, rows.device), 1, r * r, n_chunks,
                  g.view(r * r, 1))
    # Mirror the upper triangle: exactly symmetric whatever the hardware did.
    return torch.triu(g) + torch.triu(g, 1).T


@_on_device
def segment_gram(rows: Tensor, offsets: Tensor) -> Tensor:
    """Per-segment Grams from the ``gram`` partial kernel run over segment-aligned chunks and
    the stage-2 segment sums (each chunk belongs to one segment)."""
    _check(rows)
    if rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D [R, N] matrix, got shape {tuple(rows.shape)}")
    acc = _acc(rows.dtype)
    r = rows.shape[0]
    n_seg = offsets.numel() - 1
    out = torch.zeros(r * r, n_seg, dtype=acc, device=rows.device)
    block = config.gram_block(max(r, 1))
    chunk = max(block, config.REDUCE_CHUNK // block * block)
    table, chunk_ptr, n_chunks = tables.segment_chunks(offsets, chunk, rows.device)
    if r and n_chunks:
        partial = torch.empty(r * r, n_chunks, dtype=acc, device=rows.device)
        gram_partial_kernel[(n_chunks, r)](rows, table, partial, r, rows.stride(0), n_chunks,
                                           R_PAD=config.next_pow2(r), ACC=_TL[acc],
                                           BLOCK=block, num_warps=config.REDUCE_WARPS)
        _segment_sums(partial, chunk_ptr, n_seg, r * r, n_chunks, out)
    g = out.T.reshape(n_seg, r, r)
    return torch.triu(g) + torch.triu(g, 1).transpose(1, 2)


# ---------------------------------------------------------------- element-wise

def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.element_size()])


@_on_device
def mix_perturb_(param: Tensor, backup: Tensor, g0: Tensor, coef: Tensor, offsets: Tensor,
                 local: Tensor | None = None, local_coef: Tensor | None = None,
                 starts: Tensor | None = None, lengths: Tensor | None = None,
                 local_starts: Tensor | None = None, adaptive: bool = False,
                 save_backup: bool = True) -> None:
    has_local = local is not None and local_coef is not None and starts is not None
    _check(param, backup, g0, local if has_local else None)
    if has_local and tables.sampled_overlap(starts, lengths):
        torch_ref.mix_perturb_(param, backup, g0, coef, offsets, local, local_coef, starts,
                               lengths, local_starts, adaptive, save_backup)
        return
    acc = _acc(param.dtype)
    block, warps = config.elementwise_block(param.numel())
    if has_local:
        table, n_blocks = tables.mix_blocks(offsets, block, param.device, starts, lengths,
                                            local_starts)
        lcoef = local_coef.to(param.device, acc)
    else:
        table, n_blocks = tables.mix_blocks(offsets, block, param.device)
        lcoef = None
    if n_blocks == 0:
        return
    coef_d = coef.to(param.device, acc)
    mix_perturb_kernel[(n_blocks,)](param, backup, g0, coef_d,
                                    local if has_local else g0,
                                    lcoef if has_local else coef_d, table,
                                    HAS_LOCAL=has_local, ADAPTIVE=bool(adaptive),
                                    SAVE=bool(save_backup), ACC=_TL[acc],
                                    ROUND_BF16=_round_bf16(param.dtype), BLOCK=block,
                                    num_warps=warps)


@_on_device
def perturb_points_(out: Tensor, theta: Tensor, directions: Tensor, coefs: Tensor,
                    offsets: Tensor, local: Tensor | None = None,
                    local_coefs: Tensor | None = None, starts: Tensor | None = None,
                    lengths: Tensor | None = None, local_starts: Tensor | None = None,
                    adaptive: bool = False) -> None:
    """All K points ``out[i] = theta + T^2 (A_i d_i + B_i ghat_i)`` in one launch.

    Row ``i`` is, bit for bit, what :func:`mix_perturb_` writes for task ``i`` with
    ``save_backup=False`` (both kernels run the same block function over the same block
    table); a per-row loop would cost K launches and K reads of the block table. ``theta`` is
    only read. Overlapping sampled segments go to the reference, as in :func:`mix_perturb_`.
    """
    has_local = local is not None and local_coefs is not None and starts is not None
    _check(out, theta, directions, local if has_local else None)
    if has_local and tables.sampled_overlap(starts, lengths):
        torch_ref.perturb_points_(out, theta, directions, coefs, offsets, local, local_coefs,
                                  starts, lengths, local_starts, adaptive)
        return
    k, n = out.shape
    acc = _acc(out.dtype)
    # The single-point rule on N: the same (cached) block table as mix_perturb_ on this layout.
    block, warps = config.elementwise_block(n)
    if has_local:
        table, n_blocks = tables.mix_blocks(offsets, block, out.device, starts, lengths,
                                            local_starts)
    else:
        table, n_blocks = tables.mix_blocks(offsets, block, out.device)
    if n_blocks == 0 or k == 0:
        return
    coef_d = coefs.to(out.device, acc).contiguous()
    shared = directions.shape[0] == 1
    if has_local:
        lcoef = local_coefs.to(out.device, acc).contiguous()
        m, p = local.shape[1], lcoef.shape[1]
    else:
        m = p = 0  # local/lcoef pointers: unread placeholders that stay put
    per_launch = max(1, _MAX_PROGRAMS // n_blocks)  # rows per launch: all K in practice
    for r0 in range(0, k, per_launch):
        r1 = min(k, r0 + per_launch)
        rows = r1 - r0
        coef_r = coef_d[r0:r1]
        perturb_points_kernel[(n_blocks * rows,)](
            out[r0:r1], theta, directions if shared else directions[r0:r1], coef_r,
            local[r0:r1] if has_local else theta, lcoef[r0:r1] if has_local else coef_r,
            table, rows, n, coef_d.shape[1], m, p, HAS_LOCAL=has_local, SHARED_DIR=shared,
            ADAPTIVE=bool(adaptive), ACC=_TL[acc], ROUND_BF16=_round_bf16(out.dtype),
            BLOCK=block, num_warps=warps)


@_on_device
def restore_(param: Tensor, backup: Tensor) -> None:
    _check(param, backup)
    n = param.numel()
    if n == 0:
        return
    block, warps = config.elementwise_block(n)
    copy_kernel[(triton.cdiv(n, block),)](_bits(param), _bits(backup), n, BLOCK=block,
                                          num_warps=warps)


@_on_device
def combine_(out: Tensor, rows: Tensor, weights: Tensor) -> None:
    _check(out, rows)
    acc = _acc(out.dtype)
    n = out.numel()
    if n == 0:
        return
    w = weights.to(out.device, acc).contiguous()
    block, warps = config.elementwise_block(n)
    combine_kernel[(triton.cdiv(n, block),)](out, rows, w, rows.shape[0], n, ACC=_TL[acc],
                                             ROUND_BF16=_round_bf16(out.dtype), BLOCK=block,
                                             num_warps=warps)


@_on_device
def flat_gram_(sam: Tensor, loss: Tensor) -> Tensor:
    """Composed from the Triton ``sub_`` and ``gram`` kernels (two passes, not fused yet)."""
    sub_(sam, loss)
    return gram(sam)


@_on_device
def sub_(rows: Tensor, other: Tensor) -> None:
    if not (rows.is_contiguous() and other.is_contiguous()) or rows.shape != other.shape:
        torch_ref.sub_(rows, other)  # strided or broadcast: torch handles the indexing
        return
    _check(rows, other)
    n = rows.numel()
    if n == 0:
        return
    block, warps = config.elementwise_block(n)
    sub_kernel[(triton.cdiv(n, block),)](rows, other, n, ACC=_TL[_acc(rows.dtype)],
                                         ROUND_BF16=_round_bf16(rows.dtype), BLOCK=block,
                                         num_warps=warps)
