"""The self-check's fixed problem: small inputs that reach the kernels' edge cases, and one
case per op that runs it through a kernel module (the compiled one, or the reference).

What the sizes reach:

* ``LENGTHS`` (the flat ops) and ``ROW_LENGTHS`` (the ops on ``[K, N_R]`` row matrices):
  empty and one-element segments, odd lengths (the tails of the CPU kernels' 8-lane and 32-wide
  sums and of the GPU kernels' 16-byte vectors), and a long segment: 8209 elements span
  several chunks of the CPU (4096) and the CUDA (8192) reductions and perturbations, 4103
  several of the CPU Gram's column chunks;
* ``N`` and ``N_R`` are odd, so every row of a row matrix after the first starts misaligned;
  every buffer also starts one element past its allocation (misaligned for vector loads and
  stores, in the outputs too);
* ``K = 9`` rows (more than 8: the CPU Gram's groups of 4 leave one row over; 45 Gram pairs,
  more than a warp) and ``K = 1``;
* sampled tables (start, length, local start) with an empty and a one-element range, ranges
  that straddle segment boundaries, and local ranges that overlap and come in any order; where
  the kernels accept them (CUDA and Triton; the CPU kernels require sorted starts, as the ops
  layer's checks do) the starts themselves are unsorted.

Cost: see the note next to the sizes below (5-18 ms per device and dtype on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from mtlsam_ext.kernels import torch_ref
from mtlsam_ext.kernels.device_tables import keep
from mtlsam_ext.ops.points import perturb_points

# The flat layout (the ops on one flat buffer: norms, layer stats, perturbations, restore).
LENGTHS = (0, 1, 37, 0, 5, 8209, 2, 63, 1, 3)  # N = 8321
# The row layout (the ops on [K, N_R] row matrices: Gram matrices, the K points, combine, sub):
# narrower, as K rows cost K times as much (under Triton's interpreter, which the tests run, a
# check took 3.5 s with rows of N columns, 1.5 s with these); its long segment still spans the
# CPU kernels' 4096-element chunks (Gram columns, perturbation chunks).
ROW_LENGTHS = (0, 1, 37, 0, 5, 4103, 2, 63, 1, 3)  # N_R = 4215
K = 9
M = 333  # columns of the local-gradient rows (odd: misaligned rows)
# (start, length, local start) per layout: sorted and disjoint in the flat buffer, as the flat
# layout makes them, straddling segment boundaries; local ranges overlap ([0, 13) holds
# [5, 12)) and are out of order
SORTED = ((1, 1, 20), (3, 0, 0), (40, 7, 5), (100, 13, 0), (4100, 300, 9), (8300, 21, 300))
ROW_SORTED = ((1, 1, 20), (3, 0, 0), (40, 7, 5), (100, 13, 0), (3900, 300, 9), (4200, 15, 300))
# The same ranges with unsorted starts, for the kernels that take any order (CUDA, Triton).
# Disjoint: the flat layout never makes overlapping ranges, and Triton hands those to the
# reference, so they would not reach its kernels.
_SHUFFLE = (4, 0, 5, 3, 1, 2)
ANY_ORDER = tuple(SORTED[i] for i in _SHUFFLE)
ROW_ANY_ORDER = tuple(ROW_SORTED[i] for i in _SHUFFLE)
# Cost, every op for one (device, dtype) (compiled run, reference run, comparison), measured
# with `python -m mtlsam_ext.info --selfcheck` on the 2-core development CPU (ext, AVX2, torch
# 2.13 CPU), three runs while other work loaded the machine: the first dtype in a process
# 10-18 ms (torch's own first calls included: BLAS set-up and the like), each further one
# 5-10 ms; budget 20 ms. Most of it is the reference's per-call overhead (its Python loops over
# segments, sampled ranges and rows) and the comparisons, not arithmetic.
N = sum(LENGTHS)
N_R = sum(ROW_LENGTHS)
KINDS = ("reduce", "elementwise", "exact")


@dataclass(frozen=True)
class Tables:
    """The int64 tables of one layout, on the CPU (the reference reads them there), each with
    its device copy kept for the kernels (see device_tables)."""

    offsets: Tensor
    starts: Tensor
    lengths: Tensor
    local_starts: Tensor


_TABLES: dict[tuple[torch.device, bool], tuple[Tables, Tables]] = {}


def _parts(lengths: tuple[int, ...], sampled: tuple[tuple[int, int, int], ...]
           ) -> list[list[int]]:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return [offsets, [s for s, _, _ in sampled], [n for _, n, _ in sampled],
            [q for _, _, q in sampled]]


def tables(device: torch.device, any_order: bool) -> tuple[Tables, Tables]:
    """The flat and row layouts' tables for ``device`` (made once per device). For a GPU all
    eight go over in one non-blocking copy from pinned memory, so that making them does not
    wait for the device (the check synchronises once, at its end)."""
    key = (device, any_order)
    t = _TABLES.get(key)
    if t is None:
        parts = _parts(LENGTHS, ANY_ORDER if any_order else SORTED) + _parts(
            ROW_LENGTHS, ROW_ANY_ORDER if any_order else ROW_SORTED)
        sizes = [len(p) for p in parts]
        whole = torch.tensor([v for p in parts for v in p], dtype=torch.int64)
        cpu = list(torch.split(whole, sizes))
        if device.type != "cpu":
            on_dev = whole.pin_memory().to(device, non_blocking=True) \
                if device.type == "cuda" else whole.to(device)
            for c, d in zip(cpu, torch.split(on_dev, sizes)):
                keep(c, d)
        t = _TABLES[key] = (Tables(*cpu[:4]), Tables(*cpu[4:]))
    return t


@dataclass(frozen=True)
class Problem:
    """The inputs for one (device, dtype); float tensors in ``dtype`` unless noted."""

    t: Tables           # the flat layout's
    r: Tables           # the row layout's
    x: Tensor
    scale: Tensor
    g0: Tensor
    g1: Tensor
    theta: Tensor
    local_row: Tensor   # [M]
    local: Tensor       # [K, M]
    rows: Tensor        # [K, N_R]
    other: Tensor       # [K, N_R]
    dirs: Tensor        # [K, N_R]
    coef: Tensor        # [S], accumulation dtype
    coef2: Tensor       # [S], accumulation dtype
    local_coef: Tensor  # [P], accumulation dtype
    coefs: Tensor       # [K, S], accumulation dtype
    local_coefs: Tensor  # [K, P], accumulation dtype
    weights: Tensor     # [K], float64

    def absolute(self) -> Problem:
        """The same problem with every value replaced by its magnitude: the reference on it
        gives the sum of the magnitudes of the terms behind each result (what rounding errors
        scale with)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).abs() for f in dataclasses.fields(self)
            if f.name not in ("t", "r")})

    def placed(self, like: Tensor) -> Tensor:
        """A copy of ``like`` in a buffer that starts one element past its allocation."""
        buf = torch.empty(like.numel() + 1, dtype=like.dtype, device=like.device)
        out = buf[1:].view(like.shape)
        out.copy_(like)
        return out

    def empty(self, *shape: int) -> Tensor:
        buf = torch.empty(_numel(shape) + 1, dtype=self.x.dtype, device=self.x.device)
        return buf[1:].view(shape).fill_(float("nan"))  # stale-looking contents


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def problem(device: torch.device, dtype: torch.dtype, any_order: bool) -> Problem:
    """The inputs, made on ``device`` from a fixed formula (no random generator is drawn from,
    and nothing is copied from the host but the tables)."""
    t, r = tables(device, any_order)
    s, p = len(LENGTHS), t.starts.numel()
    acc = torch_ref.acc_dtype(dtype)
    shapes = dict(x=(N,), scale=(N,), g0=(N,), g1=(N,), theta=(N,), local_row=(M,),
                  local=(K, M), rows=(K, N_R), other=(K, N_R), dirs=(K, N_R))
    # One short wave read through shifted windows (every array and row starts elsewhere in it,
    # so no two are alike): evaluating sin/cos for every element (250k) took most of the
    # check's time. Values in about [-1.7, 1.7], both signs.
    i = torch.arange(N + 64 * (len(shapes) + K), dtype=torch.float64, device=device)
    wave = (torch.sin(i * 0.7548776662) * (1.0 + 0.7 * torch.cos(i * 0.5698402910))).to(dtype)
    vals = {}
    for j, (name, shape) in enumerate(shapes.items()):
        src = wave[64 * j:]
        if len(shape) == 2:  # row q starts 67 q elements further
            src = src.as_strided(shape, (67, 1), src.storage_offset())
        else:
            src = src[:shape[0]]
        buf = torch.empty(src.numel() + 1, dtype=dtype, device=device)  # misaligned start
        vals[name] = buf[1:].view(shape).copy_(src)

    def lin(lo: float, hi: float, count: int, dt: torch.dtype = acc) -> Tensor:
        return torch.linspace(lo, hi, count, dtype=dt, device=device)

    return Problem(t=t, r=r, **vals, coef=lin(-0.3, 0.4, s), coef2=lin(0.25, -0.05, s),
                   local_coef=lin(0.5, -0.7, p), coefs=lin(-0.4, 0.6, K * s).view(K, s),
                   local_coefs=lin(0.3, -0.9, K * p).view(K, p),
                   weights=lin(-1.0, 1.5, K, torch.float64))


# -- one case per op: run it through a kernel module, return its outputs --------------------------

def _segment_sumsq(mod: ModuleType, p: Problem) -> list[Tensor]:
    return [mod.segment_sumsq(p.x, p.t.offsets, None)]


def _segment_sumsq_adaptive(mod: ModuleType, p: Problem) -> list[Tensor]:
    return [mod.segment_sumsq(p.x, p.t.offsets, p.scale)]


def _gl_layer_stats(mod: ModuleType, p: Problem) -> list[Tensor]:
    t = p.t
    d, q = mod.gl_layer_stats(p.g0, p.local, t.starts, t.lengths, t.local_starts, p.scale)
    d1, q1 = mod.gl_layer_stats(p.g0, p.local[4:5], t.starts, t.lengths, t.local_starts, None)
    return [d, q, d1, q1]


def _mix(mod: ModuleType, p: Problem, local: bool) -> list[Tensor]:
    t = p.t
    loc = (p.local_row, p.local_coef, t.starts, t.lengths, t.local_starts) if local \
        else (None,) * 5
    param, backup = p.placed(p.theta), p.empty(N)
    mod.mix_perturb_(param, backup, p.g0, p.coef, t.offsets, *loc, True, True)
    first, saved = param.clone(), backup.clone()
    # rebuilt from the backup with another direction (consecutive tasks, no restore between)
    mod.mix_perturb_(param, backup, p.g1, p.coef2, t.offsets, *loc, False, False)
    return [first, saved, param]


def _mix_perturb(mod: ModuleType, p: Problem) -> list[Tensor]:
    return _mix(mod, p, False)


def _mix_perturb_local(mod: ModuleType, p: Problem) -> list[Tensor]:
    return _mix(mod, p, True)


def _perturb_points(mod: ModuleType, p: Problem) -> list[Tensor]:
    out, one = p.empty(K, N_R), p.empty(1, N_R)
    theta = p.theta[:N_R]
    perturb_points(mod, out, theta, p.dirs[:1], p.coefs, p.r.offsets, adaptive=True)
    perturb_points(mod, one, theta, p.dirs[2:3], p.coefs[2:3], p.r.offsets)
    return [out, one]


def _perturb_points_local(mod: ModuleType, p: Problem) -> list[Tensor]:
    r = p.r
    out = p.empty(2, N_R)  # (K > 8 rows: perturb_points_)
    perturb_points(mod, out, p.theta[:N_R], p.dirs[1:3], p.coefs[1:3], r.offsets, p.local[5:7],
                   p.local_coefs[1:3], r.starts, r.lengths, r.local_starts, adaptive=True)
    return [out]


def _restore(mod: ModuleType, p: Problem) -> list[Tensor]:
    param = p.placed(p.g1)
    mod.restore_(param, p.theta)
    return [param]


def _gram(mod: ModuleType, p: Problem) -> list[Tensor]:
    return [mod.gram(p.rows), mod.gram(p.rows[3:4])]


def _segment_gram(mod: ModuleType, p: Problem) -> list[Tensor]:
    # three rows (the pairs off the diagonal; K > 8: gram): the Triton kernel runs one program
    # per (segment, row), and nine rows took 1.2 s under the interpreter
    return [mod.segment_gram(p.rows[:3], p.r.offsets),
            mod.segment_gram(p.rows[3:4], p.r.offsets)]


def _combine(mod: ModuleType, p: Problem) -> list[Tensor]:
    out = p.empty(N_R)
    mod.combine_(out, p.rows, p.weights)
    return [out]


def _flat_gram(mod: ModuleType, p: Problem) -> list[Tensor]:
    sam = p.placed(p.rows[:5])  # (5 rows: the CPU kernel's groups of 4 and one more)
    g = mod.flat_gram_(sam, p.other[:5])
    return [sam, g]


def _sub(mod: ModuleType, p: Problem) -> list[Tensor]:
    rows = p.placed(p.rows[:2])  # element-wise: two rows reach every case
    mod.sub_(rows, p.other[:2])
    return [rows]


# -- what each reduction's rounding error scales with: the sum of its terms' magnitudes --------

def _itself(p: Problem, want: list[Tensor]) -> list[Tensor | None]:
    """Sums of squares: their terms are >= 0, the sum is the bound."""
    return [w.double() for w in want]


def _cauchy_schwarz(g: Tensor) -> Tensor:
    """``sqrt(G_ii G_jj) >= sum |a_i b_j|`` for the (last two) Gram dimensions."""
    d = g.double().diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    return d.unsqueeze(-1) * d.unsqueeze(-2)


def _grams(p: Problem, want: list[Tensor]) -> list[Tensor | None]:
    return [_cauchy_schwarz(w) for w in want]


def _flat_gram_bounds(p: Problem, want: list[Tensor]) -> list[Tensor | None]:
    return [None, _cauchy_schwarz(want[1])]


def _gl_bounds(p: Problem, want: list[Tensor]) -> list[Tensor | None]:
    """The dot products' terms: the reference on the magnitudes; the squares: themselves."""
    twin = _gl_layer_stats(torch_ref, p.absolute())
    return [twin[0].double(), want[1].double(), twin[2].double(), want[3].double()]


@dataclass(frozen=True)
class Case:
    """An op's check: ``run(module, problem)`` -> outputs, how each output is compared
    ("reduce": within the reduction tolerance of the terms' magnitudes that ``bounds`` gives;
    "elementwise": within the element-wise tolerance of the value; "exact": equal)."""

    run: Callable[[ModuleType, Problem], list[Tensor]]
    kinds: tuple[str, ...]
    bounds: Callable[[Problem, list[Tensor]], list[Tensor | None]] | None = None


# Keys: the ops layer's op names (ops_bench's; "_local" with task-gradient rows, "_adaptive"
# with the ASAM scale), the names the dispatcher picks a backend for.
CASES: dict[str, Case] = {
    "segment_sumsq": Case(_segment_sumsq, ("reduce",), _itself),
    "segment_sumsq_adaptive": Case(_segment_sumsq_adaptive, ("reduce",), _itself),
    "gl_layer_stats": Case(_gl_layer_stats, ("reduce",) * 4, _gl_bounds),
    "mix_perturb_": Case(_mix_perturb, ("elementwise", "exact", "elementwise")),
    "mix_perturb_local": Case(_mix_perturb_local, ("elementwise", "exact", "elementwise")),
    "perturb_points_": Case(_perturb_points, ("elementwise", "elementwise")),
    "perturb_points_local": Case(_perturb_points_local, ("elementwise",)),
    "restore_": Case(_restore, ("exact",)),
    "gram": Case(_gram, ("reduce", "reduce"), _grams),
    "segment_gram": Case(_segment_gram, ("reduce", "reduce"), _grams),
    "combine_": Case(_combine, ("elementwise",)),
    "flat_gram_": Case(_flat_gram, ("elementwise", "reduce"), _flat_gram_bounds),
    "sub_": Case(_sub, ("elementwise",)),
}
OPS = tuple(CASES)
