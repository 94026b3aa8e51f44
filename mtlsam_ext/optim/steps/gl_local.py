"""Global-local SAM's task-local gradients ``ghat_i`` on the sampled layers (report Alg. 1,
lines 6-8), and the lag that ``local_grad="lagged"`` keeps from step to step.

``"autograd"``: K backward passes restricted to the sampled layers' parameters (or one with K
batched cotangents); ``"lagged"``: the previous step's SAM gradients on those layers, kept at
that step's commit; ``"zo"``: forward-only central differences, computed after ``g_0``'s
backward (:func:`mtlsam_ext.optim.zeroth_order.zo_local_grads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.flat import copy_or_zero
from mtlsam_ext.optim.task_rows import agree

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def local_gradients(run: Run, losses: list[Tensor], sampled: list[int], tables: list
                    ) -> tuple[list[Tensor], Tensor | None, bool]:
    """``(local, local_scale, from_lag)``: the compact ``[K, M_b]`` local gradients per bucket
    (empty for ``"zo"``, whose forwards must wait until after ``g_0``'s backward), the loss
    scale they carry, and whether they are the kept lag."""
    opt = run.opt
    sh = run.shared
    k = run.k
    lag = opt.work.bufs.get("lag")
    # The lag holds the layers chosen for this step (stored at the previous step's commit);
    # after a change of selection without that history, the step uses autograd.
    if opt.local_grad == "lagged" and opt._lag_valid and lag is not None \
            and opt._lag_layers == tuple(sampled) \
            and all(t.shape == (k, tb[3]) for t, tb in zip(lag, tables)):
        local = lag  # the previous step's SAM gradients on the sampled layers
        local_scale = opt._lag_scale  # the factor of the step that computed them
    elif opt.local_grad == "zo":
        local = []  # after g0: the zo forwards must not run before the first graph's backward
        # differences of the closure's unscaled losses (summed over ranks in global sync)
        local_scale = run.scaling.world if run.global_sync else None
    else:
        local_scale = run.scaling.factor(run.global_sync)
        # every column is written below (a copy per sampled parameter, zeros for one a loss
        # does not reach), except by the sharded path, which adds into the rows. Reused from
        # step to step with local_grad="autograd"; gl-lagged comes here only without a usable
        # lag (first step, new selection): kept, its [K, M] would outlive its use (+5.9 MB
        # on the main job's MLP)
        specs = [((k, t[3]), b.dtype) for t, b in zip(tables, sh.buckets)]
        local = opt.work.scratch("local", specs) if opt.local_grad == "autograd" else \
            [torch.empty(s, dtype=d, device=sh.device) for s, d in specs]
        if run.sharded:
            for loc in local:
                loc.zero_()
        params_s = sh.layer_params(sampled)
        state = run.passes.grads_state()
        trial = got = None
        if state in ("batched", "trial"):
            # (the clock waits for the device: only an "auto" trial reads it)
            t0 = run.clock() if state == "trial" else 0.0
            got = run.passes.batched_task_grads(losses, params_s)
            if got is not None:  # [K, *shape] per parameter, one batched backward
                if state == "trial":  # batched = "auto": into scratch, then sequential too
                    trial = [torch.zeros_like(t) for t in local]
                copy_or_zero(sh.local_batched_views(local if trial is None else trial,
                                                     sampled), got)
                if trial is not None:
                    opt.batched.record("grads", "batched", run.clock() - t0)
        if trial is not None or got is None:  # sequential (also after a failed batched try)
            t0 = run.clock() if trial is not None else 0.0
            if run.global_sync and trial is None:  # travel during the later passes and g0's
                run.comm.begin_phase(local)
            for i in range(k):
                if run.sharded:
                    run.passes.backward_local(losses[i], local, i, sampled)
                    continue
                got = run.passes.task_grads(losses[i], params_s)
                copy_or_zero(sh.local_views(local, i, sampled), got)
                run.comm.row_ready(i)
            if trial is not None:
                opt.batched.record("grads", "sequential", run.clock() - t0)
                agree(run, "grads", local, trial)
    return local, local_scale, local is lag


def lagged_summed_update(run: Run, sums: list[Tensor], nxt: list[Tensor], sampled: list[int]
                         ) -> None:
    """End of a gl-lagged step with LS / mean and a fixed layer selection: the split passes
    left ``sum_i g_i^SAM`` on the other layers in ``sums`` and each task's SAM gradient on the
    sampled layers in ``nxt``. Their sums go into ``sums``' sampled columns (one K-row combine
    over the compact columns), then the update as :meth:`Update.finish_summed`. With LS this is the
    row-wise update bit for bit (the same sums in the same order); the ``[K, N]`` rows, their
    zeroing, the K-row combine over the other layers and the copy of the sampled columns into
    the lag are not needed: on commit ``nxt`` becomes the lag (no copy) and the old lag the
    next step's ``nxt``."""
    opt = run.opt
    runs = opt.work.sampled_runs(sampled)
    for s_row, loc, rb in zip(sums, nxt, runs):
        if not rb:
            continue
        acc = torch.float64 if loc.dtype == torch.float64 else torch.float32
        col = torch.empty(loc.shape[1], dtype=loc.dtype, device=loc.device)
        ops.combine_(col, loc, torch.ones(loc.shape[0], dtype=acc, device=loc.device),
                     backend=run.be)
        for s, n, q in rb:
            s_row[0, s:s + n].copy_(col[q:q + n])
    run.update.finish_summed(sums)

    def swap() -> None:
        # the SAM gradients of the (unchanged) sampled layers are the next step's lag
        opt.work.bufs["lag"], opt.work.bufs["lag_next"] = nxt, opt.work.bufs.get("lag")
        if opt.work.bufs["lag_next"] is None:
            del opt.work.bufs["lag_next"]
        lag_kept(run, sampled)

    run.on_commit.append(swap)


def lag_kept(run: Run, layers: list[int]) -> None:
    """The lag now holds this step's SAM gradients on ``layers``, kept as computed (scaled:
    fp16 rows would lose small values if unscaled) with the scale they carry; the next step
    rescales its statistics by the ratio."""
    opt = run.opt
    opt._lag_layers = tuple(layers)
    opt._lag_scale = run.scaling.factor(run.sync is not None)
    opt._lag_valid = True


def keep_lagged(run: Run, rows: list[Tensor]) -> None:
    """On commit, the next step's local gradients: this step's SAM rows on the layers the next
    step samples (chosen by the layer selector's commit just before). Written only once the
    step has succeeded, so a failed step leaves the history intact."""
    opt, sh, k = run.opt, run.shared, run.k

    def keep() -> None:
        nxt = opt.sampled_layers
        tabs = opt.work.sampled_tables(nxt)
        lag = opt.work.scratch("lag", [((k, t[3]), b.dtype) for t, b in zip(tabs, sh.buckets)])
        for r, runs, dst in zip(rows, opt.work.sampled_runs(nxt), lag):
            for s, n, ls in runs:
                dst[:, ls:ls + n].copy_(r[:, s:s + n])
        lag_kept(run, nxt)

    run.on_commit.append(keep)
