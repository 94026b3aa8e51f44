"""The K per-task gradients at one point, as rows of ``[K, N]`` matrices: K backward passes,
or one backward with K batched cotangents, and the ``batched="auto"`` trial that times both
and checks that they agree."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mtlsam_ext.optim.batched import AGREE

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def per_task_rows(run: Run, losses: list[Tensor], rows: list[Tensor], first_row: int = 0
                   ) -> None:
    """Rows ``first_row + i`` := the shared gradient of ``losses[i]`` (K backward passes, or
    one batched backward with ``batched_grads``).

    Heads accumulate across the passes, which leaves head i with its own gradient since only
    loss i reaches it (checked on the first step).
    """
    k = len(losses)
    state = run.passes.grads_state()
    if state == "batched" and run.passes.batched_rows(losses, rows, first_row):
        return
    trial = None
    if state == "trial":  # batched = "auto": both ways (batched first, the graph is kept)
        trial = _trial_grads(run, losses, rows)
        t0 = run.clock()
    for r in rows:  # the backward passes accumulate straight into the rows
        r[first_row:first_row + k].zero_()
    for i, loss in enumerate(losses):
        run.passes.backward_into(loss, rows, first_row + i, retain_graph=i < k - 1)
        if trial is None:  # (a trial compares the rows first: they are sent at the end)
            run.comm.row_ready(i)
    if trial is not None:
        run.opt.batched.record("grads", "sequential", run.clock() - t0)
        agree(run, "grads", [r[first_row:first_row + k] for r in rows], trial)


def _trial_grads(run: Run, losses: list[Tensor], rows: list[Tensor]) -> list[Tensor] | None:
    """``batched="auto"`` trial of the batched cotangents: the shared rows into scratch
    buffers (the heads are left to the sequential passes), timed."""
    t0 = run.clock()
    got = run.passes.batched_task_grads(losses, run.shared.ordered_params())
    if got is None:
        return None
    scratch = [t[:len(losses)] for t in run.opt.work.buffers("rows_trial", len(losses))]
    run.shared.copy_batched(scratch, 0, len(losses), got)
    run.opt.batched.record("grads", "batched", run.clock() - t0)
    return scratch


def agree(run: Run, phase: str, want: list[Tensor], got: list[Tensor] | None,
           heads: bool = False) -> None:
    """``batched="auto"``: a trial whose batched result differs from the sequential one (beyond
    rounding, :data:`AGREE`) turns the phase off; trial buffers go once the phase is decided."""
    policy = run.opt.batched
    if got is not None and policy.state(phase) == "trial":
        pairs = list(zip(want, got))
        if heads and run.heads is not None:
            pairs += [(h[0], b.grad) for h, b in zip(run.perturb.head_out, run.heads.buckets)]
        for a, b in pairs:
            if not a.numel():
                continue
            # per row (task), the norm of the difference against the row's norm: rounding in
            # another summation order stays orders below AGREE; a different computation
            # (random ops, changed state) is off by O(1). (The largest element difference
            # against the largest element, checked before, flagged fp32 grouped convolutions
            # of the CNN at K = 40: 4.6e-4.)
            a2, b2 = (t.double().reshape(t.shape[0] if t.dim() == 2 else 1, -1) for t in (a, b))
            rel = float(((a2 - b2).norm(dim=1) / a2.norm(dim=1).clamp_min(1e-30)).max())
            if not rel <= AGREE[a.dtype]:
                policy.fall_back(phase, f"the batched {phase} differ from the sequential ones "
                                 f"(relative error {rel:.3g} in a task's gradient; random ops "
                                 "or state changed by the closure?)")
                break
    trial_buffers_freed(run)


def trial_buffers_freed(run: Run) -> None:
    """Trial buffers go once every phase is decided."""
    policy = run.opt.batched
    if all(policy.state(p) != "trial" for p in ("points", "grads")):
        run.opt.work.bufs.pop("rows_trial", None)
        if policy.state("points") != "batched":
            run.opt.work.bufs.pop("points", None)
