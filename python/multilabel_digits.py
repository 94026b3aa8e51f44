"""Multi-label digits: the many-task (CelebA-style) case on scikit-learn's 8x8 digits.

Each 16x16 canvas holds 2 or 3 digits, each in its own quadrant and shifted by up to 2 pixels
(so neighbours may overlap; pixel-wise maximum). There are K = 10 binary tasks, "digit d is
present", each with a one-logit linear head (binary cross-entropy) on a shared small CNN; the
score is the per-task accuracy averaged over the ten tasks, as for CelebA's attributes.
Train, validation and test canvases are built from disjoint sets of source images.
With ``--label-noise p``, p of each task's training labels are flipped (symmetric noise on a
binary task: the one other class); validation and test labels stay clean.

Compares ERM, F-MTL and global-local SAM (each local-gradient estimator) with every
aggregator, plus an alpha / sampled-layer sweep, over seeds; see mtl_runs.py for the protocol
and the outputs (.jsonl, .md table, .png of test accuracy against wall time).

    python python/multilabel_digits.py --quick --out /tmp/ml             # CI smoke size
    python python/multilabel_digits.py --out python/results/multilabel_digits   # full run
    python python/multilabel_digits.py --plan --label-noise 0.2 --out PREFIX   # the study
"""

from __future__ import annotations

import argparse

import mtl_data
import mtl_runs
import torch
from torch.nn import functional as F

CANVAS = 16
JITTER = 2
K = 10


def make_split(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases, each with 2 or 3 random source images in distinct quadrants."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, CANVAS, CANVAS)
    y = torch.zeros(n, K)
    counts = torch.randint(2, 4, (n,), generator=g)
    for c in range(n):
        quadrants = torch.randperm(4, generator=g)[: int(counts[c])]
        for q in quadrants.tolist():
            k = int(torch.randint(0, len(images), (1,), generator=g))
            dy, dx = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=g))
            top = min(max(8 * (q // 2) + dy, 0), CANVAS - 8)
            left = min(max(8 * (q % 2) + dx, 0), CANVAS - 8)
            patch = x[c, 0, top:top + 8, left:left + 8]
            patch.copy_(torch.maximum(patch, images[k]))
            y[c, labels[k]] = 1.0
    return x, y


def load(seed: int, sizes: tuple[int, int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return mtl_data.digit_splits(seed, sizes, make_split)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits[:, 0], y)


PROBLEM = mtl_runs.Problem(
    name="multilabel_digits",
    title="Multi-label digits (2-3 sklearn digits per 16x16 canvas, K=10 'digit d present')",
    n_tasks=K, canvas=CANVAS, head_out=1, load=load, loss=_loss,
    correct=lambda logits, y: (logits[:, 0] > 0) == (y > 0.5),
    global_pool=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mtl_runs.add_arguments(ap, sizes="2000,1000,2000", epochs=10, batch=64, lr=3e-3, rho=0.05)
    mtl_runs.main(PROBLEM, "multilabel_digits", ap.parse_args(), quick_sizes="1024,256,256")


if __name__ == "__main__":
    main()
