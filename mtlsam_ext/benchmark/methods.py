"""The methods the step benchmark compares: MTLSAM's configurations and the naive baselines,
by name, and the optimizer each name builds."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from mtlsam_ext import MTLSAM
from mtlsam_ext.benchmark.naive_fmtl import NaiveFMTL, NaiveSAMPerTask

OURS: dict[str, dict[str, Any]] = {
    "erm": dict(method="erm"),
    "fmtl": dict(method="fmtl"),
    "sam": dict(method="sam"),
    "gl-autograd": dict(method="gl", local_grad="autograd"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
    "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1),
    # the K task gradients at one point as one batched backward (not in the default list)
    "fmtl-batched": dict(method="fmtl", batched_grads=True),
    "gl-autograd-batched": dict(method="gl", local_grad="autograd", batched_grads=True),
    # the K perturbed passes as one vmapped pass (batched="points"), or both batched phases
    # chosen by measurement on the first steps (batched="auto")
    "fmtl-vmap": dict(method="fmtl", batched="points"),
    "gl-lagged-vmap": dict(method="gl", local_grad="lagged", batched="points"),
    "gl-autograd-vmap": dict(method="gl", local_grad="autograd", batched="points"),
    "fmtl-auto": dict(method="fmtl", batched="auto"),
    "gl-lagged-auto": dict(method="gl", local_grad="lagged", batched="auto"),
}
# Configurations that differ from another only by a task-aware closure (``closure(task=i)``
# builds one head and one loss at task i's perturbed point instead of all K).
TASK_AWARE = {"fmtl-task": "fmtl", "gl-lagged-task": "gl-lagged"}
NAIVE: dict[str, tuple[type, dict[str, Any]]] = {
    "naive-fmtl": (NaiveFMTL, {}),
    "naive-fmtl-2k": (NaiveFMTL, dict(recompute=True)),
    "naive-sam-per-task": (NaiveSAMPerTask, {}),
}
ALL_METHODS = ["erm", "naive-fmtl", "naive-fmtl-2k", "naive-sam-per-task", "fmtl",
               "fmtl-task", "gl-autograd", "gl-lagged", "gl-lagged-task", "gl-zo", "sam"]


def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> Any:
    common = dict(heads=list(model.heads), aggregator=args.aggregator, rho=args.rho,
                  lr=args.lr)
    if name in OURS or name in TASK_AWARE:
        gen = torch.Generator().manual_seed(args.seed)
        cfg = OURS[TASK_AWARE.get(name, name)]
        if "batched" in cfg:
            common["task_chunk"] = args.task_chunk
        return MTLSAM(model.body, torch.optim.SGD, backend=args.backend, generator=gen,
                      **cfg, **common)
    cls, kw = NAIVE[name]
    return cls(model.body, torch.optim.SGD, seed=args.seed, **kw, **common)

