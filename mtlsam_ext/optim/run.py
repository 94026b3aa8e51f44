"""``Run``: one step in flight, and the collaborators its method's phases call.

A step (``mtlsam_ext.optim.steps``) reads as its paper's algorithm; everything else is one
of these, each with one job:

- ``run.passes``  (:class:`~mtlsam_ext.optim.passes.Passes`): the closure's forwards and the
  backward passes, where the gradients land;
- ``run.perturb`` (:class:`~mtlsam_ext.optim.perturber.Perturber`): perturbation radii, and
  save / perturb / restore of the shared parameters and of the heads;
- ``run.comm``    (:class:`~mtlsam_ext.optim.distributed.StepComm`): the gradient phases'
  collectives under data parallelism;
- ``run.update``  (:class:`~mtlsam_ext.optim.update.Update`): Gram, weights, combine, then
  the loss scale's ``1/S`` and clipping;
- ``run.checks``  (:class:`~mtlsam_ext.optim.checks.StepChecks`): the values whose
  finiteness decides whether the step commits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mtlsam_ext.optim.amp import Scaling
from mtlsam_ext.optim.batched import timer
from mtlsam_ext.optim.checks import StepChecks
from mtlsam_ext.optim.closure import accepts_task
from mtlsam_ext.optim.distributed import StepComm
from mtlsam_ext.optim.passes import Passes
from mtlsam_ext.optim.perturber import Perturber
from mtlsam_ext.optim.update import Update

if TYPE_CHECKING:
    from mtlsam_ext.optim.mtlsam import MTLSAM


class Run:
    """State of one step in flight: what every phase shares (the optimizer, the closure, the
    flat buffers, the loss scale, K and the unperturbed losses), the collaborators, and what
    happens when the step commits."""

    def __init__(self, opt: MTLSAM, closure: Callable[..., Any],
                 scaling: Scaling | None = None) -> None:
        self.opt = opt
        self.closure = closure
        self.task_aware = accepts_task(closure)
        self.scaling = scaling or Scaling()
        self.be = opt.ops_backend
        self.shared = opt.shared
        self.heads = opt.heads
        self.sync = opt.sync
        self.global_sync = opt.sync is not None and opt.sync.global_perturb
        # Sharded shared parameters (FSDP2): the shards' gradients arrive averaged over the
        # ranks; times W they follow this module's convention of summed gradients.
        self.sharded = opt.shared.sharded
        self.shard_scale = float(opt.sync.world) if self.sharded else 1.0
        self.k = 0  # the number of tasks, known after the first forward
        self.unperturbed: Tensor | None = None  # the K losses at theta, what step() returns
        self.on_commit: list[Callable[[], None]] = []
        self.clock = timer(self.shared.device)
        self.checks = StepChecks(self)
        self.perturb = Perturber(self)
        self.comm = StepComm(self)
        self.passes = Passes(self)
        self.update = Update(self)

    def commit(self) -> None:
        """The step succeeded: what it keeps for the next step is written now (a failed step
        leaves the history intact)."""
        for fn in self.on_commit:
            fn()
