"""Turn benchmark results into PNG charts (matplotlib, Agg backend).

Inputs: JSON-lines files written by ``bench.step_bench`` / ``bench.aggregator_bench``
(``--out``), and/or pytest-benchmark JSON files (``pytest bench/ --benchmark-only
--benchmark-json FILE``). When a configuration appears more than once, the newest record
(``timestamp``) wins.

Charts written to ``--outdir``:

* ``step_<device>_<model>_<aggregator>.png``: per K, step time (median, IQR error bars),
  peak extra memory, and time relative to the naive F-MTL baseline, one bar per method;
* ``aggregator_<device>.png``: time vs K (log-log), one panel per aggregator: ours (G -> w),
  ours end to end (Gram + solve + combine) and the reference implementation;
* ``ops.png``: pytest-benchmark means per op and backend.

Usage: ``python -m bench.plot results.jsonl [more.jsonl ...] --outdir bench/results/plots``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

METHOD_ORDER = ["erm", "naive-fmtl", "naive-fmtl-2k", "naive-sam-per-task", "fmtl",
                "gl-autograd", "gl-lagged", "gl-zo", "sam"]


def load(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(JSON-lines records, pytest-benchmark entries) from the given files."""
    records, pybench = [], []
    for p in paths:
        text = Path(p).read_text()
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict) and "benchmarks" in whole:
            pybench.extend(whole["benchmarks"])
        elif isinstance(whole, dict):
            records.append(whole)  # a JSON-lines file with a single record
        else:
            records.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return records, pybench


def newest(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        k = tuple(r.get(f) for f in key)
        if k not in best or str(r.get("timestamp", "")) >= str(best[k].get("timestamp", "")):
            best[k] = r
    return list(best.values())


def plot_steps(rows: list[dict[str, Any]], outdir: Path) -> list[Path]:
    rows = newest(rows, ("device", "model", "aggregator", "tasks", "method", "batch"))
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r.get("device", "cpu"), r["model"], r["aggregator"])].append(r)
    written = []
    for (device, model, agg), rs in sorted(groups.items()):
        ks = sorted({r["tasks"] for r in rs})
        methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rs)]
        methods += sorted({r["method"] for r in rs} - set(methods))
        by = {(r["tasks"], r["method"]): r for r in rs}
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        width = 0.8 / max(1, len(methods))
        panels = [
            ("step time (ms, median, IQR bars)", lambda r: 1e3 * r["step_median"],
             lambda r: (1e3 * (r["step_median"] - r["step_q1"]),
                        1e3 * (r["step_q3"] - r["step_median"])), True),
            ("peak extra memory (MiB)",
             lambda r: (r["peak_bytes"] or 0) / 2**20, None, True),
            ("time / naive F-MTL", lambda r: r.get("vs_naive_fmtl") or float("nan"), None,
             False),
        ]
        for ax, (title, val, err, logy) in zip(axes, panels):
            for j, m in enumerate(methods):
                xs, ys, lo, hi = [], [], [], []
                for i, k in enumerate(ks):
                    r = by.get((k, m))
                    if r is None:
                        continue
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(val(r))
                    if err:
                        e = err(r)
                        lo.append(e[0])
                        hi.append(e[1])
                ax.bar(xs, ys, width, label=m, yerr=[lo, hi] if err else None, capsize=2)
            ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
            ax.set_title(title)
            if logy:
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
        r0 = rs[0]
        fig.suptitle(f"{model} on {r0.get('device_name', device)}, aggregator={agg}, "
                     f"batch={r0.get('batch')}, shared params={r0.get('shared_params', 0):,}"
                     f"  [{str(r0.get('commit', ''))[:12]}]")
        axes[0].legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = outdir / f"step_{device.replace(':', '')}_{model}_{agg}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_aggregators(rows: list[dict[str, Any]], outdir: Path) -> list[Path]:
    rows = newest(rows, ("device", "aggregator", "tasks", "dim"))
    written = []
    for device in sorted({r.get("device", "cpu") for r in rows}):
        rs = [r for r in rows if r.get("device", "cpu") == device]
        names = sorted({r["aggregator"] for r in rs})
        cols = min(3, len(names))
        nrows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            sub = sorted((r for r in rs if r["aggregator"] == name), key=lambda r: r["tasks"])
            ks = [r["tasks"] for r in sub]
            ax.plot(ks, [1e3 * r["solve_median"] for r in sub], "o-", label="ours G->w")
            ax.plot(ks, [1e3 * r["full_median"] for r in sub], "s-",
                    label="ours gram+solve+combine")
            ref = [r for r in sub if "ref_median" in r]
            if ref:
                ax.plot([r["tasks"] for r in ref], [1e3 * r["ref_median"] for r in ref], "^--",
                        label=f"reference ({ref[0]['ref_impl']})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("K")
            ax.set_ylabel("ms")
            ax.set_title(name)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        r0 = rs[0]
        fig.suptitle(f"aggregators on {r0.get('device_name', device)}, N={r0.get('dim')}, "
                     f"{r0.get('dtype')}  [{str(r0.get('commit', ''))[:12]}]")
        fig.tight_layout()
        path = outdir / f"aggregator_{device.replace(':', '')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_pybench(entries: list[dict[str, Any]], outdir: Path) -> list[Path]:
    if not entries:
        return []
    names = [e["name"] for e in entries]
    means = [1e3 * e["stats"]["mean"] for e in entries]
    stds = [1e3 * e["stats"]["stddev"] for e in entries]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
    ax.barh(range(len(names)), means, xerr=stds, capsize=2)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms (mean, stddev)")
    ax.invert_yaxis()
    fig.tight_layout()
    path = outdir / "ops.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="JSON-lines or pytest-benchmark JSON files")
    ap.add_argument("--outdir", default="bench/results/plots")
    args = ap.parse_args(argv)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records, pybench = load(args.inputs)
    written = plot_steps([r for r in records if r.get("bench") == "step"], outdir)
    written += plot_aggregators([r for r in records if r.get("bench") == "aggregator"], outdir)
    written += plot_pybench(pybench, outdir)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
