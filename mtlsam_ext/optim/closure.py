"""The closure contract: what ``MTLSAM.step`` calls and what it accepts back.

A closure runs a forward pass and returns the K task losses, without calling ``backward``:

* a list or tuple of scalar tensors, a 1-D tensor, or a dict ``{task name: loss}`` (the names
  and their order are fixed by the first step);
* a *task-aware* closure takes a keyword ``task``: ``closure(task=None)`` returns all K losses
  (the unperturbed pass, forward-only estimates), ``closure(task=i)`` only task i's loss (the
  perturbed pass of task i), where ``i`` is the task's index, or its name for dict closures.
  At K = 40 a perturbed pass then builds one head and one loss instead of 40.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from mtlsam_ext.optim.checks import as_loss_list

#: The message every closure-contract error ends with.
CONTRACT = ("the closure must run a forward pass and return the K task losses without calling "
            "backward(); MTLSAM runs every backward pass itself")


# Answers for plain functions by code object: a training loop that defines its closure anew
# every step hands a new function with the same code, and inspect.signature took ~30 us. Not
# for functions whose signature is declared apart from their code (functools.wraps sets
# __wrapped__: one wrapper code then stands for many signatures).
_BY_CODE: dict[types.CodeType, bool] = {}


def accepts_task(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` takes a ``task`` keyword (then perturbed passes ask for one loss)."""
    plain = type(closure) is types.FunctionType and not (
        "__wrapped__" in closure.__dict__ or "__signature__" in closure.__dict__)
    if plain:
        code = closure.__code__
        known = _BY_CODE.get(code)
        if known is None:
            if len(_BY_CODE) > 1024:
                _BY_CODE.clear()
            known = _BY_CODE[code] = _accepts_task(closure)
        return known
    return _accepts_task(closure)


def _accepts_task(closure: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    p = params.get("task")
    return p is not None and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        inspect.Parameter.KEYWORD_ONLY)


def parse_all(out: object, k: int | None, names: Sequence[str] | None, fixed: bool,
              graph: bool = True, only: int | None = None
              ) -> tuple[list[Tensor], list[str] | None]:
    """The K losses of a full closure call, and the task names when it returned a dict
    (``only``: just that loss checked, see :func:`as_loss_list`).

    ``fixed`` says whether a first call has fixed the form; ``names`` are the names it fixed
    (``None`` for unnamed losses). A dict with other task names, or a dict where a list was
    returned before (and vice versa), is a ``ValueError``; the same names in another order
    are taken in the fixed order.
    """
    if isinstance(out, dict):
        keys = list(out.keys())
        if not all(isinstance(key, str) for key in keys):
            raise ValueError("a dict of losses must map task names (str) to losses, got keys "
                             f"{keys!r}")
        if names is not None and keys != list(names):
            if set(keys) == set(names):
                # Same tasks in another order: take them in the fixed order.
                out = {n: out[n] for n in names}
            else:
                raise ValueError(f"the closure returned losses for tasks {keys}, but the task "
                                 f"names are {list(names)} (the named heads', or the first "
                                 "step's)")
        elif names is None and fixed:
            raise ValueError("the closure returned a dict of named losses, but earlier steps "
                             "returned unnamed ones; return the same form every time")
        losses = as_loss_list(list(out.values()), k, graph, only)
        return losses, list(out.keys())
    if fixed and names is not None:
        raise ValueError(f"the closure returned {type(out).__name__}, but the tasks are named "
                         f"{list(names)} (by named heads, or by the first step's dict of "
                         "losses): return a dict {name: loss} every time")
    return as_loss_list(out, k, graph, only), None


def parse_one(out: object, task: int, name: str | None) -> Tensor:
    """Task ``task``'s loss from ``closure(task=...)``: a scalar tensor, or a one-entry list,
    tuple, 1-D tensor or dict (keyed by the task's name)."""
    if isinstance(out, dict):
        if list(out.keys()) != [name]:
            raise ValueError(f"closure(task={name!r}) must return that task's loss alone (a "
                             f"scalar, or a dict with the one key {name!r}), got keys "
                             f"{list(out.keys())}")
        out = list(out.values())
    if isinstance(out, Tensor) and out.dim() == 0:
        out = [out]
    what = repr(name) if name is not None else task
    try:
        (loss,) = as_loss_list(out, 1)
    except ValueError as err:
        raise ValueError(f"closure(task={what}) must return one scalar loss: {err}") from None
    return loss
