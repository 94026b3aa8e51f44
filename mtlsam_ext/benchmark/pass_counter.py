"""Instrumentation of the step benchmark's counting steps (never of the timed ones): backbone
forwards and backwards counted with hooks, the closure and the autograd entry points timed."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mtlsam_ext.benchmark.harness import Timer


class PassCounter:
    """Counts backbone forwards and backwards with hooks and times the closure and the
    autograd entry points; install with ``with counter.installed(): ...``."""

    def __init__(self, body: nn.Module, device: torch.device) -> None:
        self.body = body
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.backwards = 0
        self.backwards_full = 0
        self.autograd_calls = 0
        self.fwd_timer = Timer(self.device)
        self.bwd_timer = Timer(self.device)

    def wrap_closure(self, closure: Callable[..., Any], task_aware: bool = False
                     ) -> Callable[..., Any]:
        if task_aware:
            def timed_task(task: int | None = None) -> Any:
                with self.fwd_timer:
                    return closure(task=task)
            return timed_task

        def timed() -> Any:
            with self.fwd_timer:
                return closure()
        return timed

    @contextmanager
    def installed(self):
        handles = []

        def pre(_m: nn.Module, _inp: Any) -> None:
            self.forwards += 1

        def post(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._on_top)

        handles.append(self.body.register_forward_pre_hook(pre))
        handles.append(self.body.register_forward_hook(post))
        first = next(p for p in self.body.parameters() if p.requires_grad)
        handles.append(first.register_hook(self._on_bottom))
        orig_backward, orig_grad = torch.autograd.backward, torch.autograd.grad

        def backward(*a: Any, **kw: Any) -> Any:
            self.autograd_calls += 1
            with self.bwd_timer:
                return orig_backward(*a, **kw)

        def grad(*a: Any, **kw: Any) -> Any:
            self.autograd_calls += 1
            with self.bwd_timer:
                return orig_grad(*a, **kw)

        torch.autograd.backward, torch.autograd.grad = backward, grad
        try:
            yield self
        finally:
            torch.autograd.backward, torch.autograd.grad = orig_backward, orig_grad
            for h in handles:
                h.remove()

    def _on_top(self, g: torch.Tensor) -> None:
        self.backwards += 1

    def _on_bottom(self, g: torch.Tensor) -> None:
        self.backwards_full += 1

