"""Gram-matrix aggregators for multi-task gradients.

Every aggregator is a pure function ``agg(G, *, generator=None, **options) -> w`` of the
K x K Gram matrix ``G[i, j] = <g_i, g_j>`` of the task gradients, returning K weights in
G's dtype and on G's device; the combined update is ``d = sum_i w_i g_i``.  Internally all
of them compute in float64.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from .aligned_mtl import aligned_mtl, check_scale_mode
from .cagrad import cagrad
from .conventions import NORMALIZE, SCALE, check_convention, with_convention
from .dual_cone import solve_nonneg_qp
from .fairgrad import check_fairgrad_options, fairgrad
from .gradvac import GradVac, draw_orders, gradvac
from .imtl import imtl
from .ls import ls, mean
from .mgda import mgda
from .nash import nash
from .pcgrad import draw_permutations, pcgrad
from .rlw import rlw
from .stateful import aggregator_state, load_aggregator_state
from .upgrad import check_projection_options, dualproj, upgrad

__all__ = [
    "AGGREGATORS",
    "NORMALIZE",
    "SCALE",
    "Aggregator",
    "GradVac",
    "aggregator_state",
    "aligned_mtl",
    "cagrad",
    "check_weights",
    "draw_orders",
    "draw_permutations",
    "dualproj",
    "fairgrad",
    "get_aggregator",
    "gradvac",
    "imtl",
    "load_aggregator_state",
    "ls",
    "mean",
    "mgda",
    "nash",
    "pcgrad",
    "rlw",
    "solve_nonneg_qp",
    "upgrad",
    "with_convention",
]

#: What :func:`get_aggregator` returns: ``agg(G, generator=None) -> w``.
Aggregator = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

AGGREGATORS: dict[str, Callable[..., torch.Tensor]] = {
    "ls": ls,
    "mean": mean,
    "mgda": mgda,
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "imtl": imtl,
    "nash": nash,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "aligned_mtl": aligned_mtl,
    "fairgrad": fairgrad,
    "gradvac": gradvac,
    "rlw": rlw,
}

# Aggregators with state across calls: resolve builds one object per spec (its options are
# its constructor's), whose ``state_dict``/``load_state_dict`` MTLSAM saves and restores.
_STATEFUL: dict[str, type] = {"gradvac": GradVac}


def _check_aligned_mtl(pref_vector: object = None, scale_mode: object = "min") -> None:
    check_projection_options("aligned_mtl", pref_vector)
    check_scale_mode(scale_mode)


# Option checks run when a name is resolved, so that MTLSAM's constructor raises them.
_CHECKS: dict[str, Callable[..., object]] = {
    "upgrad": functools.partial(check_projection_options, "upgrad"),
    "dualproj": functools.partial(check_projection_options, "dualproj"),
    "aligned_mtl": _check_aligned_mtl,
    "fairgrad": check_fairgrad_options,
}


def _option_names(fn: Callable[..., torch.Tensor]) -> list[str]:
    """Keyword options of a built-in aggregator (everything keyword-only but ``generator``)."""
    params = inspect.signature(fn).parameters.values()
    return [
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "generator"
    ]


def _accepts_generator(fn: Callable[..., object]) -> bool:
    """Whether ``fn`` can be called with a ``generator=`` keyword argument."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no inspectable signature
        return False
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if p.name == "generator" and p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return True
    return False


def get_aggregator(spec: str | Callable[..., torch.Tensor], **options: object) -> Aggregator:
    """:func:`resolve` ``spec`` with ``options``, then wrap it with the gradient normalisation
    and output scaling of :mod:`mtlsam_ext.aggregators.conventions`: the options
    ``normalize`` (``"none"``, ``"l2"``) and ``scale`` (``"none"``, ``"tasks"``), e.g.
    ``normalize="l2", scale="tasks"`` for the F-MTL authors' NYUv2 MGDA. A user callable
    that has a parameter of that name receives the option itself instead."""
    conv: dict[str, str] = {}
    for key in ("normalize", "scale"):
        if key in options and not (not isinstance(spec, str) and _takes(spec, key)):
            conv[key] = options.pop(key)  # type: ignore[assignment]
    normalize, scale = conv.get("normalize", "none"), conv.get("scale", "none")
    check_convention(normalize, scale)
    return with_convention(resolve(spec, **options), normalize, scale)


def _takes(fn: Callable[..., object], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resolve(spec: str | Callable[..., torch.Tensor], **options: object) -> Aggregator:
    """Resolve ``spec`` to a callable ``agg(G, generator=None) -> w`` with ``options`` bound.

    ``spec`` is either a registered name (see :data:`AGGREGATORS`; case-insensitive) or a
    user callable.  For a name, ``options`` must be keyword options of that aggregator
    (e.g. ``get_aggregator("cagrad", c=0.5)``); an unknown name or option raises
    ``ValueError`` listing the valid ones.

    A user callable takes ``G`` positionally and, optionally, a ``generator=`` keyword:
    it is called as ``fn(G, generator=generator, **options)`` if its signature accepts a
    ``generator`` keyword (or ``**kwargs``), else as ``fn(G, **options)``.  Its result is
    not checked here; use :func:`check_weights`.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in AGGREGATORS:
            raise ValueError(
                f"unknown aggregator {spec!r}; valid names are: {', '.join(sorted(AGGREGATORS))}"
            )
        fn = AGGREGATORS[key]
        stateful = _STATEFUL.get(key)
        valid = (list(inspect.signature(stateful).parameters) if stateful is not None
                 else _option_names(fn))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"aggregator {key!r} got unknown option(s) {unknown}; "
                f"valid options: {valid if valid else 'none'} (and, for every aggregator, "
                f"normalize={NORMALIZE} and scale={SCALE})"
            )
        if stateful is not None:
            return _stateful_builtin(key, stateful(**options))
        if key in _CHECKS:
            _CHECKS[key](**options)
        bound = functools.partial(fn, **options)

        def builtin(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            return bound(G, generator=generator)

        builtin.__name__ = key
        builtin.__doc__ = fn.__doc__
        return builtin
    if callable(spec):
        user = spec
        takes_generator = _accepts_generator(user)

        def wrapped(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            w = (user(G, generator=generator, **options) if takes_generator
                 else user(G, **options))
            # A user's weights may come from the CPU (``torch.ones(K)``) while G sits on a
            # GPU: put them where the update is computed (checked by check_weights).
            if isinstance(w, torch.Tensor) and w.device != G.device:
                w = w.to(G.device)
            return w

        wrapped.__name__ = getattr(user, "__name__", "user_aggregator")
        wrapped.__doc__ = getattr(user, "__doc__", None)
        return wrapped
    raise ValueError(
        f"aggregator spec must be a name ({', '.join(sorted(AGGREGATORS))}) or a callable, "
        f"got {type(spec).__name__}"
    )


def _stateful_builtin(key: str, obj: GradVac) -> Aggregator:
    def builtin(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return obj(G, generator)

    builtin.__name__ = key
    builtin.__doc__ = AGGREGATORS[key].__doc__
    builtin.state_dict = obj.state_dict  # type: ignore[attr-defined]
    builtin.load_state_dict = obj.load_state_dict  # type: ignore[attr-defined]
    return builtin


def check_weights(w: object, K: int, name: str = "aggregator") -> torch.Tensor:
    """Validate the weights returned by an aggregator and return them unchanged.

    Raises ``ValueError`` unless ``w`` is a floating-point ``torch.Tensor`` of shape ``[K]``
    with only finite entries.  (The finiteness test reads one boolean from the device.)
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name}: weights must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 1 or w.shape[0] != K:
        raise ValueError(f"{name}: weights must have shape [{K}], got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: weights must have a floating dtype, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: weights contain NaN or infinite entries")
    return w
