"""F-MTL (Phan et al., "Improving multi-task learning via seeking task-based flat regions",
Alg. 1): per-task SAM on the shared part with the loss / flat decomposition.

Alg. 1, for every task i: line 2 ``g_i^loss = grad l_i(theta)``; line 3
``eps_i = rho g_i^loss / ||g_i^loss||`` (heads: ``rho_heads`` and their own gradient); line 4
``g_i^SAM = grad l_i(theta + eps_i)``; line 5 ``g_i^flat = g_i^SAM - g_i^loss``. Then lines 7-8:
``d = M(g^loss) + M(g^flat)`` (``decompose=True``) or ``M(g^SAM)``; line 9 is the base
optimizer's step. 2K gradient computations.

Rows 0..K-1 hold the loss gradients, rows K..2K-1 the SAM (then flat) gradients:
(2K + 1) |theta_sh| with the backup. With LS / mean the SAM gradients are summed by the
passes into one row instead ((K + 2) |theta_sh|, :func:`summed_passes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.sam_passes import sam_passes, summed_passes
from mtlsam_ext.optim.segments import whole
from mtlsam_ext.optim.task_rows import per_task_rows

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def step_fmtl(run: Run) -> Tensor:
    """One F-MTL step (Alg. 1). Returns the K losses at theta."""
    opt = run.opt
    losses = run.passes.first_losses()
    k = run.k
    summed = summed_passes(run)  # LS / mean: the SAM gradients summed in one buffer, no SAM rows
    rows = opt.work.buffers("rows", k) if summed else opt.work.buffers("rows2", 2 * k)
    run.passes.zero_all()
    if run.global_sync:  # the loss rows travel while the later tasks' passes run
        run.comm.begin_phase([r[:k] for r in rows])
    per_task_rows(run, losses, rows)                        # line 2: g_i^loss
    if run.global_sync:
        run.comm.reduce([], head_grads=True)
    hc = run.perturb.head_coefs() if run.heads is not None else None   # line 3, heads
    offs = [whole(b.numel) for b in run.shared.buckets]
    coefs = run.perturb.row_coefs(rows, k, opt.rho)         # line 3: rho / ||g_i^loss||
    if summed:  # K loss rows, one summed row and the backup: (K + 2) |theta_sh|
        sums = opt.work.buffers("sam_sum", 1)
        run.comm.begin_phase(sums)
        sam_passes(run, rows, [coefs.reshape(k, 1)] * len(offs), offs, sums, 0, hc,
                   summed=True)                             # line 4, summed over i
        run.perturb.restore_shared()
        run.comm.reduce([], head_out=True)
        run.perturb.heads_to_grad()
        run.update.finish_summed(sums)                      # lines 7-8 with constant weights
        return run.unperturbed
    # SAM rows (and, with local perturbations, the loss rows too) in one phase; task i's
    # loss row is its direction, read by its own pass only, so it may travel after that pass
    run.comm.begin_phase([r[k:] for r in rows] if run.global_sync
                         else [r[:k] for r in rows] + [r[k:] for r in rows])
    sam_passes(run, [r[:k] for r in rows], [coefs.reshape(k, 1)] * len(offs), offs, rows, k,
               hc)                                          # line 4: g_i^SAM into row K + i
    run.perturb.restore_shared()
    run.comm.reduce([], head_out=True)
    run.perturb.heads_to_grad()
    if opt.decompose:
        # Two K x K Grams rather than one 2K x 2K: the loss block then has exactly the bits
        # ERM computes, so rho = 0 reproduces ERM's update (the cross block is never used).
        w_loss, _ = run.update.weights([r[:k] for r in rows])           # line 7: M(g^loss)
        if opt.constant_weights is None:
            # line 5: flat = SAM - loss in place, its Gram taken in the same pass
            w_flat = run.update.aggregate(run.update.true_gram(
                [ops.flat_gram_(r[k:], r[:k], backend=run.be) for r in rows]))
        else:
            for r in rows:
                ops.sub_(r[k:], r[:k], backend=run.be)                  # line 5
            w_flat, _ = run.update.weights([r[k:] for r in rows])
        # line 8: d = M(g^loss) + M(g^flat) as one combine of the 2K rows. No Gram of the
        # whole update (the loss/flat cross block is never formed): a clip norm, if asked
        # for, is read from the combined gradient.
        run.update.finish_update(rows, torch.cat([w_loss, w_flat.to(w_loss.dtype)]), None)
    else:
        run.update.finish([r[k:] for r in rows])            # d = M(g^SAM)
    return run.unperturbed
