"""Which shared layers global-local SAM samples, step by step.

The global-local report (§V, Figs. 2-3) picks the "crucial" layers as those whose cosine
similarity between the tasks' gradients changes most during training (there: the first, some
middle and the last layers). Modes:

* fixed (``layers=None`` or a list): the same layers every step;
* ``"adaptive"``: per shared layer l and task pair (i, j), the cosine
  ``c_lij = G_l[i, j] / sqrt(G_l[i, i] G_l[j, j])`` of the step's per-task SAM gradients
  (per-layer Gram matrices ``G_l``, taken in the pass that also yields the aggregator's Gram
  matrix, so no extra backward); the score of layer l is an exponential moving average of
  ``mean_{i<j} |c_lij(t) - c_lij(t-1)|``; every ``resample_every`` steps the ``n_sampled``
  layers with the highest scores are selected. Until then the default selection applies;
* ``"random"``: ``n_sampled`` distinct layers drawn for every step from the optimizer's
  generator (``torch.randperm(L)[:n_sampled]``, sorted; the draw for step t + 1 is made at the
  end of step t, the first at construction).

Updates are computed during a step and applied only when it succeeds (``commit``), so a failed
step leaves the scores, the selection and the generator as they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LAYER_MODES = ("adaptive", "random")
# Layers sampled by the modes unless n_sampled says otherwise (capped at the backbone's layers):
# as many as the default fixed selection (first, middle, last).
DEFAULT_N_SAMPLED = 3


def default_layers(n_layers: int, n: int = 3) -> list[int]:
    """First, middle and last (for ``n = 3``); in general ``n`` evenly spaced layers."""
    if n == 3:
        return sorted({0, n_layers // 2, n_layers - 1})
    n = min(n, n_layers)
    return sorted({round(i * (n_layers - 1) / max(n - 1, 1)) for i in range(n)})


def cosine_pairs(seg_gram: Tensor) -> Tensor:
    """``[L, P]`` cosines of the task pairs ``i < j`` per layer from ``[L, K, K]`` Grams (0 for
    a pair with a zero gradient)."""
    g = seg_gram.double()
    k = g.shape[1]
    iu = torch.triu_indices(k, k, 1, device=g.device)
    d = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    den = d[:, iu[0]] * d[:, iu[1]]
    num = g[:, iu[0], iu[1]]
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.zeros_like(num))


class LayerSelector:
    """The sampled-layer state of one optimizer (see the module docstring)."""

    def __init__(self, mode: str | None, fixed: list[int], n_layers: int, n_sampled: int,
                 resample_every: int, ema: float, generator: torch.Generator) -> None:
        if mode is not None and mode not in LAYER_MODES:
            raise ValueError(f"layer mode must be one of {LAYER_MODES}, got {mode!r}")
        if mode is not None:
            if not (isinstance(n_sampled, int) and not isinstance(n_sampled, bool)
                    and 1 <= n_sampled <= n_layers):
                raise ValueError(f"n_sampled must be an int in [1, {n_layers}] (the number of "
                                 f"shared layers), got {n_sampled!r}")
            if not (isinstance(resample_every, int) and not isinstance(resample_every, bool)
                    and resample_every >= 1):
                raise ValueError(f"resample_every must be an int >= 1, got {resample_every!r}")
            if not (isinstance(ema, (int, float)) and 0.0 <= ema < 1.0):
                raise ValueError(f"layer_ema must be in [0, 1), got {ema!r}")
        self.mode = mode
        self.n_layers = n_layers
        self.n_sampled = n_sampled
        self.resample_every = resample_every
        self.ema = float(ema)
        self.score = torch.zeros(n_layers, dtype=torch.float64)
        self.prev_cos: Tensor | None = None
        self.measured = 0
        if mode == "random":
            self.selection = self._draw(generator)
        elif mode == "adaptive":
            self.selection = default_layers(n_layers, n_sampled)
        else:
            self.selection = list(fixed)
        self._pending: tuple[Tensor, Tensor] | None = None

    @property
    def measures(self) -> bool:
        """Whether the step must hand over per-layer Grams."""
        return self.mode == "adaptive"

    def _draw(self, generator: torch.Generator) -> list[int]:
        return sorted(torch.randperm(self.n_layers, generator=generator)[:self.n_sampled]
                      .tolist())

    def observe(self, layer_gram: Tensor) -> None:
        """This step's ``[L, K, K]`` per-layer Grams (kept until :meth:`commit`)."""
        if layer_gram.shape[1] < 2:
            raise ValueError("layers='adaptive' measures how the cosine between tasks changes "
                             "and needs at least 2 tasks")
        cos = cosine_pairs(layer_gram).cpu()
        if self.prev_cos is None or self.prev_cos.shape != cos.shape:
            score = self.score.clone()
        else:
            change = (cos - self.prev_cos).abs().mean(dim=1)
            score = self.ema * self.score + (1.0 - self.ema) * change
        self._pending = (cos, score)

    def commit(self, generator: torch.Generator) -> None:
        """The step succeeded: take its measurement and choose the next step's layers."""
        if self.mode == "adaptive" and self._pending is not None:
            cos, score = self._pending
            had_prev = self.prev_cos is not None
            self.prev_cos, self.score = cos, score
            if had_prev:
                self.measured += 1
                if self.measured % self.resample_every == 0:
                    top = torch.topk(self.score, self.n_sampled).indices
                    self.selection = sorted(top.tolist())
        elif self.mode == "random":
            self.selection = self._draw(generator)
        self._pending = None

    def discard(self) -> None:
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "selection": list(self.selection),
                "score": self.score.clone(), "measured": self.measured,
                "prev_cos": None if self.prev_cos is None else self.prev_cos.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"state dict was saved with layer mode {state.get('mode')!r}, this "
                             f"optimizer uses {self.mode!r}")
        self.selection = [int(i) for i in state["selection"]]
        self.score = state["score"].clone().double().cpu()
        self.measured = int(state["measured"])
        prev = state.get("prev_cos")
        self.prev_cos = None if prev is None else prev.clone().cpu()
