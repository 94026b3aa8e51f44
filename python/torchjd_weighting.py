"""A TorchJD weighting as MTLSAM's aggregator.

    python python/torchjd_weighting.py --weighting AlignedMTLWeighting --steps 200 --check

MTLSAM's ``aggregator=`` takes any callable ``G -> w`` from the K x K Gram matrix of the task
gradients to K weights. TorchJD's weightings (``torchjd.aggregation.*Weighting``) are exactly
that: modules called on a Gramian that return its weights. So one is passed as it is, and
MTLSAM's update is ``sum_i w_i g_i`` with TorchJD's weights (for ``fmtl``: on the loss and on
the flat gradients; for ``gl``/``sam``: on the SAM gradients).

``--check`` first compares one update with TorchJD's own aggregator: an ``erm`` step with
plain SGD (lr 1) must move the parameters by minus what the matching
``torchjd.aggregation`` aggregator returns for the Jacobian of the same losses.
"""

from __future__ import annotations

import argparse

import torch
import torchjd.aggregation as tjd
from torch import nn

from mtlsam_ext import MTLSAM


def problem(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    targets = [torch.sin(x[:, :4].sum(1, keepdim=True)), (x[:, 4:] ** 2).mean(1, keepdim=True),
               x[:, :2].prod(1, keepdim=True)]
    backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in targets])

    def closure():  # forward only: the K task losses
        h = backbone(x)
        return [nn.functional.mse_loss(head(h), y) for head, y in zip(heads, targets)]

    return backbone, heads, closure


def check_against_torchjd(weighting_name: str) -> float:
    """Largest difference between MTLSAM's erm update with the TorchJD weighting and TorchJD's
    aggregator on the Jacobian of the same losses (shared parameters only)."""
    backbone, heads, closure = problem()
    shared = list(backbone.parameters())
    with torch.enable_grad():
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared,
                                                                     retain_graph=True)])
                for loss in closure()]
    aggregator = getattr(tjd, weighting_name.removesuffix("Weighting"))()
    want = aggregator(torch.stack(rows))  # TorchJD: the aggregated vector from the Jacobian
    before = torch.cat([p.detach().reshape(-1) for p in shared])
    opt = MTLSAM(backbone, torch.optim.SGD, heads=heads, method="erm",
                 aggregator=getattr(tjd, weighting_name)(), lr=1.0)
    opt.step(closure)
    moved = before - torch.cat([p.detach().reshape(-1) for p in shared])
    return float((moved - want).abs().max() / want.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weighting", default="AlignedMTLWeighting",
                    help="a torchjd.aggregation weighting that takes no arguments")
    ap.add_argument("--method", default="fmtl", choices=["gl", "fmtl", "sam", "erm"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--check", action="store_true",
                    help="compare one erm update with TorchJD's aggregator first")
    args = ap.parse_args()

    if args.check:
        err = check_against_torchjd(args.weighting)
        print(f"erm update vs torchjd.aggregation.{args.weighting.removesuffix('Weighting')}: "
              f"largest relative difference {err:.1e}")
        if err > 1e-4:
            raise SystemExit("MTLSAM's update differs from TorchJD's aggregator")

    backbone, heads, closure = problem()
    weighting = getattr(tjd, args.weighting)()
    opt = MTLSAM(backbone, torch.optim.Adam, heads=heads, method=args.method,
                 aggregator=weighting, lr=3e-3)
    for step in range(args.steps + 1):
        losses = opt.step(closure)
        if step % max(1, args.steps // 4) == 0:
            print(f"step {step:4d}  task losses {[round(float(v), 4) for v in losses]}")


if __name__ == "__main__":
    main()
