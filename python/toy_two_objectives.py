"""The two-objective toy study of the global-local report (§IV.A), with the public API.

    f1(x) = (x1 - 2)^2 + 0.5 (x2 + 1)^2,   f2(x) = 0.5 (x1 + 2)^2 + (x2 - 1)^2,
    x1 in [-5, 5], x2 in [-3, 3], start (0, 0).

Runs each aggregator (LS, MGDA, PCGrad, CAGrad, IMTL) alone and with SAM (on the weighted
loss), F-MTL and global-local SAM, projecting onto the box after every step; draws one panel
per aggregator with the four trajectories on the contour plot of both objectives and the
Pareto set (the curve between the two minima where a convex combination of the gradients
vanishes) marked, plus a panel of the final points in objective space against the Pareto
front; writes a PNG and prints the final points and objective values.

    python python/toy_two_objectives.py --out toy.png --steps 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtlsam_ext import MTLSAM

LOW = torch.tensor([-5.0, -3.0], dtype=torch.float64)
HIGH = torch.tensor([5.0, 3.0], dtype=torch.float64)


def objectives(x: torch.Tensor) -> list[torch.Tensor]:
    f1 = (x[0] - 2) ** 2 + 0.5 * (x[1] + 1) ** 2
    f2 = 0.5 * (x[0] + 2) ** 2 + (x[1] - 1) ** 2
    return [f1, f2]


def pareto_set(n: int = 200) -> torch.Tensor:
    """Points where a convex combination of the two gradients vanishes (the Pareto set)."""
    pts = []
    for a in torch.linspace(0, 1, n, dtype=torch.float64):
        # grad f1 = (2(x1-2), (x2+1)), grad f2 = ((x1+2), 2(x2-1)); a g1 + (1-a) g2 = 0
        x1 = (4 * a - 2 * (1 - a)) / (2 * a + (1 - a))
        x2 = (2 * (1 - a) - a) / (a + 2 * (1 - a))
        pts.append((float(x1), float(x2)))
    return torch.tensor(pts)


AGGREGATORS = {"LS": "ls", "MGDA": "mgda", "PCGrad": "pcgrad", "CAGrad": "cagrad",
               "IMTL": "imtl"}
METHODS = {"ERM": "erm", "SAM": "sam", "F-MTL": "fmtl", "global-local SAM": "gl"}
# one panel per aggregator, each with the aggregator alone and with the three SAM methods
RUNS = {(agg, meth): dict(method=m, aggregator=a)
        for agg, a in AGGREGATORS.items() for meth, m in METHODS.items()}


def run(cfg: dict, steps: int, lr: float, rho: float) -> torch.Tensor:
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = MTLSAM([x], torch.optim.SGD, lr=lr, rho=rho,
                 generator=torch.Generator().manual_seed(0), **cfg)
    path = [x.detach().clone()]
    for _ in range(steps):
        opt.step(lambda: objectives(x))
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, HIGH), LOW))  # stay in the box
        path.append(x.detach().clone())
    return torch.stack(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rho", type=float, default=0.3)
    ap.add_argument("--out", default="toy_two_objectives.png")
    args = ap.parse_args()
    # the output's folder before the runs, not after them
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)

    paths = {key: run(cfg, args.steps, args.lr, args.rho) for key, cfg in RUNS.items()}
    print(f"{'aggregator':11}{'method':17}{'x1':>9}{'x2':>9}{'f1':>9}{'f2':>9}")
    for (agg, meth), p in paths.items():
        f1, f2 = (float(v) for v in objectives(p[-1]))
        print(f"{agg:11}{meth:17}{float(p[-1, 0]):9.3f}{float(p[-1, 1]):9.3f}{f1:9.3f}{f2:9.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g1, g2 = torch.meshgrid(torch.linspace(-5, 5, 200, dtype=torch.float64),
                            torch.linspace(-3, 3, 160, dtype=torch.float64), indexing="xy")
    f1, f2 = objectives(torch.stack([g1, g2]))
    ps = pareto_set()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, agg in zip(axes.flat, AGGREGATORS):
        ax.contour(g1, g2, f1, levels=15, colors="tab:blue", alpha=0.3)
        ax.contour(g1, g2, f2, levels=15, colors="tab:red", alpha=0.3)
        ax.plot(ps[:, 0], ps[:, 1], "k-", lw=3, alpha=0.4, label="Pareto set")
        for meth in METHODS:
            p = paths[(agg, meth)]
            label = agg if meth == "ERM" else f"{meth} ({agg})"
            ax.plot(p[:, 0], p[:, 1], lw=1.3, label=label)
            ax.plot(p[-1, 0], p[-1, 1], "o", ms=4, color=ax.lines[-1].get_color())
        ax.plot(0, 0, "k*", ms=10)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-3, 3)
        ax.set_title(agg)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    last = axes.flat[-1]  # the sixth panel: objective space, Pareto front and final points
    front = torch.stack([torch.stack(objectives(p)) for p in ps])
    last.plot(front[:, 0], front[:, 1], "k-", lw=3, alpha=0.4, label="Pareto front")
    for meth, marker in zip(METHODS, "osD^"):
        pts = torch.stack([torch.stack(objectives(paths[(agg, meth)][-1]))
                           for agg in AGGREGATORS])
        last.scatter(pts[:, 0], pts[:, 1], marker=marker, label=meth, s=20, alpha=0.8)
    last.set_xlabel("f1")
    last.set_ylabel("f2")
    last.set_title("final points of every run (all aggregators)")
    last.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Toy study: {args.steps} steps, lr {args.lr}, rho {args.rho}, start (0, 0)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
