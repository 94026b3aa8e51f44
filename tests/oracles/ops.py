"""Float64 oracle of the flat-buffer ops, written from the formulas with explicit loops.

Independent of :mod:`mtlsam_ext.kernels.torch_ref`: segments are walked one by one in
Python and every quantity is computed in float64 from its definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def segment_sumsq(x: Tensor, offsets: list[int], scale: Tensor | None = None) -> Tensor:
    x = x.to(F64)
    t = torch.ones_like(x) if scale is None else scale.to(F64).abs()
    return torch.stack([((t[a:b] * x[a:b]) ** 2).sum() if b > a else torch.zeros((), dtype=F64)
                        for a, b in zip(offsets[:-1], offsets[1:])])


def gl_layer_stats(g0: Tensor, local: Tensor, sampled: list[tuple[int, int, int]],
                   scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    g0 = g0.to(F64)
    local = local.to(F64)
    t = torch.ones_like(g0) if scale is None else scale.to(F64).abs()
    k = local.shape[0]
    dots = torch.zeros(k, len(sampled), dtype=F64)
    sq = torch.zeros_like(dots)
    for p, (s, n, ls) in enumerate(sampled):
        for i in range(k):
            a = t[s:s + n] * g0[s:s + n]
            b = t[s:s + n] * local[i, ls:ls + n]
            dots[i, p] = torch.dot(a, b)
            sq[i, p] = torch.dot(b, b)
    return dots, sq


def perturbed(theta: Tensor, g0: Tensor, coef: list[float], offsets: list[int],
              local: Tensor | None = None, local_coef: list[float] | None = None,
              sampled: list[tuple[int, int, int]] | None = None,
              adaptive: bool = False) -> Tensor:
    """``theta + T^2 (a_l g0 + b_p ghat)`` in float64."""
    th = theta.to(F64)
    eps = torch.zeros_like(th)
    for c, a, b in zip(coef, offsets[:-1], offsets[1:]):
        eps[a:b] += c * g0.to(F64)[a:b]
    if local is not None:
        for c, (s, n, ls) in zip(local_coef, sampled):
            eps[s:s + n] += c * local.to(F64)[ls:ls + n]
    if adaptive:
        eps = eps * th * th
    return th + eps


def gram(rows: Tensor) -> Tensor:
    m = rows.to(F64)
    k = m.shape[0]
    return torch.tensor([[float(torch.dot(m[i], m[j])) for j in range(k)] for i in range(k)],
                        dtype=F64)


def combine(rows: Tensor, w: Tensor) -> Tensor:
    m = rows.to(F64)
    out = torch.zeros(m.shape[1], dtype=F64)
    for i in range(m.shape[0]):
        out += float(w[i]) * m[i]
    return out


def segment_gram(rows: Tensor, offsets: list[int]) -> Tensor:
    """Per-segment Gram matrices, term by term in float64: ``G[s, i, j] = sum_n m_in m_jn``
    over the columns of segment ``s`` (the per-layer task inner products of the global-local
    report, §V)."""
    m = rows.double()
    r = m.shape[0]
    out = torch.zeros(len(offsets) - 1, r, r, dtype=torch.float64)
    for s in range(len(offsets) - 1):
        a, e = offsets[s], offsets[s + 1]
        for i in range(r):
            for j in range(r):
                out[s, i, j] = (m[i, a:e] * m[j, a:e]).sum()
    return out
