"""The step benchmark's picture (``--plot FILE.png``): step time per method with its 95% CI,
one panel per (model, K), and, when several K were run, step time against K per method.

matplotlib is imported here only (the ``bench`` extra); the benchmark runs without it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_steps(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Draw the rows of :func:`mtlsam_ext.benchmark.step.main` into the PNG ``path``."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib, or the package's "
                         "bench extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r["model"]][r["tasks"]].append(r)
    n_cols = max(len(ks) + (1 if len(ks) > 1 else 0) for ks in groups.values())
    fig, axes = plt.subplots(len(groups), n_cols, squeeze=False,
                             figsize=(4.6 * n_cols, 0.35 * max(len(v) for g in groups.values()
                                                               for v in g.values()) * 1.2
                                      * len(groups) + 1.5))
    for row_axes, (model, by_k) in zip(axes, groups.items()):
        for ax, (k, rs) in zip(row_axes, sorted(by_k.items())):
            names = [r["method"] for r in rs]
            med = [1e3 * r["step_ci"] for r in rs]
            err = [[1e3 * (r["step_ci"] - r["step_ci_lo"]) for r in rs],
                   [1e3 * (r["step_ci_hi"] - r["step_ci"]) for r in rs]]
            ax.barh(range(len(rs)), med, xerr=err, color="tab:blue", alpha=0.75, capsize=3)
            ax.set_yticks(range(len(rs)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("step time (ms), median and 95% CI")
            ax.set_title(f"{model}, K = {k} ({rs[0]['rounds']} rounds)", fontsize=9)
        if len(by_k) > 1:
            ax = row_axes[len(by_k)]
            ks = sorted(by_k)
            methods = [r["method"] for r in by_k[ks[0]]]
            for m in methods:
                pts = [(k, r) for k in ks for r in by_k[k] if r["method"] == m]
                xs = [k for k, _ in pts]
                ys = [1e3 * r["step_ci"] for _, r in pts]
                err = [[1e3 * (r["step_ci"] - r["step_ci_lo"]) for _, r in pts],
                       [1e3 * (r["step_ci_hi"] - r["step_ci"]) for _, r in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("tasks K")
            ax.set_ylabel("step time (ms)")
            ax.set_title(f"{model}: step time against K", fontsize=9)
            ax.legend(fontsize=6)
        for ax in row_axes[len(by_k) + (1 if len(by_k) > 1 else 0):]:
            ax.axis("off")
    r0 = rows[0]
    fig.suptitle(f"{r0['device_name']}, torch {r0['torch']}, commit {str(r0['commit'])[:12]}",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
