"""Time of each Gram-matrix aggregator (``mtlsam_ext.aggregators``) next to the reference-style
implementations users know, for K task gradients of dimension N.

Columns per (K, aggregator):

* ``solve``: ours, ``AGGREGATORS[name](G)`` on a precomputed K x K Gram matrix (G -> w);
* ``full``: ours end to end on the stacked rows [K, N]: ``ops.gram`` + solve + ``ops.combine_``
  (what one aggregation costs inside an MTLSAM step);
* ``reference``: the implementation users know, end to end from the gradients to the update:
  - mgda: Sener & Koltun-style Frank-Wolfe ``MinNormSolver`` (dot products with ``.item()``,
    MAX_ITER 250, stop 1e-5; :class:`mtlsam_ext.benchmark.naive_fmtl.MinNormSolverFW`);
  - pcgrad: the common PCGrad loop (copy, ``random.shuffle``, project) on the task vectors;
  - cagrad: the authors' SciPy SLSQP dual with the ``(1 + c^2)`` rescale, c = 0.4;
  - imtl: IMTL-G closed form with ``torch.inverse`` on the stacked gradients;
  - nash: Nash-MTL as commonly implemented: Gram matrix normalised by its Frobenius norm,
    then up to 20 sequential convex approximations, each a CVXPY problem (log constraints,
    linearised concave part) solved with warm start; ECOS when installed, else CLARABEL
    (cvxpy >= 1.5 ships CLARABEL by default). Without cvxpy: ``scipy.optimize.minimize``
    (L-BFGS-B, bounds alpha > 0) on the convex ``1/2 a^T G a - sum log a`` (whose stationary
    point solves G a = 1/a), reported with ``ref_impl = scipy``;
  - ls: ``stack().sum(0)``;
  - upgrad, dualproj, aligned_mtl, fairgrad (alpha = 2), gradvac, rlw: TorchJD 0.18's
    weighting (``UPGradWeighting`` ... ``RandomWeighting``; UPGrad and DualProj solve their QPs
    with quadprog on the CPU, FairGrad with SciPy's least_squares) on ``mat @ mat.T``, then
    ``w @ mat``;
* ``torchjd_solve`` (those six only): TorchJD's weighting on the same G as ``solve``, i.e. the
  two solvers side by side (our weights for gradvac and rlw come from other random draws, so
  their ``cos`` compares different directions);
* ``cos`` / ``norm_ratio``: agreement of our update with the reference's. Below 1 by the
  references' own stopping rules (Frank-Wolfe's 1e-5 L1 change, SLSQP's absolute ftol, the
  20 convex approximations of Nash-MTL) and, for PCGrad, because the two sides draw
  different random visiting orders (torch.Generator vs Python ``random``).

Run from the repository root: ``python -m bench.aggregator_bench --tasks 2,10,40,100``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mtlsam_ext import ops
from mtlsam_ext.aggregators import AGGREGATORS, get_aggregator
from mtlsam_ext.benchmark.harness import Stats, limit_blas_threads, record, sync, time_fn
from mtlsam_ext.benchmark.naive_fmtl import agg_cagrad, agg_imtl, agg_ls, agg_mgda, agg_pcgrad

try:  # optional: the reference Nash-MTL uses cvxpy
    import cvxpy as cp
except ImportError:  # pragma: no cover - depends on the environment
    cp = None


# -- reference Nash-MTL ---------------------------------------------------------------------------
class NashMTLReference:
    """Nash-MTL's published recipe, written from the paper (Navon et al., ICML 2022, sec. 3.2
    "sequential convex approximation"): find alpha > 0 with G alpha = 1/alpha by repeatedly
    solving  min sum_i (G alpha)_i + phi(alpha)/n  s.t.  -log(alpha_i n) - log((G alpha)_i) <= 0,
    phi(alpha) <= 0, where phi is the first-order expansion of the concave part at the
    previous alpha; Gram matrix normalised by its Frobenius norm n. The CVXPY problem is built
    once per K (parameters), every call runs at most ``niter`` solves with warm start."""

    def __init__(self, k: int, niter: int = 20, max_iters: int = 100) -> None:
        self.k = k
        self.niter = niter
        self.max_iters = max_iters
        self.prvs = np.ones(k, dtype=np.float32)
        if cp is not None:
            self._build()

    def _build(self) -> None:
        k = self.k
        self.alpha = cp.Variable(shape=(k,), nonneg=True)
        self.prvs_alpha = cp.Parameter(shape=(k,), value=self.prvs.copy())
        self.G = cp.Parameter(shape=(k, k), value=np.eye(k))
        self.nf = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_prvs = self.G @ self.prvs_alpha
        prvs_phi_tag = 1 / self.prvs_alpha + (1 / g_prvs) @ self.G
        self.phi = prvs_phi_tag @ (self.alpha - self.prvs_alpha)
        g_alpha = self.G @ self.alpha
        cons = [-cp.log(self.alpha[i] * self.nf) - cp.log(g_alpha[i]) <= 0 for i in range(k)]
        cons.append(self.phi <= 0)
        self.prob = cp.Problem(cp.Minimize(cp.sum(g_alpha) + self.phi / self.nf), cons)
        solvers = cp.installed_solvers()
        self.solver = "ECOS" if "ECOS" in solvers else "CLARABEL"
        self.iter_kw = "max_iters" if self.solver == "ECOS" else "max_iter"

    def _stop(self, gtg: np.ndarray, alpha_t: np.ndarray) -> bool:
        return (self.alpha.value is None
                or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(self.alpha.value - self.prvs_alpha.value) < 1e-6)

    def weights(self, gtg: np.ndarray, nf: float) -> np.ndarray:
        """``gtg``: the Gram matrix divided by ``nf`` (its Frobenius norm). The constraints
        ``alpha_i nf (gtg alpha)_i >= 1`` make alpha solve the *unnormalised* G alpha = 1/alpha."""
        if cp is None:
            return self._weights_scipy(gtg * nf)
        alpha_t = self.prvs
        self.G.value = gtg
        self.nf.value = np.array([nf])
        for _ in range(self.niter):
            self.alpha.value = alpha_t
            self.prvs_alpha.value = alpha_t
            try:
                with warnings.catch_warnings():
                    # The problem is not DPP (1/prvs_alpha of a parameter), as in the
                    # reference, so cvxpy re-canonicalises it on every solve and says so.
                    warnings.simplefilter("ignore", UserWarning)
                    self.prob.solve(solver=self.solver, warm_start=True,
                                    **{self.iter_kw: self.max_iters})
            except Exception:  # noqa: BLE001 - the reference swallows solver failures too
                self.alpha.value = self.prvs_alpha.value
            if self._stop(gtg, alpha_t):
                break
            alpha_t = self.alpha.value
        if alpha_t is not None:
            self.prvs = alpha_t
        return self.prvs

    @staticmethod
    def _weights_scipy(gtg: np.ndarray) -> np.ndarray:
        from scipy.optimize import minimize

        k = gtg.shape[0]
        res = minimize(lambda a: 0.5 * a @ gtg @ a - np.sum(np.log(a)), np.ones(k),
                       jac=lambda a: gtg @ a - 1 / a, method="L-BFGS-B",
                       bounds=[(1e-12, None)] * k)
        return res.x

    def __call__(self, mat: torch.Tensor) -> torch.Tensor:
        """``mat``: stacked task gradients [K, N] -> update [N]."""
        gtg = torch.mm(mat, mat.t())
        nf = torch.norm(gtg).item()
        gtg = gtg / nf
        alpha = self.weights(gtg.cpu().detach().numpy().astype(np.float64), nf)
        a = torch.from_numpy(np.asarray(alpha, dtype=np.float64)).to(mat.device, mat.dtype)
        return (a.view(-1, 1) * mat).sum(0)


# -- TorchJD's weightings (the peers of the aggregators added after TorchJD 0.18) ----------------
OPTIONS: dict[str, dict[str, Any]] = {"fairgrad": {"alpha": 2.0}}
TORCHJD = {"upgrad": "UPGradWeighting", "dualproj": "DualProjWeighting",
           "aligned_mtl": "AlignedMTLWeighting", "fairgrad": "FairGradWeighting",
           "gradvac": "GradVacWeighting", "rlw": "RandomWeighting"}


def torchjd_weighting(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import torchjd.aggregation as tjd

    return getattr(tjd, TORCHJD[name])(**OPTIONS.get(name, {}))


# -- references on stacked vectors -----------------------------------------------------------------
def _as_lists(mat: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[mat[i]] for i in range(mat.shape[0])]


def reference(name: str, k: int, seed: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    rng = random.Random(seed)
    if name == "ls":
        return (lambda m: agg_ls(_as_lists(m))[0]), "torch"
    if name == "mgda":
        return (lambda m: agg_mgda(_as_lists(m))[0]), "sener-fw"
    if name == "pcgrad":
        return (lambda m: agg_pcgrad(_as_lists(m), rng=rng)[0]), "pcgrad-loop"
    if name == "cagrad":
        return (lambda m: agg_cagrad(_as_lists(m))[0]), "scipy-slsqp"
    if name == "imtl":
        return (lambda m: agg_imtl(_as_lists(m))[0]), "torch.inverse"
    if name == "nash":
        ref = NashMTLReference(k)
        impl = "scipy-lbfgsb" if cp is None else f"cvxpy-{ref.solver.lower()}"
        return ref, impl
    if name in TORCHJD:
        weighting = torchjd_weighting(name)
        return (lambda m: weighting(m @ m.T) @ m), "torchjd-0.18"
    raise KeyError(name)


# -- the benchmark --------------------------------------------------------------------------------
def make_grads(k: int, n: int, seed: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K gradients sharing a common direction with task-specific strength (some negative, so
    some pairs conflict), independent noise and log-normal norms."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=g)
    a = torch.rand(k, 1, generator=g) * 2.0 - 0.5
    noise = torch.randn(k, n, generator=g)
    scale = torch.exp(0.5 * torch.randn(k, 1, generator=g))
    return ((a * common + noise) * scale).to(device=device, dtype=dtype)


def _adaptive_time(fn: Callable[[], Any], device: torch.device, repeats: int,
                   budget_s: float) -> Stats:
    """``time_fn`` with the repeat count cut so one cell takes about ``budget_s``."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - t0
    reps = max(3, min(repeats, int(budget_s / max(one, 1e-9))))
    return time_fn(fn, device=device, warmup=1, repeats=reps)


def bench_cell(name: str, k: int, mat: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    agg = get_aggregator(name, **OPTIONS.get(name, {}))  # (gradvac: the stateful object)
    gen = torch.Generator().manual_seed(args.seed)
    G = ops.gram(mat, backend=args.backend)
    out = torch.empty(mat.shape[1], dtype=mat.dtype, device=device)

    def solve() -> torch.Tensor:
        return agg(G, gen)

    def full() -> torch.Tensor:
        gg = ops.gram(mat, backend=args.backend)
        w = agg(gg, gen)
        ops.combine_(out, mat, w.to(mat.dtype), backend=args.backend)
        return out

    t_solve = _adaptive_time(solve, device, args.repeats, args.budget)
    t_full = _adaptive_time(full, device, args.repeats, args.budget)
    row: dict[str, Any] = {"bench": "aggregator", "aggregator": name, "tasks": k,
                           "dim": mat.shape[1], "dtype": str(mat.dtype).replace("torch.", ""),
                           "backend": ops.resolve_backend(args.backend, device),
                           **t_solve.as_dict("solve_"), **t_full.as_dict("full_")}
    if name in TORCHJD and not args.no_reference:
        weighting = torchjd_weighting(name)
        t_tjd = _adaptive_time(lambda: weighting(G), device, args.repeats, args.budget)
        row.update({**t_tjd.as_dict("torchjd_solve_"),
                    "torchjd_over_solve": t_tjd.median / t_solve.median})
    if not args.no_reference:
        ref, impl = reference(name, k, args.seed)
        t_ref = _adaptive_time(lambda: ref(mat), device, args.repeats, args.budget)
        d_ours = full().double().clone()
        d_ref = ref(mat).double()
        cos = float(torch.dot(d_ours, d_ref) / (d_ours.norm() * d_ref.norm()).clamp_min(1e-300))
        row.update({"ref_impl": impl, **t_ref.as_dict("ref_"),
                    "ref_over_full": t_ref.median / t_full.median,
                    "ref_over_solve": t_ref.median / t_solve.median,
                    "cos": cos, "norm_ratio": float(d_ours.norm() / d_ref.norm())})
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="2,10,40,100")
    ap.add_argument("--aggregators", default="ls,mgda,pcgrad,cagrad,imtl,nash")
    ap.add_argument("--dim", type=int, default=None,
                    help="gradient dimension N (default 100000 on CPU, 1000000 on CUDA)")
    ap.add_argument("--device", default="cpu,cuda",
                    help="comma list; cuda entries are skipped when no GPU is present")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per timed cell, about")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="cap NumPy/SciPy BLAS threads (threadpoolctl); default: untouched")
    ap.add_argument("--out", help="append JSON lines (harness.record) to this file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_blas_threads(args.blas_threads)
    devices = []
    for d in (x for x in args.device.split(",") if x):
        if d.startswith("cuda") and not torch.cuda.is_available():
            continue
        devices.append(torch.device(d))
    names = [a for a in args.aggregators.split(",") if a]
    bad = [a for a in names if a not in AGGREGATORS]
    if bad:
        sys.exit(f"unknown aggregators {bad}; choose from {list(AGGREGATORS)}")
    tasks = [int(t) for t in args.tasks.split(",") if t]
    if cp is None and "nash" in names and not args.no_reference:
        print("note: cvxpy not installed; the Nash-MTL reference uses scipy L-BFGS-B",
              file=sys.stderr)
    bar = tqdm(total=len(devices) * len(tasks) * len(names), disable=args.no_progress,
               desc="cells", file=sys.stderr)
    rows = []
    for device in devices:
        n = args.dim or (1_000_000 if device.type == "cuda" else 100_000)
        for k in tasks:
            mat = make_grads(k, n, args.seed + k, device)
            for name in names:
                bar.set_postfix_str(f"{device.type} K={k} {name}")
                rows.extend(record(args.out, [bench_cell(name, k, mat, args, device)],
                                   device=device, command="python -m bench.aggregator_bench "
                                   + " ".join(argv or sys.argv[1:])))
                bar.update(1)
            del mat
    bar.close()
    print(f"{'dev':<5}{'K':>4} {'aggregator':<12}{'solve ms':>10}{'tjd ms':>9}{'full ms':>10}"
          f"{'ref ms':>11} {'reference':<15}{'ref/full':>9}{'cos':>10}")
    for r in rows:
        ref = f"{1e3 * r['ref_median']:>11.3f} {r['ref_impl']:<15}{r['ref_over_full']:>9.1f}" \
              f"{r['cos']:>10.6f}" if "ref_median" in r else ""
        tjd = f"{1e3 * r['torchjd_solve_median']:>9.3f}" if "torchjd_solve_median" in r \
            else f"{'':>9}"
        dev = r["device"].split(":")[0]
        print(f"{dev:<5}{r['tasks']:>4} {r['aggregator']:<12}{1e3 * r['solve_median']:>10.3f}"
              f"{tjd}{1e3 * r['full_median']:>10.3f}{ref}")
    if any(math.isfinite(r.get("cos", 1.0)) and r.get("cos", 1.0) < 0.99 for r in rows):
        print("note: cos < 0.99 means the reference stopped early or solves a different "
              "normalisation (see the module docstring)")
    return rows


if __name__ == "__main__":
    main()
