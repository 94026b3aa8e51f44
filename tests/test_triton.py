"""The Triton backend against the float64 oracle, on CPU tensors through the interpreter.

``TRITON_INTERPRET=1`` is set (when no GPU is present) before anything imports triton; the
kernel module's functions are called directly, since the dispatcher offers Triton only for
CUDA tensors. Layouts are small (the interpreter runs every program in numpy); the chunk
constants are shrunk with ``config.override`` so that short segments still span many chunks
and many second-stage blocks.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from mtlsam_ext.kernels import torch_ref  # noqa: E402
from mtlsam_ext.kernels import triton_kernels as tk  # noqa: E402
from mtlsam_ext.kernels.triton import config, tables  # noqa: E402
from mtlsam_ext.ops import selfcheck  # noqa: E402
from tests.layouts import LAYOUTS, offsets_of, sampled_of  # noqa: E402
from tests.oracles import ops as oracle  # noqa: E402
from tests.tolerances import DTYPES, ELEMENTWISE, REDUCE, assert_reduction_close  # noqa: E402

if not config.INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

DEV = "cpu" if config.INTERPRET else "cuda"
# Small reduction constants: a 1500-element segment spans 12 chunks of 128 (4 blocks of 32
# each) and the second stage sums them 8 at a time.
SMALL = dict(block=32, chunk=128, partial_block=8)
# The shared layouts, scaled down for the interpreter (it runs every program in numpy):
# 1-element and empty segments, odd sizes, many tiny segments, a long one.
LAYOUTS_T = {
    "ragged": LAYOUTS["ragged"],
    "one_element": LAYOUTS["one_element"],
    "many_tiny": [1, 2, 3] * 6 + [0, 0],
    "long": [1500, 5, 300, 0],
}
# (layout, reduction constants): "long" and a second "ragged" run with SMALL.
REDUCE_CASES = [("ragged", {}), ("ragged", SMALL), ("one_element", {}), ("many_tiny", {}),
                ("long", SMALL)]
REDUCE_IDS = [f"{lay}-{'small' if c else 'default'}" for lay, c in REDUCE_CASES]


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


def _data(n, dtype, seed, k=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (k, n)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)


def _cpu(x):
    return x.cpu()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- reductions

@pytest.mark.parametrize("layout,chunks", REDUCE_CASES, ids=REDUCE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_segment_sumsq(layout, dtype, adaptive, chunks):
    offs = offsets_of(LAYOUTS_T[layout])
    x = _data(offs[-1], dtype, 1)
    scale = _data(offs[-1], dtype, 2) if adaptive else None
    with config.override(**chunks):
        got = tk.segment_sumsq(x, _t(offs), scale)
    want = oracle.segment_sumsq(_cpu(x), offs, None if scale is None else _cpu(scale))
    assert got.dtype == _acc(dtype) and got.shape == (len(offs) - 1,)
    torch.testing.assert_close(_cpu(got).double(), want, **REDUCE[dtype])


@pytest.mark.parametrize("layout,chunks", REDUCE_CASES, ids=REDUCE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_gl_layer_stats(layout, dtype, adaptive, chunks):
    lengths = LAYOUTS_T[layout]
    n = sum(lengths)
    table = sampled_of(lengths)
    m = sum(t[1] for t in table)
    g0, local = _data(n, dtype, 3), _data(m, dtype, 4, 3)
    scale = _data(n, dtype, 5) if adaptive else None
    st, ln, ls = (_t([t[j] for t in table]) for j in range(3))
    with config.override(**chunks):
        dots, sq = tk.gl_layer_stats(g0, local, st, ln, ls, scale)
    sc = None if scale is None else _cpu(scale)
    want_d, want_q = oracle.gl_layer_stats(_cpu(g0), _cpu(local), table, sc)
    g0_sq = oracle.gl_layer_stats(_cpu(g0), _cpu(g0).unsqueeze(0),
                                  [(s, k, s) for s, k, _ in table], sc)[1]
    assert dots.dtype == sq.dtype == _acc(dtype)
    assert_reduction_close(_cpu(dots), want_d, (g0_sq * want_q).sqrt(), dtype)
    assert_reduction_close(_cpu(sq), want_q, want_q, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,chunks", [((1, 1), {}), ((3, 257), {}), ((3, 257), SMALL),
                                          ((10, 1100), {}), ((2, 0), {}), ((0, 4), {})],
                         ids=["1x1", "3x257", "3x257-small", "10x1100", "2x0", "0x4"])
def test_gram(dtype, shape, chunks):
    rows = _data(shape[1], dtype, 9, shape[0])
    with config.override(**chunks):
        got = tk.gram(rows)
    want = oracle.gram(_cpu(rows)) if shape[0] else torch.zeros(0, 0, dtype=torch.float64)
    d = want.diagonal().sqrt()
    assert got.dtype == _acc(dtype)
    assert_reduction_close(_cpu(got), want, d[:, None] * d[None, :], dtype)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["ragged", "one_element", "long"])
@pytest.mark.parametrize("chunks", [{}, SMALL], ids=["default", "small"])
def test_segment_gram(dtype, layout, chunks):
    offs = offsets_of(LAYOUTS[layout])
    rows = _data(offs[-1], dtype, 16, 3)
    with config.override(**chunks):
        got = tk.segment_gram(rows, _t(offs))
    want = oracle.segment_gram(_cpu(rows), offs)
    d = want.diagonal(dim1=1, dim2=2).sqrt()
    assert got.dtype == _acc(dtype) and got.shape == (len(offs) - 1, 3, 3)
    assert_reduction_close(_cpu(got), want, d[:, :, None] * d[:, None, :], dtype)
    assert torch.equal(got, got.transpose(1, 2))


def test_reductions_are_deterministic_and_local():
    """Same bits twice; a segment's sum does not change when other segments surround it
    (the chunk decomposition depends only on the segment)."""
    lengths = [400, 1, 0, 133]
    offs = offsets_of(lengths)
    x = _data(offs[-1], torch.float32, 20)
    with config.override(**SMALL):
        a = tk.segment_sumsq(x, _t(offs))
        b = tk.segment_sumsq(x, _t(offs))
        assert torch.equal(a, b)
        head = torch.cat([_data(50, torch.float32, 21), x])
        c = tk.segment_sumsq(head, _t([0, 50] + [o + 50 for o in offs[1:]]))
        assert torch.equal(c[1:], a)
        rows = _data(300, torch.float32, 22, 3)
        assert torch.equal(tk.gram(rows), tk.gram(rows))
        st, ln, ls = _t([0, 401]), _t([400, 133]), _t([0, 400])
        local = _data(533, torch.float32, 23, 2)
        d1, q1 = tk.gl_layer_stats(x, local, st, ln, ls)
        d2, q2 = tk.gl_layer_stats(x, local, st, ln, ls)
        assert torch.equal(d1, d2) and torch.equal(q1, q2)


def test_default_constants_long_segment():
    """With the real constants a segment longer than REDUCE_CHUNK spans several chunks."""
    n = 2 * config.REDUCE_CHUNK + 7
    offs = [0, 3, n + 3]
    x = _data(n + 3, torch.float32, 24)
    got = tk.segment_sumsq(x, _t(offs))
    assert_reduction_close(_cpu(got), oracle.segment_sumsq(_cpu(x), offs),
                           oracle.segment_sumsq(_cpu(x), offs), torch.float32)


def test_empty_tables():
    x = _data(0, torch.float32, 0)
    assert torch.equal(tk.segment_sumsq(x, _t([0, 0, 0])), torch.zeros(2, device=DEV))
    g0 = _data(5, torch.float32, 1)
    dots, sq = tk.gl_layer_stats(g0, _data(3, torch.float32, 2, 2), _t([0, 4]), _t([0, 0]),
                                 _t([0, 3]))
    assert dots.shape == (2, 2) and not dots.any() and not sq.any()
    dots, sq = tk.gl_layer_stats(g0, _data(3, torch.float32, 2, 2), _t([]), _t([]), _t([]))
    assert dots.shape == (2, 0)
    p = x.clone()
    tk.mix_perturb_(p, torch.empty_like(p), x, torch.ones(2), _t([0, 0, 0]))
    tk.restore_(p, x)
    tk.combine_(x, _data(0, torch.float32, 0, 2), torch.ones(2))


# ---------------------------------------------------------------- element-wise

@pytest.mark.parametrize("layout", LAYOUTS_T)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_local", [False, True])
def test_mix_perturb_and_restore(layout, dtype, adaptive, with_local):
    lengths = LAYOUTS_T[layout]
    offs = offsets_of(lengths)
    n = offs[-1]
    theta = _data(n, dtype, 6)
    original = theta.clone()
    g0 = _data(n, dtype, 7)
    coef = torch.linspace(0.01, 0.2, len(lengths), dtype=_acc(dtype))
    kw, table, local_row, lcoef = {}, None, None, None
    if with_local:
        table = sampled_of(lengths)
        local_row = _data(sum(t[1] for t in table), dtype, 8)
        lcoef = torch.linspace(-0.1, 0.3, len(table), dtype=_acc(dtype))
        kw = dict(local=local_row, local_coef=lcoef, starts=_t([t[0] for t in table]),
                  lengths=_t([t[1] for t in table]), local_starts=_t([t[2] for t in table]))
    backup = torch.empty_like(theta)
    tk.mix_perturb_(theta, backup, g0, coef, _t(offs), adaptive=adaptive, **kw)
    assert torch.equal(backup, original)
    want = oracle.perturbed(_cpu(original), _cpu(g0), coef.tolist(), offs,
                            None if local_row is None else _cpu(local_row),
                            None if lcoef is None else lcoef.tolist(), table, adaptive)
    torch.testing.assert_close(_cpu(theta).double(), want, **ELEMENTWISE[dtype])
    if config.INTERPRET:
        # No FMA contraction in numpy: the same roundings as the reference, bit for bit.
        ref, ref_backup = original.clone(), torch.empty_like(original)
        torch_ref.mix_perturb_(ref, ref_backup, g0, coef, _t(offs), adaptive=adaptive, **kw)
        assert torch.equal(theta, ref)
    first = theta.clone()
    theta.fill_(123.0)  # rebuilt from the backup: the same bits
    tk.mix_perturb_(theta, backup, g0, coef, _t(offs), adaptive=adaptive, save_backup=False, **kw)
    assert torch.equal(theta, first)
    tk.restore_(theta, backup)
    assert torch.equal(theta, original)


class _Launches:
    """Stands in for a kernel in the backend module: records each launch's grid, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _points_case(lengths, dtype, k, shape, seed=11, sampled=None):
    """``(theta, directions, coefs, offsets, kw)`` for perturb_points_: "gl" has one shared
    direction and per-task local rows on ``sampled`` (default: every other segment), "fmtl"
    one direction per task and no local part."""
    offs = _t(offsets_of(lengths))
    n = sum(lengths)
    theta = _data(n, dtype, seed)
    coefs = torch.linspace(-0.2, 0.3, k * len(lengths), dtype=_acc(dtype)).reshape(k, -1)
    if shape == "fmtl":
        return theta, _data(n, dtype, seed + 1, k), coefs, offs, {}
    table = sampled_of(lengths) if sampled is None else sampled
    kw = dict(local=_data(max([t[1] + t[2] for t in table] + [0]), dtype, seed + 2, k),
              local_coefs=torch.linspace(0.1, -0.4, k * len(table),
                                         dtype=_acc(dtype)).reshape(k, -1),
              starts=_t([t[0] for t in table]), lengths=_t([t[1] for t in table]),
              local_starts=_t([t[2] for t in table]))
    return theta, _data(n, dtype, seed + 1).unsqueeze(0), coefs, offs, kw


def _per_row(out, theta, dirs, coefs, offs, adaptive, kw, mix=None):
    """K single-point ``mix_perturb_`` calls (``save_backup=False``) into the rows of ``out``."""
    mix = tk.mix_perturb_ if mix is None else mix
    for i in range(out.shape[0]):
        row_kw = {} if not kw else dict(
            local=kw["local"][i], local_coef=kw["local_coefs"][i], starts=kw["starts"],
            lengths=kw["lengths"], local_starts=kw["local_starts"])
        mix(out[i], theta, dirs[0 if dirs.shape[0] == 1 else i], coefs[i], offs,
            adaptive=adaptive, save_backup=False, **row_kw)


def _fused_only(monkeypatch):
    """Count the fused kernel's launches and make the per-row fallback an error: a result
    that came from K single-point calls fails the test instead of passing it."""
    single = tk.mix_perturb_

    def no_per_row(*args, **kwargs):
        raise AssertionError("perturb_points_ fell back to per-row mix_perturb_ calls")

    launches = _Launches(tk.perturb_points_kernel)
    monkeypatch.setattr(tk, "perturb_points_kernel", launches)
    monkeypatch.setattr(tk, "mix_perturb_", no_per_row)
    return launches, single


@pytest.mark.parametrize("layout", ["ragged", "many_tiny"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("shape", ["gl", "fmtl"])
@pytest.mark.parametrize("k", [1, 3])
def test_perturb_points(layout, dtype, adaptive, shape, k, monkeypatch):
    """All K points through the ops entry point with backend="triton", in ONE launch of the
    fused kernel: row i is, bit for bit, what the Triton mix_perturb_ writes for task i and
    (under the interpreter; else to rounding) the reference's point of task i."""
    from mtlsam_ext import ops

    theta, dirs, coefs, offs, kw = _points_case(LAYOUTS_T[layout], dtype, k, shape)
    # the kernels' first-use self-check (once per dtype) before the launches are counted
    selfcheck.verdicts("triton", theta.device, dtype)
    launches, single = _fused_only(monkeypatch)
    before = theta.clone()
    got = torch.full((k, theta.numel()), 7.0, dtype=dtype, device=DEV)
    ops.perturb_points_(got, theta, dirs, coefs, offs, adaptive=adaptive, backend="triton", **kw)
    assert len(launches.grids) == 1
    assert torch.equal(theta, before)
    rows = torch.full_like(got, -3.0)
    _per_row(rows, theta, dirs, coefs, offs, adaptive, kw, mix=single)
    assert torch.equal(got, rows)
    want = torch.empty_like(got)
    torch_ref.perturb_points_(want, theta, dirs, coefs, offs, adaptive=adaptive, **kw)
    if config.INTERPRET:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **ELEMENTWISE[dtype])


@pytest.mark.parametrize("shape", ["gl", "fmtl"])
@pytest.mark.parametrize("rows_per_launch", [1, 2, 3])
def test_perturb_points_row_groups(shape, rows_per_launch, monkeypatch):
    """Past the grid's program limit the rows go in groups, one launch each, same bits (the
    limit lowered here; 1 row per launch also when one row alone exceeds it)."""
    k, dtype = 5, torch.bfloat16
    theta, dirs, coefs, offs, kw = _points_case(LAYOUTS_T["ragged"], dtype, k, shape)
    block = config.elementwise_block(theta.numel())[0]
    sampled = () if not kw else (kw["starts"], kw["lengths"], kw["local_starts"])
    _, n_blocks = tables.mix_blocks(offs, block, torch.device(DEV), *sampled)
    limit = 1 if rows_per_launch == 1 else n_blocks * rows_per_launch + n_blocks - 1
    monkeypatch.setattr(tk, "_MAX_PROGRAMS", limit)
    launches, _ = _fused_only(monkeypatch)
    got = torch.empty(k, theta.numel(), dtype=dtype, device=DEV)
    tk.perturb_points_(got, theta, dirs, coefs, offs, adaptive=True, **kw)
    assert [grid[0] for grid in launches.grids] == [
        n_blocks * min(rows_per_launch, k - r0) for r0 in range(0, k, rows_per_launch)]
    want = torch.empty_like(got)
    torch_ref.perturb_points_(want, theta, dirs, coefs, offs, adaptive=True, **kw)
    if config.INTERPRET:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **ELEMENTWISE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overlap", [False, True], ids=["straddle", "overlap"])
def test_perturb_points_unaligned_and_overlapping_local(dtype, overlap, monkeypatch):
    """Sampled segments that straddle segment boundaries run fused; overlapping ones go to
    the reference, as the single-point op does (no fused launch), with the same bits."""
    lengths = [100, 0, 150, 50]
    table = ([(10, 30, 0), (20, 30, 100)] if overlap
             else [(50, 120, 0), (240, 60, 200), (0, 0, 399)])
    theta, dirs, coefs, offs, kw = _points_case(lengths, dtype, 3, "gl", seed=30,
                                                sampled=table)
    launches, single = _fused_only(monkeypatch)
    got = torch.empty(3, theta.numel(), dtype=dtype, device=DEV)
    tk.perturb_points_(got, theta, dirs, coefs, offs, adaptive=True, **kw)
    assert len(launches.grids) == (0 if overlap else 1)
    rows = torch.empty_like(got)
    _per_row(rows, theta, dirs, coefs, offs, True, kw, mix=single)
    assert torch.equal(got, rows)
    want = torch.empty_like(got)
    torch_ref.perturb_points_(want, theta, dirs, coefs, offs, adaptive=True, **kw)
    if config.INTERPRET or overlap:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **ELEMENTWISE[dtype])


def test_mix_perturb_unaligned_and_overlapping_local():
    """Sampled segments need not follow the offsets; overlapping ones defer to the reference
    (which adds both local terms)."""
    n = 300
    offs = _t([0, 100, 100, 250, 300])
    theta, g0, local = _data(n, torch.float32, 30), _data(n, torch.float32, 31), \
        _data(400, torch.float32, 32)
    coef = torch.tensor([0.1, 0.5, -0.2, 0.3])
    for st, ln, ls in [([50, 240, 0], [120, 60, 0], [0, 200, 399]),   # straddle segments
                       ([10, 20], [30, 30], [0, 100])]:               # overlap
        kw = dict(local=local, local_coef=torch.linspace(-1, 1, len(st)), starts=_t(st),
                  lengths=_t(ln), local_starts=_t(ls))
        a, b = theta.clone(), theta.clone()
        tk.mix_perturb_(a, torch.empty_like(a), g0, coef, offs, adaptive=True, **kw)
        torch_ref.mix_perturb_(b, torch.empty_like(b), g0, coef, offs, adaptive=True, **kw)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_restore_is_a_bit_copy():
    bits = torch.tensor([0x7FC1, -1, 0x0001, -0x8000, 0x7F80], dtype=torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        backup = bits.view(dtype).to(DEV)
        p = torch.zeros_like(backup)
        tk.restore_(p, backup)
        assert torch.equal(p.view(torch.int16), backup.view(torch.int16))
    nan64 = torch.tensor([0x7FF0000000000001, -1], dtype=torch.int64).view(torch.float64)
    p = torch.zeros_like(nan64).to(DEV)
    tk.restore_(p, nan64.to(DEV))
    assert torch.equal(p.view(torch.int64).cpu(), nan64.view(torch.int64))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 + 1e38
def test_bf16_rounds_to_nearest_even():
    """fp32 -> bf16 at the store: ties to even, not truncation (the interpreter's own cast)."""
    one = 1.0 + 2.0 ** -7           # bf16 with an odd last mantissa bit
    base = torch.tensor([one, 1.0, one, -one, float("inf"), 3.0e38], dtype=torch.bfloat16)
    g0 = torch.tensor([2.0 ** -8, 2.0 ** -8, 3 * 2.0 ** -9, 2.0 ** -8, 1.0, 1.0e38],
                      dtype=torch.bfloat16)
    p = base.clone().to(DEV)
    tk.mix_perturb_(p, torch.empty_like(p), g0.to(DEV), torch.ones(1), _t([0, 6]))
    want = (base.float() + g0.float()).to(torch.bfloat16)
    assert torch.equal(p.cpu().view(torch.int16), want.view(torch.int16))
    a = torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16).to(DEV)
    tk.sub_(a, torch.zeros_like(a))
    assert torch.isnan(a[0]) and a[1] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (10, 1100)])
def test_combine(dtype, shape):
    rows = _data(shape[1], dtype, 10, shape[0])
    w = torch.linspace(-1, 2, shape[0], dtype=torch.float64)
    out = torch.empty(shape[1], dtype=dtype, device=DEV)
    tk.combine_(out, rows, w)
    torch.testing.assert_close(_cpu(out).double(), oracle.combine(_cpu(rows), w),
                               **ELEMENTWISE[dtype])
    if config.INTERPRET:  # sequential row order in the accumulation dtype, as the reference
        ref = torch.empty_like(out)
        torch_ref.combine_(ref, rows, w)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_appending_zero_rows_is_exact(dtype):
    rows = _data(513, dtype, 11, 3)
    w = torch.tensor([0.3, -1.2, 0.7])
    a = torch.empty(513, dtype=dtype, device=DEV)
    tk.combine_(a, rows, w)
    b = torch.empty_like(a)
    more = torch.cat([rows, torch.zeros(2, 513, dtype=dtype, device=DEV), rows[:1]])
    tk.combine_(b, more, torch.cat([w, torch.ones(2), torch.zeros(1)]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sub(dtype):
    a, b = _data(100, dtype, 12, 2), _data(100, dtype, 13, 2)
    want = _cpu(a).double() - _cpu(b).double()
    ref = a.clone()
    tk.sub_(a, b)
    torch.testing.assert_close(_cpu(a).double(), want, **ELEMENTWISE[dtype])
    torch_ref.sub_(ref, b)
    assert torch.equal(a, ref)
    strided = _data(100, dtype, 14, 2).T  # non-contiguous: handed to torch
    tk.sub_(strided, strided.contiguous())
    assert not strided.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_gram(dtype):
    sam, loss = _data(300, dtype, 15, 3), _data(300, dtype, 16, 3)
    ref = _cpu(sam).clone()
    torch_ref.sub_(ref, _cpu(loss))
    g = tk.flat_gram_(sam, loss)
    assert torch.equal(_cpu(sam), ref)
    want = oracle.gram(ref)
    d = want.diagonal().sqrt()
    assert_reduction_close(_cpu(g), want, d[:, None] * d[None, :], dtype)


# ---------------------------------------------------------------- API

def test_supports_and_bad_arguments():
    assert not tk.supports("cpu")
    if config.INTERPRET:
        assert not tk.supports("cuda")  # the interpreter is for tests, never for users
    with pytest.raises(ValueError, match="contiguous"):
        tk.segment_sumsq(_data(10, torch.float32, 0)[::2], _t([0, 5]))
    with pytest.raises(ValueError, match="float"):
        tk.segment_sumsq(torch.zeros(5, dtype=torch.int32, device=DEV), _t([0, 5]))
    with pytest.raises(ValueError, match="2-D"):
        tk.gram(_data(4, torch.float32, 0))
    with pytest.raises(ValueError, match="multiple"):
        with config.override(block=64, chunk=100):
            pass
    assert config.REDUCE_CHUNK % config.REDUCE_BLOCK == 0


def test_block_rule():
    assert config.elementwise_block(1) == (256, 1)
    assert config.elementwise_block(11_000_000) == (2048, 8)
    for n in (1, 1000, 10**5, 10**6, 10**8):
        block, warps = config.elementwise_block(n)
        assert block & (block - 1) == 0 and 256 <= block <= 2048 and warps == block // 256
    assert config.gram_block(1) == config.REDUCE_BLOCK and config.gram_block(64) == 128


def test_import_without_triton_is_an_import_error(monkeypatch):
    for name in list(sys.modules):
        if name == "triton" or name.startswith(("triton.", "mtlsam_ext.kernels.triton")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError):
        importlib.import_module("mtlsam_ext.kernels.triton_kernels")
