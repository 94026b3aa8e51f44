"""Pure-torch reference kernels: the definition every other backend must match.

All kernels work on flat 1-D tensors (or ``[R, N]`` row matrices) plus segment tables:

* ``offsets``: int64, length ``S + 1``, non-decreasing, ``offsets[0] = 0`` and
  ``offsets[-1] = N``; segment ``s`` is ``x[offsets[s]:offsets[s + 1]]`` (may be empty).
* a *sampled* table ``(starts, lengths, local_starts)``: int64, length ``P`` each; sampled
  segment ``p`` is ``x[starts[p]:starts[p] + lengths[p]]`` in the flat buffer and
  ``local[:, local_starts[p]:local_starts[p] + lengths[p]]`` in a ``[K, M]`` matrix of
  task-local gradients (a compact buffer, or the previous step's SAM rows when
  ``local_starts == starts``).

Accumulation is in float32 for 16- and 32-bit inputs and float64 for float64 inputs; the
order of every reduction is fixed (sequential over rows) so that compiled backends can
reproduce it exactly where they choose to.

The adaptive (ASAM) variants use ``T = |theta|`` (Kwon et al. 2021; F-MTL appendix C.2):
norms are of ``T * v`` and perturbations are ``T**2 * v`` scaled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlsam_ext.kernels.device_tables import on_device


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths(offsets: Tensor, device: torch.device) -> Tensor:
    """Segment lengths on ``device``: the tables stay on the CPU (where the flat-buffer module
    keeps them) while the data may be on a GPU, and torch's indexing ops refuse to mix them
    (the table's device copy is kept, see device_tables)."""
    off = on_device(offsets, device)
    return off[1:] - off[:-1]


def _segment_ids(offsets: Tensor, n: int, device: torch.device) -> Tensor:
    lengths = _lengths(offsets, device)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths,
                                   output_size=n)


def segment_sumsq(x: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
    """Per-segment sum of squares ``sum_{j in s} (T_j x_j)^2`` (T = |scale| or 1).

    Gives the per-layer squared norms ``||g0_l||^2`` of docs/design.md §1a step 3 and, summed, the
    global ``||g||^2`` of the SAM perturbation ``eps = rho g / ||g||`` (Foret et al. 2021, eq. 2).
    Returns ``[S]`` in the accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    v = x.to(acc)
    if scale is not None:
        v = v * scale.to(acc)
    sq = v * v
    out = torch.zeros(offsets.numel() - 1, dtype=acc, device=x.device)
    if x.numel():
        out.index_add_(0, _segment_ids(offsets, x.numel(), x.device), sq)
    return out


def gl_layer_stats(g0: Tensor, local: Tensor, starts: Tensor, lengths: Tensor,
                   local_starts: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per sampled layer and task: ``<T g0_l, T ghat_il>`` and ``||T ghat_il||^2``.

    These give ``||m_il||^2 = a^2 ||g0_l||^2 + 2a(1-a) <g0_l, ghat_il> + (1-a)^2 ||ghat_il||^2``
    (docs/design.md §1a step 3, global-local report eq. for eps_hat_{i,sh}) for every task from one
    read of ``(g0, ghat_1..K)``. Returns ``(dots [K, P], sq [K, P])`` in the accumulation dtype.
    """
    acc = acc_dtype(g0.dtype)
    k = local.shape[0]
    dots = torch.zeros(k, starts.numel(), dtype=acc, device=g0.device)
    sq = torch.zeros_like(dots)
    for p, (s, n, ls) in enumerate(zip(starts.tolist(), lengths.tolist(), local_starts.tolist())):
        a = g0[s:s + n].to(acc)
        loc = local[:, ls:ls + n].to(acc)
        if scale is not None:
            t = scale[s:s + n].to(acc)
            a = a * t
            loc = loc * t
        dots[:, p] = (loc * a).sum(dim=1)
        sq[:, p] = (loc * loc).sum(dim=1)
    return dots, sq


def mix_perturb_(param: Tensor, backup: Tensor, g0: Tensor, coef: Tensor, offsets: Tensor,
                 local: Tensor | None = None, local_coef: Tensor | None = None,
                 starts: Tensor | None = None, lengths: Tensor | None = None,
                 local_starts: Tensor | None = None, adaptive: bool = False,
                 save_backup: bool = True) -> None:
    """In place: ``theta = theta0 + T^2 (a_l g0 + b_p ghat)`` with ``theta0`` saved to ``backup``.

    ``coef[s]`` (``a``) scales ``g0`` on segment ``s`` of ``offsets``; ``local_coef[p]`` (``b``)
    scales the 1-D local gradient row ``local`` on sampled segment ``p``. This is the
    global-local perturbation ``eps_i = a g0 + b ghat_i`` of the report's eq. for
    ``eps_hat_{i,sh}`` (coefficients from :mod:`mtlsam_ext.optim.perturbation`) and, with no
    local part, plain SAM's ``eps = rho g/||g||``. ``T = |theta0|`` when ``adaptive``.

    With ``save_backup`` the current ``param`` is first copied to ``backup``; without it
    ``param`` is rebuilt from ``backup`` (so consecutive tasks need no restore in between).
    """
    acc = acc_dtype(param.dtype)
    if save_backup:
        backup.copy_(param)
    n = param.numel()
    base = backup.to(acc)
    a = torch.repeat_interleave(coef.to(param.device, acc), _lengths(offsets, param.device),
                                output_size=n)
    eps = a * g0.to(acc)
    if local is not None and local_coef is not None and starts is not None:
        for p, (s, ln, ls) in enumerate(zip(starts.tolist(), lengths.tolist(),
                                            local_starts.tolist())):
            eps[s:s + ln] += local_coef[p].to(acc) * local[ls:ls + ln].to(acc)
    if adaptive:
        eps = eps * (base * base)
    param.copy_((base + eps).to(param.dtype))


def perturb_points_(out: Tensor, theta: Tensor, directions: Tensor, coefs: Tensor,
                    offsets: Tensor, local: Tensor | None = None,
                    local_coefs: Tensor | None = None, starts: Tensor | None = None,
                    lengths: Tensor | None = None, local_starts: Tensor | None = None,
                    adaptive: bool = False) -> None:
    """All K perturbed points at once: ``out[i] = theta + T^2 (A_i d_i + B_i ghat_i)``.

    Row ``i`` is exactly what :func:`mix_perturb_` writes into the parameters for task ``i``
    (``coefs[i]`` per segment, direction ``directions[i]``, or ``directions[0]`` for every task
    when it has one row, local row ``local[i]`` scaled by ``local_coefs[i]`` per sampled
    segment), so the batched passes evaluate the same points, bit for bit, as the sequential
    ones: the global-local ``eps_hat_{i,sh}`` (report, Alg. 1) or F-MTL's per-task
    ``eps_i = rho g_i / ||g_i||`` (Phan et al., Alg. 1 line 3). ``T = |theta|`` when
    ``adaptive``. ``theta`` is only read.
    """
    shared_dir = directions.shape[0] == 1
    for i in range(out.shape[0]):
        mix_perturb_(out[i], theta, directions[0 if shared_dir else i], coefs[i], offsets,
                     None if local is None else local[i],
                     None if local_coefs is None else local_coefs[i], starts, lengths,
                     local_starts, adaptive=adaptive, save_backup=False)


def restore_(param: Tensor, backup: Tensor) -> None:
    """Bit-exact restore of ``theta0`` saved by :func:`mix_perturb_`."""
    param.copy_(backup)


def gram(rows: Tensor) -> Tensor:
    """``G[i, j] = <m_i, m_j>`` of an ``[R, N]`` matrix (docs/design.md §1c), in fp32/fp64."""
    m = rows.to(acc_dtype(rows.dtype))
    g = m @ m.T
    # BLAS need not give G[i, j] == G[j, i] bit for bit; mirror the upper triangle so the
    # aggregators always see an exactly symmetric matrix.
    return torch.triu(g) + torch.triu(g, 1).T


def segment_gram(rows: Tensor, offsets: Tensor) -> Tensor:
    """``G[s, i, j] = <m_i, m_j>`` restricted to segment ``s`` of an ``[R, N]`` matrix: the
    per-layer Gram matrices ``[S, R, R]`` (fp32/fp64) from which the per-layer task cosine
    similarities of the global-local report (§V, Fig. 2) are read; summed over ``s`` they
    give :func:`gram`. Exactly symmetric; an empty segment gives zeros."""
    m = rows.to(acc_dtype(rows.dtype))
    r = rows.shape[0]
    out = torch.zeros(offsets.numel() - 1, r, r, dtype=m.dtype, device=rows.device)
    for s, (a, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if e > a:
            g = m[:, a:e] @ m[:, a:e].T
            out[s] = torch.triu(g) + torch.triu(g, 1).T
    return out


def combine_(out: Tensor, rows: Tensor, weights: Tensor) -> None:
    """``out = sum_i w_i m_i`` (the aggregated update ``d = sum_i w_i g_i``, docs/design.md §1c).

    Accumulated sequentially in row order, so that appending rows whose weight times value is
    exactly zero leaves the result bit-identical (F-MTL with rho = 0 equals ERM exactly).
    """
    acc = acc_dtype(out.dtype)
    w = weights.to(acc)
    total = torch.zeros(out.shape, dtype=acc, device=out.device)
    for i in range(rows.shape[0]):
        total.add_(rows[i].to(acc) * w[i])
    out.copy_(total.to(out.dtype))


def sub_(rows: Tensor, other: Tensor) -> None:
    """``rows -= other`` in place: F-MTL's ``g_flat = g_SAM - g_loss`` (Alg. 1 line 5)."""
    rows.sub_(other)


def flat_gram_(sam: Tensor, loss: Tensor) -> Tensor:
    """F-MTL's flat gradients in place, ``sam -= loss`` (Alg. 1 line 5), and their Gram matrix.

    Defined as :func:`sub_` followed by :func:`gram` of the stored (rounded) flat rows; fused
    backends do both in one pass, saving the Gram's separate read of the K flat rows.
    """
    sub_(sam, loss)
    return gram(sam)
