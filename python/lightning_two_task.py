"""MTLSAM in a PyTorch Lightning module: manual optimization, saved to and resumed from a
Lightning checkpoint.

    python python/lightning_two_task.py --epochs 4 --check-resume --out runs/lightning

MTLSAM runs its own forward and backward passes inside ``step(closure)``, so the module turns
Lightning's automatic optimization off and calls ``self.optimizers().step(closure)`` with a
closure that returns the task losses and never calls ``backward``. Lightning saves
``MTLSAM.state_dict()`` in its checkpoints and loads it on resume like any optimizer's.

``--check-resume`` trains ``--epochs`` epochs in one go, then half of them, saves a checkpoint,
and finishes from it in a fresh module and Trainer: the program fails unless both runs end
with the same parameters, bit for bit.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mtlsam_ext import MTLSAM


class TwoTask(pl.LightningModule):
    def __init__(self, method: str = "gl", aggregator: str = "mgda", lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # MTLSAM runs the backward passes itself
        self.backbone = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleDict({"sine": nn.Linear(64, 1), "square": nn.Linear(64, 1)})

    def configure_optimizers(self):
        # Lightning calls this after moving the module to its device: MTLSAM packs the
        # parameters into flat buffers where they are, so build it here, not in __init__.
        return MTLSAM(self.backbone, torch.optim.Adam, heads=self.heads,
                      method=self.hparams.method, aggregator=self.hparams.aggregator,
                      local_grad="lagged", lr=self.hparams.lr)

    def training_step(self, batch, batch_idx):
        x, y = batch

        def closure():  # forward only: the named task losses, no backward()
            h = self.backbone(x)
            return {name: nn.functional.mse_loss(head(h), y[:, i:i + 1])
                    for i, (name, head) in enumerate(self.heads.items())}

        losses = self.optimizers().step(closure)  # {"sine": ..., "square": ...}
        self.log_dict({f"loss_{name}": loss for name, loss in losses.items()})


def data(n: int = 512, batch: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.cat([torch.sin(x[:, :4].sum(1, keepdim=True)),
                   (x[:, 4:] ** 2).mean(1, keepdim=True)], dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch)  # same batches every epoch


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True)


def fit(epochs: int, method: str, aggregator: str, ckpt_in: Path | None = None,
        ckpt_out: Path | None = None) -> TwoTask:
    torch.manual_seed(0)  # the same initial weights in every run
    model = TwoTask(method, aggregator)
    t = trainer(epochs)
    t.fit(model, data(), ckpt_path=ckpt_in)
    if ckpt_out is not None:
        t.save_checkpoint(ckpt_out)  # weights, MTLSAM.state_dict(), loop state
    return model


def final_losses(model: TwoTask) -> dict[str, float]:
    x, y = data().dataset.tensors
    with torch.no_grad():
        h = model.backbone(x)
        return {name: float(nn.functional.mse_loss(head(h), y[:, i:i + 1]))
                for i, (name, head) in enumerate(model.heads.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--method", default="gl", choices=["gl", "fmtl", "sam", "erm"])
    ap.add_argument("--aggregator", default="mgda")
    ap.add_argument("--check-resume", action="store_true",
                    help="also train half the epochs, checkpoint, resume, and compare")
    ap.add_argument("--out", default="runs/lightning", help="folder for the checkpoint")
    args = ap.parse_args()
    # A toy dataset in memory: Lightning's advice to use DataLoader workers does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    straight = fit(args.epochs, args.method, args.aggregator)
    print(f"{args.epochs} epochs: task losses {final_losses(straight)}")
    if args.check_resume:
        half = max(1, args.epochs // 2)
        ckpt = out / f"epoch{half}.ckpt"
        fit(half, args.method, args.aggregator, ckpt_out=ckpt)
        resumed = fit(args.epochs, args.method, args.aggregator, ckpt_in=ckpt)
        same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                      resumed.state_dict().values()))
        print(f"resumed from {ckpt} after {half} epochs: parameters identical to the "
              f"uninterrupted run: {same}")
        if not same:
            raise SystemExit("the resumed run diverged from the uninterrupted one")


if __name__ == "__main__":
    main()
