"""Multi-digits: the Multi-MNIST protocol of the F-MTL source on scikit-learn's 8x8 digits.

Each image holds two digits on a 12x12 canvas, one in the top-left corner and one in the
bottom-right corner, overlapping in the middle (pixel-wise maximum). Task 1 is the class of
the top-left digit, task 2 that of the bottom-right one. Train, validation and test canvases
are built from disjoint sets of source images, so no digit image is seen in two splits.
A small CNN backbone is shared; each task has a linear head.

For every configuration (method x aggregator x local-gradient estimator) and seed the program
trains with MTLSAM, picks the epoch with the best mean validation accuracy, and reports the
test accuracy there (mean +- std over seeds), wall time per epoch and per step, and the
closure calls (forwards) per step. Results go to a JSON-lines file and a PNG (test accuracy
against wall time per epoch).

    python python/multi_digits.py --quick                     # ~1 minute, CI smoke size
    python python/multi_digits.py --seeds 0,1,2 --epochs 30   # the full comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mtlsam_ext import MTLSAM

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
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(perm)), int(0.8 * len(perm))  # disjoint source images per split
    parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
    return {name: make_split(images[idx], labels[idx], n, seed + k)
            for k, ((name, idx), n) in enumerate(zip(parts.items(), sizes))}


class Backbone(nn.Sequential):
    def __init__(self, width: int = 32) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 9, 64), nn.ReLU())


CONFIGS = {
    "erm": dict(method="erm"),
    "fmtl": dict(method="fmtl"),
    "gl-autograd": dict(method="gl", local_grad="autograd"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
    "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1),
}


def accuracy(body, heads, x, y) -> list[float]:
    with torch.no_grad():
        h = body(x)
        return [float((hd(h).argmax(1) == y[:, i]).float().mean()) for i, hd in enumerate(heads)]


def train_one(name: str, aggregator: str, seed: int, data, epochs: int, batch: int, rho: float,
              lr: float, bar) -> dict:
    torch.manual_seed(seed)
    body, heads = Backbone(), [nn.Linear(64, 10) for _ in range(2)]
    opt = MTLSAM(body, torch.optim.Adam, heads=heads, aggregator=aggregator, rho=rho, lr=lr,
                 generator=torch.Generator().manual_seed(seed), **CONFIGS[name])
    xtr, ytr = data["train"]
    g = torch.Generator().manual_seed(seed)
    best = (-1.0, None, 0)
    calls = steps = 0
    epoch_times, first_loss, last_loss = [], None, None
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        t0 = time.perf_counter()
        for s in range(0, len(xtr) - batch + 1, batch):
            xb, yb = xtr[perm[s:s + batch]], ytr[perm[s:s + batch]]

            def closure(xb=xb, yb=yb):
                nonlocal calls
                calls += 1
                h = body(xb)
                return [F.cross_entropy(hd(h), yb[:, i]) for i, hd in enumerate(heads)]

            losses = opt.step(closure)
            steps += 1
            loss = float(losses.sum())
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
        epoch_times.append(time.perf_counter() - t0)
        val = accuracy(body, heads, *data["val"])
        if sum(val) / 2 > best[0]:
            best = (sum(val) / 2, accuracy(body, heads, *data["test"]), epoch)
        bar.update(1)
    return {"config": name, "aggregator": aggregator, "seed": seed, "epochs": epochs,
            "best_epoch": best[2], "val_acc": best[0], "test_acc": best[1],
            "test_acc_mean": sum(best[1]) / 2, "s_per_epoch": statistics.mean(epoch_times),
            "s_per_step": sum(epoch_times) / steps, "forwards_per_step": calls / steps,
            "first_loss": first_loss, "last_loss": last_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--aggregators", default="ls,mgda,pcgrad,cagrad,imtl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sizes", default="6000,1000,2000", help="train,val,test canvases")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--out", default="multi_digits")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.aggregators, args.seeds = "erm,fmtl,gl-lagged", "ls,mgda", "0"
        args.epochs, args.sizes = 2, "1024,256,256"
    from tqdm import tqdm

    sizes = tuple(int(s) for s in args.sizes.split(","))
    configs = [c for c in args.configs.split(",") if c]
    aggs = [a for a in args.aggregators.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = []
    bar = tqdm(total=len(configs) * len(aggs) * len(seeds) * args.epochs, desc="epochs")
    for seed in seeds:
        data = load(seed, sizes)
        for name in configs:
            for agg in aggs:
                runs.append(train_one(name, agg, seed, data, args.epochs, args.batch, args.rho,
                                      args.lr, bar))
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in runs:
            f.write(json.dumps({**r, "torch": torch.__version__}) + "\n")
    print(f"{'config':13}{'agg':8}{'test acc':>18}{'s/epoch':>9}{'ms/step':>9}{'fwd/step':>9}")
    summary = []
    for name in configs:
        for agg in aggs:
            rs = [r for r in runs if r["config"] == name and r["aggregator"] == agg]
            accs = [100 * r["test_acc_mean"] for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row = (name, agg, statistics.mean(accs), sd,
                   statistics.mean(r["s_per_epoch"] for r in rs),
                   1e3 * statistics.mean(r["s_per_step"] for r in rs), rs[0]["forwards_per_step"])
            summary.append(row)
            print(f"{name:13}{agg:8}{row[2]:10.2f} +- {row[3]:4.2f}{row[4]:9.2f}{row[5]:9.1f}"
                  f"{row[6]:9.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in configs:
        pts = [r for r in summary if r[0] == name]
        ax.errorbar([p[4] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts],
                    fmt="o", label=name)
        for p in pts:
            ax.annotate(p[1], (p[4], p[2]), fontsize=7)
    ax.set_xlabel("wall time per epoch (s)")
    ax.set_ylabel("mean test accuracy of the two tasks (%)")
    ax.set_title("Multi-digits (sklearn 8x8 digits, two per canvas)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.jsonl')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
