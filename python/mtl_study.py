"""The convergence and label-noise study of the digit programs: its plan, and its report.

Plan (``--plan`` of multi_digits.py / multilabel_digits.py): the configuration x aggregator
pairs of ``plan(K, noise)`` (a budgeted part of ``PLAN``) over ``PLAN_SEEDS``, each run
trained until the mean validation accuracy has not improved for ``PLAN_PATIENCE`` epochs (not
before ``PLAN_MIN_EPOCHS``, at most ``--max-epochs``, 60), test accuracy at the best
validation epoch; one command per label-noise level, all appending to one record per program
(docs/evidence.md gives the commands and their measured cost).

Report: per setting (program, i.e. K, and label-noise level), the test accuracy mean ± std
over seeds of every configuration x aggregator, and paired differences (same seed: same data
split, noisy labels and initialisation) to ERM with the same aggregator and to F-MTL with the
same aggregator, with a 95 % Student-t interval over seeds and a verdict: "better" or "worse"
where the interval excludes zero, "no difference" where it covers zero. Optimizer time per
step and in total per run; a plot of test accuracy against total optimizer time per run, one
panel per setting.

    python python/mtl_study.py report python/results/study_multilabel_digits.jsonl \\
        python/results/study_multi_digits.jsonl --out python/results/study
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import mtl_records

ALL = ["ls", "mgda", "upgrad"]
# Every method with LS, MGDA and UPGrad, except gl-autograd and gl-zo with LS only (their
# aggregator effect is measured by gl-lagged).
PLAN: dict[str, list[str]] = {"erm": ALL, "sam": ALL, "fmtl": ALL, "gl-lagged": ALL,
                              "gl-autograd": ["ls"], "gl-zo": ["ls"]}
PLAN_SEEDS = (0, 1, 2, 3, 4)
PLAN_PATIENCE = 5
PLAN_MIN_EPOCHS = 15
LEVEL = 0.95


def plan(n_tasks: int, noise: float) -> list[tuple[str, str]]:
    """The (config, aggregator) pairs of one setting. The budget cut of docs/evidence.md
    (measured: the full plan needs about 3.9 h of the 2-core machine, this one 2.7 h): at
    K = 2 the whole ``PLAN``; at K = 10, where F-MTL and gl cost 6-8 s per epoch, LS and MGDA
    on clean labels (UPGrad's K = 10 effect is in the recorded 10-epoch comparison) and LS
    only under label noise (the question there is SAM against ERM, not the aggregator)."""
    if n_tasks <= 2:
        keep = ALL
    elif noise == 0:
        keep = ["ls", "mgda"]
    else:
        keep = ["ls"]
    return [(c, a) for c, aggs in PLAN.items() for a in aggs if a in keep]


def t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_interval(diffs: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t interval: mean ± t_{(1+level)/2, n-1}
    s / sqrt(n), s the sample standard deviation. Needs two pairs or more."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {n}")
    mean = statistics.mean(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float) -> str:
    """'better' / 'worse' where the interval lies above / below zero, else 'no difference'."""
    return "better" if lo > 0 else "worse" if hi < 0 else "no difference"


def setting_of(run: dict) -> tuple[int, float]:
    """(K, label-noise level) of a run."""
    return len(run["test_acc"]), float(run.get("label_noise", 0.0))


def _paired(runs: list[dict], ref: str, cfg: str, agg: str) -> dict | None:
    base = {r["seed"]: r["test_acc_mean"] for r in runs
            if (r["config"], r["aggregator"]) == (ref, agg)}
    d = [100 * (r["test_acc_mean"] - base[r["seed"]]) for r in runs
         if (r["config"], r["aggregator"]) == (cfg, agg) and r["seed"] in base]
    if cfg == ref or len(d) < 2:
        return None
    mean, lo, hi = paired_interval(d)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(d), "verdict": verdict(lo, hi)}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (config, aggregator) of one setting, in first-seen order."""
    rows = []
    pairs = list(dict.fromkeys((r["config"], r["aggregator"]) for r in runs))
    order = [*PLAN, *ALL]  # the plan's order first (runs finish in any order)
    pairs.sort(key=lambda p: tuple(order.index(x) if x in order else len(order) for x in p))
    for cfg, agg in pairs:
        rs = [r for r in runs if (r["config"], r["aggregator"]) == (cfg, agg)]
        acc = [100 * r["test_acc_mean"] for r in rs]
        rows.append({
            "config": cfg, "aggregator": agg, "seeds": len(rs), "acc": statistics.mean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "final_acc": 100 * statistics.mean(r.get("final_test_acc_mean", r["test_acc_mean"])
                                               for r in rs),
            "epochs_run": statistics.mean(r.get("epochs_run", r["epochs"]) for r in rs),
            "best_epoch": statistics.mean(r["best_epoch"] for r in rs),
            "ms_per_step": 1e3 * statistics.mean(r["s_per_step"] for r in rs),
            "opt_s": statistics.mean(r.get("opt_s", 0.0) for r in rs),
            "run_s": statistics.mean(r.get("run_s", 0.0) for r in rs),
            "vs_erm": _paired(runs, "erm", cfg, agg), "vs_fmtl": _paired(runs, "fmtl", cfg, agg)})
    return rows


def _diff(d: dict | None) -> str:
    if d is None:
        return "–"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {d['verdict']}"


def markdown(rows: list[dict]) -> str:
    lines = ["| config | aggregator | seeds | test acc % (mean ± std) | Δ vs ERM, pp [95 % CI] "
             "| Δ vs F-MTL, pp [95 % CI] | last-epoch acc % | epochs run | best epoch "
             "| ms / step | optimizer s / run | run s |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['aggregator']} | {r['seeds']} | {r['acc']:.2f} ± "
            f"{r['acc_std']:.2f} | {_diff(r['vs_erm'])} | {_diff(r['vs_fmtl'])} "
            f"| {r['final_acc']:.2f} | {r['epochs_run']:.1f} | {r['best_epoch']:.1f} "
            f"| {r['ms_per_step']:.1f} | {r['opt_s']:.0f} | {r['run_s']:.0f} |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """Plain statements of one setting: the best mean, and every paired comparison whose
    interval excludes zero (the others are 'no difference')."""
    best = max(rows, key=lambda r: r["acc"])
    out = [f"highest mean test accuracy: {best['config']} with {best['aggregator']}, "
           f"{best['acc']:.2f} %"]
    for ref in ("erm", "fmtl"):
        d = [(r, r[f"vs_{ref}"]) for r in rows if r[f"vs_{ref}"] is not None]
        sig = [f"{r['config']}/{r['aggregator']} {x['verdict']} by {abs(x['mean']):.2f} pp"
               for r, x in d if x["verdict"] != "no difference"]
        name = "ERM" if ref == "erm" else "F-MTL"
        out.append(f"vs {name} (same aggregator): " + ("; ".join(sig) if sig else "")
                   + ("; " if sig else "") + f"{len(d) - len(sig)} of {len(d)} no difference")
    return out


def plot(settings: dict[tuple, list[dict]], titles: dict[tuple, str], path: Path) -> None:
    """Test accuracy against mean total optimizer time per run, one panel per setting; colour
    per configuration, marker per aggregator, bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(settings)
    cols = min(n, 3)
    rws = math.ceil(n / cols)
    fig, axes = plt.subplots(rws, cols, figsize=(5.2 * cols, 4.2 * rws), squeeze=False)
    markers = dict(zip(ALL, "osD"))
    configs = list(dict.fromkeys(r["config"] for rows in settings.values() for r in rows))
    colours = {c: f"C{i}" for i, c in enumerate(configs)}
    for ax, (key, rows) in zip(axes.flat, settings.items()):
        for r in rows:
            ax.errorbar(r["opt_s"], r["acc"], yerr=r["acc_std"], color=colours[r["config"]],
                        marker=markers.get(r["aggregator"], "^"), capsize=2, linestyle="none")
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("optimizer wall time per run (s)")
        ax.set_ylabel("test accuracy, mean over tasks (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[c], marker="o", linestyle="none", label=c)
               for c in configs]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", label=a)
                for a, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(jsonls: list[Path], out: Path) -> str:
    """Read the records, write ``out``.md (tables and findings per setting) and ``out``.png,
    and return the Markdown."""
    runs, metas = [], []
    for p in jsonls:
        meta, rs = mtl_records.read(Path(p))
        metas.append(meta)
        runs += [{**r, "program": meta["program"]} for r in rs]
    if not runs:
        raise SystemExit(f"no runs recorded in {', '.join(map(str, jsonls))}")
    keyed: dict[tuple, list[dict]] = {}
    for r in runs:
        keyed.setdefault((r["program"], *setting_of(r)), []).append(r)
    keys = sorted(keyed, key=lambda k: (-k[1], k[2]))
    settings = {k: summarise(keyed[k]) for k in keys}
    titles = {k: f"{k[0]}, K = {k[1]}, label noise {100 * k[2]:.0f} %" for k in keys}
    parts = []
    for meta in metas:
        proto = meta.get("protocol") or mtl_records.protocol(meta["args"])
        cmds = "; ".join(f"`{i['command']}` at {i['commit']} ({i['runs']} runs, "
                         f"{i['wall_s']:.0f} s, {i['jobs']} x {i['threads_per_run']} thread)"
                         for i in meta.get("invocations", []))
        parts.append(f"- {meta['title']}: protocol {proto}; torch {meta['torch']}, "
                     f"{meta['cpus']} CPUs; {meta.get('wall_s', 0):.0f} s in all. "
                     f"Commands: {cmds or meta['command']}")
    text = ["# Convergence and label-noise study\n", *parts, "",
            "Test accuracy at the best validation epoch. Δ: mean paired difference (same seed) "
            "in points with its 95 % t-interval over seeds, to ERM and to F-MTL with the same "
            "aggregator; 'no difference' where the interval covers 0. Optimizer time: inside "
            "`opt.step` only (the per-step rate leaves out the first step).\n"]
    for k in keys:
        text += [f"## {titles[k]}\n", markdown(settings[k]), "",
                 *[f"- {line}" for line in findings(settings[k])], ""]
    md = "\n".join(text)
    out = Path(out)
    out.with_suffix(".md").write_text(md)
    plot(settings, titles, out.with_suffix(".png"))
    return md


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Tables (.md) and plot (.png) of the convergence "
                                 "and label-noise study from its records (.jsonl).")
    ap.add_argument("command", choices=["report"])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--out", required=True, help="output prefix: writes .md and .png")
    a = ap.parse_args()
    print(report([Path(p) for p in a.jsonl], Path(a.out)))
