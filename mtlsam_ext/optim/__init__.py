"""User layer: the ``MTLSAM`` optimizer.

Map of a step (``MTLSAM.step(closure)`` in ``mtlsam.py``)::

    options.py        the constructor's keyword arguments, validated in one place; rho,
                      rho_heads and alpha read from param_groups at every step
    mtlsam.py         MTLSAM: wiring (wiring.py: heads, layers, generator), step() (run,
                      check, commit or undo), state_dict, info
    run.py            Run: one step in flight, the shared state and the collaborators below
    steps/            one module per method, read as its paper's algorithm:
      erm.py sam.py   ERM; SAM on the average loss (Foret et al. eq. 2)
      fmtl.py         F-MTL, Phan et al. Alg. 1 (loss / flat decomposition)
      gl.py           global-local sampled SAM, report Alg. 1, with gl_local.py (the local
                      gradients: autograd / lagged / zo) and gl_coefs.py (eps = A g0 + B ghat)
    passes.py         Passes: closure calls and backward passes (where gradients land)
    task_rows.py      the K per-task gradients at one point (and the batched="auto" trial)
    sam_passes.py     the K perturbed passes, sequential or batched (batched.py: vmap)
    perturber.py      Perturber: radii, save / perturb / restore of shared params and heads
    perturbation.py   global-local coefficients from per-layer statistics (pure math)
    update.py         Update: Gram, weights M(G), combine, 1/S and clipping folded in
    checks.py         the closure's graph checks and StepChecks (finiteness, one host sync)
    distributed.py    data parallelism: Sync, Phase, StepComm (one collective per phase)
    amp.py            loss scaling (GradScaler);  batchnorm.py  running statistics
    workspace.py      persistent row buffers and tables cached per layer selection
    layer_selection.py, zeroth_order.py, closure.py, segments.py, dtypes.py: as named

Where new things go:

- a new method: ``steps/<method>.py`` with ``step_<method>(run)``, registered in
  ``steps/__init__.py``'s ``STEPS`` and in ``options.METHODS``; it calls the collaborators and
  adds no state to ``Run`` that one of them could hold;
- an aggregator option: ``mtlsam_ext/aggregators`` (the step sees only ``w = M(G)``);
- a training feature (a new backward variant, a norm, a check): the collaborator whose job it
  is, its option in ``options.py``; ``tests/test_code_limits.py`` keeps every module under
  600 lines, every class under 26 methods and the imports free of cycles.
"""

from mtlsam_ext.optim.mtlsam import MTLSAM

__all__ = ["MTLSAM"]
