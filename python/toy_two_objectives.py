"""The two-objective toy study of the global-local report (§IV.A), with the public API.

    f1(x) = (x1 - 2)^2 + 0.5 (x2 + 1)^2,   f2(x) = 0.5 (x1 + 2)^2 + (x2 - 1)^2,
    x1 in [-5, 5], x2 in [-3, 3], start (0, 0).

Runs LS, LS + SAM, F-MTL and global-local SAM (and MGDA / PCGrad / CAGrad / IMTL with and
without SAM), projecting onto the box after every step, draws every trajectory on the contour
plot of both objectives with the Pareto set (the segment between the two minima, where the
gradients are opposite) marked, writes a PNG, and prints the final points and objective
values.

    python python/toy_two_objectives.py --out toy.png --steps 300
"""

from __future__ import annotations

import argparse

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


RUNS = {
    "LS": dict(method="erm", aggregator="ls"),
    "LS+SAM": dict(method="sam", aggregator="ls"),
    "F-MTL (LS)": dict(method="fmtl", aggregator="ls"),
    "global-local SAM (LS)": dict(method="gl", aggregator="ls"),
    "MGDA": dict(method="erm", aggregator="mgda"),
    "F-MTL (MGDA)": dict(method="fmtl", aggregator="mgda"),
    "PCGrad": dict(method="erm", aggregator="pcgrad"),
    "F-MTL (PCGrad)": dict(method="fmtl", aggregator="pcgrad"),
    "CAGrad": dict(method="erm", aggregator="cagrad"),
    "F-MTL (CAGrad)": dict(method="fmtl", aggregator="cagrad"),
    "IMTL": dict(method="erm", aggregator="imtl"),
    "F-MTL (IMTL)": dict(method="fmtl", aggregator="imtl"),
}


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

    paths = {name: run(cfg, args.steps, args.lr, args.rho) for name, cfg in RUNS.items()}
    print(f"{'run':24}{'x1':>9}{'x2':>9}{'f1':>9}{'f2':>9}")
    for name, p in paths.items():
        f1, f2 = (float(v) for v in objectives(p[-1]))
        print(f"{name:24}{float(p[-1, 0]):9.3f}{float(p[-1, 1]):9.3f}{f1:9.3f}{f2:9.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g1, g2 = torch.meshgrid(torch.linspace(-5, 5, 200, dtype=torch.float64),
                            torch.linspace(-3, 3, 160, dtype=torch.float64), indexing="xy")
    f1, f2 = objectives(torch.stack([g1, g2]))
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.contour(g1, g2, f1, levels=15, colors="tab:blue", alpha=0.35)
    ax.contour(g1, g2, f2, levels=15, colors="tab:red", alpha=0.35)
    ps = pareto_set()
    ax.plot(ps[:, 0], ps[:, 1], "k-", lw=3, alpha=0.5, label="Pareto set")
    for name, p in paths.items():
        ax.plot(p[:, 0], p[:, 1], lw=1.2, label=name)
        ax.plot(p[-1, 0], p[-1, 1], "o", ms=4)
    ax.plot(0, 0, "k*", ms=10)
    ax.set_xlim(-5, 5)
    ax.set_ylim(-3, 3)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title(f"Toy study: {args.steps} steps, lr {args.lr}, rho {args.rho}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
