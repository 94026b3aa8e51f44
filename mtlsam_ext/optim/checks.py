"""Validation of what a closure returns, and a one-time walk of the autograd graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_loss_list(out: object, k: int | None, graph: bool = True, only: int | None = None
                 ) -> list[Tensor]:
    """The closure's K task losses as a list of scalar tensors with a graph.

    Raises ``ValueError`` naming the problem: wrong container, wrong count, non-scalar loss,
    or a loss that does not require grad (computed under ``no_grad`` or detached; not checked
    with ``graph=False``: under vmap a loss is a batched wrapper that hides its graph).
    ``only``: a perturbed pass that uses loss ``only`` alone checks (and reshapes) that one;
    the others are returned as given (K checks per pass were ~0.1 ms of a K = 10 pass).
    """
    if isinstance(out, Tensor):
        if out.dim() != 1:
            raise ValueError("the closure must return the K task losses as a list, a tuple or a "
                             f"1-D tensor; got a tensor of shape {tuple(out.shape)}")
        losses = list(out.unbind(0))
    elif isinstance(out, (list, tuple)):
        losses = list(out)
    else:
        raise ValueError("the closure must return the K task losses (list, tuple or 1-D "
                         f"tensor), got {type(out).__name__}")
    if k is not None and len(losses) != k:
        raise ValueError(f"the closure returned {len(losses)} losses, expected {k} "
                         "(one per task)")
    if not losses:
        raise ValueError("the closure returned no losses")
    for i, loss in enumerate(losses):
        if only is not None and i != only:
            continue
        if not isinstance(loss, Tensor):
            raise ValueError(f"loss {i} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(f"loss {i} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.dtype.is_floating_point:
            raise ValueError(f"loss {i} must be floating point, got {loss.dtype}")
        if graph and (not loss.requires_grad or loss.grad_fn is None):
            raise ValueError(f"loss {i} has no autograd graph (computed under no_grad, "
                             "detached, or independent of the parameters)")
    if only is not None:
        losses[only] = losses[only].reshape(())
        return losses
    return [loss.reshape(()) for loss in losses]


def reachable_leaves(loss: Tensor) -> tuple[set[int], bool]:
    """``id``s of the leaf tensors that ``loss.backward()`` would accumulate into, and whether
    the graph holds an opaque node (a ``torch.compile``d region: one node whose inputs are all
    the region's parameters, so reaching a leaf through it does not mean depending on it)."""
    # Node wrappers are kept alive in ``seen``: a freed wrapper's id could be reused by
    # another node and make the walk skip it.
    seen: dict[int, object] = {}
    found: set[int] = set()
    opaque = False
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        opaque = opaque or "CompiledFunction" in type(fn).__name__
        var = getattr(fn, "variable", None)
        if isinstance(var, Tensor):
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found, opaque


def finite_report(values: Sequence[Tensor], what: str) -> str:
    """Describe which entries of ``values`` are not finite (called on the error path only)."""
    bad = [i for i, v in enumerate(values) if not bool(torch.isfinite(v).all())]
    return f"{what} not finite for task(s) {bad}" if bad else ""
