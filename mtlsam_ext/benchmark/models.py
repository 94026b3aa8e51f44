"""The step benchmark's problems: models with a backbone ``body`` and K linear heads, one seeded
batch per (model, K), and the closure every method steps with."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class MLPNet(nn.Module):
    """The main job's MLP (64 -> width x depth, ReLU), K heads of 10 classes."""

    def __init__(self, k: int, width: int = 256, depth: int = 4, d_in: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))
        self.input_shape = (d_in,)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (32-64-128 channels) on 3x32x32 images, global average pool."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(128, 10) for _ in range(k))
        self.input_shape = (3, 32, 32)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Backbone(nn.Module):
    """ResNet-18 layout for 32x32 inputs (CIFAR stem: one 3x3 conv, no max-pool), 4 stages of
    2 basic blocks with 64/128/256/512 channels, global average pool: 11.2 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        blocks: list[nn.Module] = []
        c = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


class ResNet18Net(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.body = ResNet18Backbone()
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(k))
        self.input_shape = (3, 32, 32)


MODELS: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    # name: (factory(K), default batch)
    "mlp": (MLPNet, 128),
    "cnn": (SmallCNN, 64),
    "resnet18": (ResNet18Net, 128),
}



def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                task_aware: bool = False) -> Callable[..., Any]:
    """The benchmark's closure: the K task losses of one forward (``task_aware``: a
    ``task`` keyword builds one head and one loss, as ``closure(task=i)`` may)."""

    def closure() -> list[torch.Tensor]:
        h = model.body(x)
        return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]

    def closure_task(task: int | None = None) -> Any:
        h = model.body(x)
        if task is None:
            return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]
        return F.cross_entropy(model.heads[task](h), y[:, task])

    return closure_task if task_aware else closure


def make_problem(model_name: str, k: int, args: argparse.Namespace, device: torch.device
                 ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The benchmark's model with K heads, one seeded batch ``(x, y)`` and its size."""
    factory, default_batch = MODELS[model_name]
    batch = args.batch or default_batch
    torch.manual_seed(args.seed)
    model = factory(k).to(device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, *model.input_shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch, k), generator=g).to(device)
    return model, x, y, batch
