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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlsam_ext.optim.checks import as_loss_list

if TYPE_CHECKING:
    from mtlsam_ext.optim.mtlsam import MTLSAM

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


def call_closure(opt: MTLSAM, closure: Callable[..., Any], task: int | None = None,
                 task_aware: bool = False, batched: bool = False,
                 pick: int | None = None) -> list[Tensor]:
    """Call the closure (``closure(task=...)`` when ``task_aware``) and return the K losses,
    or ``[loss_task]`` for a task-aware call with ``task`` given. ``batched``: the call runs
    under vmap (the K losses of one point; the form was fixed by the first call).
    ``pick``: only loss ``pick`` will be used (a perturbed pass), only it is checked."""
    with torch.enable_grad():  # step() runs under no_grad; the losses need graphs
        if not task_aware:
            out = closure()
        elif task is None:
            out = closure(task=None)
        else:
            name = opt.task_names[task] if opt.task_names is not None else None
            out = closure(task=task if name is None else name)
        if task_aware and task is not None:
            losses = [parse_one(out, task, name)]
        else:
            losses, names = parse_all(out, opt.num_tasks, opt.task_names,
                                      opt._form_fixed, graph=not batched,
                                      only=pick if opt._form_fixed else None)
            if not opt._form_fixed:
                opt.task_names = names
                opt._form_fixed = True
    # A closure may call model.zero_grad() (set_to_none=True): put the flat views back
    # before autograd would write fresh tensors the flat buffers never see. A perturbed
    # pass backpropagates one loss, which reaches one head: only that head is re-attached
    # here (all heads are again before the base optimizer reads them, heads_to_grad).
    opt.shared.attach_grads()
    if opt.heads is not None:
        one = pick if not task_aware else task
        if one is None or batched:
            opt.heads.attach_grads()
        else:
            opt.heads.attach_layer_grads(one)
    if opt.num_tasks is None:
        opt.num_tasks = len(losses)
    for loss in losses if pick is None or task_aware else losses[pick:pick + 1]:
        if loss.device != opt.shared.device:
            raise ValueError(f"losses are on {loss.device} but parameters on "
                             f"{opt.shared.device}")
    return losses


def check_no_backward(opt: MTLSAM) -> None:
    """First step only (gradients were zeroed before the closure): a non-zero gradient
    after the closure means it ran backward itself."""
    bufs = [] if opt.shared.sharded else [b.grad for b in opt.shared.buckets]
    if opt.heads is not None:
        bufs += [b.grad for b in opt.heads.buckets]
    if (opt.shared.sharded and opt.shared.has_grads()) or any(
            bool(g.ne(0).any()) for g in bufs):
        raise ValueError(f"gradients changed while the closure ran: {CONTRACT}")
