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
import copy
import gc
import shlex
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mtlsam_ext import MTLSAM
from mtlsam_ext.benchmark.harness import (
    PeakMemory,
    Stats,
    Timer,
    cpu_allocator_setup,
    limit_blas_threads,
    record,
    sync,
    time_once,
)
from mtlsam_ext.benchmark.naive_fmtl import NAIVE_AGGREGATORS, NaiveFMTL, NaiveSAMPerTask
from mtlsam_ext.benchmark.rounds import CI, RoundsResult, median_ci, run_rounds

CI_METHOD = "median over rounds, 95% CI from order statistics (binomial, distribution-free)"


# ================================================================================================
# Models: a backbone ``body`` and K linear heads; data fixed per (model, K).
# ================================================================================================
class MLPNet(nn.Module):
    """The main job's MLP (64 -> width x depth, ReLU), K heads of 10 classes."""

    def __init__(self, k: int, width: int = 256, depth: int = 4, d_in: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))
        self.input_shape = (d_in,)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (32-64-128 channels) on 3x32x32 images, global average pool."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(128, 10) for _ in range(k))
        self.input_shape = (3, 32, 32)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Backbone(nn.Module):
    """ResNet-18 layout for 32x32 inputs (CIFAR stem: one 3x3 conv, no max-pool), 4 stages of
    2 basic blocks with 64/128/256/512 channels, global average pool: 11.2 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        blocks: list[nn.Module] = []
        c = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


class ResNet18Net(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.body = ResNet18Backbone()
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(k))
        self.input_shape = (3, 32, 32)


MODELS: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    # name: (factory(K), default batch)
    "mlp": (MLPNet, 128),
    "cnn": (SmallCNN, 64),
    "resnet18": (ResNet18Net, 128),
}


# ================================================================================================
# Methods
# ================================================================================================
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


# ================================================================================================
# Instrumentation (only for the counting steps)
# ================================================================================================
class PassCounter:
    """Counts backbone forwards and backwards with hooks and times the closure and the
    autograd entry points; install with ``with counter.installed(): ...``."""

    def __init__(self, body: nn.Module, device: torch.device) -> None:
        self.body = body
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.backwards = 0
        self.backwards_full = 0
        self.autograd_calls = 0
        self.fwd_timer = Timer(self.device)
        self.bwd_timer = Timer(self.device)

    def wrap_closure(self, closure: Callable[..., Any], task_aware: bool = False
                     ) -> Callable[..., Any]:
        if task_aware:
            def timed_task(task: int | None = None) -> Any:
                with self.fwd_timer:
                    return closure(task=task)
            return timed_task

        def timed() -> Any:
            with self.fwd_timer:
                return closure()
        return timed

    @contextmanager
    def installed(self):
        handles = []

        def pre(_m: nn.Module, _inp: Any) -> None:
            self.forwards += 1

        def post(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._on_top)

        handles.append(self.body.register_forward_pre_hook(pre))
        handles.append(self.body.register_forward_hook(post))
        first = next(p for p in self.body.parameters() if p.requires_grad)
        handles.append(first.register_hook(self._on_bottom))
        orig_backward, orig_grad = torch.autograd.backward, torch.autograd.grad

        def backward(*a: Any, **kw: Any) -> Any:
            self.autograd_calls += 1
            with self.bwd_timer:
                return orig_backward(*a, **kw)

        def grad(*a: Any, **kw: Any) -> Any:
            self.autograd_calls += 1
            with self.bwd_timer:
                return orig_grad(*a, **kw)

        torch.autograd.backward, torch.autograd.grad = backward, grad
        try:
            yield self
        finally:
            torch.autograd.backward, torch.autograd.grad = orig_backward, orig_grad
            for h in handles:
                h.remove()

    def _on_top(self, g: torch.Tensor) -> None:
        self.backwards += 1

    def _on_bottom(self, g: torch.Tensor) -> None:
        self.backwards_full += 1


# ================================================================================================
# The benchmark
# ================================================================================================
def _closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 task_aware: bool = False) -> Callable[..., Any]:
    def closure() -> list[torch.Tensor]:
        h = model.body(x)
        return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]

    def closure_task(task: int | None = None) -> Any:
        h = model.body(x)
        if task is None:
            return [F.cross_entropy(hd(h), y[:, i]) for i, hd in enumerate(model.heads)]
        return F.cross_entropy(model.heads[task](h), y[:, task])

    return closure_task if task_aware else closure


def make_problem(model_name: str, k: int, args: argparse.Namespace, device: torch.device
                 ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The benchmark's model with K heads, one seeded batch ``(x, y)`` and its size."""
    factory, default_batch = MODELS[model_name]
    batch = args.batch or default_batch
    torch.manual_seed(args.seed)
    model = factory(k).to(device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, *model.input_shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch, k), generator=g).to(device)
    return model, x, y, batch


# The two bare passes timed in every round next to the methods (names no method can take).
BARE_FWD, BARE_BWD = "(forward)", "(backward)"


def measure_alone(name: str, template: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Peak memory and pass counts of one method with no other method's model or optimizer
    alive: the peak over building the optimizer and ``max(2, --warmup)`` steps (its state
    exists from the first step on), then ``--instr-steps`` instrumented steps."""
    model = copy.deepcopy(template)
    closure = _closure_for(model, x, y, name in TASK_AWARE)
    gc.collect()
    with PeakMemory(device) as mem:
        opt = make_optimizer(name, model, args)
        for _ in range(max(2, args.warmup)):
            opt.step(closure)
    # Per instrumented step: its time and the time inside the closure and the backwards; the
    # step with the median time is reported (one step alone caught a 0.5 s stall of a busy
    # machine once and showed erm's own time as 28 ms instead of 1).
    counter = PassCounter(model.body, device)
    per_step: list[tuple[float, float, float]] = []
    with counter.installed():
        timed_closure = counter.wrap_closure(closure, name in TASK_AWARE)
        for _ in range(args.instr_steps):
            f0, b0 = counter.fwd_timer.total, counter.bwd_timer.total
            with Timer(device) as step_timer:
                opt.step(timed_closure)
            per_step.append((step_timer.total, counter.fwd_timer.total - f0,
                             counter.bwd_timer.total - b0))
    n = args.instr_steps
    step_i, fwd_i, bwd_i = sorted(per_step)[(n - 1) // 2]
    inside = fwd_i + bwd_i
    out = {
        "backend": getattr(opt, "backend", None),
        "peak_bytes": mem.peak_bytes, "mem_method": mem.method,
        "forwards": counter.forwards / n, "backwards": counter.backwards / n,
        "backwards_full": counter.backwards_full / n,
        "autograd_calls": counter.autograd_calls / n,
        "instr_step_s": step_i, "instr_fwd_s": fwd_i, "instr_bwd_s": bwd_i,
        "outside_share": max(0.0, 1.0 - inside / step_i) if step_i > 0 else None,
        # the step's own time: outside the closure and the backward passes (bookkeeping,
        # perturbations, aggregation, the base optimizer), in the instrumented steps
        "outside_s": max(0.0, step_i - inside),
    }
    del opt, model, closure
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _bare_passes(template: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
                 ) -> dict[str, Callable[[], float]]:
    """Round participants timing one forward of the closure (K losses) and one backward of
    one task loss through the whole backbone (after an untimed fresh forward)."""
    probe = copy.deepcopy(template)
    closure = _closure_for(probe, x, y)

    def fwd() -> float:
        with torch.enable_grad():
            return time_once(closure, device)

    def bwd() -> float:
        probe.zero_grad(set_to_none=True)
        with torch.enable_grad():
            losses = closure()
        sync(device)
        return time_once(losses[0].backward, device)

    return {BARE_FWD: fwd, BARE_BWD: bwd}


def headline_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The ratios the rounds must pin down: gl-lagged and our fmtl against naive F-MTL, and
    gl-lagged against our fmtl (those present); without them, every method against the
    first."""
    pairs = [(a, b) for a, b in (("gl-lagged", "fmtl"), ("gl-lagged", "naive-fmtl"),
                                 ("fmtl", "naive-fmtl")) if a in methods and b in methods]
    return pairs or [(m, methods[0]) for m in methods[1:]]


def time_in_rounds(template: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: list[str],
                   args: argparse.Namespace, device: torch.device, bar: Any) -> RoundsResult:
    """Every method's own model (the same initial weights) and optimizer, warmed up, then
    interleaved rounds with the bare passes (see :mod:`mtlsam_ext.benchmark.rounds`)."""
    participants: dict[str, Callable[[], float]] = {}
    for name in methods:
        model = copy.deepcopy(template)
        opt = make_optimizer(name, model, args)
        closure = _closure_for(model, x, y, name in TASK_AWARE)
        for _ in range(args.warmup):
            opt.step(closure)

        def step(opt: Any = opt, closure: Callable[..., Any] = closure) -> float:
            return time_once(lambda: opt.step(closure), device)

        participants[name] = step
    participants.update(_bare_passes(template, x, y, device))
    sync(device)
    pairs = headline_pairs(methods)

    def converged(res: RoundsResult) -> bool:
        return all(median_ci(res.ratio(a, b)).rel_half_width <= args.ci_target
                   for a, b in pairs)

    def on_round(res: RoundsResult) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{res.elapsed_s:.0f}/{args.budget_s:g} s")

    return run_rounds(participants, min_rounds=args.steps, max_rounds=args.max_rounds,
                      budget_s=args.budget_s, seed=args.seed, converged=converged,
                      on_round=on_round)


def bench_group(model_name: str, k: int, methods: list[str], args: argparse.Namespace,
                device: torch.device, bar: Any) -> list[dict[str, Any]]:
    template, x, y, batch = make_problem(model_name, k, args, device)
    shared_params = sum(p.numel() for p in template.body.parameters())

    if not getattr(args, "_process_warm", False):
        # First use of every code path (thread pools, kernels, lazy imports, allocator
        # arenas) allocates memory once per process; pay it before any peak is measured.
        for name in methods:
            model = copy.deepcopy(template)
            make_optimizer(name, model, args).step(
                _closure_for(model, x, y, name in TASK_AWARE))
        del model
        args._process_warm = True

    alone = {name: measure_alone(name, template, x, y, args, device) for name in methods}
    res = time_in_rounds(template, x, y, methods, args, device, bar)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t_f, t_b = res.times[BARE_FWD], res.times[BARE_BWD]
    rows = []
    for name in methods:
        a = alone[name]
        ts = res.times[name]
        # per round: this step over what its passes cost in the same round
        eff = [t / (a["forwards"] * f + a["backwards"] * b) for t, f, b in zip(ts, t_f, t_b)]
        row = {
            "bench": "step", "model": model_name, "tasks": k, "method": name,
            "aggregator": args.aggregator, "batch": batch, "shared_params": shared_params,
            "rho": args.rho, "timing": "interleaved rounds", "ci": CI_METHOD,
            "rounds": res.rounds, "stop_reason": res.stop_reason,
            "timing_s": res.elapsed_s, "budget_s": args.budget_s, "ci_target": args.ci_target,
            **Stats.of(ts).as_dict("step_"),
            **median_ci(ts).as_dict("step_ci"),
            **a,
            "t_fwd_single": statistics.median(t_f), "t_bwd_single": statistics.median(t_b),
            "pass_cost_s": a["forwards"] * statistics.median(t_f)
            + a["backwards"] * statistics.median(t_b),
            **median_ci(eff).as_dict("pass_cost_efficiency"),
        }
        for ref, key in (("naive-fmtl", "vs_naive_fmtl"), ("fmtl", "vs_fmtl")):
            if ref in res.times:
                row.update(median_ci(res.ratio(name, ref)).as_dict(key))
            else:
                row.update({key: None, f"{key}_lo": None, f"{key}_hi": None})
        rows.append(row)
    return rows


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
