"""The step benchmark's measurements for one model and K: each method alone (peak memory, pass
counts, the instrumented steps), then all of them in interleaved rounds with the bare passes,
and the table rows formed from both (ratios within rounds, medians with 95% CIs)."""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtlsam_ext.benchmark.harness import PeakMemory, Stats, Timer, sync, time_once
from mtlsam_ext.benchmark.methods import TASK_AWARE, make_optimizer
from mtlsam_ext.benchmark.models import closure_for, make_problem
from mtlsam_ext.benchmark.pass_counter import PassCounter
from mtlsam_ext.benchmark.rounds import RoundsResult, median_ci, run_rounds

CI_METHOD = "median over rounds, 95% CI from order statistics (binomial, distribution-free)"


# The two bare passes timed in every round next to the methods (names no method can take).
BARE_FWD, BARE_BWD = "(forward)", "(backward)"


def measure_alone(name: str, template: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Peak memory and pass counts of one method with no other method's model or optimizer
    alive: the peak over building the optimizer and ``max(2, --warmup)`` steps (its state
    exists from the first step on), then ``--instr-steps`` instrumented steps."""
    model = copy.deepcopy(template)
    closure = closure_for(model, x, y, name in TASK_AWARE)
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
    closure = closure_for(probe, x, y)

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
        closure = closure_for(model, x, y, name in TASK_AWARE)
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
                closure_for(model, x, y, name in TASK_AWARE))
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

