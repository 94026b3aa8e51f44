"""Interleaved timing rounds and their confidence intervals (mtlsam_ext.benchmark.rounds), and
the step benchmark built on them."""

import math
import random
import statistics

import pytest

from mtlsam_ext.benchmark import rounds
from mtlsam_ext.benchmark.rounds import median_ci, run_rounds


def _coverage(n: int, j: int) -> float:
    return sum(math.comb(n, b) for b in range(j, n - j + 1)) / 2 ** n


@pytest.mark.parametrize("n", [6, 7, 10, 25, 60, 200])
def test_median_ci_ranks_are_the_tightest_with_95_percent_coverage(n):
    xs = list(range(n))
    random.Random(n).shuffle(xs)
    ci = median_ci(xs)
    j = int(ci.lo) + 1  # the values are their ranks - 1
    assert ci.hi == n - j
    assert _coverage(n, j) >= 0.95 > _coverage(n, j + 1)
    assert ci.median == statistics.median(xs)


def test_median_ci_known_values():
    # n = 10: the interval [x_(2), x_(9)] has coverage 0.979, [x_(3), x_(8)] only 0.891
    ci = median_ci([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])
    assert (ci.lo, ci.median, ci.hi) == (2, 5.5, 9)


def test_median_ci_coverage_by_simulation():
    # the interval covers the true median of a skewed distribution in >= 95% of samples
    rng = random.Random(0)
    true_median = math.log(2)  # exponential(1)
    hits = 0
    for _ in range(2000):
        ci = median_ci([rng.expovariate(1.0) for _ in range(30)])
        hits += ci.lo <= true_median <= ci.hi
    assert 0.95 <= hits / 2000 <= 0.99


def test_too_few_samples_give_an_infinite_interval():
    ci = median_ci([1.0, 2.0, 3.0])
    assert ci.rel_half_width == math.inf and ci.fmt() == "2.00 [?]"
    with pytest.raises(ValueError, match="no samples"):
        median_ci([])


def _clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: now[0])
    return now


def test_rounds_interleave_in_a_fresh_order_and_stop_when_converged(monkeypatch):
    now = _clock(monkeypatch)
    calls = []

    def part(name, t):
        def run():
            calls.append(name)
            now[0] += t
            return t
        return run

    res = run_rounds({"a": part("a", 1.0), "b": part("b", 2.0), "c": part("c", 0.5)},
                     min_rounds=8, max_rounds=100, budget_s=1e9, seed=3,
                     converged=lambda r: True)
    assert res.stop_reason == "converged" and res.rounds == 8
    assert len(calls) == 24 and all(sorted(calls[3 * i:3 * i + 3]) == ["a", "b", "c"]
                                    for i in range(8))
    assert len({tuple(o) for o in res.orders}) > 1  # the order changes between rounds
    assert res.ratio("a", "b") == [0.5] * 8


def test_rounds_stop_at_the_budget_or_the_round_cap(monkeypatch):
    now = _clock(monkeypatch)

    def step():
        now[0] += 1.0
        return 1.0

    res = run_rounds({"a": step}, min_rounds=2, max_rounds=1000, budget_s=10.5, seed=0,
                     converged=lambda r: False)
    assert res.stop_reason == "budget" and res.rounds == 10 and res.elapsed_s <= 10.5
    res = run_rounds({"a": step}, min_rounds=2, max_rounds=5, budget_s=1e9, seed=0)
    assert res.stop_reason == "max rounds" and res.rounds == 5
    # the minimum number of rounds runs even past the budget (a stalling machine)
    res = run_rounds({"a": step}, min_rounds=6, max_rounds=100, budget_s=2.5, seed=0)
    assert res.stop_reason == "budget" and res.rounds == 6
    with pytest.raises(ValueError, match="min_rounds"):
        run_rounds({"a": step}, min_rounds=3, max_rounds=2, budget_s=1, seed=0)


def test_step_benchmark_interleaves_and_reports_ratio_intervals(tmp_path):
    from mtlsam_ext.benchmark import harness, step

    out = tmp_path / "r.jsonl"
    rows = step.main(["--tasks", "2", "--methods", "naive-fmtl,fmtl,gl-lagged", "--steps", "6",
                      "--max-rounds", "6", "--budget-s", "60", "--no-progress", "--out",
                      str(out), "--plot", str(tmp_path / "p.png")], prog="step")
    assert [r["method"] for r in rows] == ["naive-fmtl", "fmtl", "gl-lagged"]
    for r in rows:
        assert r["rounds"] == 6 and r["stop_reason"] in ("max rounds", "converged")
        assert r["vs_naive_fmtl_lo"] <= r["vs_naive_fmtl"] <= r["vs_naive_fmtl_hi"]
        assert r["pass_cost_efficiency_lo"] <= r["pass_cost_efficiency"] \
            <= r["pass_cost_efficiency_hi"]
        assert r["step_ci_lo"] <= r["step_ci"] <= r["step_ci_hi"]
        assert r["forwards"] == 3 and r["peak_bytes"] is not None
    assert rows[0]["vs_naive_fmtl"] == 1.0
    assert len(harness.read_records([out])) == 3
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_step_benchmark_refuses_bad_round_options():
    from mtlsam_ext.benchmark import step

    with pytest.raises(SystemExit, match="--budget-s"):
        step.main(["--tasks", "2", "--budget-s", "0", "--no-progress"])
    with pytest.raises(SystemExit, match="max-rounds"):
        step.main(["--tasks", "2", "--steps", "5", "--max-rounds", "3", "--no-progress"])
