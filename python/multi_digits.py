"""Multi-digits: the Multi-MNIST protocol of the F-MTL source on scikit-learn's 8x8 digits.

Each image holds two digits on a 12x12 canvas, one in the top-left corner and one in the
bottom-right corner, overlapping in the middle (pixel-wise maximum). Task 1 is the class of
the top-left digit, task 2 that of the bottom-right one. Train, validation and test canvases
are built from disjoint sets of source images, so no digit image is seen in two splits.
A small CNN backbone is shared; each task has a linear head (10 classes, cross-entropy).
With ``--label-noise p``, p of each task's training labels are replaced by one of the 9 other
classes, uniformly (symmetric noise); validation and test labels stay clean.

Compares ERM, F-MTL and global-local SAM (each local-gradient estimator) with every
aggregator, plus an alpha / sampled-layer sweep, over seeds; see mtl_runs.py for the protocol
and the outputs (.jsonl, .md table, .png of test accuracy against wall time).

    python python/multi_digits.py --quick --out /tmp/md          # CI smoke size, ~12 s on 2 cores
    python python/multi_digits.py --out python/results/multi_digits   # the full comparison
    python python/multi_digits.py --plan --label-noise 0.2 --out PREFIX   # the study
"""

from __future__ import annotations

import argparse

import mtl_data
import mtl_runs
import torch
from torch.nn import functional as F

CANVAS = 12
SHIFT = CANVAS - 8


def make_split(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases from random pairs of the given source images."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(images), (n,), generator=g)
    j = torch.randint(0, len(images), (n,), generator=g)
    x = torch.zeros(n, 1, CANVAS, CANVAS)
    x[:, 0, :8, :8] = images[i]
    x[:, 0, SHIFT:, SHIFT:] = torch.maximum(x[:, 0, SHIFT:, SHIFT:], images[j])
    return x, torch.stack([labels[i], labels[j]], dim=1)


def load(seed: int, sizes: tuple[int, int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return mtl_data.digit_splits(seed, sizes, make_split)


PROBLEM = mtl_runs.Problem(
    name="multi_digits", title="Multi-digits (sklearn 8x8 digits, two per 12x12 canvas, K=2)",
    n_tasks=2, canvas=CANVAS, head_out=10, load=load, loss=F.cross_entropy,
    correct=lambda logits, y: logits.argmax(1) == y, n_classes=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mtl_runs.add_arguments(ap, sizes="3000,1000,2000", epochs=15, batch=128, lr=1e-3, rho=0.05)
    mtl_runs.main(PROBLEM, "multi_digits", ap.parse_args(), quick_sizes="1024,256,256")


if __name__ == "__main__":
    main()
