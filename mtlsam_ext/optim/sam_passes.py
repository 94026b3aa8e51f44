"""The K perturbed passes: task i's loss at its own point ``theta + eps_i``, its gradient into
row i (or, with LS / mean, added into one summed row), head i's SAM gradient kept.

Sequential passes (one closure call and one backward per task), or batched passes
(:mod:`mtlsam_ext.optim.batched`: the points written as ``[K, N]`` rows by one op, the closure
run under ``vmap``, one backward), per the ``batched`` policy; ``batched="auto"`` runs both on
its trial steps.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.batched import BatchedError
from mtlsam_ext.optim.dtypes import acc_dtype
from mtlsam_ext.optim.task_rows import agree, trial_buffers_freed

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def sam_passes(run: Run, dirs: list[Tensor], coefs: list[Tensor], offs: list[Tensor],
                rows: list[Tensor], first_row: int, hc: Tensor | None,
                local: list[Tensor] | None = None, local_coefs: list[Tensor] | None = None,
                tables: list | None = None, summed: bool = False,
                split: tuple[list[Tensor], list[int]] | None = None) -> None:
    """The K perturbed passes: rows ``first_row + i`` := the shared gradient of loss i at
    ``theta + eps_i`` (``eps_i`` from row ``i`` of ``coefs`` / ``local_coefs`` / ``local`` and
    the direction ``dirs[b][i]``, or ``dirs[b][0]`` for all), head i's SAM gradient kept by
    :meth:`Perturber.finish_head`; the shared parameters are left perturbed (or not) for the
    caller's :meth:`Perturber.restore_shared`. Sequential passes, or one batched pass
    (:mod:`mtlsam_ext.optim.batched`), per ``batched``.

    ``summed`` (sequential passes only, see :func:`summed_passes`): every pass accumulates into row
    ``first_row``, which ends as ``sum_i g_i^SAM``; with ``split = (locals, layers)`` the
    gradients of those layers go to row ``i`` of the compact ``locals`` instead (gl-lagged's
    next local gradients) and row ``first_row`` sums the other layers only."""
    k = run.k
    state = run.opt.batched.state("points")
    # the kernels take their coefficients in the accumulation dtype: converted once here,
    # not per task and bucket inside the loop
    accs = [acc_dtype(b.dtype) for b in run.shared.buckets]
    coefs = [c.to(a) for c, a in zip(coefs, accs)]
    if local_coefs is not None:
        local_coefs = [c.to(a) for c, a in zip(local_coefs, accs)]
    if state == "batched":  # (never summed: summed_passes asks for sequential passes)
        _batched_sam_passes(run, dirs, coefs, offs, rows, first_row, hc, local, local_coefs,
                            tables)
        return
    t0 = run.clock() if state == "trial" else 0.0
    for r in rows:  # the SAM passes accumulate straight into the rows (or the one sum)
        r[first_row:first_row + (1 if summed else k)].zero_()
    for loc in split[0] if split is not None else []:
        loc.zero_()
    if hc is not None:  # every head at its own task's point; no other loss reaches it
        run.perturb.perturb_heads(hc)
    for i in range(k):
        _perturb_task(run, i, dirs, coefs, offs, local, local_coefs, tables)
        loss = run.passes.perturbed_loss(i)
        if split is not None:
            run.passes.backward_split(loss, rows, split[0], i, split[1])
        else:
            run.passes.backward_into(loss, rows, first_row if summed else first_row + i)
        run.perturb.finish_head(i)
        if state != "trial" and not summed:  # (a trial compares the rows first: they are
            run.comm.row_ready(i)                 # sent at the end; the sum is final at the end)
    if summed:
        run.comm.row_ready(0)
    if state == "trial":  # batched = "auto": the batched way too, into scratch rows
        policy = run.opt.batched
        if summed or not summable(run):
            # the sequential way timed as the steady state runs it: with LS / mean that is the
            # summed passes (second trial step on), not the rows the first step compares
            policy.record("points", "sequential", run.clock() - t0)
        scratch = [t[:k] for t in run.opt.work.buffers("rows_trial", k)]
        t0 = run.clock()
        try:
            _batched_sam_passes(run, dirs, coefs, offs, scratch, 0, hc, local, local_coefs,
                                tables, trial=True)
        except BatchedError as err:
            policy.fall_back("points", str(err))
            scratch = None
        else:
            policy.record("points", "batched", run.clock() - t0)
        # (the heads' gradients the trial left are overwritten by heads_to_grad)
        if summed:
            trial_buffers_freed(run)
        else:
            agree(run, "points", [r[first_row:first_row + k] for r in rows], scratch,
                   heads=True)
            policy.phases["points"].checked = True


def _perturb_task(run: Run, i: int, dirs: list[Tensor], coefs: list[Tensor],
                  offs: list[Tensor], local: list[Tensor] | None,
                  local_coefs: list[Tensor] | None, tables: list | None) -> None:
    """The shared parameters at task ``i``'s point (see :func:`sam_passes`)."""
    run.perturb.perturb_shared(
        [d[0 if d.shape[0] == 1 else i] for d in dirs], [c[i] for c in coefs], offs,
        local=None if local is None else [loc[i] for loc in local],
        local_coefs=None if local_coefs is None else [c[i] for c in local_coefs],
        tables=tables)


def _batched_sam_passes(run: Run, dirs: list[Tensor], coefs: list[Tensor], offs: list[Tensor],
                        rows: list[Tensor], first_row: int, hc: Tensor | None,
                        local: list[Tensor] | None, local_coefs: list[Tensor] | None,
                        tables: list | None, trial: bool = False) -> None:
    """:func:`sam_passes` as batched passes of ``task_chunk`` points: the points written by
    :func:`ops.perturb_points_`, one vmapped forward, one backward into the rows."""
    opt, k, sh = run.opt, run.k, run.shared
    chunk = min(k, opt.batched.task_chunk or k)
    points = opt.work.buffers("points", chunk)
    if hc is not None:  # every head at its own task's point; no other loss reaches it
        run.perturb.perturb_heads(hc)
    randomness = "error" if opt.batched.mode == "auto" else "different"
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        pts, dsts = [], []
        for j, b in enumerate(sh.buckets):
            acc = acc_dtype(b.dtype)
            theta = run.perturb.backup[j][0] if run.perturb.shared_saved else b.data
            has_local = local is not None and tables[j][0].numel() > 0
            st, ln, ls, _ = tables[j] if has_local else (None, None, None, None)
            d = dirs[j] if dirs[j].shape[0] == 1 else dirs[j][c0:c1]
            out = points[j][:c1 - c0]
            ops.perturb_points_(out, theta, d, coefs[j][c0:c1].to(acc), offs[j],
                                local[j][c0:c1] if has_local else None,
                                local_coefs[j][c0:c1].to(acc) if has_local else None, st, ln,
                                ls, adaptive=opt.adaptive, backend=run.be)
            pts.append(out)
            dst = rows[j][first_row + c0:first_row + c1]
            dst.zero_()
            dsts.append(dst)
        losses = run.passes.call_points(sh.point_leaves(pts, dsts), c0, randomness)
        with torch.enable_grad():
            total = losses.sum()
        with warnings.catch_warnings():
            # The rows' column blocks are strided views; autograd adds into them in place
            # all the same, and says that a dense layout "may" be faster.
            warnings.filterwarnings("ignore", message="grad and param do not obey")
            run.passes.backward(total)
        if not trial:
            run.checks.perturbed_losses.extend(losses.detach().unbind(0))
            run.checks.append(losses.detach())
    if not trial:
        for i in range(k):
            run.perturb.finish_head(i)


def summed_passes(run: Run) -> bool:
    """Whether the update can be taken from the sum of the SAM gradients, accumulated by the K
    sequential passes in one buffer: LS and mean weigh every task's SAM gradient by a constant
    (``d = w sum_i g_i^SAM``, ``w`` = 1 or 1/K), so the ``[K, N]`` SAM rows, their zeroing and
    the K-row combine are not needed (F-MTL with ``decompose``: ``sum_i g_loss_i + sum_i
    g_flat_i`` is the same sum). Equal to the row-wise update to rounding, not to the bit.
    Rows are still kept where something else reads them: batched passes (and the first step
    of a ``batched="auto"`` trial, which compares the batched rows with sequential ones), layer
    scores (per-layer Grams), gl-lagged's local gradients when the layers change or the ranks
    exchange rows (with fixed layers in one process only the sampled layers keep per-task
    rows, see :func:`lagged_summed_update`). 16-bit parameters keep the rows too: autograd adds
    into a gradient of the parameters' dtype, so the sum would be rounded to bf16/fp16 after
    each of the K passes, where the combine sums the rows in float32 and rounds once."""
    phase = run.opt.batched.phases["points"]
    # batched="auto": the first trial step compares the batched rows with sequential ones; the
    # later trial steps run (and time) the summed passes the sequential steps would run
    return summable(run) and (phase.state == "sequential"
                               or (phase.state == "trial" and phase.checked))


def summable(run: Run) -> bool:
    """:func:`summed_passes` apart from the batched passes: the configuration would sum the SAM
    gradients whenever the K perturbed passes run sequentially."""
    opt = run.opt
    if any(b.dtype not in (torch.float32, torch.float64) for b in run.shared.buckets):
        return False
    if opt.method == "gl" and opt.local_grad == "lagged":
        # the next step's local gradients come from this step's SAM gradients on the sampled
        # layers: kept per task by the split passes (:func:`lagged_summed_update`), where the
        # selection cannot change and no collective is needed; rows otherwise
        if opt.layer_selector.mode is not None or run.sync is not None:
            return False
    return (opt.constant_weights is not None and opt.batched.state("points") != "batched"
            and not opt.layer_selector.measures)
