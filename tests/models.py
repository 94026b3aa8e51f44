"""Small multi-task models shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


class TwoTask(nn.Module):
    """A tanh MLP backbone with K linear heads, and a regression closure on fixed data."""

    def __init__(self, k: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                 width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width),
                                  nn.Tanh(), nn.Linear(width, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))
        self.to(dtype)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(64, 6, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(6, k, generator=g, dtype=torch.float64)
        self.y = (torch.sin(self.x.double() @ w) + 0.1 * (self.x.double() ** 2) @
                  torch.randn(6, k, generator=g, dtype=torch.float64)).to(dtype)

    def losses(self) -> list[torch.Tensor]:
        h = self.body(self.x)
        return [((head(h).squeeze(1) - self.y[:, i]) ** 2).mean()
                for i, head in enumerate(self.heads)]

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]


class BNNet(nn.Module):
    """A small CNN with BatchNorm in the backbone and in each of K heads (BatchNorm1d), for
    the training-loop tests. ``dropout`` adds a Dropout after the backbone."""

    def __init__(self, k: int = 2, seed: int = 0, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(24, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
            for _ in range(k))
        self.to(dtype)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(16, 1, 6, 6, generator=g).to(dtype)
        self.y = torch.randn(16, k, generator=g).to(dtype)

    def losses(self) -> list[torch.Tensor]:
        h = self.body(self.x)
        return [((head(h).squeeze(1) - self.y[:, i]) ** 2).mean()
                for i, head in enumerate(self.heads)]

    def bn_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state_dict().items()
                if "running" in k or "num_batches" in k}
