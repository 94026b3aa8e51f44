"""``MTLSAM``: a drop-in optimizer for sharpness-aware multi-task learning.

It wraps any ``torch.optim`` optimizer. ``step(closure)`` runs the chosen method's forward and
backward passes, builds the shared update with the chosen aggregator, and lets the base
optimizer step. The per-method passes live in :mod:`mtlsam_ext.optim.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlsam_ext.aggregators import check_weights, get_aggregator
from mtlsam_ext.flat import FlatParams
from mtlsam_ext.ops.dispatch import check_backend_name, resolve_backend
from mtlsam_ext.optim import methods
from mtlsam_ext.optim.checks import as_loss_list, reachable_leaves

METHODS = ("gl", "fmtl", "sam", "erm")
LOCAL_GRADS = ("autograd", "lagged", "zo")
NORMS = ("match", "global")

Params = nn.Module | Iterable[Tensor] | dict


class MTLSAM(torch.optim.Optimizer):
    """Sharpness-aware multi-task optimizer over a shared backbone and optional task heads.

    Args:
        shared: the shared part: an ``nn.Module`` (each submodule owning parameters is a
            layer), an iterable of parameters (each tensor is a layer), or a dict of named
            layers.
        base_optimizer: a ``torch.optim.Optimizer`` class, built over all parameters with
            ``**base_kwargs``; its ``param_groups`` are this optimizer's, so LR schedulers work.
        heads: optional list of K modules / iterables of task-specific parameters; head i may
            only influence loss i. Heads get plain SAM with radius ``rho_heads``. For ``gl``
            and ``sam`` the head direction is taken from the one backward of ``l_0``, i.e.
            ``w_i * grad l_i``: the same direction for ``w_i > 0``, and no head perturbation
            for a task whose weight is 0.
        method: ``"gl"`` global-local sampled SAM (report Alg. 1), ``"fmtl"`` F-MTL
            (Phan et al. Alg. 1), ``"sam"`` plain SAM on the weighted average loss, ``"erm"``
            no perturbation.
        aggregator: ``"ls"`` (sum), ``"mean"``, ``"mgda"``, ``"pcgrad"``, ``"cagrad"``,
            ``"imtl"``, ``"nash"``, or a callable ``G -> w`` on the K x K Gram matrix.
        rho, rho_heads: perturbation radii of the shared part and of the heads.
        alpha: global/local mixing weight of ``gl`` (1 = global only).
        layers: sampled layers of ``gl``: ``None`` = first, middle (``L // 2``) and last;
            otherwise a list of layer indices or names.
        norm: ``"match"`` or ``"global"`` (see :func:`~mtlsam_ext.optim.perturbation.
            global_local_coefs`).
        local_grad: ``"autograd"`` (exact task gradients on the sampled layers),
            ``"lagged"`` (previous step's SAM gradients there; the first step uses autograd)
            or ``"zo"`` (forward-only central differences along ``n_dirs`` seeded Gaussian
            directions of size ``mu``; 2 n_dirs forwards, no backward).
        adaptive: ASAM perturbations ``rho T^2 g / ||T g||`` with ``T = |theta|``.
        decompose: F-MTL's M(loss) + M(flat) (``True``) or M(SAM) (``False``).
        task_weights: weights of the average loss ``l_0 = sum_i w_i l_i`` (default 1/K).
        backend: ``"auto"``, ``"torch"``, ``"ext"`` or ``"triton"`` for the fused ops.
        generator: ``torch.Generator`` for random aggregators (PCGrad); default: one seeded
            from the global RNG at construction.
        aggregator_options: keyword options of a named aggregator, e.g. ``{"c": 0.5}`` for
            CAGrad.
    """

    def __init__(self, shared: Params, base_optimizer: type[torch.optim.Optimizer], *,
                 heads: Sequence[Params] | None = None, method: str = "gl",
                 aggregator: str | Callable[..., Tensor] = "ls", rho: float = 0.05,
                 rho_heads: float | None = None, alpha: float = 0.5,
                 layers: Sequence[int | str] | None = None, norm: str = "match",
                 local_grad: str = "autograd", adaptive: bool = False, decompose: bool = True,
                 task_weights: Sequence[float] | Tensor | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None,
                 aggregator_options: dict[str, Any] | None = None, n_dirs: int = 4,
                 mu: float = 1e-3, **base_kwargs: Any) -> None:
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
        check_backend_name(backend)

        self.shared = FlatParams(shared, "shared")
        self.heads: FlatParams | None = None
        if heads is not None:
            heads = list(heads)
            if not heads:
                raise ValueError("heads must be a non-empty list (one entry per task) or None")
            named = {f"head{i}": h for i, h in enumerate(heads)}
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

        self.method = method
        self.aggregator_spec = aggregator
        self._aggregate = get_aggregator(aggregator, **(aggregator_options or {}))
        # LS and mean weights do not depend on the Gram matrix: the step skips computing it.
        self.constant_weights: str | None = (
            aggregator.lower() if isinstance(aggregator, str)
            and aggregator.lower() in ("ls", "mean") else None)
        self.rho = float(rho)
        self.rho_heads = float(rho if rho_heads is None else rho_heads)
        self.alpha = float(alpha)
        self.norm = norm
        self.local_grad = local_grad
        self.adaptive = bool(adaptive)
        self.decompose = bool(decompose)
        self.backend_request = backend
        self.backend = resolve_backend(backend, self.shared.device)

        n_layers = len(self.shared.layers)
        if layers is None:
            picked = sorted({0, n_layers // 2, n_layers - 1})
        else:
            picked = sorted({self.shared.layer_index(s) for s in layers})
            if not picked:
                raise ValueError("layers must name at least one layer (or be None)")
        self.sampled_layers: list[int] = picked

        self._task_weights_arg = task_weights
        self._task_weights: Tensor | None = None
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.generator = generator
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
        self._buffers: dict[str, list[Tensor]] = {}
        self._tables: list[tuple[Tensor, Tensor, Tensor, int]] | None = None

    # -- public API -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers; ``p.grad`` stay views of them (never ``None``),
        so ``set_to_none`` is accepted for compatibility and ignored."""
        self.shared.zero_grad()
        if self.heads is not None:
            self.heads.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One optimisation step; returns the K task losses at the unperturbed point.

        ``closure()`` must run a forward pass and return the K task losses (a list, a tuple or
        a 1-D tensor) without calling ``backward``; it is called several times per step. On
        any error the parameters, the base optimizer and this optimizer's state are left as
        they were before the step.
        """
        if closure is None or not callable(closure):
            raise ValueError("MTLSAM.step needs a closure that returns the K task losses")
        gen_state = self.generator.get_state()
        self.shared.attach_grads()
        self.shared.check_data_attached()
        if self.heads is not None:
            self.heads.attach_grads()
        run = methods.Run(self, closure)
        try:
            losses = getattr(methods, f"step_{self.method}")(run)
            ok = run.all_finite()
            if not bool(ok):  # the step's one host sync: never step on non-finite values
                raise ValueError(run.nonfinite_message())
        except BaseException as err:
            run.restore_all()
            self.generator.set_state(gen_state)
            if isinstance(err, (ValueError, RuntimeError)) and run.checks \
                    and not bool(run.all_finite()):
                raise ValueError(run.nonfinite_message()) from err
            raise
        run.commit()
        self.base_optimizer.step()
        self._step_count += 1
        return losses

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        lag = self._buffers.get("lag") if self._lag_valid else None
        return {
            "base": self.base_optimizer.state_dict(),
            "mtlsam": {
                "step": self._step_count,
                "num_tasks": self.num_tasks,
                "generator": self.generator.get_state(),
                "lagged": None if lag is None else [t.clone() for t in lag],
                "sampled_layers": list(self.sampled_layers),
                "zo_seed": self.zo_seed,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "base" not in state_dict \
                or "mtlsam" not in state_dict:
            raise ValueError("not an MTLSAM state dict (expected keys 'base' and 'mtlsam')")
        own = state_dict["mtlsam"]
        if list(own.get("sampled_layers", self.sampled_layers)) != self.sampled_layers:
            raise ValueError("state dict was saved with different sampled layers "
                             f"{own['sampled_layers']} (this optimizer: {self.sampled_layers})")
        k = own.get("num_tasks")
        if self.num_tasks is not None and k is not None and k != self.num_tasks:
            raise ValueError(f"state dict has {k} tasks, this optimizer {self.num_tasks}")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self._step_count = int(own["step"])
        if k is not None:
            self.num_tasks = k
        self.generator.set_state(own["generator"])
        self.zo_seed = int(own.get("zo_seed", self.zo_seed))
        lag = own.get("lagged")
        if lag is not None:
            self._buffers["lag"] = [t.to(self.shared.device) for t in lag]
            self._lag_valid = True
        else:
            self._lag_valid = False

    # -- helpers used by the methods ----------------------------------------------------------
    def buffers(self, name: str, rows: int, flat: FlatParams | None = None) -> list[Tensor]:
        """Persistent ``[rows, N_b]`` work buffers per bucket (allocated once, reused)."""
        flat = flat or self.shared
        bufs = self._buffers.get(name)
        if bufs is None or bufs[0].shape[0] != rows:
            bufs = flat.new_rows(rows)
            self._buffers[name] = bufs
        return bufs

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

    def check_graph(self, losses: list[Tensor]) -> None:
        """First step only: every shared parameter must get a gradient from some loss, and
        head i's parameters from loss i and from no other loss."""
        if self._graph_checked:
            return
        reach = [reachable_leaves(loss) for loss in losses]
        union = set().union(*reach)
        missing = self.shared.names_not_in(union)
        if missing:
            raise ValueError(f"shared parameters {missing[:5]}{'...' if len(missing) > 5 else ''}"
                             " receive no gradient from any task loss; freeze them "
                             "(requires_grad=False) or leave them out of `shared`")
        if self.heads is not None:
            for i in range(len(self.heads.layers)):
                ids = self.heads.layer_param_ids(i)
                if not ids & reach[i]:
                    raise ValueError(f"head {i} receives no gradient from loss {i}")
                for j, r in enumerate(reach):
                    if j != i and ids & r:
                        raise ValueError(f"head {i}'s parameters receive gradient from loss {j};"
                                         f" heads[i] may only influence loss i")
        self._graph_checked = True

    def call_closure(self, closure: Callable[[], Any]) -> list[Tensor]:
        with torch.enable_grad():  # step() runs under no_grad; the losses need graphs
            out = closure()
            losses = as_loss_list(out, self.num_tasks)
        # A closure may call model.zero_grad() (set_to_none=True): put the flat views back
        # before autograd would write fresh tensors the flat buffers never see.
        self.shared.attach_grads()
        if self.heads is not None:
            self.heads.attach_grads()
        if self.num_tasks is None:
            self.num_tasks = len(losses)
        for loss in losses:
            if loss.device != self.shared.device:
                raise ValueError(f"losses are on {loss.device} but parameters on "
                                 f"{self.shared.device}")
        return losses

    def info(self) -> dict[str, Any]:
        """The configuration actually in use (backend resolved, layers sampled)."""
        return {
            "method": self.method, "aggregator": str(self.aggregator_spec),
            "backend": self.backend, "rho": self.rho, "rho_heads": self.rho_heads,
            "alpha": self.alpha, "norm": self.norm, "local_grad": self.local_grad,
            "adaptive": self.adaptive, "decompose": self.decompose,
            "sampled_layers": [self.shared.layer_names[i] for i in self.sampled_layers],
            "num_layers": len(self.shared.layers), "shared_numel": self.shared.numel,
        }

