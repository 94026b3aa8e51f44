"""``MTLSAM``: a drop-in optimizer for sharpness-aware multi-task learning.

It wraps any ``torch.optim`` optimizer. ``step(closure)`` runs the chosen method's forward and
backward passes, builds the shared update with the chosen aggregator, and lets the base
optimizer step. Each method's step lives in :mod:`mtlsam_ext.optim.steps`; the map of a step is in
:mod:`mtlsam_ext.optim`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from mtlsam_ext.ops.dispatch import check_backend_name, pin
from mtlsam_ext.optim.amp import calling_scaler, init_scaler, report_found_inf, scaling_for
from mtlsam_ext.optim.batched import BatchedPolicy, unsupported_reason
from mtlsam_ext.optim.batchnorm import BN_STATS, RunningStats, batchnorm_modules
from mtlsam_ext.optim.distributed import BUCKET_CAP_MB, check_sharded, resolve_sync, unwrap_ddp
from mtlsam_ext.optim.layer_selection import (
    DEFAULT_N_SAMPLED,
    LAYER_MODES,
    LayerSelector,
    default_layers,
)
from mtlsam_ext.optim.run import Run
from mtlsam_ext.optim.steps import STEPS
from mtlsam_ext.optim.workspace import Workspace

METHODS = ("gl", "fmtl", "sam", "erm")
LOCAL_GRADS = ("autograd", "lagged", "zo")
NORMS = ("match", "global")

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
        rho: perturbation radius of the shared part (SAM's rho).
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if local_grad not in LOCAL_GRADS:
            raise ValueError(f"local_grad must be one of {LOCAL_GRADS}, got {local_grad!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        for name, v in (("rho", rho), ("rho_heads", rho if rho_heads is None else rho_heads)):
            if not (isinstance(v, (int, float)) and v >= 0 and v < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(n_dirs, int) and n_dirs >= 1):
            raise ValueError(f"n_dirs must be a positive int, got {n_dirs!r}")
        if not (isinstance(mu, (int, float)) and 0 < mu < float("inf")):
            raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError("base_optimizer must be a torch.optim.Optimizer class, e.g. "
                             "torch.optim.SGD")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        if max_grad_norm is not None and not (
                isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
                and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be None or a finite number > 0, got "
                             f"{max_grad_norm!r}")
        if bn_modules is not None and not isinstance(bn_modules, nn.Module):
            bn_modules = list(bn_modules)
            if not all(isinstance(m, nn.Module) for m in bn_modules):
                raise ValueError("bn_modules must be an nn.Module or a list of nn.Modules")
        if generator is not None and getattr(generator, "device", torch.device("cpu")).type \
                != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (it draws the layer "
                             f"selections and PCGrad's task orders on the CPU, for any "
                             f"parameter device), got one on {generator.device}")
        check_backend_name(backend)
        self.sync = resolve_sync(process_group, perturb_sync, bucket_cap_mb)
        shared, ddp = unwrap_ddp(shared)
        self._ddp = [ddp] if ddp is not None else []
        head_names: list[str] | None = None
        if isinstance(heads, (Mapping, nn.ModuleDict)):  # names: the tasks' names
            head_names = [str(key) for key in heads.keys()]
            heads = list(heads.values())
        elif isinstance(heads, str) or (isinstance(heads, nn.Module)
                                        and not hasattr(type(heads), "__iter__")):
            # one module (an nn.Linear) is not K heads; containers (ModuleList, Sequential) are
            raise ValueError(f"heads must be a list of K heads (modules or parameter lists), an "
                             f"nn.ModuleList, or an nn.ModuleDict / dict {{task name: head}}; "
                             f"got {type(heads).__name__}")
        if heads is not None:
            unwrapped = [unwrap_ddp(h) for h in heads]
            heads = [h for h, _ in unwrapped]
            self._ddp += [d for _, d in unwrapped if d is not None]

        self.shared = FlatParams(shared, "shared", allow_sharded=True)
        self.heads: FlatParams | None = None
        if heads is not None:
            heads = list(heads)
            if not heads:
                raise ValueError("heads must be a non-empty list (one entry per task) or None")
            named = dict(zip(head_names, heads)) if head_names is not None else \
                {f"head{i}": h for i, h in enumerate(heads)}
            self.heads = FlatParams(named, "heads")
            if len(self.heads.layers) != len(heads):
                have = {la.name for la in self.heads.layers}
                empty = [n for n in named if n not in have]
                raise ValueError(f"heads {empty} have no trainable parameters (or repeat "
                                 "another head's)")
            if self.heads.device != self.shared.device:
                raise ValueError(f"heads are on {self.heads.device} but shared parameters are "
                                 f"on {self.shared.device}")
            overlap = self.shared.ids() & self.heads.ids()
            if overlap:
                raise ValueError("a parameter appears in both shared and heads")
        self.num_tasks: int | None = len(heads) if heads is not None else None
        # named heads fix the task names: the closure returns {name: loss}, in any order
        self.task_names: list[str] | None = head_names
        # whether named/unnamed losses are fixed (by named heads, or by a first closure call)
        self._form_fixed = head_names is not None

        roots: list[object] = [shared]
        if isinstance(shared, dict):
            roots.extend(shared.values())
        roots.extend(heads or [])
        roots.extend([bn_modules] if isinstance(bn_modules, nn.Module) else (bn_modules or []))
        self.bn_stats = bn_stats
        self.bn_running_stats = RunningStats(batchnorm_modules(roots) if bn_stats == "first"
                                             else [])
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)

        self.method = method
        self.aggregator_spec = aggregator
        self._aggregate = get_aggregator(aggregator, **(aggregator_options or {}))
        # LS and mean weights do not depend on the Gram matrix: the step skips computing it
        # (unless a normalisation or scaling convention makes them depend on it).
        conv = {k: v for k, v in (aggregator_options or {}).items()
                if k in ("normalize", "scale") and v != "none"}
        self.constant_weights: str | None = (
            aggregator.lower() if isinstance(aggregator, str)
            and aggregator.lower() in ("ls", "mean") and not conv else None)
        if not isinstance(batched_grads, bool):
            raise ValueError(f"batched_grads must be True or False, got {batched_grads!r}")
        self.batched_grads = batched_grads
        # BatchNorm layers that normalise functionally (batch statistics) inside vmap
        self.batched_bn = batchnorm_modules(roots)
        unsupported = None
        if batched is not False:
            unsupported = unsupported_reason(
                self.shared.find_owners(roots),
                self.heads.find_owners(roots) if self.heads is not None else [],
                bn_stats == "all" and bool(self.batched_bn))
        self.batched = BatchedPolicy(batched, task_chunk, unsupported)
        self.batched.only({
            "points": method in ("gl", "fmtl"),
            "grads": method == "fmtl" or (method == "gl" and local_grad == "autograd") or (
                method in ("erm", "sam") and self.constant_weights is None)})
        self.rho = float(rho)
        self.rho_heads = float(rho if rho_heads is None else rho_heads)
        self.alpha = float(alpha)
        self.norm = norm
        self.local_grad = local_grad
        self.adaptive = bool(adaptive)
        self.decompose = bool(decompose)
        self.backend_request = backend
        # the ops get the resolved backend ("auto" pinned to it), so a step's op calls read
        # no environment variable; the compiled kernels check themselves here, before any step
        # (explicit backend: ValueError; auto: failing ops run on the reference, one warning)
        self.backend, self.ops_backend = pin(backend, self.shared.device)
        self._selfcheck_dtypes = tuple(dict.fromkeys(
            b.dtype for f in (self.shared, self.heads) if f is not None for b in f.buckets))
        selfcheck.prepare(self.backend, self.shared.device, self._selfcheck_dtypes,
                          fallback=self.ops_backend != self.backend, requested=backend)
        if self.shared.sharded:
            check_sharded(self.shared, self.sync, method=method, local_grad=local_grad,
                          batched=batched, batched_grads=batched_grads)

        n_layers = len(self.shared.layers)
        layer_mode = None
        if isinstance(layers, str):  # a mode or one layer's name, never its characters
            if layers in LAYER_MODES:
                layer_mode, picked = layers, []
            else:
                picked = [self.shared.layer_index(layers)]
        elif layers is None:
            picked = default_layers(n_layers)
        else:
            picked = sorted({self.shared.layer_index(s) for s in layers})
            if not picked:
                raise ValueError("layers must name at least one layer (or be None)")
        if n_sampled is None:  # the default fits any backbone; an explicit value is checked
            n_sampled = min(DEFAULT_N_SAMPLED, n_layers)
        layer_args = (layer_mode, picked, n_layers, n_sampled, resample_every, layer_ema)

        self._task_weights_arg = task_weights
        self._task_weights: Tensor | None = None
        if generator is None:
            generator = torch.Generator()
            seed = int(torch.randint(0, 2**62, (1,)).item())
            if self.sync is not None:
                seed = self.sync.broadcast_seed(seed, self.shared.device)
            generator.manual_seed(seed)
        self.generator = generator
        self.layer_selector = LayerSelector(*layer_args, generator=generator)
        self.work = Workspace(self.shared, self.heads)  # step buffers, cached tables
        self.n_dirs = n_dirs
        self.mu = float(mu)
        # Seed of the zo directions: the generator's seed, read without consuming its state
        # (PCGrad's draws stay the same whether or not zo is used).
        self.zo_seed = int(generator.initial_seed())

        groups = [{"params": list(self.shared.params)}]
        if self.heads is not None:
            groups.append({"params": list(self.heads.params)})
        defaults = dict(rho=self.rho, alpha=self.alpha)
        super().__init__(groups, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state

        self._step_count = 0
        self._graph_checked = False
        self._lag_valid = False
        self._lag_scale: Tensor | None = None
        self._lag_layers: tuple[int, ...] | None = None
        self._sync_checked = False
        self._initialized = True
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            scaling_for(grad_scaler, None, None, self.shared.device)  # validates the scaler
            init_scaler(grad_scaler, self.shared.device)

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
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
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
        """The configuration actually in use (backend resolved, layers sampled)."""
        return {
            "method": self.method, "aggregator": str(self.aggregator_spec),
            "backend": self.backend, "rho": self.rho, "rho_heads": self.rho_heads,
            "alpha": self.alpha, "norm": self.norm, "local_grad": self.local_grad,
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

