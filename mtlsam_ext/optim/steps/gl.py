"""Global-local sampled SAM (the report's Algorithm 1; docs/design.md §1a).

Alg. 1, at step t: line 4 the average-loss gradient ``g_0 = grad l_0(theta_t)``,
``l_0 = sum_i w_i l_i``; lines 5-8, for every task i, the task-local gradient ``ghat_i`` on the
sampled layers only; line 9 the perturbation ``eps_i``, per layer a mix of ``g_0`` and
``ghat_i`` with weight ``alpha``, normalised in magnitude; line 10 ``g_i^SAM =
grad l_i(theta_t + eps_i)``; line 12 ``d_t = M(g_1^SAM, ..., g_K^SAM)``, the base optimizer's
step. K + 1 gradient computations (``local_grad="autograd"``: K more restricted to the
sampled layers; ``"lagged"`` reuses the last step's SAM gradients there, ``"zo"`` estimates
them with forwards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.sam_passes import sam_passes, summed_passes
from mtlsam_ext.optim.steps.gl_coefs import mixing_coefs
from mtlsam_ext.optim.steps.gl_local import keep_lagged, lagged_summed_update, local_gradients
from mtlsam_ext.optim.zeroth_order import zo_local_grads

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def step_gl(run: Run) -> Tensor:
    """One global-local step (Alg. 1, lines 4-12). Returns the K losses at theta."""
    opt = run.opt
    sh = run.shared
    losses = run.passes.first_losses()                      # the K losses at theta
    k = run.k
    sampled = opt.sampled_layers
    tables = opt.work.sampled_tables(sampled)
    local, local_scale, from_lag = local_gradients(run, losses, sampled, tables)  # lines 6-8
    run.passes.zero_all()
    run.passes.backward(run.passes.average_loss(losses))   # line 4: g_0 (and the heads')
    g0 = opt.work.buffers("g0", 1)
    for j, b in enumerate(sh.buckets):
        g0[j][0].copy_(b.grad)
    if run.global_sync:  # g0, the heads' gradients and exact local gradients: one phase
        begun = run.comm.phase is not None  # (the local rows, already on their way)
        exact_local = [] if opt.local_grad == "zo" or from_lag or begun else local
        run.comm.reduce([g[0] for g in g0] + list(exact_local), head_grads=True)
    hc = run.perturb.head_coefs() if run.heads is not None else None
    if opt.local_grad == "zo" and not local:
        # Forward-only estimates after the first graph is consumed: a forward updates
        # BatchNorm buffers in place, which the first graph's backward would refuse.
        local = zo_local_grads(run, tables, sum_over_ranks=run.global_sync)
    coef_a, coef_b, seg_layers, samp_layers = mixing_coefs(     # line 9: eps_i = A g_0 + B ghat_i
        run, g0, local, local_scale, sampled, tables)

    summed = summed_passes(run)  # LS / mean: the SAM gradients summed in one buffer, no rows
    lagged_summed = summed and opt.local_grad == "lagged"
    rows = opt.work.buffers("sam_sum", 1) if summed else opt.work.buffers("rows", k)
    run.comm.begin_phase(rows)
    offs = [b.seg_offsets for b in sh.buckets]
    # every task's per-segment coefficients gathered once (one index per bucket, not per task)
    ca = [coef_a[:, s] for s in seg_layers]
    cb = [coef_b[:, ids] for ids in samp_layers]
    # the compact [K, M_b] rows the split passes write the next step's local gradients into
    # (two sets alternate with the lag the step reads, see lagged_summed_update)
    nxt = opt.work.scratch("lag_next", [((k, tb[3]), b.dtype)
                                        for tb, b in zip(tables, sh.buckets)]
                           ) if lagged_summed else None
    sam_passes(run, g0, ca, offs, rows, 0, hc, local=local, local_coefs=cb, tables=tables,
               summed=summed, split=None if nxt is None else (nxt, sampled))   # line 10
    run.perturb.restore_shared()
    run.comm.reduce([], head_out=True)
    run.perturb.heads_to_grad()
    selector = opt.layer_selector
    if lagged_summed:
        lagged_summed_update(run, rows, nxt, sampled)
        run.on_commit.append(lambda: selector.commit(opt.generator))
        return run.unperturbed
    if summed:                                              # line 12 with constant weights
        run.update.finish_summed(rows)
    elif selector.measures:
        _finish_with_layer_scores(run, rows, seg_layers)    # line 12, scoring the layers
    else:
        run.update.finish(rows)                             # line 12: d = M(g^SAM)
    run.on_commit.append(lambda: selector.commit(opt.generator))
    if opt.local_grad == "lagged":
        keep_lagged(run, rows)
    return run.unperturbed


def _finish_with_layer_scores(run: Run, rows: list[Tensor], seg_layers: list[Tensor]) -> None:
    """``layers="adaptive"``: per-layer Grams of the SAM rows for the layer scores; their sum
    is the aggregator's Gram matrix, so the pass replaces the Gram pass (with LS/mean it is an
    extra read of the rows)."""
    opt, sh, k = run.opt, run.shared, run.k
    layer_gram = torch.zeros(len(sh.layers), k, k, dtype=torch.float64, device=sh.device)
    grams = []
    for r, b, seg in zip(rows, sh.buckets, seg_layers):
        sg = ops.segment_gram(r, b.seg_offsets, backend=run.be)
        layer_gram.index_add_(0, seg, sg.double())
        grams.append(sg.sum(0))
    layer_gram, *grams = run.comm.partial_sums(layer_gram, *grams)  # (sharded: summed)
    opt.layer_selector.observe(layer_gram)
    g = run.update.true_gram(grams, partial=False)
    w = run.update.aggregate(g) if opt.constant_weights is None else run.update.weights(rows)[0]
    run.update.finish_update(rows, w, g)
