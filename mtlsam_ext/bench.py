"""``python -m mtlsam_ext.bench``: the step-time comparison on a default CPU-sized model.

Run from a source checkout, it runs ``bench/step_bench.py`` (K = 10 tasks unless ``--tasks``
is given; every other option is passed through): MTLSAM's methods side by side with the
naive F-MTL baselines written like the authors' training scripts, with times, peak memory,
measured pass counts and ratios. The naive baselines are not shipped in the package, so an
installed package (or ``--builtin``) runs the built-in comparison below: ``erm``, our F-MTL,
plain SAM and global-local SAM (``autograd`` and ``lagged``) on one multi-task MLP, with the
median step time, the passes each method makes, and each time as a ratio of our F-MTL's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from mtlsam_ext import MTLSAM, __version__

CONFIGS: dict[str, dict[str, Any]] = {
    "erm": dict(method="erm"),
    "fmtl": dict(method="fmtl"),
    "sam": dict(method="sam"),
    "gl-autograd": dict(method="gl", local_grad="autograd"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
    "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1),
}


def passes(name: str, k: int) -> tuple[int, int]:
    """(forwards, backwards) one step makes; ``gl-autograd`` backwards are partial ones."""
    return {
        "erm": (1, k),
        "fmtl": (k + 1, 2 * k),
        "sam": (2, k + 1),
        "gl-autograd": (k + 1, 2 * k + 1),
        "gl-lagged": (k + 1, k + 1),
        "gl-zo": (k + 3, k + 1),
    }[name]


class MultiTaskMLP(nn.Module):
    def __init__(self, k: int, width: int, depth: int, d_in: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))


def run(k: int, width: int, depth: int, batch: int, steps: int, warmup: int,
        methods: list[str], aggregator: str, seed: int = 0, progress: bool = True
        ) -> list[dict[str, Any]]:
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 64, generator=g)
    y = torch.randint(0, 10, (batch, k), generator=g)
    results = []
    bar = tqdm(total=len(methods) * (steps + warmup), disable=not progress, desc="steps")
    for name in methods:
        torch.manual_seed(seed)
        model = MultiTaskMLP(k, width, depth)
        opt = MTLSAM(model.body, torch.optim.SGD, heads=list(model.heads), lr=0.01,
                     aggregator=aggregator, **CONFIGS[name])

        def closure(model=model):
            h = model.body(x)
            return [nn.functional.cross_entropy(hd(h), y[:, i])
                    for i, hd in enumerate(model.heads)]

        times = []
        for it in range(steps + warmup):
            t0 = time.perf_counter()
            losses = opt.step(closure)
            dt = time.perf_counter() - t0
            if it >= warmup:
                times.append(dt)
            bar.update(1)
        fw, bw = passes(name, k)
        results.append({
            "method": name, "tasks": k, "aggregator": aggregator, "width": width,
            "depth": depth, "batch": batch, "shared_params": opt.shared.numel,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "forwards": fw, "backwards": bw, "final_loss": float(losses.sum()),
            "backend": opt.backend,
        })
    bar.close()
    return results


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--builtin" in argv:
        argv.remove("--builtin")
    else:
        try:  # importable from a source checkout's root only
            from bench.step_bench import main as step_bench_main
        except ImportError:
            step_bench_main = None
        if step_bench_main is not None:
            tasks = [] if any(a.startswith("--tasks") for a in argv) else ["--tasks", "10"]
            step_bench_main(tasks + argv)
            return
    builtin(argv)


def builtin(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default=",".join(CONFIGS))
    ap.add_argument("--aggregator", default="ls")
    ap.add_argument("--out", help="append results as JSON lines to this file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in CONFIGS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(CONFIGS)}")
    results = run(args.tasks, args.width, args.depth, args.batch, args.steps, args.warmup,
                  methods, args.aggregator, progress=not args.no_progress)
    ref = next((r["median_s"] for r in results if r["method"] == "fmtl"), None)
    print(f"mtlsam_ext {__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, K={args.tasks}, aggregator={args.aggregator}, "
          f"shared params={results[0]['shared_params']:,}")
    print(f"{'method':<13}{'step ms':>10}{'fwd':>5}{'bwd':>5}{'vs fmtl':>9}")
    for r in results:
        ratio = f"{r['median_s'] / ref:.2f}" if ref else "-"
        print(f"{r['method']:<13}{1e3 * r['median_s']:>10.2f}{r['forwards']:>5}"
              f"{r['backwards']:>5}{ratio:>9}")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "torch": torch.__version__,
                                    "mtlsam_ext": __version__,
                                    "threads": torch.get_num_threads()}) + "\n")


if __name__ == "__main__":
    main()
