"""Forward-only task-local gradients on the sampled layers (``local_grad="zo"``).

docs/design.md §1a, after the global-local report's "two forward passes per task": for each of
``n_dirs`` Gaussian directions z_j over the sampled layers, perturb those layers by ``+mu z_j``
and ``-mu z_j`` in place (through the fused perturb/restore ops), run one forward each, and
use every forward's K losses at once:

    ghat_i = (1 / n_dirs) sum_j (l_i(theta + mu z_j) - l_i(theta - mu z_j)) / (2 mu) z_j.

The directions are drawn from a generator seeded by ``(seed, step, j)``, so they can be
regenerated (and are never kept beyond the direction in use). For a quadratic the central
difference is exact, so the estimator is then the projection of the true gradient on the
directions: unbiased, with variance falling as 1 / n_dirs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.segments import whole

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def direction_seed(seed: int, step: int, j: int) -> int:
    """The seed of direction ``j`` at ``step`` (documented so tests can regenerate them)."""
    return (seed * 1_000_003 + step * 10_007 + j) % (2**63 - 1)


def directions(sizes: list[int], dtypes: list[torch.dtype], device: torch.device, seed: int,
               out: list[Tensor] | None = None) -> list[Tensor]:
    """One Gaussian direction over the sampled layers, per bucket (compact layout); drawn into
    ``out`` (float32 ``[M_b]`` tensors) when given: the same numbers, no allocation."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if out is None:
        out = [torch.empty(m, device=device, dtype=torch.float32) for m in sizes]
    return [torch.randn(m, generator=g, device=device, dtype=torch.float32, out=o).to(dt)
            for m, dt, o in zip(sizes, dtypes, out)]


def zo_local_grads(run: Run, tables: list[tuple[Tensor, Tensor, Tensor, int]],
                   sum_over_ranks: bool = False) -> list[Tensor]:
    """``[K, M_b]`` forward-only estimates of the task gradients on the sampled layers.

    Costs ``2 n_dirs`` forwards and no backward. Parameters are restored bit-exactly from the
    step's backup afterwards (and by the step's undo path if a closure fails meanwhile).

    ``sum_over_ranks``: the estimate is linear in the ``[n_dirs, K]`` central differences and
    the directions are the same on every rank (seeded), so data parallelism sums those
    ``n_dirs * K`` numbers in one collective, not the ``[K, M]`` rows; the directions are then
    drawn a second time to form the rows (a Gaussian draw over M, no forward).
    """
    opt, sh = run.opt, run.shared
    k, mu, n_dirs = run.k, opt.mu, opt.n_dirs
    for j, b in enumerate(sh.buckets):  # one full backup: the undo path restores everything
        run.perturb.backup[j][0].copy_(b.data)
    run.perturb.shared_saved = True
    accs = [torch.float64 if b.dtype == torch.float64 else torch.float32 for b in sh.buckets]
    # persistent work tensors (see MTLSAM.scratch): the estimates and the direction
    local = opt.work.scratch("zo_local", [((k, t[3]), a) for t, a in zip(tables, accs)])
    for loc in local:
        loc.zero_()
    sizes = [t[3] for t in tables]
    dtypes = [b.dtype for b in sh.buckets]
    z_out = opt.work.scratch("zo_direction", [((m,), torch.float32) for m in sizes])
    # runs of adjacent sampled segments (a layer's weight and bias, neighbouring layers): one
    # op per run instead of one per segment, the same value for every element
    runs = opt.work.sampled_runs(opt.sampled_layers)
    diffs: list[Tensor] = []
    for d in range(n_dirs):
        z = directions(sizes, dtypes, sh.device, direction_seed(opt.zo_seed, opt._step_count, d),
                       z_out)
        evals = []
        for sign in (1.0, -1.0):
            for j, b in enumerate(sh.buckets):
                for s, n, q in runs[j]:
                    if n:
                        # theta_S = backup_S + (+-mu) z on each sampled range; the rest untouched
                        ops.mix_perturb_(b.data[s:s + n], run.perturb.backup[j][0][s:s + n],
                                         z[j][q:q + n], _coef(sign * mu, b.dtype, b.device),
                                         whole(n), save_backup=False, backend=run.be)
            losses = run.passes.call()
            evals.append(torch.stack([x.detach() for x in losses]))
        c = (evals[0] - evals[1]) / (2 * mu * n_dirs)  # [K] central differences
        run.checks.append(c)
        if sum_over_ranks:
            diffs.append(c)
            continue
        for loc, zj in zip(local, z):
            loc.addcmul_(c.to(loc.dtype).unsqueeze(1), zj.to(loc.dtype).unsqueeze(0))
    for j, b in enumerate(sh.buckets):
        ops.restore_(b.data, run.perturb.backup[j][0], backend=run.be)
    if sum_over_ranks:
        summed = torch.stack(diffs)
        run.comm.reduce([summed])
        for d in range(n_dirs):
            z = directions(sizes, dtypes, sh.device,
                           direction_seed(opt.zo_seed, opt._step_count, d), z_out)
            for loc, zj in zip(local, z):
                loc.addcmul_(summed[d].to(loc.dtype).unsqueeze(1), zj.to(loc.dtype).unsqueeze(0))
    return [loc.to(b.dtype) for loc, b in zip(local, sh.buckets)]


@functools.lru_cache(maxsize=64)
def _coef(v: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The one-segment coefficient ``[v]`` on the parameters' device (cached: read-only, the
    same every step; made on the CPU it was copied to a GPU by every op call)."""
    return torch.tensor([v], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=device)

