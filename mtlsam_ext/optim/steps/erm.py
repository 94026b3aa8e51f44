"""ERM: no perturbation, ``d = M(g_1, ..., g_K)`` at theta (the cost baseline).

With LS and mean the update is the gradient of ``sum_i w_i l_i``: one backward replaces the K
per-task passes, the rows, the Gram matrix and the combine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mtlsam_ext.optim.task_rows import per_task_rows

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def step_erm(run: Run) -> Tensor:
    """Per-task gradients, then ``d = M(g_1..g_K)``; one backward of the weighted loss for
    LS and mean. Returns the K losses at theta."""
    losses = run.passes.first_losses()                      # the K losses at theta
    run.passes.zero_all()
    if run.opt.constant_weights is not None:                # LS / mean: one backward
        run.update.weighted_backward(losses)
        run.update.finish_weighted()
        return run.unperturbed
    rows = run.opt.work.buffers("rows", run.k)
    run.comm.begin_phase(rows)
    per_task_rows(run, losses, rows)                        # g_i = grad l_i(theta)
    run.comm.reduce([], head_grads=True)
    run.update.finish(rows)                                 # d = M(g_1, ..., g_K)
    return run.unperturbed
