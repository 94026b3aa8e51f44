"""The CUDA kernels of the compiled extension (backend="ext" on CUDA tensors).

Mirrors tests/test_ops.py: every op against the float64 oracle on every layout and dtype, plus
the issue's tolerance rule (the kernel's error against float64 is at most twice the pure-torch
reference's error at the same dtype, plus a small atol), bit-exact backup / rebuild / restore,
run-to-run and alignment determinism, segments spanning many blocks, device segment tables and
argument errors. Skipped without a GPU or without CUDA kernels in mtlsam_ext._C.
"""

import pytest
import torch

from mtlsam_ext import ops
from mtlsam_ext.kernels import torch_ref
from tests.layouts import LAYOUTS, offsets_of, sampled_of
from tests.oracles import ops as oracle
from tests.tolerances import (
    DTYPES,
    ELEMENTWISE,
    REDUCE,
    REFERENCE_ULPS,
    accumulation_eps,
    assert_reduction_close,
)


def _cuda_ext_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from mtlsam_ext.kernels import ext
    except ImportError:
        return False
    return ext.supports(torch.device("cuda"))


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_ext_available(),
                       reason="needs a CUDA device and mtlsam_ext._C built with CUDA kernels"),
]

DEV = "cuda"
EXT = "ext"


def _t(v, device="cpu"):
    # The ext wrappers copy CPU tables to the device; the torch backend indexes the CUDA data
    # with its offsets (repeat_interleave / index_select), so the perturbation tests give it
    # device tables.
    return torch.tensor(v, dtype=torch.int64, device=device)


def _data(n, dtype, seed, k=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (k, n)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_error_within_reference(got, ref, want, dtype, atol=None, scale=None):
    """``|got - want| <= 2 max|ref - want| + atol + REFERENCE_ULPS eps_acc scale`` elementwise.

    ``want`` is the float64 oracle, ``ref`` the pure-torch reference (mtlsam_ext.kernels.torch_ref)
    run on the same inputs and dtype; ``atol`` defaults to the dtype's reduction atol; the last
    term allows a few ulps of the accumulation dtype where the reference is correctly rounded
    (tests/tolerances.py). ``scale`` is the magnitude a summation error grows with, ``|want|``
    by default; for inner products pass ``||a|| ||b||`` (a cancelled result is smaller).
    """
    want = want.double().cpu()
    err = (got.double().cpu() - want).abs()
    ref_err = (ref.double().cpu() - want).abs()
    if atol is None:
        atol = REDUCE[dtype]["atol"]
    if not err.numel():
        return
    r = float(ref_err.max())
    scale = want.abs() if scale is None else scale.double().cpu()
    limit = 2 * r + atol + REFERENCE_ULPS * accumulation_eps(dtype) * scale
    bad = err > limit
    assert not bool(bad.any()), (
        f"kernel error {float(err[bad].max()):.3g} exceeds 2 x the reference error {r:.3g} "
        f"+ atol {atol:.3g} + {REFERENCE_ULPS} ulps at {int(bad.sum())} entries")


# ---------------------------------------------------------------------------------------------
# Every op against the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_segment_sumsq(layout, dtype, adaptive):
    lengths = LAYOUTS[layout]
    offs = offsets_of(lengths)
    x = _data(offs[-1], dtype, 1)
    scale = _data(offs[-1], dtype, 2) if adaptive else None
    got = ops.segment_sumsq(x, _t(offs), scale, backend=EXT)
    assert got.device.type == "cuda"
    assert got.dtype == _acc(dtype)
    want = oracle.segment_sumsq(x.cpu(), offs, None if scale is None else scale.cpu())
    torch.testing.assert_close(got.double().cpu(), want, **REDUCE[dtype])
    ref = ops.segment_sumsq(x, _t(offs), scale, backend="torch")
    assert_error_within_reference(got, ref, want, dtype)
    # Device tables are accepted as they are.
    again = ops.segment_sumsq(x, _t(offs, DEV), scale, backend=EXT)
    assert torch.equal(again, got)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5, 17])
def test_gl_layer_stats(layout, dtype, adaptive, k):
    lengths = LAYOUTS[layout]
    n = sum(lengths)
    table = sampled_of(lengths)
    m = sum(t[1] for t in table)
    g0 = _data(n, dtype, 3)
    local = _data(m, dtype, 4, k)
    scale = _data(n, dtype, 5) if adaptive else None
    st, ln, ls = (_t([t[j] for t in table]) for j in range(3))
    dots, sq = ops.gl_layer_stats(g0, local, st, ln, ls, scale, backend=EXT)
    assert dots.shape == sq.shape == (k, len(table))
    assert dots.dtype == sq.dtype == _acc(dtype)
    sc = None if scale is None else scale.cpu()
    want_d, want_q = oracle.gl_layer_stats(g0.cpu(), local.cpu(), table, sc)
    g0_sq = oracle.gl_layer_stats(g0.cpu(), g0.cpu().unsqueeze(0).contiguous(),
                                  [(s, n_, s) for s, n_, _ in table], sc)[1]
    assert_reduction_close(dots.cpu(), want_d, (g0_sq * want_q).sqrt(), dtype)
    assert_reduction_close(sq.cpu(), want_q, want_q, dtype)
    ref_d, ref_q = ops.gl_layer_stats(g0, local, st, ln, ls, scale, backend="torch")
    assert_error_within_reference(dots, ref_d, want_d, dtype, scale=(g0_sq * want_q).sqrt())
    assert_error_within_reference(sq, ref_q, want_q, dtype)


def _perturb_args(lengths, dtype, with_local, table_device="cpu"):
    offs = offsets_of(lengths)
    n = offs[-1]
    g0 = _data(n, dtype, 7)
    # On the device: the torch backend's repeat_interleave of coef meets the CUDA g0.
    coef = torch.linspace(0.01, 0.2, len(lengths), dtype=torch.float64).to(DEV, _acc(dtype))
    kw, table, local_row, lcoef = {}, None, None, None
    if with_local:
        table = sampled_of(lengths)
        m = sum(t[1] for t in table)
        local_row = _data(m, dtype, 8)
        lcoef = torch.linspace(-0.1, 0.3, len(table), dtype=_acc(dtype))
        kw = dict(local=local_row, local_coef=lcoef,
                  starts=_t([t[0] for t in table], table_device),
                  lengths=_t([t[1] for t in table], table_device),
                  local_starts=_t([t[2] for t in table], table_device))
    return offs, g0, coef, kw, table, local_row, lcoef


def _points_args(lengths, dtype, shape, k, perm=None):
    """perturb_points_ arguments (CPU tables) for K points: "gl" is one shared direction [1, N]
    with per-point local rows on the sampled segments, "fmtl" one direction per point [K, N]
    and no local part. perm reorders the sampled table (and the local_coefs columns alike)."""
    offs = offsets_of(lengths)
    n = offs[-1]
    theta = _data(n, dtype, 6)
    # Coefficients on the device: the torch backend multiplies them with the CUDA data.
    coefs = torch.linspace(-0.2, 0.3, k * len(lengths), dtype=_acc(dtype),
                           device=DEV).reshape(k, -1)
    if shape == "fmtl":
        return offs, theta, _data(n, dtype, 12, k), coefs, {}
    table = sampled_of(lengths)
    p = len(table)
    kw = dict(local=_data(sum(t[1] for t in table), dtype, 9, k),
              local_coefs=torch.linspace(0.1, -0.4, k * p, dtype=_acc(dtype),
                                         device=DEV).reshape(k, p),
              starts=_t([t[0] for t in table]), lengths=_t([t[1] for t in table]),
              local_starts=_t([t[2] for t in table]))
    if perm is not None:
        kw = {key: (v if key == "local" else v[:, perm.to(v.device)].contiguous()
                    if key == "local_coefs" else v[perm]) for key, v in kw.items()}
    return offs, theta, _data(n, dtype, 7).unsqueeze(0), coefs, kw


def _fused_points(out, theta, dirs, coefs, offs, kw, adaptive):
    """The CUDA op itself (one launch, device tables and coefficients), whatever the ops
    layer's choice of kernel."""
    d = out.device
    _ops.perturb_points_(out, theta, dirs, coefs.to(d), _t(offs, d), kw.get("local"),
                         None if not kw else kw["local_coefs"].to(d),
                         *(None if not kw else kw[key].to(d)
                           for key in ("starts", "lengths", "local_starts")), adaptive)


def _assert_rows_are_mix_perturb(got, theta, dirs, coefs, offs, kw, adaptive):
    """Row i is, bit for bit, what K calls of the ext mix_perturb_ write into the parameters
    (backup = theta, save_backup=False), and theta is left as it was."""
    before = theta.clone()
    for i in range(got.shape[0]):
        single = torch.full_like(theta, 7.0)
        row_kw = {} if not kw else dict(
            local=kw["local"][i], local_coef=kw["local_coefs"][i], starts=kw["starts"],
            lengths=kw["lengths"], local_starts=kw["local_starts"])
        ops.mix_perturb_(single, theta, dirs[0 if dirs.shape[0] == 1 else i], coefs[i],
                         _t(offs), adaptive=adaptive, save_backup=False, backend=EXT, **row_kw)
        assert torch.equal(got[i], single), f"row {i}"
    assert torch.equal(theta, before)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("shape", ["gl", "fmtl"])
@pytest.mark.parametrize("k", [1, 3])
def test_perturb_points(layout, dtype, adaptive, shape, k):
    """All K points in one launch on CUDA: row i equals, bit for bit, the torch backend's point
    of task i and what the ext mix_perturb_ writes for it (the same rounding steps). "gl": one
    direction with per-point local rows; "fmtl": K directions, no local part. Both the 16-byte
    path (N a multiple of the vector width: "many_tiny", "long") and the scalar one (odd N with
    K > 1: "ragged") are covered."""
    offs, theta, dirs, coefs, kw = _points_args(LAYOUTS[layout], dtype, shape, k)
    n = offs[-1]
    inputs = [t.clone() for t in (theta, dirs, *kw.values())]
    got = torch.full((k, n), 7.0, dtype=dtype, device=DEV)
    ops.perturb_points_(got, theta, dirs, coefs, _t(offs), adaptive=adaptive, backend=EXT, **kw)
    ref = torch.empty_like(got)
    ops.perturb_points_(ref, theta, dirs, coefs, _t(offs, DEV), adaptive=adaptive,
                        backend="torch", **kw)
    assert torch.equal(got, ref)
    fused = torch.full_like(got, -3.0)
    _fused_points(fused, theta, dirs, coefs, offs, kw, adaptive)
    assert torch.equal(fused, ref)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (theta, dirs, *kw.values())))
    _assert_rows_are_mix_perturb(fused, theta, dirs, coefs, offs, kw, adaptive)
    want = oracle.perturbed(theta.cpu(), dirs[0].cpu(), coefs[0].tolist(), offs,
                            None if not kw else kw["local"][0].cpu(),
                            None if not kw else kw["local_coefs"][0].tolist(),
                            None if not kw else sampled_of(LAYOUTS[layout]), adaptive)
    torch.testing.assert_close(fused[0].double().cpu(), want, **ELEMENTWISE[dtype])


@pytest.mark.parametrize("k", [1, 4])
def test_perturb_points_unsorted_sampled_table_on_device(k):
    """The sampled table may come in any order and already live on the device: it is sorted
    once for all rows, each row's local_coefs permuted with it."""
    perm = torch.tensor([3, 0, 2, 1])
    offs, theta, dirs, coefs, kw = _points_args(LAYOUTS["ragged"], torch.float32, "gl", k, perm)
    kw_dev = {key: v.to(DEV) for key, v in kw.items()}
    got = torch.full((k, offs[-1]), 7.0, device=DEV)
    ops.perturb_points_(got, theta, dirs, coefs, _t(offs, DEV), adaptive=True, backend=EXT,
                        **kw_dev)
    # The reference itself: the ops layer accepts unsorted tables only on the device (a CPU
    # table must be sorted; a device one is the kernels' to check).
    ref = torch.empty_like(got)
    torch_ref.perturb_points_(ref, theta, dirs, coefs, _t(offs, DEV), adaptive=True, **kw)
    assert torch.equal(got, ref)
    fused = torch.empty_like(got)
    _fused_points(fused, theta, dirs, coefs, offs, kw, True)
    assert torch.equal(fused, ref)
    _assert_rows_are_mix_perturb(fused, theta, dirs, coefs, offs, kw_dev, True)
    table = [sampled_of(LAYOUTS["ragged"])[i] for i in perm.tolist()]
    for i in range(k):
        want = oracle.perturbed(theta.cpu(), dirs[0].cpu(), coefs[i].tolist(), offs,
                                kw["local"][i].cpu(), kw["local_coefs"][i].tolist(), table, True)
        torch.testing.assert_close(fused[i].double().cpu(), want, **ELEMENTWISE[torch.float32])


def test_perturb_points_many_shuffled_sampled_segments():
    """More sampled segments than threads of the sorting block, with ties in start (empty
    segments), shuffled, and several rows of local_coefs permuted by the one sort."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 4, (900,), generator=g).tolist()
    table = sampled_of(lengths)
    assert len(table) > 256 and len({t[0] for t in table}) < len(table)
    perm = torch.randperm(len(table), generator=g)
    offs, theta, dirs, coefs, kw = _points_args(lengths, torch.float32, "gl", 5, perm)
    for adaptive in (False, True):
        got = torch.empty(5, offs[-1], device=DEV)
        _fused_points(got, theta, dirs, coefs, offs, kw, adaptive)
        ref = torch.empty_like(got)
        torch_ref.perturb_points_(ref, theta, dirs, coefs, _t(offs, DEV), adaptive=adaptive,
                                  **kw)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["gl", "fmtl"])
def test_perturb_points_many_chunks_and_alignment(dtype, shape):
    """Rows spanning many chunks (N a multiple of every vector width, so aligned buffers take
    the 16-byte path), against the same data in views one element off 16-byte alignment (the
    scalar path) and against per-row mix_perturb_: the same bits."""
    lengths = [3, 5 * 8192 + 17, 0, 1, 200_000, 7]
    lengths[-1] += (-sum(lengths)) % 8
    k = 3
    offs, theta, dirs, coefs, kw = _points_args(lengths, dtype, shape, k)
    n = offs[-1]
    assert n % 8 == 0

    def off_by_one(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    got = torch.empty(k, n, dtype=dtype, device=DEV)
    _fused_points(got, theta, dirs, coefs, offs, kw, True)
    mis = off_by_one(torch.zeros(k, n, dtype=dtype, device=DEV))
    mis_kw = dict(kw, local=off_by_one(kw["local"])) if kw else {}
    _fused_points(mis, off_by_one(theta), off_by_one(dirs), coefs, offs, mis_kw, True)
    assert torch.equal(got, mis)
    _assert_rows_are_mix_perturb(got, theta, dirs, coefs, offs, kw, True)


def test_perturb_points_empty():
    """K = 0 or N = 0: nothing to write, no launch."""
    for k, n in ((0, 5), (2, 0), (0, 0)):
        out = torch.empty(k, n, device=DEV)
        _ops.perturb_points_(out, torch.zeros(n, device=DEV), torch.zeros(1, n, device=DEV),
                             torch.ones(k, 1, device=DEV), _t([0, n], DEV), None, None, None,
                             None, None, True)
    out = torch.empty(2, 0, device=DEV)
    _ops.perturb_points_(out, torch.zeros(0, device=DEV), torch.zeros(2, 0, device=DEV),
                         torch.ones(2, 0, device=DEV), _t([0], DEV), None, None, None, None,
                         None, False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_local", [False, True])
def test_mix_perturb_and_restore(layout, dtype, adaptive, with_local):
    lengths = LAYOUTS[layout]
    offs, g0, coef, kw, table, local_row, lcoef = _perturb_args(lengths, dtype, with_local)
    theta = _data(offs[-1], dtype, 6)
    original = theta.clone()
    backup = torch.empty_like(theta)
    ops.mix_perturb_(theta, backup, g0, coef, _t(offs), adaptive=adaptive, backend=EXT, **kw)
    assert torch.equal(backup, original)
    want = oracle.perturbed(original.cpu(), g0.cpu(), coef.tolist(), offs,
                            None if local_row is None else local_row.cpu(),
                            None if lcoef is None else lcoef.tolist(), table, adaptive)
    torch.testing.assert_close(theta.double().cpu(), want, **ELEMENTWISE[dtype])
    # Same rounding steps as the pure-torch reference: the same bits.
    ref = original.clone()
    ops.mix_perturb_(ref, torch.empty_like(ref), g0, coef, _t(offs, DEV), adaptive=adaptive,
                     backend="torch", **kw)
    assert_error_within_reference(theta, ref, want, dtype, atol=ELEMENTWISE[dtype]["atol"])
    assert torch.equal(theta, ref)
    first = theta.clone()
    # Rebuilding from the backup (no restore in between) gives the same bits.
    theta.fill_(123.0)
    ops.mix_perturb_(theta, backup, g0, coef, _t(offs), adaptive=adaptive, save_backup=False,
                     backend=EXT, **kw)
    assert torch.equal(theta, first)
    assert torch.equal(backup, original)
    ops.restore_(theta, backup, backend=EXT)
    assert torch.equal(theta, original)


def test_mix_perturb_unsorted_sampled_table_on_device():
    """The sampled table may come in any order and already live on the device."""
    lengths = LAYOUTS["ragged"]
    dtype = torch.float32
    offs, g0, coef, kw, table, local_row, lcoef = _perturb_args(lengths, dtype, True, DEV)
    perm = torch.tensor([3, 0, 2, 1])
    kw = {k: (v[perm.to(v.device)] if k != "local" else v) for k, v in kw.items()}
    table = [table[i] for i in perm.tolist()]
    theta = _data(offs[-1], dtype, 6)
    original = theta.clone()
    ops.mix_perturb_(theta, torch.empty_like(theta), g0, coef, _t(offs, DEV), adaptive=True,
                     backend=EXT, **kw)
    want = oracle.perturbed(original.cpu(), g0.cpu(), coef.tolist(), offs, local_row.cpu(),
                            kw["local_coef"].tolist(), table, True)
    torch.testing.assert_close(theta.double().cpu(), want, **ELEMENTWISE[dtype])


def test_mix_perturb_many_shuffled_sampled_segments():
    """More sampled segments than threads of the sorting block (the table is sorted on the
    device by one block, strided over the entries), with ties in start (empty segments), in a
    shuffled order: the same bits as the reference."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 4, (900,), generator=g).tolist()
    offs, g0, coef, kw, table, _, _ = _perturb_args(lengths, torch.float32, True, DEV)
    assert len(table) > 256 and len({t[0] for t in table}) < len(table)
    perm = torch.randperm(len(table), generator=g)
    kw = {k: (v[perm.to(v.device)] if k != "local" else v) for k, v in kw.items()}
    theta = _data(offs[-1], torch.float32, 6)
    ref = theta.clone()
    for adaptive in (False, True):
        ops.mix_perturb_(theta, torch.empty_like(theta), g0, coef, _t(offs, DEV),
                         adaptive=adaptive, backend=EXT, **kw)
        # Device tables: the ops layer requires a CPU table to be sorted.
        ops.mix_perturb_(ref, torch.empty_like(ref), g0, coef, _t(offs, DEV),
                         adaptive=adaptive, backend="torch", **kw)
        assert torch.equal(theta, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_gram(layout, dtype):
    offs = offsets_of(LAYOUTS[layout])
    rows = _data(offs[-1], dtype, 16, 3)
    got = ops.segment_gram(rows, _t(offs), backend=EXT)
    want = oracle.segment_gram(rows.cpu(), offs)
    d = want.diagonal(dim1=1, dim2=2).sqrt()
    assert got.dtype == _acc(dtype) and got.shape == (len(offs) - 1, 3, 3)
    assert_reduction_close(got.cpu(), want, d[:, :, None] * d[:, None, :], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (10, 4099), (2, 0), (0, 5), (40, 1031),
                                   (67, 300), (4, 70000), (5, 4097), (9, 1), (130, 70),
                                   (8, 5_000_003)])
def test_gram(dtype, shape):
    rows = _data(shape[1], dtype, 9, shape[0])
    got = ops.gram(rows, backend=EXT)
    assert got.dtype == _acc(dtype) and got.shape == (shape[0], shape[0])
    want = oracle.gram(rows.cpu()) if shape[0] else torch.zeros(0, 0, dtype=torch.float64)
    d = want.diagonal().sqrt()
    assert_reduction_close(got.cpu(), want, d[:, None] * d[None, :], dtype)
    assert torch.equal(got, got.T)
    if shape[0]:
        assert_error_within_reference(got, ops.gram(rows, backend="torch"), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (10, 4099), (2, 0), (5, 1001)])
def test_combine(dtype, shape):
    rows = _data(shape[1], dtype, 10, shape[0])
    w = torch.linspace(-1, 2, shape[0], dtype=torch.float64)
    out = torch.empty(shape[1], dtype=dtype, device=DEV)
    ops.combine_(out, rows, w, backend=EXT)
    want = oracle.combine(rows.cpu(), w)
    torch.testing.assert_close(out.double().cpu(), want, **ELEMENTWISE[dtype])
    ref = torch.empty_like(out)
    ops.combine_(ref, rows, w, backend="torch")
    assert_error_within_reference(out, ref, want, dtype, atol=ELEMENTWISE[dtype]["atol"])
    assert torch.equal(out, ref)  # same sequential rounding steps as the reference


def test_combine_misaligned_rows_same_bits():
    rows = _data(1 + 3 * 1001, torch.float16, 14)[1:].view(3, 1001)  # 2-byte offset
    w = torch.tensor([0.5, -1.0, 2.0])
    a = torch.empty(1001, dtype=torch.float16, device=DEV)
    ops.combine_(a, rows, w, backend=EXT)
    b = torch.empty_like(a)
    ops.combine_(b, rows.clone(), w, backend=EXT)
    assert torch.equal(a, b)


def test_combine_appending_zero_rows_is_exact():
    rows = _data(513, torch.float32, 11, 3)
    w = torch.tensor([0.3, -1.2, 0.7])
    a = torch.empty(513, device=DEV)
    ops.combine_(a, rows, w, backend=EXT)
    b = torch.empty(513, device=DEV)
    ops.combine_(b, torch.cat([rows, torch.zeros(2, 513, device=DEV)]),
                 torch.cat([w, torch.ones(2)]), backend=EXT)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [100, 4099])
def test_sub(dtype, n):
    a = _data(n, dtype, 12, 2)
    b = _data(n, dtype, 13, 2)
    want = a.clone()
    want.sub_(b)
    ops.sub_(a, b, backend=EXT)
    assert torch.equal(a, want)
    torch.testing.assert_close(a.double(), want.double(), **ELEMENTWISE[dtype])


# ---------------------------------------------------------------------------------------------
# Many blocks, determinism, alignment, streams, empty inputs
# ---------------------------------------------------------------------------------------------

BIG = [3, 5 * 8192 + 17, 0, 1, 200_000, 7]


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_spanning_many_blocks(dtype):
    offs = offsets_of(BIG)
    x = _data(offs[-1], dtype, 15)
    scale = _data(offs[-1], dtype, 16)
    got = ops.segment_sumsq(x, _t(offs), scale, backend=EXT)
    want = oracle.segment_sumsq(x.cpu(), offs, scale.cpu())
    torch.testing.assert_close(got.double().cpu(), want, **REDUCE[dtype])
    assert_error_within_reference(got, ops.segment_sumsq(x, _t(offs), scale, backend="torch"),
                                  want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism_and_alignment(dtype):
    offs = offsets_of(BIG)
    buf = _data(offs[-1] + 1, dtype, 17)
    x = buf[1:]  # misaligned by one element: no 16-byte loads on this view
    xa = x.clone()  # aligned copy
    runs = [ops.segment_sumsq(v, _t(offs), None, backend=EXT) for v in (x, x, xa)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    table = sampled_of(BIG)
    m = sum(t[1] for t in table)
    local = _data(m, dtype, 18, 5)
    st, ln, ls = (_t([t[j] for t in table]) for j in range(3))
    s1 = ops.gl_layer_stats(x, local, st, ln, ls, x, backend=EXT)
    s2 = ops.gl_layer_stats(xa, local, st, ln, ls, xa, backend=EXT)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])
    rows = _data(100_003, dtype, 19, 6)
    assert torch.equal(ops.gram(rows, backend=EXT), ops.gram(rows.clone(), backend=EXT))


def test_non_default_stream():
    offs = offsets_of(BIG)
    x = _data(offs[-1], torch.float32, 20)
    want = ops.segment_sumsq(x, _t(offs), None, backend=EXT)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.segment_sumsq(x, _t(offs), None, backend=EXT)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, want)


def test_empty_inputs():
    e = torch.empty(0, device=DEV)
    assert ops.segment_sumsq(e, _t([0]), backend=EXT).shape == (0,)
    assert torch.equal(ops.segment_sumsq(e, _t([0, 0, 0]), backend=EXT),
                       torch.zeros(2, device=DEV))
    d, q = ops.gl_layer_stats(e, torch.empty(3, 0, device=DEV), _t([]), _t([]), _t([]),
                              backend=EXT)
    assert d.shape == q.shape == (3, 0)
    d, q = ops.gl_layer_stats(e, torch.empty(2, 0, device=DEV), _t([0]), _t([0]), _t([0]),
                              backend=EXT)
    assert torch.equal(d, torch.zeros(2, 1, device=DEV)) and torch.equal(q, d)
    b = torch.empty(0, device=DEV)
    ops.mix_perturb_(e, b, e, torch.ones(1), _t([0, 0]), backend=EXT)
    ops.restore_(e, b, backend=EXT)
    ops.combine_(e, torch.empty(3, 0, device=DEV), torch.ones(3), backend=EXT)
    ops.sub_(torch.empty(2, 0, device=DEV), torch.empty(2, 0, device=DEV), backend=EXT)
    assert ops.gram(torch.empty(0, 4, device=DEV), backend=EXT).shape == (0, 0)


# ---------------------------------------------------------------------------------------------
# Segment tables with large int64 values; argument errors of the CUDA ops themselves
# ---------------------------------------------------------------------------------------------

_ops = torch.ops.mtlsam if _cuda_ext_available() else None


class TestDeviceTables:
    def test_large_offsets_rejected_by_the_device_check(self, monkeypatch):
        monkeypatch.setenv("MTLSAM_CUDA_CHECK_TABLES", "1")
        x = torch.zeros(5, device=DEV)
        with pytest.raises(RuntimeError, match="end at 5"):
            _ops.segment_sumsq(x, _t([0, 2**31, 2**31 + 5], DEV), None)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            _ops.segment_sumsq(x, _t([0, 2**33, 3, 5], DEV), None)
        # A valid table passes the same check.
        got = _ops.segment_sumsq(torch.ones(5, device=DEV), _t([0, 2, 5], DEV), None)
        assert got.tolist() == [2.0, 3.0]

    def test_large_sampled_values_rejected_by_the_device_check(self, monkeypatch):
        monkeypatch.setenv("MTLSAM_CUDA_CHECK_TABLES", "1")
        g0 = torch.zeros(4, device=DEV)
        loc = torch.zeros(2, 4, device=DEV)
        with pytest.raises(RuntimeError, match="past the flat buffer"):
            _ops.gl_layer_stats(g0, loc, _t([2**31 + 1], DEV), _t([2], DEV), _t([0], DEV), None)
        with pytest.raises(RuntimeError, match="past the local-gradient buffer"):
            _ops.gl_layer_stats(g0, loc, _t([0], DEV), _t([2], DEV), _t([2**40], DEV), None)
        with pytest.raises(RuntimeError, match="negative"):
            _ops.gl_layer_stats(g0, loc, _t([0], DEV), _t([-(2**40)], DEV), _t([0], DEV), None)

    def test_unchecked_malformed_tables_stay_in_bounds(self, monkeypatch):
        """Without the opt-in check, kernels clamp table values: no out-of-bounds access."""
        monkeypatch.delenv("MTLSAM_CUDA_CHECK_TABLES", raising=False)
        x = torch.ones(5, device=DEV)
        _ops.segment_sumsq(x, _t([0, 2**31, 2**31 + 5], DEV), None)
        g0 = torch.ones(4, device=DEV)
        _ops.gl_layer_stats(g0, torch.ones(2, 4, device=DEV), _t([2**31 + 1, 1], DEV),
                            _t([2**40, 2], DEV), _t([2**35, 0], DEV), None)
        p, b = torch.ones(5, device=DEV), torch.empty(5, device=DEV)
        _ops.mix_perturb_(p, b, x, torch.ones(2, device=DEV), _t([0, 2**31, 2**31 + 5], DEV),
                          torch.ones(3, device=DEV), torch.ones(1, device=DEV),
                          _t([2**40], DEV), _t([3], DEV), _t([2**31], DEV), True, True)
        torch.cuda.synchronize()
        # The context is healthy afterwards.
        assert ops.segment_sumsq(x, _t([0, 5]), backend=EXT).item() == 5.0


class TestBadArguments:
    def test_cpu_tensor(self):
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            _ops.segment_sumsq(torch.zeros(5), _t([0, 5], DEV), None)
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            _ops.combine_(torch.zeros(3, device=DEV), torch.zeros(2, 3),
                          torch.ones(2, device=DEV))

    def test_cpu_table(self):
        with pytest.raises(RuntimeError, match="device memory"):
            _ops.segment_sumsq(torch.zeros(5, device=DEV), _t([0, 5]), None)

    def test_int32_table(self):
        with pytest.raises(RuntimeError, match="int64"):
            _ops.segment_sumsq(torch.zeros(5, device=DEV),
                               torch.tensor([0, 5], dtype=torch.int32, device=DEV), None)

    def test_dtype_mismatch(self):
        x = torch.zeros(5, device=DEV)
        with pytest.raises(RuntimeError, match="dtype"):
            _ops.segment_sumsq(x, _t([0, 5], DEV), x.double())
        with pytest.raises(RuntimeError, match="dtype"):
            _ops.mix_perturb_(x, x.double(), x, torch.ones(1, device=DEV), _t([0, 5], DEV),
                              None, None, None, None, None, False, True)
        with pytest.raises(RuntimeError, match="dtype"):
            _ops.sub_(x, x.half())

    def test_integer_buffer(self):
        with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
            _ops.segment_sumsq(torch.zeros(5, dtype=torch.int32, device=DEV), _t([0, 5], DEV),
                               None)

    def test_non_contiguous(self):
        with pytest.raises(RuntimeError, match="contiguous"):
            _ops.segment_sumsq(torch.zeros(10, device=DEV)[::2], _t([0, 5], DEV), None)

    def test_table_lengths(self):
        g0 = torch.zeros(4, device=DEV)
        with pytest.raises(RuntimeError, match="equal length"):
            _ops.gl_layer_stats(g0, torch.zeros(2, 4, device=DEV), _t([0, 1], DEV), _t([1], DEV),
                                _t([0], DEV), None)
        with pytest.raises(RuntimeError, match="one value per segment"):
            _ops.mix_perturb_(g0, torch.empty_like(g0), g0, torch.ones(2, device=DEV),
                              _t([0, 4], DEV), None, None, None, None, None, False, True)

    def test_shapes(self):
        x = torch.zeros(4, device=DEV)
        with pytest.raises(RuntimeError, match="expected 4"):
            _ops.mix_perturb_(x, torch.zeros(3, device=DEV), x, torch.ones(1, device=DEV),
                              _t([0, 4], DEV), None, None, None, None, None, False, True)
        with pytest.raises(RuntimeError, match="columns"):
            _ops.combine_(x, torch.zeros(2, 5, device=DEV), torch.ones(2, device=DEV))
        with pytest.raises(RuntimeError, match="2 values"):
            _ops.combine_(x, torch.zeros(2, 4, device=DEV), torch.ones(3, device=DEV))
        with pytest.raises(RuntimeError, match="2-D"):
            _ops.gram(torch.zeros(68, device=DEV))

    def test_local_without_table(self):
        x = torch.zeros(4, device=DEV)
        with pytest.raises(RuntimeError, match="local needs"):
            _ops.mix_perturb_(x, torch.empty_like(x), x, torch.ones(1, device=DEV),
                              _t([0, 4], DEV), x, None, None, None, None, False, True)

    def test_perturb_points_arguments(self):
        out = torch.zeros(2, 4, device=DEV)
        theta = torch.zeros(4, device=DEV)
        d1 = torch.zeros(1, 4, device=DEV)
        c = torch.ones(2, 1, device=DEV)
        off = _t([0, 4], DEV)
        none5 = (None,) * 5
        with pytest.raises(RuntimeError, match="2-D"):
            _ops.perturb_points_(theta, theta.clone(), d1, c, off, *none5, False)
        with pytest.raises(RuntimeError, match="expected 4"):
            _ops.perturb_points_(out, torch.zeros(3, device=DEV), d1, c, off, *none5, False)
        with pytest.raises(RuntimeError, match="directions must be"):
            _ops.perturb_points_(out, theta, torch.zeros(3, 4, device=DEV), c, off, *none5,
                                 False)
        with pytest.raises(RuntimeError, match="dtype"):
            _ops.perturb_points_(out, theta, d1.double(), c, off, *none5, False)
        with pytest.raises(RuntimeError, match=r"must be \[2, 1\]"):
            _ops.perturb_points_(out, theta, d1, torch.ones(2, device=DEV), off, *none5, False)
        with pytest.raises(RuntimeError, match="share memory"):
            _ops.perturb_points_(out, out[1], d1, c, off, *none5, False)
        with pytest.raises(RuntimeError, match="share memory"):
            _ops.perturb_points_(out, theta, out[:1], c, off, *none5, False)
        with pytest.raises(RuntimeError, match="contiguous"):
            _ops.perturb_points_(torch.zeros(4, 2, device=DEV).T, theta, d1, c, off, *none5,
                                 False)
        loc = torch.zeros(2, 3, device=DEV)
        with pytest.raises(RuntimeError, match="local needs"):
            _ops.perturb_points_(out, theta, d1, c, off, loc, None, None, None, None, False)
        with pytest.raises(RuntimeError, match="local must be"):
            _ops.perturb_points_(out, theta, d1, c, off, torch.zeros(3, device=DEV),
                                 torch.ones(2, 1, device=DEV), _t([0], DEV), _t([3], DEV),
                                 _t([0], DEV), False)
        with pytest.raises(RuntimeError, match=r"must be \[2, 1\]"):
            _ops.perturb_points_(out, theta, d1, c, off, loc, torch.ones(1, device=DEV),
                                 _t([0], DEV), _t([3], DEV), _t([0], DEV), False)
        with pytest.raises(RuntimeError, match="share memory"):
            _ops.perturb_points_(out, theta, d1, c, off, out, torch.ones(2, 1, device=DEV),
                                 _t([0], DEV), _t([3], DEV), _t([0], DEV), False)

    def test_multi_gpu_device_mismatch(self):
        if torch.cuda.device_count() < 2:
            pytest.skip("needs two GPUs")
        x = torch.zeros(4, device="cuda:0")
        with pytest.raises(RuntimeError, match="is on cuda:1"):
            _ops.sub_(x, torch.zeros(4, device="cuda:1"))
