"""The training harness shared by the multi-task programs in python/ (multi_digits.py,
multilabel_digits.py): the configurations compared, one training run, parallel execution,
and the outputs (JSON lines, a Markdown table, a PNG of accuracy against wall time).

A *problem* (the dataset side) gives the splits, the number of tasks, the head width, a
per-task loss and a per-task "correct" test; everything else is common, so the two programs
compare the methods under one protocol:

* the shared backbone is a small CNN, each task has a linear head, the base optimizer is Adam;
* every configuration is trained on the same batches (seeded), either for a fixed number of
  epochs or (``--patience P``) until the mean validation accuracy has not improved for P epochs
  (not before ``--min-epochs``, at most ``--max-epochs``); the epoch with the best mean
  validation accuracy is selected and its test accuracy reported (the last epoch's too);
* ``--label-noise p`` replaces p of each task's training labels (symmetric noise, seeded per
  run; validation and test labels stay clean);
* wall time counts the optimizer steps only (closure included, evaluation excluded); forwards
  are counted in the closure and backward passes through the backbone by a hook on its output,
  so "passes per step" is measured, not assumed;
* each run is appended to the .jsonl as soon as it ends, and running the same command again
  skips the runs the file already holds (same protocol), so an interrupted sweep continues.

Nothing in mtlsam_ext imports this file; it uses the public API as a user would.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import mtl_records
import mtl_study
import torch
from mtl_data import Split, noisy_labels
from torch import nn

import mtlsam_ext
from mtlsam_ext import MTLSAM


@dataclass(frozen=True)
class Problem:
    """What a dataset program supplies. ``load(seed, sizes)`` returns {"train", "val",
    "test"} splits of (images N x 1 x S x S, targets N x K); ``loss(logits, y)`` and
    ``correct(logits, y)`` act on one task's head output and target column."""

    name: str
    title: str
    n_tasks: int
    canvas: int
    head_out: int
    load: Callable[[int, tuple[int, int, int]], dict[str, Split]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    global_pool: bool = False
    n_classes: int = 2  # classes per task, for the label noise (2: binary tasks)


class Backbone(nn.Sequential):
    """Three 3x3 convolutions (two max-pools) and a 64-unit linear layer: four layers in
    MTLSAM's layer rule, so the default sampled set {0, L//2, L-1} is {conv1, conv3, fc}.
    ``global_pool`` takes the spatial maximum of the last feature map (presence tasks: a
    digit anywhere on the canvas) instead of flattening it (position tasks)."""

    def __init__(self, canvas: int, width: int = 16, global_pool: bool = False) -> None:
        side = 1 if global_pool else canvas // 4
        pool = nn.AdaptiveMaxPool2d(1) if global_pool else nn.MaxPool2d(2)
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), pool,
            nn.Flatten(), nn.Linear(2 * width * side * side, 64), nn.ReLU())
        # He initialisation: with PyTorch's default (kaiming_uniform, a=sqrt(5)) the
        # multi-label task sat at the prior (BCE 0.54 per task) for ~4 epochs (120 steps) of
        # plain Adam before learning anything; with He-normal it learns from the first epoch.
        for m in self:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


# name -> MTLSAM keyword arguments. ``layers`` is a rule resolved on the 4-layer backbone.
CONFIGS: dict[str, dict] = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam"),  # plain SAM on the (aggregated) average loss
    "fmtl": dict(method="fmtl"),
    "gl-autograd": dict(method="gl", local_grad="autograd"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
    "gl-zo": dict(method="gl", local_grad="zo", n_dirs=2),
    # the sweep (gl with exact task gradients, one aggregator): alpha and the sampled layers
    "gl-autograd a=0.25": dict(method="gl", local_grad="autograd", alpha=0.25),
    "gl-autograd a=0.75": dict(method="gl", local_grad="autograd", alpha=0.75),
    "gl-autograd last": dict(method="gl", local_grad="autograd", layers="last"),
    "gl-autograd all": dict(method="gl", local_grad="autograd", layers="all"),
    # the sampled-layer modes (report §V): two layers chosen by the change of the task cosine
    # (re-selected every 10 steps), or drawn at random every step
    "gl-lagged adaptive": dict(method="gl", local_grad="lagged", layers="adaptive",
                               n_sampled=2, resample_every=10),
    "gl-lagged random": dict(method="gl", local_grad="lagged", layers="random", n_sampled=2),
}
MAIN = ["erm", "fmtl", "gl-autograd", "gl-lagged", "gl-zo"]
SWEEP = ["gl-autograd a=0.25", "gl-autograd a=0.75", "gl-autograd last", "gl-autograd all"]
AGGREGATORS = ["ls", "mgda", "pcgrad", "cagrad", "imtl", "nash"]
# Relative step cost at K=10, used only to start the long runs first (load balance).
_COST = {"erm": 1, "sam": 2, "fmtl": 8, "gl-autograd": 5, "gl-lagged": 3, "gl-zo": 3}


def _layers(rule: str | None) -> list[int] | str | None:
    if rule in ("adaptive", "random"):
        return rule
    return {None: None, "last": [3], "all": [0, 1, 2, 3]}[rule]


@dataclass(frozen=True)
class RunSpec:
    config: str
    aggregator: str
    seed: int
    sizes: tuple[int, int, int]
    epochs: int
    batch: int
    lr: float
    rho: float
    patience: int = 0  # > 0: stop after this many epochs without a better validation accuracy
    label_noise: float = 0.0
    min_epochs: int = 0  # with patience: never stop before this many epochs


_DATA: dict[tuple, dict[str, Split]] = {}


def _data(problem: Problem, seed: int, sizes: tuple[int, int, int], noise: float = 0.0
          ) -> dict[str, Split]:
    """The splits of ``seed``; with ``noise`` > 0 the training labels are made noisy, seeded by
    the run's seed (the same noisy labels for every configuration of that seed)."""
    key = (problem.name, seed, sizes, noise)
    if key not in _DATA:
        data = dict(_data(problem, seed, sizes)) if noise else problem.load(seed, sizes)
        if noise:
            x, y = data["train"]
            g = torch.Generator().manual_seed(10_007 * seed + 1)
            data["train"] = (x, noisy_labels(y, noise, problem.n_classes, g))
        _DATA[key] = data
    return _DATA[key]


def _accuracy(problem: Problem, body: nn.Module, heads: list[nn.Module], split: Split
              ) -> list[float]:
    x, y = split
    with torch.no_grad():
        h = body(x)
        return [float(problem.correct(hd(h), y[:, i]).float().mean())
                for i, hd in enumerate(heads)]


def train(problem: Problem, spec: RunSpec, on_epoch: Callable[[], None] | None = None) -> dict:
    """One configuration, one seed. Returns the record written to the JSON-lines file."""
    t_run = time.perf_counter()
    data = _data(problem, spec.seed, spec.sizes, spec.label_noise)
    torch.manual_seed(spec.seed)
    body = Backbone(problem.canvas, global_pool=problem.global_pool)
    heads = [nn.Linear(64, problem.head_out) for _ in range(problem.n_tasks)]
    kw = dict(CONFIGS[spec.config])
    kw["layers"] = _layers(kw.pop("layers", None))
    opt = MTLSAM(body, torch.optim.Adam, heads=heads, aggregator=spec.aggregator, rho=spec.rho,
                 lr=spec.lr, generator=torch.Generator().manual_seed(spec.seed), **kw)
    xtr, ytr = data["train"]
    g = torch.Generator().manual_seed(spec.seed)
    counts = {"forward": 0, "backward": 0}

    def count_backward(grad: torch.Tensor) -> None:
        counts["backward"] += 1

    best_val, best_test, best_epoch = -1.0, [0.0] * problem.n_tasks, -1
    epoch_times, epoch_losses, val_curve, steps, opt_total = [], [], [], 0, 0.0
    for epoch in range(spec.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        elapsed, loss_sum, n = 0.0, 0.0, 0
        for s in range(0, len(xtr) - spec.batch + 1, spec.batch):
            xb, yb = xtr[perm[s:s + spec.batch]], ytr[perm[s:s + spec.batch]]

            def closure(task=None, xb=xb, yb=yb):
                # Task-aware: at task i's perturbed point only head i and loss i are built.
                counts["forward"] += 1
                h = body(xb)
                if h.requires_grad:
                    h.register_hook(count_backward)
                if task is not None:
                    return problem.loss(heads[task](h), yb[:, task])
                return [problem.loss(hd(h), yb[:, i]) for i, hd in enumerate(heads)]

            t0 = time.perf_counter()
            losses = opt.step(closure)
            dt = time.perf_counter() - t0
            opt_total += dt  # every step, for the total optimizer time of the run
            if steps + n > 0:  # the first step allocates the flat buffers: not in the rate
                elapsed += dt
            loss_sum += float(losses.sum())
            n += 1
        steps += n
        epoch_times.append(elapsed)
        epoch_losses.append(loss_sum / n)
        val = sum(_accuracy(problem, body, heads, data["val"])) / problem.n_tasks
        val_curve.append(val)
        if val > best_val:
            best_val, best_epoch = val, epoch
            best_test = _accuracy(problem, body, heads, data["test"])
        if on_epoch is not None:
            on_epoch()
        # no better validation accuracy for `patience` epochs: converged. Not before
        # `min_epochs`: with noisy labels the K = 10 tasks can sit at the class prior for the
        # first epochs, a plateau that is not convergence.
        if spec.patience and epoch + 1 >= spec.min_epochs and epoch - best_epoch >= spec.patience:
            break
    epochs_run = len(val_curve)
    last_test = best_test if best_epoch == epochs_run - 1 else _accuracy(
        problem, body, heads, data["test"])
    return {"config": spec.config, "aggregator": spec.aggregator, "seed": spec.seed,
            "label_noise": spec.label_noise, "patience": spec.patience,
            "min_epochs": spec.min_epochs,
            "epochs": spec.epochs, "epochs_run": epochs_run, "best_epoch": best_epoch,
            "val_acc": best_val, "test_acc": best_test,
            "test_acc_mean": sum(best_test) / problem.n_tasks,
            "final_val_acc": val_curve[-1], "final_test_acc": last_test,
            "final_test_acc_mean": sum(last_test) / problem.n_tasks,
            "s_per_epoch": sum(epoch_times) / max(steps - 1, 1) * (steps / epochs_run),
            "s_per_step": sum(epoch_times) / max(steps - 1, 1),
            "opt_s": opt_total, "run_s": time.perf_counter() - t_run, "val_curve": val_curve,
            "forwards_per_step": counts["forward"] / steps,
            "backwards_per_step": counts["backward"] / steps,
            "epoch_loss": epoch_losses, "info": opt.info()}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_in_worker(problem_module: str, spec: RunSpec) -> dict:
    import importlib

    return train(importlib.import_module(problem_module).PROBLEM, spec)


def run_all(problem: Problem, problem_module: str, specs: list[RunSpec], jobs: int,
            threads: int, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Every spec, ``jobs`` at a time (separate processes, ``threads`` threads each), with a
    progress bar; ``on_record`` gets each record as soon as its run ends; the records come
    back in the order of ``specs``."""
    from tqdm import tqdm

    if jobs <= 1:
        torch.set_num_threads(threads)
        out = []
        for s in tqdm(specs, desc=f"{problem.name} runs"):
            out.append(train(problem, s))
            if on_record is not None:
                on_record(out[-1])
        return out
    order = sorted(range(len(specs)), key=lambda i: -_COST.get(specs[i].config.split()[0], 5))
    out: list[dict | None] = [None] * len(specs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_train_in_worker, problem_module, specs[i]): i for i in order}
        bar = tqdm(total=len(specs), desc=f"{problem.name} runs")
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if on_record is not None:
                on_record(out[futures[fut]])
            bar.update(1)
        bar.close()
    return out  # type: ignore[return-value]


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(runs: list[dict]) -> list[dict]:
    """Mean +- std over seeds per (config, aggregator), in first-seen order, with the time
    relative to F-MTL with the same aggregator where that was run."""
    keys = list(dict.fromkeys((r["config"], r["aggregator"]) for r in runs))
    rows = []
    for cfg, agg in keys:
        rs = [r for r in runs if (r["config"], r["aggregator"]) == (cfg, agg)]
        accs = [100 * r["test_acc_mean"] for r in rs]
        rows.append({"config": cfg, "aggregator": agg, "seeds": len(rs),
                     "acc": statistics.mean(accs),
                     "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in rs),
                     "ms_per_step": 1e3 * statistics.mean(r["s_per_step"] for r in rs),
                     "fwd": statistics.mean(r["forwards_per_step"] for r in rs),
                     "bwd": statistics.mean(r["backwards_per_step"] for r in rs)})
    # accuracy difference to F-MTL with the same aggregator on the same seed (same data split
    # and initialisation), so the split-to-split spread cancels out of the comparison
    ref = {(r["aggregator"], r["seed"]): r["test_acc_mean"] for r in runs
           if r["config"] == "fmtl"}
    for row in rows:
        d = [100 * (r["test_acc_mean"] - ref[(r["aggregator"], r["seed"])]) for r in runs
             if (r["config"], r["aggregator"]) == (row["config"], row["aggregator"])
             and (r["aggregator"], r["seed"]) in ref]
        row["d_fmtl"] = statistics.mean(d) if d else None
        row["d_fmtl_std"] = statistics.stdev(d) if len(d) > 1 else 0.0
    fmtl = {r["aggregator"]: r["ms_per_step"] for r in rows if r["config"] == "fmtl"}
    for r in rows:
        r["vs_fmtl"] = r["ms_per_step"] / fmtl[r["aggregator"]] if r["aggregator"] in fmtl \
            else None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | aggregator | test acc % (mean ± std) | Δ vs F-MTL, paired (pp) "
             "| s / epoch | ms / step | × F-MTL time | forwards / step | backwards / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['vs_fmtl']:.2f}" if r["vs_fmtl"] is not None else "–"
        dif = f"{r['d_fmtl']:+.2f} ± {r['d_fmtl_std']:.2f}" if r["d_fmtl"] is not None else "–"
        lines.append(f"| {r['config']} | {r['aggregator']} | {r['acc']:.2f} ± {r['acc_std']:.2f} "
                     f"| {dif} | {r['s_per_epoch']:.2f} | {r['ms_per_step']:.1f} | {rel} "
                     f"| {r['fwd']:.1f} | {r['bwd']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        pts = [r for r in rows if r["config"] == cfg]
        ax.errorbar([p["s_per_epoch"] for p in pts], [p["acc"] for p in pts],
                    yerr=[p["acc_std"] for p in pts], fmt="o", capsize=2, label=cfg)
        for p in pts:
            ax.annotate(p["aggregator"], (p["s_per_epoch"], p["acc"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("wall time per epoch (s, optimizer steps only)")
    ax.set_ylabel("test accuracy, mean over tasks (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(ap, sizes: str, epochs: int, batch: int, lr: float, rho: float) -> None:
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated, from: {', '.join(CONFIGS)} (default: "
                    f"{','.join(MAIN)}; with --plan: the plan's, filtered to these)")
    ap.add_argument("--aggregators", default=None,
                    help=f"default: {','.join(AGGREGATORS)}; with --plan: the plan's, "
                    "filtered to these")
    ap.add_argument("--sweep", default="ls",
                    help="aggregators for the alpha / sampled-layer sweep ('' = no sweep)")
    ap.add_argument("--seeds", default=None, help="default 0,1,2; with --plan 0,1,2,3,4")
    ap.add_argument("--sizes", default=sizes, help="train,val,test examples")
    ap.add_argument("--epochs", type=int, default=epochs,
                    help="epochs per run when --patience is 0")
    ap.add_argument("--patience", type=int, default=None,
                    help="> 0: train until the mean validation accuracy has not improved for "
                    "this many epochs, at most --max-epochs (default 0: a fixed --epochs; "
                    "with --plan the plan's)")
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--min-epochs", type=int, default=None,
                    help="with --patience: never stop before this many epochs (default 0; "
                    "with --plan the plan's)")
    ap.add_argument("--label-noise", type=float, default=0.0,
                    help="fraction of each task's training labels replaced at random "
                    "(symmetric: uniformly among the other classes; binary tasks: flipped)")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--rho", type=float, default=rho)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--quick", action="store_true",
                    help="a small run (one seed, few configs, 2 epochs) for smoke tests")
    ap.add_argument("--plan", action="store_true",
                    help="the convergence study (python/mtl_study.py PLAN): its configuration x "
                    "aggregator pairs, 5 seeds, early stopping; one command per label-noise "
                    "level")
    ap.add_argument("--out", required=True,
                    help="output prefix: writes .jsonl, .md and .png; an existing .jsonl of the "
                    "same protocol is continued (the runs it holds are skipped)")


def _pairs(args, n_tasks: int) -> list[tuple[str, str]]:
    """The (config, aggregator) pairs asked for: the cross product of --configs and
    --aggregators, or the plan's pairs for K = ``n_tasks`` and the label-noise level
    (restricted to --configs and --aggregators where given)."""
    if args.plan:
        return [(c, a) for c, a in mtl_study.plan(n_tasks, args.label_noise)
                if (args.configs is None or c in args.configs.split(","))
                and (args.aggregators is None or a in args.aggregators.split(","))]
    names = [c for c in (args.configs or ",".join(MAIN)).split(",") if c]
    aggs = [a for a in (args.aggregators or ",".join(AGGREGATORS)).split(",") if a]
    return [(c, a) for c in names for a in aggs]


def main(problem: Problem, problem_module: str, args, quick_sizes: str) -> list[dict]:
    """Run the comparison the parsed ``args`` ask for, appending each run to the .jsonl as it
    ends (skipping those it already holds), and write the tables and the plot."""
    if args.quick:
        args.configs, args.aggregators, args.sweep = "erm,fmtl,gl-lagged,gl-zo", "ls,mgda", ""
        args.seeds, args.epochs, args.jobs, args.sizes = "0", 2, 1, quick_sizes
        args.max_epochs = min(args.max_epochs, 3)
    if args.plan:
        args.sweep = ""
        args.seeds = args.seeds or ",".join(map(str, mtl_study.PLAN_SEEDS))
        args.patience = mtl_study.PLAN_PATIENCE if args.patience is None else args.patience
        args.min_epochs = (mtl_study.PLAN_MIN_EPOCHS if args.min_epochs is None
                           else args.min_epochs)
    args.seeds, args.patience = args.seeds or "0,1,2", args.patience or 0
    args.min_epochs = args.min_epochs or 0
    pairs = _pairs(args, problem.n_tasks)
    for c, _ in pairs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sizes = tuple(int(n) for n in args.sizes.split(","))
    if len(sizes) != 3:
        raise SystemExit(f"--sizes takes train,val,test, got {args.sizes!r}")
    epochs = args.max_epochs if args.patience else args.epochs
    if epochs < 1 or args.patience < 0 or not 0 <= args.min_epochs <= epochs \
            or not 1 <= args.batch <= sizes[0]:
        raise SystemExit(f"need --epochs (--max-epochs with --patience) >= 1, --patience >= 0, "
                         f"0 <= --min-epochs <= --max-epochs and 1 <= --batch <= the training "
                         f"size ({sizes[0]}), got epochs {epochs}, --patience {args.patience}, "
                         f"--min-epochs {args.min_epochs}, --batch {args.batch}")
    if not 0.0 <= args.label_noise < 1.0:
        raise SystemExit(f"--label-noise is a fraction in [0, 1), got {args.label_noise}")
    common = (sizes, epochs, args.batch, args.lr, args.rho, args.patience, args.label_noise,
              args.min_epochs if args.patience else 0)
    specs = [RunSpec(c, a, s, *common) for s in seeds for c, a in pairs]
    specs += [RunSpec(c, a, s, *common)
              for s in seeds for c in SWEEP for a in args.sweep.split(",") if a]
    command = " ".join([f"python/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    meta = {"program": problem.name, "title": problem.title, "command": command,
            "commit": _commit(), "mtlsam_ext": mtlsam_ext.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "jobs": args.jobs, "threads_per_run": args.threads,
            "args": vars(args), "protocol": mtl_records.protocol(vars(args))}
    out = Path(args.out).with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    have = mtl_records.start(out, meta)
    todo = [s for s in specs
            if (s.config, s.aggregator, s.seed, s.label_noise) not in have]
    if len(todo) < len(specs):
        print(f"{out}: {len(specs) - len(todo)} of the {len(specs)} runs already recorded")
    t0, made = time.time(), []
    try:
        runs = run_all(problem, problem_module, todo, args.jobs, args.threads,
                       on_record=lambda r: (mtl_records.append(out, r), made.append(r)))
    finally:  # an interrupted sweep notes what it made, too
        mtl_records.finish(out, {k: meta[k] for k in ("command", "commit", "jobs",
                                                       "threads_per_run")}
                           | {"wall_s": round(time.time() - t0, 1), "runs": len(made),
                              "complete": len(made) == len(todo)})
    _, recorded = mtl_records.read(out)
    if args.patience or any(r.get("label_noise") for r in recorded):
        print(mtl_study.report([out], Path(args.out)))
    else:
        print(report(out))
    return runs


def report(jsonl: Path) -> str:
    """Write the .md tables and the .png of a recorded run (the .jsonl that ``main`` writes)
    next to it, and return the Markdown."""
    lines = Path(jsonl).read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    rows = summarise([json.loads(line) for line in lines[1:]])
    if "title" not in meta:  # records written before the title was stored
        import importlib

        meta["title"] = importlib.import_module(meta["program"]).PROBLEM.title
    added = "".join(f" Added later under the same protocol: `{a['command']}` at commit "
                    f"{a['commit']}, {a['jobs']} run(s) in parallel x {a['threads_per_run']} "
                    f"thread(s), {a['wall_s']:.0f} s (times of runs made apart compare only "
                    f"roughly)." for a in meta.get("added", []))
    text = (f"{meta['title']}\n\n`{meta['command']}` at commit {meta['commit']}, torch "
            f"{meta['torch']}, {meta['cpus']} CPUs, {meta['jobs']} runs in parallel x "
            f"{meta['threads_per_run']} thread(s), {meta['wall_s']:.0f} s in all.{added}\n\n"
            f"Test accuracy % (mean ± std over seeds; in brackets the mean paired difference to "
            f"F-MTL with the same aggregator and seed, in points) per aggregator; time and "
            f"passes per step averaged over aggregators:\n\n{matrix_markdown(rows)}\n\n"
            f"Every configuration:\n\n{markdown(rows)}\n")
    path = Path(jsonl)
    path.with_suffix(".md").write_text(text)
    plot(rows, meta["title"], path.with_suffix(".png"))
    return text


def merge(base: Path, new: Path) -> str:
    """Append the runs of ``new`` (a later sweep of other configurations or aggregators) to the
    recorded ``base``, keep ``new``'s command, commit and timing under ``meta["added"]``, and
    rewrite ``base``'s .md and .png. Refuses another protocol (mtl_records.PROTOCOL)
    or a (config, aggregator, seed) that ``base`` already has."""
    base_lines = Path(base).read_text().splitlines()
    new_lines = Path(new).read_text().splitlines()
    meta, new_meta = json.loads(base_lines[0])["meta"], json.loads(new_lines[0])["meta"]
    mine, theirs = (m.get("protocol") or mtl_records.protocol(m["args"]) for m in (meta, new_meta))
    for key in mtl_records.PROTOCOL:
        if mine[key] != theirs[key]:
            raise SystemExit(f"{new} was run with {key}={theirs[key]!r}, {base} "
                             f"with {mine[key]!r}: not the same protocol")
    runs = [json.loads(line) for line in base_lines[1:]]
    have = {mtl_records.run_key(r) for r in runs}
    added = [json.loads(line) for line in new_lines[1:]]
    dup = [k for k in map(mtl_records.run_key, added) if k in have]
    if dup:
        raise SystemExit(f"{base} already has {dup}")
    meta.setdefault("added", []).append(
        {k: new_meta[k] for k in ("command", "commit", "jobs", "threads_per_run", "wall_s")})
    with open(base, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for r in runs + added:
            f.write(json.dumps(r) + "\n")
    return report(Path(base))


def _cell(r: dict) -> str:
    d = f" ({r['d_fmtl']:+.2f})" if r["d_fmtl"] is not None and r["config"] != "fmtl" else ""
    return f"{r['acc']:.2f} ± {r['acc_std']:.2f}{d}"


def matrix_markdown(rows: list[dict]) -> str:
    """Configurations down, aggregators across (accuracy), then mean time and passes."""
    aggs = list(dict.fromkeys(r["aggregator"] for r in rows))
    head = ("| config | " + " | ".join(aggs) + " | ms / step | × F-MTL time "
            "| forwards / step | backwards / step |")
    lines = [head, "|---" * (len(aggs) + 5) + "|"]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        rs = {r["aggregator"]: r for r in rows if r["config"] == cfg}
        accs = [_cell(rs[a]) if a in rs else "–" for a in aggs]
        rel = [r["vs_fmtl"] for r in rs.values() if r["vs_fmtl"] is not None]
        rel_s = f"{statistics.mean(rel):.2f}" if rel else "–"
        ms = statistics.mean(r["ms_per_step"] for r in rs.values())
        fwd = statistics.mean(r["fwd"] for r in rs.values())
        bwd = statistics.mean(r["bwd"] for r in rs.values())
        lines.append(f"| {cfg} | " + " | ".join(accs) + f" | {ms:.1f} | {rel_s} | {fwd:.1f} "
                     f"| {bwd:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Rewrite the .md tables and the .png of recorded "
                                 "runs (the .jsonl files the digit programs write): 'report "
                                 "A.jsonl ...'; or add the runs of a later sweep to a record "
                                 "and rewrite it: 'merge BASE.jsonl NEW.jsonl'.")
    ap.add_argument("command", choices=["report", "merge"])
    ap.add_argument("jsonl", nargs="+")
    a = ap.parse_args()
    if a.command == "merge":
        if len(a.jsonl) != 2:
            raise SystemExit("merge takes BASE.jsonl NEW.jsonl")
        print(merge(Path(a.jsonl[0]), Path(a.jsonl[1])))
    else:
        for p in a.jsonl:
            print(report(Path(p)))
