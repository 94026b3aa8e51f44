"""``MTLSAM``: a drop-in optimizer for sharpness-aware multi-task learning.

It wraps any ``torch.optim`` optimizer. ``step(closure)`` runs the chosen method's forward and
backward passes, builds the shared update with the chosen aggregator, and lets the base
optimizer step. Each method's step lives in :mod:`mtlsam_ext.optim.steps`; the map of a step is in
:mod:`mtlsam_ext.optim`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlsam_ext.aggregators import (
    aggregator_state,
    check_weights,
    get_aggregator,
    load_aggregator_state,
)
from mtlsam_ext.flat import FlatParams
from mtlsam_ext.ops import selfcheck
from mtlsam_ext.ops.dispatch import pin
from mtlsam_ext.optim.amp import calling_scaler, init_scaler, report_found_inf, scaling_for
from mtlsam_ext.optim.batched import BatchedPolicy, unsupported_reason
from mtlsam_ext.optim.batchnorm import RunningStats, batchnorm_modules
from mtlsam_ext.optim.distributed import BUCKET_CAP_MB, check_sharded, resolve_sync, unwrap_ddp
from mtlsam_ext.optim.layer_selection import LayerSelector
from mtlsam_ext.optim.options import (  # noqa: F401  (METHODS..NORMS: re-exported)
    LOCAL_GRADS,
    METHODS,
    NORMS,
    OPTION_FIELDS,
    Options,
    ScheduledHyper,
)
from mtlsam_ext.optim.run import Run
from mtlsam_ext.optim.steps import STEPS
from mtlsam_ext.optim.wiring import (
    constant_weights,
    default_generator,
    flat_heads,
    layer_choice,
    module_roots,
    split_heads,
)
from mtlsam_ext.optim.workspace import Workspace

Params = nn.Module | Iterable[Tensor] | dict


class MTLSAM(torch.optim.Optimizer):
    """Sharpness-aware multi-task optimizer over a shared backbone and optional task heads.

    Args:
        shared: the shared part: an ``nn.Module`` (each submodule owning parameters is a
            layer), an iterable of parameters (each tensor is a layer), or a dict of named
            layers. May be sharded by FSDP2's ``fully_shard`` (every parameter; ``erm``,
            ``sam``, ``fmtl``, ``gl`` with ``local_grad`` ``"autograd"``/``"lagged"``,
            ``perturb_sync="global"``): the step then works on this rank's shards and
            all-reduces only partial sums (docs/distributed.md).
        base_optimizer: a ``torch.optim.Optimizer`` class, built over all parameters with
            ``**base_kwargs``; its ``param_groups`` are this optimizer's, so LR schedulers work.
        heads: optional list (or ``nn.ModuleList``) of K modules / iterables of task-specific
            parameters, head i for loss i; or an ``nn.ModuleDict`` / dict ``{task name: head}``,
            whose names are then the tasks' (the closure returns ``{name: loss}``). A head may
            only influence its own loss. Heads get plain SAM with radius ``rho_heads``. For ``gl``
            and ``sam`` the head direction is taken from the one backward of ``l_0``, i.e.
            ``w_i * grad l_i``: the same direction for ``w_i > 0``, and no head perturbation
            for a task whose weight is 0.
        method: ``"gl"`` global-local sampled SAM (report Alg. 1), ``"fmtl"`` F-MTL
            (Phan et al. Alg. 1), ``"sam"`` plain SAM on the weighted average loss, ``"erm"``
            no perturbation.
        aggregator: ``"ls"`` (sum), ``"mean"``, ``"mgda"``, ``"pcgrad"``, ``"cagrad"``,
            ``"imtl"``, ``"nash"``, ``"upgrad"``, ``"dualproj"``, ``"aligned_mtl"``,
            ``"fairgrad"``, ``"gradvac"``, ``"rlw"``, or a callable ``G -> w`` on the K x K
            Gram matrix (e.g. a TorchJD weighting).
        rho: perturbation radius of the shared part (SAM's rho). Like ``rho_heads`` and
            ``alpha``, it is the starting value of a ``param_groups`` key that every step reads
            (a scheduler or a hand edit takes effect at the next step): group 0, the shared
            parameters', gives ``rho`` and ``alpha``, group 1, the heads', ``rho_heads``.
        rho_heads: perturbation radius of the heads (``None``: ``rho``).
        alpha: global/local mixing weight of ``gl`` (1 = global only).
        layers: sampled layers of ``gl``: ``None`` = first, middle (``L // 2``) and last; a
            list of layer indices or names; one layer name; or a mode: ``"adaptive"`` (the
            ``n_sampled`` layers whose task cosine similarities change most, re-selected every
            ``resample_every`` steps; report §V) or ``"random"`` (``n_sampled`` layers drawn
            each step from ``generator``). See :mod:`mtlsam_ext.optim.layer_selection`.
        norm: how ``gl`` sizes each task's perturbation: ``"match"`` gives every sampled
            layer the magnitude the global perturbation has there (so ``||eps_i|| = rho``),
            ``"global"`` normalises the mixed direction as a whole (see
            :func:`~mtlsam_ext.optim.perturbation.global_local_coefs`).
        local_grad: ``"autograd"`` (exact task gradients on the sampled layers),
            ``"lagged"`` (previous step's SAM gradients there; the first step uses autograd)
            or ``"zo"`` (forward-only central differences along ``n_dirs`` seeded Gaussian
            directions of size ``mu``; 2 n_dirs forwards, no backward).
        adaptive: ASAM perturbations ``rho T^2 g / ||T g||`` with ``T = |theta|``.
        decompose: F-MTL's M(loss) + M(flat) (``True``) or M(SAM) (``False``).
        task_weights: weights of the average loss ``l_0 = sum_i w_i l_i`` (default 1/K).
        backend: ``"auto"``, ``"torch"``, ``"ext"``, ``"triton"`` or ``"ext+triton"`` for the
            fused ops (``"auto"`` on CUDA: ``"ext+triton"``, each op on the backend measured
            fastest for it, where both are installed). Compiled kernels are checked against
            the pure-torch reference here, once per process, device and dtype
            (:mod:`mtlsam_ext.ops.selfcheck`): under ``"auto"`` an op that fails runs on the
            reference (one warning; ``info()["selfcheck_fallbacks"]``), an explicit backend
            raises ``ValueError``.
        generator: ``torch.Generator`` for random aggregators (PCGrad); default: one seeded
            from the global RNG at construction.
        aggregator_options: keyword options of a named aggregator, e.g. ``{"c": 0.5}`` for
            CAGrad.
        n_dirs: the number of random directions of ``local_grad="zo"``.
        mu: the finite-difference step of ``local_grad="zo"``.
        bn_stats: ``"first"`` (default): BatchNorm running statistics (and
            ``num_batches_tracked``) change only in the first, unperturbed forward of a step, as
            in the F-MTL authors' scripts and the usual SAM code; later forwards still normalise
            with their own batch statistics. ``"all"``: every forward updates them. BatchNorm
            layers are found in ``shared`` and ``heads`` when they are modules (or dicts of
            modules), and in ``bn_modules``.
        bn_modules: further modules whose BatchNorm layers follow ``bn_stats`` (needed when
            ``shared``/``heads`` are given as parameters rather than modules).
        max_grad_norm: clip the final update (shared and heads as one vector) to this L2 norm,
            as ``torch.nn.utils.clip_grad_norm_`` would (``None``: no clipping).
        grad_scaler: a ``torch.amp.GradScaler`` to use on every ``step`` (as if passed to
            ``step``); it is given its scale right away, so ``scaler.step(opt, closure)`` also
            works from the first step. Without it, ``scaler.step(opt, closure)`` works once the
            scaler has a scale (``scaler.scale(...)`` called once; torch checks it before the
            step), and ``opt.step(closure, grad_scaler=scaler)`` always.
        process_group: data parallelism (docs/design.md §4). ``None``: the default group when
            ``torch.distributed`` is initialised (else a single process); a process group
            selects another; ``False`` turns synchronisation off. Each rank's closure returns
            the K losses of its local batch; MTLSAM sums every gradient phase over the ranks
            itself, one collective per phase over the flat buffers, so the model must not be
            synchronised by DDP as well: pass a plain module, or the DDP wrapper itself as
            ``shared`` (its passes then run under ``no_sync()``). ``step`` returns the mean of
            the ranks' losses. With ``generator=None`` rank 0's seed is used on every rank; a
            generator you pass must be seeded alike on every rank.
        perturb_sync: ``"global"`` (default): every gradient the step uses is the mean over
            ranks, so every rank computes the same perturbations and update, equal to one
            process on the concatenated batch (equal local batches, mean losses). ``"local"``:
            each rank perturbs with its own gradients (SAM's m-sharpness); only the gradients
            the aggregator combines are averaged.
        bucket_cap_mb: the largest all-reduce, in MiB (default 25, as DDP's
            ``bucket_cap_mb``). The ``[K, N]`` gradient rows of a phase are sent in buckets of
            whole rows up to this size (a larger row in pieces), each as soon as its rows are
            written, so it travels while the next task's pass runs; rows that fit in one
            bucket make one collective per phase.
        n_sampled: the number of layers the ``"adaptive"`` and ``"random"`` modes sample
            (``None``: 3, or every layer of a backbone with fewer).
        resample_every: the ``"adaptive"`` mode's re-selection interval, in steps.
        layer_ema: the smoothing (EMA factor) of the ``"adaptive"`` mode's layer scores.
        batched_grads: compute the K per-task gradients at one point (erm, fmtl's loss
            gradients, sam's gradients at the perturbed point) in one backward with K batched
            cotangents (``autograd.grad(..., is_grads_batched=True)``) instead of K backward
            passes. Equal to the sequential rows to rounding. If vmap cannot run the model's
            backward, one warning is given and the sequential passes are used from then on.
            Off by default: on this project's CPU measurements it was not faster
            (docs/benchmarks.md).
        batched: run the K perturbed passes of ``gl`` and ``fmtl`` as one batched pass
            (:mod:`mtlsam_ext.optim.batched`): the K points written as ``[K, N]`` rows by one
            op, the closure run once under ``torch.func.vmap`` over them, one backward. ``True``
            also computes the per-task gradients at one point with batched cotangents (as
            ``batched_grads``). ``"auto"``: the first 3 steps run both ways (the sequential
            result is used), check they agree and keep, per phase, whichever was faster; a
            closure vmap cannot run falls back to the sequential passes with one warning.
            ``"points"``: only the K perturbed passes batched. ``False`` (default): the
            sequential passes. The closure must be vmappable (no
            ``.item()``, no branching on tensor values; see ``RULES`` there); needs the shared
            parameters held by the modules given here (or in ``bn_modules``) and
            ``bn_stats="first"``. Equal to the sequential passes to rounding.
        task_chunk: with ``batched``, the number of points per batched pass (``None``: all K).
            A batched pass holds the activations of ``task_chunk`` forwards at once; smaller
            chunks cap that memory at the cost of more, smaller passes.
        **base_kwargs: keyword arguments of ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    # GradScaler hands its scale to step() (the grad_scale attribute) instead of unscaling the
    # gradients: the step runs its own backward passes on the scaled losses and folds 1/S into
    # coefficients (mtlsam_ext.optim.amp).
    _step_supports_amp_scaling = True

    def __init__(self, shared: Params, base_optimizer: type[torch.optim.Optimizer], *,
                 heads: Sequence[Params] | None = None, method: str = "gl",
                 aggregator: str | Callable[..., Tensor] = "ls", rho: float = 0.05,
                 rho_heads: float | None = None, alpha: float = 0.5,
                 layers: Sequence[int | str] | str | None = None, norm: str = "match",
                 local_grad: str = "autograd", adaptive: bool = False, decompose: bool = True,
                 task_weights: Sequence[float] | Tensor | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None,
                 aggregator_options: dict[str, Any] | None = None, n_dirs: int = 4,
                 mu: float = 1e-3, bn_stats: str = "first",
                 bn_modules: Sequence[nn.Module] | nn.Module | None = None,
                 max_grad_norm: float | None = None, grad_scaler: Any = None,
                 process_group: Any = None, perturb_sync: str = "global",
                 bucket_cap_mb: float = BUCKET_CAP_MB,
                 n_sampled: int | None = None, resample_every: int = 10, layer_ema: float = 0.9,
                 batched_grads: bool = False, batched: bool | str = False,
                 task_chunk: int | None = None, **base_kwargs: Any) -> None:
        args = dict(locals())  # the arguments, before any local is assigned
        # Every keyword argument (and base_optimizer) checked in one place, in the order of
        # checks the constructor has always had; o holds the values in use.
        o = Options(**{name: value for name, value in args.items() if name in OPTION_FIELDS})
        self.sync = resolve_sync(o.process_group, o.perturb_sync, o.bucket_cap_mb)

        # -- the model: shared parameters and heads as flat buffers ---------------------------
        shared, ddp = unwrap_ddp(shared)
        heads, head_names, head_ddps = split_heads(heads)
        self._ddp = ([ddp] if ddp is not None else []) + head_ddps
        self.shared = FlatParams(shared, "shared", allow_sharded=True)
        self.heads: FlatParams | None = flat_heads(heads, head_names, self.shared)
        self.num_tasks: int | None = len(heads) if heads is not None else None
        # named heads fix the task names: the closure returns {name: loss}, in any order
        self.task_names: list[str] | None = head_names
        # whether named/unnamed losses are fixed (by named heads, or by a first closure call)
        self._form_fixed = head_names is not None
        roots = module_roots(shared, heads, o.bn_modules)
        self.bn_stats = o.bn_stats
        self.bn_running_stats = RunningStats(batchnorm_modules(roots) if o.bn_stats == "first"
                                             else [])
        self.max_grad_norm = o.max_grad_norm

        # -- the method, its aggregator and its passes ----------------------------------------
        self.method = o.method
        self.aggregator_spec = o.aggregator
        self._aggregate = get_aggregator(o.aggregator, **(o.aggregator_options or {}))
        self.constant_weights = constant_weights(o.aggregator, o.aggregator_options)
        o.check_batched_grads()
        self.batched_grads = o.batched_grads
        # BatchNorm layers that normalise functionally (batch statistics) inside vmap
        self.batched_bn = batchnorm_modules(roots)
        unsupported = None
        if o.batched is not False:
            unsupported = unsupported_reason(
                self.shared.find_owners(roots),
                self.heads.find_owners(roots) if self.heads is not None else [],
                o.bn_stats == "all" and bool(self.batched_bn))
        self.batched = BatchedPolicy(o.batched, o.task_chunk, unsupported)
        self.batched.only({
            "points": o.method in ("gl", "fmtl"),
            "grads": o.method == "fmtl" or (o.method == "gl" and o.local_grad == "autograd")
            or (o.method in ("erm", "sam") and self.constant_weights is None)})
        # rho, rho_heads and alpha of the next step: read from param_groups at every step
        # (ScheduledHyper); these attributes hold the values the current step uses
        self.rho, self.rho_heads, self.alpha = o.rho, o.rho_heads, o.alpha
        self.norm = o.norm
        self.local_grad = o.local_grad
        self.adaptive = o.adaptive
        self.decompose = o.decompose

        # -- the backend: the ops get the resolved one ("auto" pinned to it), so a step's op
        # calls read no environment variable; the compiled kernels check themselves here,
        # before any step (explicit backend: ValueError; auto: failing ops run on the
        # reference, one warning)
        self.backend_request = o.backend
        self.backend, self.ops_backend = pin(o.backend, self.shared.device)
        self._selfcheck_dtypes = tuple(dict.fromkeys(
            b.dtype for f in (self.shared, self.heads) if f is not None for b in f.buckets))
        selfcheck.prepare(self.backend, self.shared.device, self._selfcheck_dtypes,
                          fallback=self.ops_backend != self.backend, requested=o.backend)
        if self.shared.sharded:
            check_sharded(self.shared, self.sync, method=o.method, local_grad=o.local_grad,
                          batched=o.batched, batched_grads=o.batched_grads)

        # -- sampled layers, random draws ------------------------------------------------------
        layer_mode, picked, n_sampled = layer_choice(o.layers, self.shared, o.n_sampled)
        self._task_weights_arg = o.task_weights
        self._task_weights: Tensor | None = None
        generator = o.generator if o.generator is not None else \
            default_generator(self.sync, self.shared.device)
        self.generator = generator
        self.layer_selector = LayerSelector(layer_mode, picked, len(self.shared.layers),
                                            n_sampled, o.resample_every, o.layer_ema,
                                            generator=generator)
        self.work = Workspace(self.shared, self.heads)  # step buffers, cached tables
        self.n_dirs = o.n_dirs
        self.mu = o.mu
        # Seed of the zo directions: the generator's seed, read without consuming its state
        # (PCGrad's draws stay the same whether or not zo is used).
        self.zo_seed = int(generator.initial_seed())

        # -- the base optimizer: group 0 holds the shared parameters, group 1 the heads; every
        # group starts with the scheduled hyper-parameters, which each step reads
        groups = [{"params": list(self.shared.params)}]
        if self.heads is not None:
            groups.append({"params": list(self.heads.params)})
        super().__init__(groups, o.defaults())
        self.base_optimizer = o.base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state
        self._hyper = ScheduledHyper(self.shared.ids(),
                                     self.heads.ids() if self.heads is not None else set(),
                                     o.method)
        self._hyper.read(self.param_groups)  # a base optimizer that regroups is checked now

        self._step_count = 0
        self._graph_checked = False
        self._lag_valid = False
        self._lag_scale: Tensor | None = None
        self._lag_layers: tuple[int, ...] | None = None
        self._sync_checked = False
        self._initialized = True
        self.grad_scaler = o.grad_scaler
        if o.grad_scaler is not None:
            scaling_for(o.grad_scaler, None, None, self.shared.device)  # validates the scaler
            init_scaler(o.grad_scaler, self.shared.device)

    # -- public API -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers; ``p.grad`` stay views of them (never ``None``),
        so ``set_to_none`` is accepted for compatibility and ignored."""
        self.shared.zero_grad()
        if self.heads is not None:
            self.heads.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None,  # type: ignore[override]
             **kwargs: Any) -> Tensor | dict[str, Tensor]:
        """One optimisation step; returns the K task losses at the unperturbed point (a 1-D
        tensor, or a dict ``{task name: loss}`` when the closure returns named losses).

        ``closure()`` must run a forward pass and return the K task losses (a list, a tuple, a
        1-D tensor or a dict of named losses) without calling ``backward``; it is called
        several times per step. A closure with a ``task`` keyword is called as
        ``closure(task=None)`` for all K losses and ``closure(task=i)`` (``i`` the index, or
        the name for named losses) for task i's loss alone at its perturbed point.

        ``grad_scaler=``: a ``torch.amp.GradScaler`` for this step (keyword only; the one given
        at construction otherwise; ``scaler.step(opt, closure)`` hands over its scale as the
        ``grad_scale`` attribute, see :mod:`mtlsam_ext.optim.amp`). Every backward then runs
        on the scaled losses, ``1/S`` is folded into the step's coefficients, and a non-finite
        value skips the step (parameters and state unchanged) and is reported to the scaler,
        whose ``update()`` then backs off.

        On any error the parameters, their ``.grad``, BatchNorm statistics, the base optimizer
        and this optimizer's state are left as they were before the step.
        """
        if closure is None or not callable(closure):
            raise ValueError("MTLSAM.step needs a closure that returns the K task losses")
        # grad_scaler only by keyword and not in the signature: a signature naming it would make
        # GradScaler.step hand itself over with a FutureWarning on every step (torch 2.x)
        grad_scaler = kwargs.pop("grad_scaler", None)
        if kwargs:
            raise ValueError(f"MTLSAM.step takes a closure and optionally grad_scaler=, got "
                             f"{sorted(kwargs)}")
        # rho, rho_heads, alpha of this step from param_groups (a scheduler's or a hand edit's
        # values), checked before anything changes; the step's code reads these attributes
        self.rho, self.rho_heads, self.alpha = self._hyper.read(self.param_groups)
        scaler = grad_scaler if grad_scaler is not None else self.grad_scaler
        if scaler is None and getattr(self, "grad_scale", None) is not None:
            scaler = calling_scaler(self)  # GradScaler.step's attribute form
        scaling = scaling_for(scaler, getattr(self, "grad_scale", None),
                              getattr(self, "found_inf", None), self.shared.device)
        gen_state = self.generator.get_state()
        self._agg_state = aggregator_state(self._aggregate)  # put back by _undo
        self.shared.attach_grads()
        self.shared.check_data_attached()
        self.shared.pull()  # sharded: the shards the base optimizer (or the user) last wrote
        if self.heads is not None:
            self.heads.attach_grads()
        grads = self._save_grads()
        if self.sync is not None:
            scaling.world = self.sync.world_tensor(self.shared.device)
            self.sync.begin_step()
        run = Run(self, closure, scaling)
        form = (self.num_tasks, self.task_names, self._form_fixed)
        with contextlib.ExitStack() as stack:
            for ddp in self._ddp:  # MTLSAM synchronises the gradients itself
                stack.enter_context(ddp.no_sync())
            try:
                losses = STEPS[self.method](run)
                run.passes.end_passes()
                ok = run.checks.all_finite()  # the step's one host sync: never step on NaN/Inf
                if self.sync is not None:  # every rank skips (or steps) together
                    ok, losses = self.sync.all_ok_and_mean(ok, losses)
                finite = bool(ok)
            except BaseException as err:
                self._undo(run, gen_state, form, grads)
                nonfinite = (isinstance(err, (ValueError, RuntimeError)) and bool(run.checks.items)
                             and not bool(run.checks.all_finite()))
                if nonfinite and scaling.active:
                    # An overflow under loss scaling (or a NaN loss, as GradScaler treats
                    # it): skip the step and let the scaler back off.
                    report_found_inf(scaling, self, torch.zeros((), dtype=torch.bool))
                    return self._named(run.unperturbed)
                if nonfinite:
                    raise ValueError(run.checks.nonfinite_message()) from err
                raise
        if self.sync is not None:
            self.sync.end_step()
        if scaling.active:
            report_found_inf(scaling, self, ok)
        if not finite:
            self._undo(run, gen_state, form, grads)
            if scaling.active:
                return self._named(losses)
            raise ValueError(run.checks.nonfinite_message())
        run.commit()
        self.shared.grads_to_params()  # sharded: DTensor gradients over the flat buffer
        self.base_optimizer.step()
        self._step_count += 1
        return self._named(losses)

    def _save_grads(self) -> list[tuple[Tensor, Tensor]]:
        """``(flat gradient buffer, copy)`` pairs of the gradients before the step, which the
        step overwrites with its own: a failed or skipped step puts them back (one copy of the
        gradients per step, in buffers reused from step to step). Sharded backbones have no
        flat gradient of their own (FSDP2 leaves its shards in ``p.grad``); their heads do."""
        bufs = [] if self.shared.sharded else [b.grad for b in self.shared.buckets]
        if self.heads is not None:
            bufs += [b.grad for b in self.heads.buckets]
        saved = self.work.scratch("grads_before_step", [(tuple(b.shape), b.dtype) for b in bufs])
        if bufs:
            torch._foreach_copy_(saved, bufs)
        return list(zip(bufs, saved))

    def _undo(self, run: Run, gen_state: Tensor, form: tuple,
              grads: list[tuple[Tensor, Tensor]]) -> None:
        """Put back what a failed or skipped step changed."""
        run.comm.settle()
        if grads:
            torch._foreach_copy_([g for g, _ in grads], [s for _, s in grads])
        # p.grad the flat views again (a closure may have reset them, model.zero_grad())
        self.shared.attach_grads()
        if self.heads is not None:
            self.heads.attach_grads()
        run.perturb.restore_all()
        self.layer_selector.discard()
        if run.passes.bn:
            run.passes.bn.restore("pre")
        self.generator.set_state(gen_state)
        load_aggregator_state(self._aggregate, self._agg_state)
        self.num_tasks, self.task_names, self._form_fixed = form

    def _named(self, losses: Tensor) -> Tensor | dict[str, Tensor]:
        if self.task_names is None:
            return losses
        return dict(zip(self.task_names, losses.unbind(0)))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the constructor adds groups: parameters added later would not be in the flat
        buffers, the layer table or the per-task rows."""
        if getattr(self, "_initialized", False):
            raise ValueError("MTLSAM does not take parameter groups after construction: its "
                             "flat buffers and layer table are fixed. Build a new MTLSAM over "
                             "the extended model (state_dict() / load_state_dict() carry the "
                             "base optimizer's state over), or freeze the new parameters.")
        super().add_param_group(param_group)

    @property
    def sampled_layers(self) -> list[int]:
        """The layers ``gl`` samples in the next step."""
        return self.layer_selector.selection

    def state_dict(self) -> dict[str, Any]:
        lag = self.work.bufs.get("lag") if self._lag_valid else None
        return {
            "base": self.base_optimizer.state_dict(),
            "mtlsam": {
                "step": self._step_count,
                "num_tasks": self.num_tasks,
                "generator": self.generator.get_state(),
                "lagged": None if lag is None else [t.clone() for t in lag],
                "sampled_layers": list(self.sampled_layers),
                "lag_layers": self._lag_layers,
                "layer_selection": self.layer_selector.state_dict(),
                "zo_seed": self.zo_seed,
                "lag_scale": self._lag_scale,
                "task_names": self.task_names,
                "aggregator": aggregator_state(self._aggregate),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "base" not in state_dict \
                or "mtlsam" not in state_dict:
            raise ValueError("not an MTLSAM state dict (expected keys 'base' and 'mtlsam')")
        own = state_dict["mtlsam"]
        if self.layer_selector.mode is None and \
                list(own.get("sampled_layers", self.sampled_layers)) != self.sampled_layers:
            raise ValueError("state dict was saved with different sampled layers "
                             f"{own['sampled_layers']} (this optimizer: {self.sampled_layers})")
        k = own.get("num_tasks")
        if self.num_tasks is not None and k is not None and k != self.num_tasks:
            raise ValueError(f"state dict has {k} tasks, this optimizer {self.num_tasks}")
        load_aggregator_state(self._aggregate, own.get("aggregator"))  # absent in old dicts
        in_use = {"rho": self.rho, "rho_heads": self.rho_heads, "alpha": self.alpha}
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        # the groups' rho / rho_heads / alpha come back with the base optimizer's state; a dict
        # saved before rho_heads was scheduled lacks it: the value in use fills it
        self._hyper.fill(self.param_groups, in_use)
        self._step_count = int(own["step"])
        if k is not None:
            self.num_tasks = k
        self.generator.set_state(own["generator"])
        self.zo_seed = int(own.get("zo_seed", self.zo_seed))
        if "layer_selection" in own:
            self.layer_selector.load_state_dict(own["layer_selection"])
        lag_layers = own.get("lag_layers")
        self._lag_layers = None if lag_layers is None else tuple(lag_layers)
        names = own.get("task_names")
        if names is not None:
            if self.task_names is not None and list(names) != self.task_names:
                raise ValueError(f"state dict has tasks {list(names)}, this optimizer "
                                 f"{self.task_names}")
            self.task_names = list(names)
            self._form_fixed = True
        ls = own.get("lag_scale")
        self._lag_scale = None if ls is None else ls.to(self.shared.device)
        lag = own.get("lagged")
        if lag is not None:
            self.work.bufs["lag"] = [t.to(self.shared.device) for t in lag]
            self._lag_valid = True
        else:
            self._lag_valid = False

    # -- helpers used by the methods ----------------------------------------------------------
    def task_weights(self, k: int, device: torch.device) -> Tensor:
        if self._task_weights is None or self._task_weights.numel() != k:
            tw = self._task_weights_arg
            w = torch.full((k,), 1.0 / k, dtype=torch.float64) if tw is None \
                else torch.as_tensor(tw, dtype=torch.float64).flatten()
            if w.numel() != k:
                raise ValueError(f"task_weights has {w.numel()} entries for {k} tasks")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError("task_weights must be finite, non-negative, with a positive sum")
            self._task_weights = w.to(device)
        return self._task_weights

    def aggregate(self, gram: Tensor) -> Tensor:
        """Weights ``w = M(G)`` of the configured aggregator, validated."""
        w = self._aggregate(gram, self.generator)
        return check_weights(w, gram.shape[0], str(self.aggregator_spec))

    def info(self) -> dict[str, Any]:
        """The configuration actually in use (backend resolved, layers sampled; ``rho``,
        ``rho_heads``, ``alpha``: the values the next step reads from ``param_groups``)."""
        rho, rho_heads, alpha = self._hyper.read(self.param_groups)
        return {
            "method": self.method, "aggregator": str(self.aggregator_spec),
            "backend": self.backend, "rho": rho, "rho_heads": rho_heads,
            "alpha": alpha, "norm": self.norm, "local_grad": self.local_grad,
            "adaptive": self.adaptive, "decompose": self.decompose,
            "batched_grads": self.batched_grads,
            "batched": self.batched.info(),
            "sampled_layers": [self.shared.layer_names[i] for i in self.sampled_layers],
            "layer_mode": self.layer_selector.mode,
            "num_layers": len(self.shared.layers),
            "shared_numel": sum(self.shared.global_numels()),  # (sharded: all shards)
            "num_tasks": self.num_tasks, "task_names": self.task_names,
            "bn_stats": self.bn_stats,
            "batchnorm_layers": len(self.bn_running_stats.modules),
            "max_grad_norm": self.max_grad_norm,
            "world_size": 1 if self.sync is None else self.sync.world,
            "perturb_sync": None if self.sync is None else self.sync.perturb_sync,
            "bucket_cap_mb": None if self.sync is None else self.sync.cap_bytes / 2**20,
            "sharded": self.shared.sharded,
            "communication": None if self.sync is None else dict(self.sync.last_step),
            # ops whose compiled kernel failed its first-use check here (auto runs them on the
            # reference), with the op, backend, device, dtype and error
            "selfcheck_fallbacks": selfcheck.fell_back(self.shared.device,
                                                       self._selfcheck_dtypes),
        }

