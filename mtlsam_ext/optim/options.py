"""The constructor's options, validated in one place, and the hyper-parameters a step reads.

:class:`Options` holds ``MTLSAM``'s keyword arguments (and its ``base_optimizer``), checks them
in the order the constructor always has (when two are bad, the same one is reported), and
keeps the values the optimizer uses (``rho`` as a float, ``rho_heads`` resolved, ...). The
arguments whose check needs the model or a collaborator (the heads, ``perturb_sync``, the
aggregator, ``batched``, ``layers``, the layer modes, ``grad_scaler``) are checked where those
are built; :meth:`Options.check_batched_grads` runs at its old place among them.

:func:`step_hyper` is the other half: ``rho``, ``rho_heads`` and ``alpha`` live in
``param_groups`` (so a scheduler or a hand edit reaches them) and every step reads them from
there, checked with the same messages:

* the shared parameters' groups give ``rho`` (the radius of the shared perturbation, SAM's
  ``eps = rho g / ||g||`` over all shared parameters at once) and ``alpha`` (``gl``'s
  global/local mix, report Alg. 1): one value each, so those groups must agree;
* the heads' groups give ``rho_heads`` (each head's plain SAM radius), also one value;
  without heads it is read from the shared groups (and unused by the step).

The constructor puts the shared parameters in group 0 and the heads in group 1; a base
optimizer that splits or merges groups is honoured as long as the values above agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlsam_ext.ops.dispatch import check_backend_name
from mtlsam_ext.optim.batchnorm import BN_STATS
from mtlsam_ext.optim.distributed import BUCKET_CAP_MB

METHODS = ("gl", "fmtl", "sam", "erm")
LOCAL_GRADS = ("autograd", "lagged", "zo")
NORMS = ("match", "global")

# The hyper-parameters a step reads from param_groups (added to every group's defaults).
SCHEDULED = ("rho", "rho_heads", "alpha")


def check_radius(name: str, v: Any) -> None:
    """``rho`` / ``rho_heads``: a perturbation radius, finite and >= 0 (NaN fails too)."""
    if not (isinstance(v, (int, float)) and v >= 0 and v < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def check_alpha(alpha: Any) -> None:
    """``alpha``: ``gl``'s mixing weight, in [0, 1] (NaN fails)."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


@dataclass(frozen=True)
class Options:
    """``MTLSAM``'s arguments (see its docstring for each), checked on construction.

    The fields hold the values the optimizer uses: ``rho``, ``rho_heads`` (``None`` resolved
    to ``rho``), ``alpha``, ``mu`` and ``max_grad_norm`` as floats, ``adaptive`` and
    ``decompose`` as bools, ``bn_modules`` as a module or a list of modules. The others are
    kept as given; their collaborators check them.
    """

    base_optimizer: Any
    method: str = "gl"
    aggregator: str | Callable[..., Tensor] = "ls"
    rho: float = 0.05
    rho_heads: float | None = None
    alpha: float = 0.5
    layers: Sequence[int | str] | str | None = None
    norm: str = "match"
    local_grad: str = "autograd"
    adaptive: bool = False
    decompose: bool = True
    task_weights: Sequence[float] | Tensor | None = None
    backend: str = "auto"
    generator: torch.Generator | None = None
    aggregator_options: dict[str, Any] | None = None
    n_dirs: int = 4
    mu: float = 1e-3
    bn_stats: str = "first"
    bn_modules: Sequence[nn.Module] | nn.Module | None = None
    max_grad_norm: float | None = None
    grad_scaler: Any = None
    process_group: Any = None
    perturb_sync: str = "global"
    bucket_cap_mb: float = BUCKET_CAP_MB
    n_sampled: int | None = None
    resample_every: int = 10
    layer_ema: float = 0.9
    batched_grads: bool = False
    batched: bool | str = False
    task_chunk: int | None = None

    def __post_init__(self) -> None:
        # The order of these checks is the constructor's: it decides which of two bad
        # arguments is reported (tests/test_options.py).
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.local_grad not in LOCAL_GRADS:
            raise ValueError(f"local_grad must be one of {LOCAL_GRADS}, got "
                             f"{self.local_grad!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        rho_heads = self.rho if self.rho_heads is None else self.rho_heads
        check_radius("rho", self.rho)
        check_radius("rho_heads", rho_heads)
        if not (isinstance(self.n_dirs, int) and self.n_dirs >= 1):
            raise ValueError(f"n_dirs must be a positive int, got {self.n_dirs!r}")
        if not (isinstance(self.mu, (int, float)) and 0 < self.mu < float("inf")):
            raise ValueError(f"mu must be a finite number > 0, got {self.mu!r}")
        check_alpha(self.alpha)
        if not (isinstance(self.base_optimizer, type)
                and issubclass(self.base_optimizer, torch.optim.Optimizer)):
            raise ValueError("base_optimizer must be a torch.optim.Optimizer class, e.g. "
                             "torch.optim.SGD")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        mgn = self.max_grad_norm
        if mgn is not None and not (isinstance(mgn, (int, float)) and not isinstance(mgn, bool)
                                    and 0 < mgn < float("inf")):
            raise ValueError(f"max_grad_norm must be None or a finite number > 0, got "
                             f"{mgn!r}")
        bn_modules = self.bn_modules
        if bn_modules is not None and not isinstance(bn_modules, nn.Module):
            bn_modules = list(bn_modules)
            if not all(isinstance(m, nn.Module) for m in bn_modules):
                raise ValueError("bn_modules must be an nn.Module or a list of nn.Modules")
        gen = self.generator
        if gen is not None and getattr(gen, "device", torch.device("cpu")).type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (it draws the layer "
                             f"selections and PCGrad's task orders on the CPU, for any "
                             f"parameter device), got one on {gen.device}")
        check_backend_name(self.backend)
        # The values in use (the same float() conversions as ever: same bits).
        for name, value in (("rho", float(self.rho)), ("rho_heads", float(rho_heads)),
                            ("alpha", float(self.alpha)), ("mu", float(self.mu)),
                            ("max_grad_norm", None if mgn is None else float(mgn)),
                            ("adaptive", bool(self.adaptive)),
                            ("decompose", bool(self.decompose)), ("bn_modules", bn_modules)):
            object.__setattr__(self, name, value)

    def check_batched_grads(self) -> None:
        """Checked after the model and the aggregator are wired, where it always was."""
        if not isinstance(self.batched_grads, bool):
            raise ValueError(f"batched_grads must be True or False, got "
                             f"{self.batched_grads!r}")

    def defaults(self) -> dict[str, float]:
        """The scheduled hyper-parameters, as every param group starts with them."""
        return {name: getattr(self, name) for name in SCHEDULED}


@dataclass(frozen=True)
class GroupRoles:
    """Which param groups hold shared parameters and which hold heads (by index)."""

    shared: tuple[int, ...]
    heads: tuple[int, ...]

    @staticmethod
    def of(groups: Sequence[Mapping[str, Any]], shared_ids: set[int],
           head_ids: set[int]) -> GroupRoles:
        shared, heads = [], []
        for i, g in enumerate(groups):
            ids = {id(p) for p in g["params"]}
            if ids & shared_ids:
                shared.append(i)
            if ids & head_ids:
                heads.append(i)
        if not shared:
            raise ValueError("the base optimizer's param_groups hold none of the shared "
                             "parameters (a base optimizer must keep the parameters it is "
                             "given)")
        return GroupRoles(tuple(shared), tuple(heads))


class ScheduledHyper:
    """The reader of ``(rho, rho_heads, alpha)`` that an optimizer keeps: which groups hold
    what is worked out again only when the groups' parameter lists change (a base optimizer's
    ``load_state_dict`` keeps them), so a step pays a few dict reads."""

    def __init__(self, shared_ids: set[int], head_ids: set[int], method: str) -> None:
        self.shared_ids, self.head_ids, self.method = shared_ids, head_ids, method
        self._key: tuple[int, ...] | None = None
        self._roles: GroupRoles | None = None

    def read(self, groups: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
        key = tuple(id(g["params"]) for g in groups)
        if key != self._key or self._roles is None:
            self._roles = GroupRoles.of(groups, self.shared_ids, self.head_ids)
            self._key = key
        return step_hyper(groups, self._roles, self.method)

    def fill(self, groups: Sequence[dict[str, Any]], in_use: Mapping[str, float]) -> None:
        """Give groups without a scheduled key (a state dict saved before ``rho_heads`` was
        one) the value in use."""
        for g in groups:
            for k in SCHEDULED:
                g.setdefault(k, in_use[k])


def _one_value(groups: Sequence[Mapping[str, Any]], where: tuple[int, ...], key: str,
               used: bool, part: str) -> Any:
    """``key`` of the groups ``where``; when ``used``, they must agree."""
    values = [groups[i][key] for i in where]
    if used and any(v != values[0] for v in values[1:]):
        raise ValueError(f"param_groups {list(where)} hold the {part} but disagree on "
                         f"{key!r} ({values}): the step uses one {key} for all of them; give "
                         f"those groups the same value")
    return values[0]


def step_hyper(groups: Sequence[Mapping[str, Any]], roles: GroupRoles,
               method: str) -> tuple[float, float, float]:
    """``(rho, rho_heads, alpha)`` for the next step, read from ``groups`` and checked (the
    constructor's messages) before the step changes anything. Groups that must agree are
    only required to where the method reads the value (``erm`` reads none, ``alpha`` only
    ``gl``)."""
    for g in groups:  # every group, read or not: a bad value is never silently kept
        missing = [k for k in SCHEDULED if k not in g]
        if missing:
            raise ValueError(f"a param group has no {missing[0]!r}: MTLSAM's param groups hold "
                             f"{list(SCHEDULED)} (set them with the group's other values)")
        check_radius("rho", g["rho"])
        check_radius("rho_heads", g["rho_heads"])
        check_alpha(g["alpha"])
    perturbs = method != "erm"
    rho = _one_value(groups, roles.shared, "rho", perturbs, "shared parameters")
    alpha = _one_value(groups, roles.shared, "alpha", method == "gl", "shared parameters")
    where, part = (roles.heads, "heads") if roles.heads else (roles.shared,
                                                              "shared parameters")
    rho_heads = _one_value(groups, where, "rho_heads", perturbs and bool(roles.heads), part)
    return float(rho), float(rho_heads), float(alpha)


# the keyword arguments (and base_optimizer) Options takes
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))
