"""Saving and restoring the state of a stateful aggregator (e.g. GradVac's targets).

A resolved aggregator (what :func:`mtlsam_ext.aggregators.get_aggregator` returns) is
stateful when it has ``state_dict()`` and ``load_state_dict(state)``; the optimizer stores
that state in its own state dict and puts it back when a step fails or is skipped. Every
other aggregator has no state (``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["aggregator_state", "load_aggregator_state"]


def aggregator_state(agg: Callable[..., Any]) -> dict[str, Any] | None:
    """A copy of ``agg``'s state, or ``None`` for an aggregator without state."""
    fn = getattr(agg, "state_dict", None)
    if not callable(fn) or not callable(getattr(agg, "load_state_dict", None)):
        return None
    return fn()


def load_aggregator_state(agg: Callable[..., Any], state: dict[str, Any] | None) -> None:
    """Put back a state from :func:`aggregator_state` (``None``, or an aggregator without
    state: nothing to do)."""
    fn = getattr(agg, "load_state_dict", None)
    if state is None or not callable(fn):
        return
    fn(state)
