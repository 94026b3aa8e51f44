"""Mixed precision with MTLSAM: bf16 autocast (no scaler), or fp16 autocast with a GradScaler.

    python python/amp_two_task.py --precision bf16 --steps 100
    python python/amp_two_task.py --precision fp16 --steps 100   # GradScaler("cpu") on a CPU

The closure runs its forward under ``torch.autocast``; MTLSAM's own backward passes follow
the autocast graph as usual. bfloat16 has float32's range, so it needs no loss scaling: call
``opt.step(closure)``. float16 overflows easily: give MTLSAM the scaler (``grad_scaler=``) and
step through it, ``scaler.step(opt, closure); scaler.update()``. Every backward then runs on
the scaled losses, MTLSAM folds ``1/S`` into its coefficients, and an overflow skips the step
(parameters and state unchanged) and makes the scaler back off. The parameters stay float32.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mtlsam_ext import MTLSAM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", default="gl", choices=["gl", "fmtl", "sam", "erm"])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    device = args.device

    torch.manual_seed(0)
    x = torch.randn(256, 16, device=device)
    y = {"class": (x[:, :4].sum(1) > 0).long(), "value": x[:, 4:].pow(2).mean(1, keepdim=True)}
    backbone = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(),
                             nn.Linear(64, 64), nn.ReLU()).to(device)
    heads = nn.ModuleDict({"class": nn.Linear(64, 2), "value": nn.Linear(64, 1)}).to(device)
    criteria = {"class": nn.functional.cross_entropy, "value": nn.functional.mse_loss}

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    scaler = torch.amp.GradScaler(device) if args.precision == "fp16" else None
    opt = MTLSAM(backbone, torch.optim.SGD, heads=heads, method=args.method,
                 aggregator="mgda", max_grad_norm=1.0, grad_scaler=scaler, lr=0.05,
                 momentum=0.9)

    def closure():  # forward only, under autocast
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            h = backbone(x)
            return {name: criteria[name](head(h), y[name]) for name, head in heads.items()}

    for step in range(args.steps + 1):
        if scaler is not None:
            losses = scaler.step(opt, closure)  # scaled backward passes, 1/S folded in
            scaler.update()
        else:
            losses = opt.step(closure)
        if step % max(1, args.steps // 4) == 0:
            scale = f"  scale {scaler.get_scale():g}" if scaler is not None else ""
            print(f"step {step:4d}  " + "  ".join(f"{n} {float(v):.4f}"
                                                  for n, v in losses.items()) + scale)
    dtypes = sorted({str(p.dtype) for p in opt.param_groups[0]["params"]})
    print(f"parameters stay {', '.join(dtypes)}")


if __name__ == "__main__":
    main()
