"""End-to-end optimizer-step benchmark: MTLSAM's methods against naive F-MTL baselines.

For every model and task count K, each method gets its own copy of the same model and data
and first runs alone: peak memory over building its optimizer and its first steps, then
``--instr-steps`` *instrumented* steps that count and time the passes (the hooks and device
syncs never touch the timed steps). Then all methods are timed together in interleaved rounds
(:mod:`mtlsam_ext.benchmark.rounds`): in each round every method takes one step and a bare
forward and a bare one-loss backward run once, in a fresh seeded order; ratios are formed within
rounds and reported as medians with 95% confidence intervals. Counted in the instrumented steps:

* forwards: calls of the shared backbone (a forward pre-hook);
* backwards: backward passes that reach the backbone's output (a tensor hook installed on
  the output by a forward hook), and ``backwards_full``: those that reach the backbone's
  first parameter (a tensor hook on it; a partial ``autograd.grad`` down to a middle
  layer counts in the first number, not in the second);
* time inside the closure (forward) and inside ``torch.autograd.backward`` /
  ``torch.autograd.grad`` (both wrapped for the instrumented steps), and the share of the
  step spent outside them and its time ("own ms": bookkeeping, perturbations, norms,
  aggregation, the base optimizer).

The bare passes (one forward of the closure; one backward of one task loss from a fresh
forward) of each round give each method's "pass-cost efficiency": its step over
``forwards * t_fwd + backwards * t_bwd`` of the same round (> 1 means overhead beyond the
passes).

Methods: ``erm``, ``fmtl``, ``sam``, ``gl-autograd``, ``gl-lagged``, ``gl-zo`` (one
direction) (MTLSAM), ``fmtl-task`` and ``gl-lagged-task`` (the same with a task-aware closure:
a perturbed pass builds only its own head and loss) and
``naive-fmtl`` (authors' layout, K + 1 forwards), ``naive-fmtl-2k`` (their many-task
layout, 2K forwards), ``naive-sam-per-task`` (per-task loop over a classic SAM optimizer),
from :mod:`mtlsam_ext.benchmark.naive_fmtl`.

Run: ``python -m mtlsam_ext.bench`` (the main job, K = 10) or, from a checkout,
``python -m bench.step_bench --tasks 2,10 --model mlp``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import torch

from mtlsam_ext.benchmark.harness import cpu_allocator_setup, limit_blas_threads, record
from mtlsam_ext.benchmark.measure import bench_group
from mtlsam_ext.benchmark.methods import ALL_METHODS, NAIVE, OURS, TASK_AWARE, make_optimizer
from mtlsam_ext.benchmark.models import MODELS, MLPNet, make_problem
from mtlsam_ext.benchmark.naive_fmtl import NAIVE_AGGREGATORS
from mtlsam_ext.benchmark.pass_counter import PassCounter
from mtlsam_ext.benchmark.rounds import CI

# Also importable from here, where they lived before the split (the program's pieces are in
# models, methods, pass_counter and measure).
__all__ = ["ALL_METHODS", "MLPNet", "MODELS", "NAIVE", "OURS", "PassCounter", "TASK_AWARE",
           "bench_group", "main", "make_optimizer", "make_problem", "parse_args",
           "print_table"]


def _ci(r: dict[str, Any], key: str, digits: int = 2, scale: float = 1.0) -> str:
    if r.get(key) is None:
        return "-"
    return CI(r[key], r[f"{key}_lo"], r[f"{key}_hi"], r["rounds"]).fmt(digits, scale)


def print_table(rows: list[dict[str, Any]]) -> None:
    r0 = rows[0]
    print(f"\n== model={r0['model']} K={r0['tasks']} aggregator={r0['aggregator']} "
          f"batch={r0['batch']} shared params={r0['shared_params']:,}  bare passes: "
          f"fwd {1e3 * r0['t_fwd_single']:.2f} ms, bwd {1e3 * r0['t_bwd_single']:.2f} ms")
    print(f"   {r0['rounds']} interleaved rounds in {r0['timing_s']:.0f} s, ended by "
          f"{r0['stop_reason']} (target: headline ratios' CI half-width <= "
          f"{100 * r0['ci_target']:g}%, budget {r0['budget_s']:g} s); medians over rounds with "
          f"95% CIs [lo-hi] from order statistics; peak memory and pass counts from each "
          f"method's own steps with no other method alive")
    head = (f"{'method':<20}{'step ms [CI]':>24}{'peak MiB':>10}{'fwd':>5}{'bwd':>5}"
            f"{'full':>5}{'eff [CI]':>18}{'outside':>9}{'own ms':>8}{'/naive [CI]':>19}"
            f"{'/fmtl [CI]':>19}")
    print(head)
    for r in rows:
        mem = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
        print(f"{r['method']:<20}{_ci(r, 'step_ci', 2, 1e3):>24}{mem:>10}"
              f"{r['forwards']:>5g}{r['backwards']:>5g}{r['backwards_full']:>5g}"
              f"{_ci(r, 'pass_cost_efficiency'):>18}"
              f"{100 * r['outside_share']:>8.1f}%{1e3 * r['outside_s']:>8.2f}"
              f"{_ci(r, 'vs_naive_fmtl'):>19}{_ci(r, 'vs_fmtl'):>19}")


COLUMNS = """how it times: every method gets its own copy of the model (same weights, same batch)
and optimizer, warmed up; then rounds in which each method takes one step, and a bare forward
and a bare one-loss backward run once, in a fresh random order per round. Ratios are formed
within each round; every figure is the median over rounds with its 95% confidence interval
[lo-hi] (order statistics). Rounds go on until the headline ratios (gl-lagged / fmtl,
gl-lagged / naive-fmtl, fmtl / naive-fmtl) are known to --ci-target, or --budget-s runs out.

columns of the table:
  step ms [CI]   median time of one optimizer step over the rounds
  peak MiB       memory the optimizer and its steps take above what existed before it, measured
                 with no other method alive (CPU: the process's resident peak; CUDA: the
                 allocator's peak)
  fwd, bwd       backbone forwards and backwards per step, counted with hooks
  full           backwards that reach the first shared parameter (through the whole backbone)
  eff [CI]       step time / (fwd x bare forward + bwd x bare backward of the same round): about
                 1 when the step costs its passes, above 1 for time spent elsewhere
  outside        share of an instrumented step spent outside the closure and the backwards
                 (perturbations, aggregation, the base optimizer, bookkeeping)
  own ms         that time in milliseconds
  /naive, /fmtl  step time over naive-fmtl's and over fmtl's in the same round"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The column legend as written, and every option's default."""


def parse_args(argv: list[str] | None, prog: str | None = None,
               tasks: str = "2,3,10,40") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 epilog=COLUMNS,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--tasks", default=tasks, help="comma-separated task counts K")
    ap.add_argument("--model", default="auto",
                    help=f"comma-separated from {list(MODELS)}; auto = mlp on CPU, "
                         "mlp,resnet18 on CUDA")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--methods", default=",".join(ALL_METHODS),
                    help="comma-separated methods, from "
                    + ", ".join(list(OURS) + list(TASK_AWARE) + list(NAIVE)))
    ap.add_argument("--aggregator", default="ls", help="MTLSAM aggregator")
    ap.add_argument("--backend", default="auto", help="MTLSAM backend for the fused ops")
    ap.add_argument("--steps", type=int, default=10,
                    help="timed rounds that always run (one step per method in each); more follow "
                    "until --ci-target or --budget-s")
    ap.add_argument("--max-rounds", type=int, default=500, help="at most this many rounds")
    ap.add_argument("--budget-s", type=float, default=40.0,
                    help="time budget for the timed rounds of each model and K, in seconds")
    ap.add_argument("--ci-target", type=float, default=0.03,
                    help="stop once every headline ratio's 95%% CI half-width is at most "
                    "this fraction of the ratio")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per method before the rounds")
    ap.add_argument("--instr-steps", type=int, default=3,
                    help="instrumented steps per method (pass counts; the outside share of "
                    "the median one), before the rounds")
    ap.add_argument("--batch", type=int, default=None, help="override the model's batch")
    ap.add_argument("--task-chunk", type=int, default=None,
                    help="points per batched pass of the -vmap/-auto methods (default: all K)")
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    ap.add_argument("--seed", type=int, default=0, help="model, data and generator seed")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="cap NumPy/SciPy BLAS threads (threadpoolctl); default: untouched")
    ap.add_argument("--out", help="append JSON lines (harness.record) to this file")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="draw step time per method with its CI (and against K, for several "
                    "K) into this PNG (needs matplotlib: the bench extra)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None,
         tasks: str = "2,3,10,40") -> list[dict[str, Any]]:
    from tqdm import tqdm

    args = parse_args(argv, prog, tasks)
    cpu_allocator_setup()  # before any tensor exists, so CPU peak-RSS numbers are meaningful
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_blas_threads(args.blas_threads)
    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels and timing events on the device measured
    models = (["mlp", "resnet18"] if device.type == "cuda" else ["mlp"]) \
        if args.model == "auto" else [m for m in args.model.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    methods = [m for m in args.methods.split(",") if m]
    bad += [m for m in methods if m not in ALL_METHODS and m not in OURS]
    if bad:
        sys.exit(f"unknown model/method {bad}; models {list(MODELS)}, methods {ALL_METHODS}")
    if args.aggregator not in NAIVE_AGGREGATORS:
        skipped = [m for m in methods if m in NAIVE]
        if skipped:
            print(f"note: no naive version of aggregator {args.aggregator!r}; skipping "
                  f"{skipped}", file=sys.stderr)
        methods = [m for m in methods if m not in NAIVE]
    tasks = [int(t) for t in args.tasks.split(",") if t]
    bad_opts = [f"{k} {v}" for k, v in (("--steps", args.steps), ("--max-rounds",
                args.max_rounds), ("--instr-steps", args.instr_steps)) if v < 1]
    bad_opts += [f"{k} {v}" for k, v in (("--budget-s", args.budget_s),
                 ("--ci-target", args.ci_target)) if not v > 0]
    if bad_opts or args.max_rounds < args.steps:
        sys.exit(f"need --steps, --max-rounds, --instr-steps >= 1, --max-rounds >= --steps, "
                 f"--budget-s and --ci-target > 0; got {bad_opts or args.max_rounds}")
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([prog or "python -m mtlsam_ext.benchmark.step", shlex.join(given)])
    bar = tqdm(disable=args.no_progress, desc="rounds", unit="round", file=sys.stderr)
    all_rows = []
    for model_name in models:
        for k in tasks:
            bar.set_description(f"{model_name} K={k} rounds")
            rows = bench_group(model_name, k, methods, args, device, bar)
            rows = record(args.out, rows, device=device, command=command.strip())
            all_rows.extend(rows)
            bar.clear()
            print_table(rows)
    bar.close()
    r0 = all_rows[0]
    print(f"\nmtlsam_ext {r0['mtlsam_ext']}, torch {r0['torch']}, commit {r0['commit']}, "
          f"{r0['device_name']} ({r0['threads']} threads), {r0['timestamp']}")
    print(f"reproduce: {command.strip()}")
    if args.plot:
        from mtlsam_ext.benchmark.plot_steps import plot_steps

        plot_steps(all_rows, args.plot)
        print(f"plot: {args.plot}")
    return all_rows

if __name__ == "__main__":
    main()
