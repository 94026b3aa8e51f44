"""pytest-benchmark entries: every op of ``mtlsam_ext.ops`` on a ~1M-element flat buffer, per
backend ("torch" always, "ext" / "triton" where ``available_backends`` lists them), and one
optimizer step per method on a small model.

Run: ``pytest bench/ --benchmark-only`` (add ``--benchmark-json FILE`` for ``bench.plot``).
CUDA cases synchronise inside the timed function so the numbers are device times.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlsam_ext import MTLSAM, ops
from mtlsam_ext.benchmark.naive_fmtl import NaiveFMTL

N = 1 << 20  # flat buffer size
K = 8  # rows of the per-task matrices
SEGMENTS = 20  # ragged "layers"


class Buffers:
    def __init__(self, device: str, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(0)
        cuts = torch.sort(torch.randperm(N - 1, generator=g)[: SEGMENTS - 1] + 1).values
        self.offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]).to(torch.int64)
        mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        self.param = mk(N)
        self.backup = self.param.clone()
        self.g0 = mk(N)
        self.rows = mk(K, N)
        self.other = mk(K, N)
        self.out = torch.empty(N, device=device, dtype=dtype)
        self.weights = torch.rand(K, generator=g).to(device=device, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.coef = torch.full((SEGMENTS,), 1e-6, dtype=acc, device=device)
        # sampled: the first, middle and last segment; compact local rows [K, M]
        picks = [0, SEGMENTS // 2, SEGMENTS - 1]
        starts = self.offsets[picks]
        lengths = self.offsets[[p + 1 for p in picks]] - starts
        self.starts, self.lengths = starts, lengths
        self.local_starts = torch.cat([torch.tensor([0]), torch.cumsum(lengths, 0)[:-1]])
        m = int(lengths.sum())
        self.local = mk(K, m)
        self.local_coef = torch.full((3,), 1e-6, dtype=acc, device=device)
        self.device = device


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.fixture
def bufs(device_backend):
    device, backend = device_backend
    return Buffers(device), backend


def _run(benchmark, device: str, fn):
    def call():
        fn()
        _sync(device)
    benchmark(call)


def test_segment_sumsq(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.segment_sumsq(b.g0, b.offsets, backend=be))


def test_segment_sumsq_adaptive(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device,
         lambda: ops.segment_sumsq(b.g0, b.offsets, b.param, backend=be))


def test_gl_layer_stats(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.gl_layer_stats(
        b.g0, b.local, b.starts, b.lengths, b.local_starts, backend=be))


def test_mix_perturb(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.mix_perturb_(
        b.param, b.backup, b.g0, b.coef, b.offsets, save_backup=False, backend=be))


def test_mix_perturb_local_adaptive(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.mix_perturb_(
        b.param, b.backup, b.g0, b.coef, b.offsets, local=b.local[0], local_coef=b.local_coef,
        starts=b.starts, lengths=b.lengths, local_starts=b.local_starts, adaptive=True,
        save_backup=False, backend=be))


def test_restore(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.restore_(b.param, b.backup, backend=be))


def test_gram(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.gram(b.rows, backend=be))


def test_combine(benchmark, bufs):
    b, be = bufs
    _run(benchmark, b.device, lambda: ops.combine_(b.out, b.rows, b.weights, backend=be))


def test_sub(benchmark, bufs):
    b, be = bufs
    # rows -= other, then += other, so the values stay put across rounds
    _run(benchmark, b.device, lambda: (ops.sub_(b.rows, b.other, backend=be),
                                       b.rows.add_(b.other)))


# -- one optimizer step per method on a small model ----------------------------------------------
class Small(nn.Module):
    def __init__(self, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                  nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 5) for _ in range(k))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 32, generator=g)
        self.y = torch.randint(0, 5, (64, k), generator=g)

    def losses(self):
        h = self.body(self.x)
        return [F.cross_entropy(hd(h), self.y[:, i]) for i, hd in enumerate(self.heads)]


STEP_METHODS = {
    "erm": dict(method="erm"),
    "fmtl": dict(method="fmtl"),
    "sam": dict(method="sam"),
    "gl-autograd": dict(method="gl", local_grad="autograd"),
    "gl-lagged": dict(method="gl", local_grad="lagged"),
}


@pytest.mark.parametrize("method", [*STEP_METHODS, "naive-fmtl"])
def test_step(benchmark, device_backend, method):
    device, be = device_backend
    if method == "naive-fmtl" and be != "torch":
        pytest.skip("the naive baseline does not use the fused ops")
    model = copy.deepcopy(Small()).to(device)
    model.x, model.y = model.x.to(device), model.y.to(device)
    if method == "naive-fmtl":
        opt = NaiveFMTL(model.body, torch.optim.SGD, heads=list(model.heads), lr=0.01)
    else:
        opt = MTLSAM(model.body, torch.optim.SGD, heads=list(model.heads), lr=0.01, backend=be,
                     generator=torch.Generator().manual_seed(0), **STEP_METHODS[method])
    opt.step(model.losses)  # first step: graph checks, buffer allocation, lagged fallback

    def step():
        opt.step(model.losses)
        _sync(device)

    benchmark(step)
