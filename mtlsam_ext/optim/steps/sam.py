"""SAM on the weighted average loss (Foret et al. 2021), then the aggregator at the perturbed
point.

One perturbation for every task: ``eps = rho g_0 / ||g_0||`` with ``g_0 = grad l_0``,
``l_0 = sum_i w_i l_i`` (Foret et al. eq. 2); then ``d = M(g_1(theta + eps), ...,
g_K(theta + eps))``. Heads are perturbed by their own normalised gradients (from the same
backward, ``w_i grad l_i``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext.optim.segments import whole
from mtlsam_ext.optim.task_rows import per_task_rows

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def step_sam(run: Run) -> Tensor:
    """One SAM step on ``l_0``, aggregated per task at ``theta + eps``. Returns the K losses
    at theta."""
    opt = run.opt
    losses = run.passes.first_losses()                      # the K losses at theta
    run.passes.zero_all()
    run.passes.backward(run.passes.average_loss(losses))   # g_0 = grad l_0 (and the heads')
    if run.global_sync:
        run.comm.reduce(run.passes.grads(), head_grads=True)
    coef = run.perturb.global_coef(run.passes.grads(), opt.rho)   # rho / ||T g_0||  (eq. 2)
    hc = run.perturb.head_coefs() if run.heads is not None else None
    offs = [whole(b.numel) for b in run.shared.buckets]
    run.perturb.perturb_shared(run.passes.grads(), [coef.reshape(1)] * len(offs), offs)
    if hc is not None:
        run.perturb.perturb_heads(hc)
    run.passes.zero_shared()
    pert = run.passes.call()                                # the K losses at theta + eps
    run.checks.perturbed_losses.extend(x.detach() for x in pert)
    run.checks.append(torch.stack([x.detach() for x in pert]))
    if opt.constant_weights is not None:  # one backward at the perturbed point
        run.update.weighted_backward(pert)
        run.perturb.restore_all()
        run.update.finish_weighted()
        return run.unperturbed
    rows = opt.work.buffers("rows", run.k)
    run.comm.begin_phase(rows)
    per_task_rows(run, pert, rows)                          # g_i(theta + eps)
    run.comm.reduce([], head_grads=True)
    run.perturb.restore_all()                               # theta back, bit for bit
    run.update.finish(rows)                                 # d = M(g_1, ..., g_K)
    return run.unperturbed
