"""The data side of the digit programs: disjoint train / validation / test splits of
scikit-learn's 8x8 digits, and the symmetric label noise of the label-noise study."""

from __future__ import annotations

from collections.abc import Callable

import torch

Split = tuple[torch.Tensor, torch.Tensor]


def noisy_labels(y: torch.Tensor, p: float, n_classes: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """A copy of the targets ``y`` (N x K, one column per task) with exactly ``round(p * N)``
    labels of each task replaced, at positions drawn independently per task: symmetric noise,
    each replaced label drawn uniformly among the *other* ``n_classes - 1`` classes (for binary
    tasks, ``n_classes = 2``, that is a flip), as in the label-noise studies of SAM."""
    if not 0.0 <= p <= 1.0 or n_classes < 2:
        raise ValueError(f"need 0 <= p <= 1 and n_classes >= 2, got p={p}, n_classes={n_classes}")
    out = y.clone()
    n = round(p * len(y))
    for task in range(y.shape[1]):
        idx = torch.randperm(len(y), generator=generator)[:n]
        shift = torch.randint(1, n_classes, (n,), generator=generator)
        out[idx, task] = ((y[idx, task].long() + shift) % n_classes).to(y.dtype)
    return out


def digit_splits(seed: int, sizes: tuple[int, int, int],
                 make_split: Callable[[torch.Tensor, torch.Tensor, int, int], Split]
                 ) -> dict[str, Split]:
    """Train / validation / test splits of ``sizes`` examples built by ``make_split(images,
    labels, n, seed)`` from disjoint 60 / 20 / 20 % parts of scikit-learn's 8x8 digits
    (pixels scaled to [0, 1]), so no source image appears in two splits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
    parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
    return {name: make_split(images[idx], labels[idx], n, seed + k)
            for k, ((name, idx), n) in enumerate(zip(parts.items(), sizes))}
