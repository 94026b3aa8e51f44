"""Layouts and op cases shared by the op benchmarks (``bench/ops_bench.py``).

Bytes counted per op (N elements, element size ``e``, ``K`` task rows, ``M`` sampled
columns, every other segment sampled):

==========================  ==========================================
segment_sumsq               ``N e`` (``2 N e`` with the adaptive scale)
gl_layer_stats              ``(M + K M) e``
mix_perturb_                ``4 N e`` (read param, g0; write backup, param)
mix_perturb_local_adaptive  ``(4 N + M) e`` (rebuild from backup: the same traffic)
restore_                    ``2 N e``
gram                        ``K N e``
combine_                    ``(K + 1) N e``
sub_                        ``3 K N e``
==========================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtlsam_ext.benchmark.harness import time_fn


def resnet18_sizes() -> list[int]:
    """Element counts of ResNet-18's parameters (conv weights, BN weight/bias, fc)."""
    sizes = [64 * 3 * 7 * 7, 64, 64]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            sizes += [cout * c_in * 9, cout, cout, cout * cout * 9, cout, cout]
            if block == 0 and (stride != 1 or cin != cout):
                sizes += [cout * cin, cout, cout]
        cin = cout
    sizes += [1000 * 512, 1000]
    return sizes


def tiny_sizes(count: int = 2000, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 513, (count,), generator=g).tolist()


LAYOUTS: dict[str, Callable[[], list[int]]] = {"resnet18": resnet18_sizes,
                                               "tiny2000": tiny_sizes}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _offsets(sizes: list[int]) -> torch.Tensor:
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0, out=off[1:])
    return off


def cases(sizes: list[int], dtype: torch.dtype, k: int, dev: torch.device):
    """``(op name, bytes moved, callable(kernel module))`` for every op on one layout."""
    off = _offsets(sizes)  # CPU tables, as the flat-buffer module keeps them
    n = int(off[-1])
    e = torch.empty((), dtype=dtype).element_size()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sampled = list(range(0, len(sizes), 2))
    starts = off[:-1][sampled].clone()
    lengths = torch.tensor([sizes[i] for i in sampled], dtype=torch.int64)
    local_starts = torch.zeros_like(lengths)
    torch.cumsum(lengths[:-1], 0, out=local_starts[1:])
    m = int(lengths.sum())

    def r(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dtype)

    x, g0, scale, param = r(n), r(n), r(n), r(n)
    backup = torch.empty_like(param)
    local, rows = r(k, m), r(k, n)
    rows_b = r(k, n)
    out = torch.empty(n, device=dev, dtype=dtype)
    coef = torch.full((len(sizes),), 1e-3, device=dev, dtype=acc)
    lcoef = torch.full((len(sampled),), 1e-3, device=dev, dtype=acc)
    w = torch.linspace(-1, 1, k, device=dev, dtype=acc)
    lrow = local[0]
    pts = torch.empty(k, n, device=dev, dtype=dtype)
    coefs = torch.full((k, len(sizes)), 1e-3, device=dev, dtype=acc)
    lcoefs = torch.full((k, len(sampled)), 1e-3, device=dev, dtype=acc)
    return [
        ("segment_sumsq", n * e, lambda K: K.segment_sumsq(x, off)),
        ("segment_sumsq_adaptive", 2 * n * e, lambda K: K.segment_sumsq(x, off, scale)),
        ("gl_layer_stats", (m + k * m) * e,
         lambda K: K.gl_layer_stats(g0, local, starts, lengths, local_starts)),
        ("mix_perturb_", 4 * n * e, lambda K: K.mix_perturb_(param, backup, g0, coef, off)),
        ("mix_perturb_local_adaptive", (4 * n + m) * e,
         lambda K: K.mix_perturb_(param, backup, g0, coef, off, lrow, lcoef, starts, lengths,
                                  local_starts, True, False)),
        ("perturb_points_", (1 + 2 * k) * n * e,
         lambda K: _points(K, pts, param, rows_b, coefs, off)),
        ("perturb_points_local", ((2 + k) * n + k * m) * e,
         lambda K: _points(K, pts, param, g0.unsqueeze(0), coefs, off, local, lcoefs, starts,
                           lengths, local_starts)),
        ("restore_", 2 * n * e, lambda K: K.restore_(param, backup)),
        ("gram", k * n * e, lambda K: K.gram(rows)),
        ("segment_gram", k * n * e, lambda K: K.segment_gram(rows, off)),
        ("flat_gram_", 3 * k * n * e, lambda K: K.flat_gram_(rows_b, rows)),
        ("combine_", (k + 1) * n * e, lambda K: K.combine_(out, rows, w)),
        ("sub_", 3 * k * n * e, lambda K: K.sub_(rows_b, rows)),
    ]


def _points(K, out, theta, dirs, coefs, off, *local) -> None:
    """All K points: the module's fused kernel, or (a module without one) its single-point
    kernel once per row, as the ops layer falls back."""
    fused = getattr(K, "perturb_points_", None)
    if fused is not None:
        fused(out, theta, dirs, coefs, off, *local)
        return
    loc = local or (None,) * 5
    for i in range(out.shape[0]):
        K.mix_perturb_(out[i], theta, dirs[0 if dirs.shape[0] == 1 else i], coefs[i], off,
                       None if loc[0] is None else loc[0][i],
                       None if loc[1] is None else loc[1][i], *loc[2:], False, False)


#: The reductions, whose reference is the read bandwidth of ``torch.dot`` (issue target: the
#: fused CPU kernels at >= 0.8 of it for fp32, >= 0.6 for 16-bit inputs).
REDUCTIONS = ("segment_sumsq", "segment_sumsq_adaptive", "gl_layer_stats", "gram",
              "segment_gram", "flat_gram_")


def dot_seconds(nbytes: int, dev: torch.device, warmup: int, repeats: int) -> float:
    """``torch.dot(x, x)`` over an fp32 buffer of ``nbytes``: the read bandwidth BLAS reaches."""
    x = torch.randn(max(1, nbytes // 4), device=dev, dtype=torch.float32)
    return time_fn(lambda: torch.dot(x, x), device=dev, warmup=warmup, repeats=repeats).median


def dot_buffer(nbytes: int, dev: torch.device) -> Callable[[], object]:
    """``torch.dot(x, x)`` over an fp32 buffer of ``nbytes``, as a call."""
    x = torch.randn(max(1, nbytes // 4), device=dev, dtype=torch.float32)
    return lambda: torch.dot(x, x)


def interleaved_ratio(op: Callable[[], object], ref: Callable[[], object], dev: torch.device,
                      warmup: int, repeats: int) -> float:
    """median(ref time) / median(op time) with the two calls alternating, so both see the same
    memory bandwidth: on a shared machine it drifts by 2x within a minute (torch.dot read 18 to
    49 GB/s in one ops_bench run), more than any difference between kernels."""
    for _ in range(warmup):
        op()
        ref()
    t_op, t_ref = [], []
    for _ in range(repeats):
        t_op.append(time_fn(op, device=dev, warmup=0, repeats=1).median)
        t_ref.append(time_fn(ref, device=dev, warmup=0, repeats=1).median)
    return sorted(t_ref)[len(t_ref) // 2] / sorted(t_op)[len(t_op) // 2]


def copy_seconds(nbytes: int, dev: torch.device, warmup: int, repeats: int) -> float:
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=dev, warmup=warmup, repeats=repeats).median


def foreach_cases(sizes: list[int], dtype: torch.dtype, dev: torch.device
                  ) -> dict[str, Callable[[], object]]:
    """The best pure-torch way without flat buffers: ``torch._foreach_*`` over per-tensor lists,
    for the ops foreach covers (the per-parameter loops of the usual SAM implementations)."""
    def r(n):
        return torch.randn(n, device=dev, dtype=torch.float32).to(dtype)

    xs, ss, gs, ps = ([r(n) for n in sizes] for _ in range(4))
    bks = [torch.empty_like(p) for p in ps]
    coef = [1e-3] * len(sizes)

    def perturb():
        torch._foreach_copy_(bks, ps)
        torch._foreach_add_(ps, torch._foreach_mul(gs, coef))

    return {
        "segment_sumsq": lambda: torch.stack(torch._foreach_norm(xs)) ** 2,
        "segment_sumsq_adaptive":
            lambda: torch.stack(torch._foreach_norm(torch._foreach_mul(xs, ss))) ** 2,
        "mix_perturb_": perturb,
        "restore_": lambda: torch._foreach_copy_(ps, bks),
    }
