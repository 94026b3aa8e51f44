"""Interleaved timing rounds and distribution-free confidence intervals for ratios.

Why rounds: this class of machine drifts by 1.4-1.7x within minutes (frequency scaling,
neighbours on the host). Timing each method in its own block of consecutive steps puts that
drift between the blocks, straight into the ratios: three back-to-back runs of the main job
gave gl-lagged / naive F-MTL 0.40, 0.33 and 0.47. In a round every participant takes one
step, in a fresh seeded random order, so all of them see the same machine state within
a fraction of a second; a ratio is formed *per round* and summarised over rounds.

Why order statistics: the per-round ratios are skewed and have outliers (a round that caught
a burst of background work). The median is robust to them, and its confidence interval from
order statistics needs no distributional assumption and no resampling: for n rounds, the
interval between the j-th and the (n + 1 - j)-th smallest values covers the true median with
probability ``P(j <= B < n + 1 - j)``, ``B ~ Binomial(n, 1/2)``; we take the largest j whose
coverage is still >= the level. It exists from n = 6 on at 95% (below, the interval is
infinite).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["CI", "RoundsResult", "median_ci", "run_rounds"]


@dataclass(frozen=True)
class CI:
    """Median of a sample with a confidence interval ``[lo, hi]`` at ``level``."""

    median: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def rel_half_width(self) -> float:
        """Half-width over the median (inf without an interval or with a zero median)."""
        if not math.isfinite(self.half_width) or self.median == 0:
            return math.inf
        return self.half_width / abs(self.median)

    def fmt(self, digits: int = 2, scale: float = 1.0) -> str:
        """``0.74 [0.72-0.76]`` (``[?]`` while there are too few samples for an interval)."""
        m = f"{scale * self.median:.{digits}f}"
        if not math.isfinite(self.lo) or not math.isfinite(self.hi):
            return f"{m} [?]"
        return f"{m} [{scale * self.lo:.{digits}f}-{scale * self.hi:.{digits}f}]"

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        return {prefix: self.median, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def _median_rank(n: int, level: float) -> int | None:
    """The largest 1-based rank j with ``P(j <= B <= n - j) >= level`` for
    ``B ~ Binomial(n, 1/2)``, i.e. ``[x_(j), x_(n+1-j)]`` covers the median; None if none."""
    total = 2 ** n
    best = None
    for j in range(1, n // 2 + 1):
        inside = sum(math.comb(n, b) for b in range(j, n - j + 1))
        if inside / total >= level:
            best = j
        else:
            break
    return best


def median_ci(samples: Sequence[float], level: float = 0.95) -> CI:
    """Median of ``samples`` with its order-statistic confidence interval (module docstring)."""
    xs = sorted(float(x) for x in samples)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci: no samples")
    if not 0 < level < 1:
        raise ValueError(f"median_ci: level must be in (0, 1), got {level}")
    j = _median_rank(n, level)
    med = statistics.median(xs)
    if j is None:
        return CI(med, -math.inf, math.inf, n, level)
    return CI(med, xs[j - 1], xs[n - j], n, level)


@dataclass
class RoundsResult:
    """Per participant the time of its call in every round (same index = same round)."""

    times: dict[str, list[float]]
    rounds: int
    stop_reason: str
    elapsed_s: float
    orders: list[list[str]] = field(default_factory=list)

    def ratio(self, num: str, den: str) -> list[float]:
        """``num / den`` per round."""
        return [a / b for a, b in zip(self.times[num], self.times[den])]


def run_rounds(participants: dict[str, Callable[[], float]], *, min_rounds: int,
               max_rounds: int, budget_s: float, seed: int,
               converged: Callable[[RoundsResult], bool] | None = None,
               on_round: Callable[[RoundsResult], None] | None = None) -> RoundsResult:
    """Rounds in which every participant runs once, in a fresh random order per round.

    Each participant is a callable that runs its unit of work once and returns the seconds
    it took (:func:`mtlsam_ext.benchmark.harness.time_once`; it may do untimed preparation,
    e.g. a forward before a timed backward). ``min_rounds`` always run (a machine that stalls
    for seconds at a time, as this class of machine sometimes does, must still yield a median
    with an interval);
    after them, rounds go on until ``converged(result)`` holds, or ``max_rounds`` are done, or
    the next round would probably not finish within ``budget_s`` (measured from the first
    round, predicted from the mean round so far); ``stop_reason`` says which ("converged",
    "max rounds", "budget").
    """
    if not participants:
        raise ValueError("run_rounds: no participants")
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"run_rounds: need 1 <= min_rounds <= max_rounds, got {min_rounds}, "
                         f"{max_rounds}")
    rng = random.Random(seed)
    names = list(participants)
    res = RoundsResult({n: [] for n in names}, 0, "", 0.0)
    t0 = time.perf_counter()
    while True:
        order = names[:]
        rng.shuffle(order)
        for name in order:
            res.times[name].append(float(participants[name]()))
        res.rounds += 1
        res.orders.append(order)
        res.elapsed_s = time.perf_counter() - t0
        if on_round:
            on_round(res)
        if res.rounds < min_rounds:
            continue
        if converged is not None and converged(res):
            res.stop_reason = "converged"
            break
        if res.rounds >= max_rounds:
            res.stop_reason = "max rounds"
            break
        if res.elapsed_s * (res.rounds + 1) / res.rounds > budget_s:
            res.stop_reason = "budget"
            break
    return res
