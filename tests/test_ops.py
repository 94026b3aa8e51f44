"""Every op on every available backend against the float64 oracle, on ragged layouts."""

import pytest
import torch

from mtlsam_ext import ops
from tests.layouts import LAYOUTS, offsets_of, sampled_of
from tests.oracles import ops as oracle
from tests.tolerances import DTYPES, ELEMENTWISE, REDUCE, assert_reduction_close


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


def _data(n, dtype, seed, k=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (k, n)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_segment_sumsq(backend, layout, dtype, adaptive):
    lengths = LAYOUTS[layout]
    offs = offsets_of(lengths)
    x = _data(offs[-1], dtype, 1)
    scale = _data(offs[-1], dtype, 2) if adaptive else None
    got = ops.segment_sumsq(x, _t(offs), scale, backend=backend)
    want = oracle.segment_sumsq(x, offs, scale)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, **REDUCE[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_gl_layer_stats(backend, layout, dtype, adaptive):
    lengths = LAYOUTS[layout]
    n = sum(lengths)
    table = sampled_of(lengths)
    m = sum(t[1] for t in table)
    k = 3
    g0 = _data(n, dtype, 3)
    local = _data(m, dtype, 4, k)
    scale = _data(n, dtype, 5) if adaptive else None
    st, ln, ls = (_t([t[j] for t in table]) for j in range(3))
    dots, sq = ops.gl_layer_stats(g0, local, st, ln, ls, scale, backend=backend)
    want_d, want_q = oracle.gl_layer_stats(g0, local, table, scale)
    g0_sq = oracle.gl_layer_stats(g0, g0.unsqueeze(0).expand(1, -1).contiguous(),
                                  [(s, n, s) for s, n, _ in table], scale)[1]
    assert_reduction_close(dots, want_d, (g0_sq * want_q).sqrt(), dtype)
    assert_reduction_close(sq, want_q, want_q, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_local", [False, True])
def test_mix_perturb_and_restore(backend, layout, dtype, adaptive, with_local):
    lengths = LAYOUTS[layout]
    offs = offsets_of(lengths)
    n = offs[-1]
    theta = _data(n, dtype, 6)
    original = theta.clone()
    g0 = _data(n, dtype, 7)
    coef = torch.linspace(0.01, 0.2, len(lengths), dtype=torch.float64)
    coef_acc = coef.to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw, table, local_row, lcoef = {}, None, None, None
    if with_local:
        table = sampled_of(lengths)
        m = sum(t[1] for t in table)
        local_row = _data(m, dtype, 8)
        lcoef = torch.linspace(-0.1, 0.3, len(table), dtype=coef_acc.dtype)
        kw = dict(local=local_row, local_coef=lcoef, starts=_t([t[0] for t in table]),
                  lengths=_t([t[1] for t in table]), local_starts=_t([t[2] for t in table]))
    backup = torch.empty_like(theta)
    ops.mix_perturb_(theta, backup, g0, coef_acc, _t(offs), adaptive=adaptive, backend=backend,
                     **kw)
    assert torch.equal(backup, original)
    want = oracle.perturbed(original, g0, coef_acc.tolist(), offs, local_row,
                            None if lcoef is None else lcoef.tolist(), table, adaptive)
    torch.testing.assert_close(theta.double(), want, **ELEMENTWISE[dtype])
    first = theta.clone()
    # Rebuilding from the backup (no restore in between) gives the same bits.
    theta.fill_(123.0)
    ops.mix_perturb_(theta, backup, g0, coef_acc, _t(offs), adaptive=adaptive, save_backup=False,
                     backend=backend, **kw)
    assert torch.equal(theta, first)
    ops.restore_(theta, backup, backend=backend)
    assert torch.equal(theta, original)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("shape", ["gl", "fmtl"])
def test_perturb_points(backend, layout, dtype, adaptive, shape):
    """All K points in one call: row i equals the oracle's perturbed point of task i and,
    bit for bit, what mix_perturb_ writes into the parameters for task i."""
    lengths = LAYOUTS[layout]
    offs = offsets_of(lengths)
    n, k = offs[-1], 3
    theta = _data(n, dtype, 11)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = torch.linspace(-0.2, 0.3, k * len(lengths), dtype=acc).reshape(k, len(lengths))
    kw, table, local = {}, None, None
    if shape == "gl":  # one direction g0, per-task local rows on the sampled segments
        dirs = _data(n, dtype, 12).unsqueeze(0)
        table = sampled_of(lengths)
        local = _data(sum(t[1] for t in table), dtype, 13, k)
        lcoefs = torch.linspace(0.1, -0.4, k * len(table), dtype=acc).reshape(k, len(table))
        kw = dict(local=local, local_coefs=lcoefs, starts=_t([t[0] for t in table]),
                  lengths=_t([t[1] for t in table]), local_starts=_t([t[2] for t in table]))
    else:  # F-MTL: one direction per task, one coefficient per task
        dirs = _data(n, dtype, 12, k)
        offs = [0, n]
        coefs = coefs[:, :1]
    out = torch.full((k, n), 7.0, dtype=dtype)
    before = theta.clone()
    ops.perturb_points_(out, theta, dirs, coefs, _t(offs), adaptive=adaptive, backend=backend,
                        **kw)
    assert torch.equal(theta, before)
    for i in range(k):
        d = dirs[0 if dirs.shape[0] == 1 else i]
        row_kw = {} if shape == "fmtl" else dict(
            local=local[i], local_coef=kw["local_coefs"][i], starts=kw["starts"],
            lengths=kw["lengths"], local_starts=kw["local_starts"])
        want = oracle.perturbed(before, d, coefs[i].tolist(), offs,
                                None if local is None else local[i],
                                None if local is None else kw["local_coefs"][i].tolist(), table,
                                adaptive)
        torch.testing.assert_close(out[i].double(), want, **ELEMENTWISE[dtype])
        single = theta.clone()
        ops.mix_perturb_(single, torch.empty_like(single), d, coefs[i], _t(offs),
                         adaptive=adaptive, backend=backend, **row_kw)
        assert torch.equal(out[i], single)


@pytest.mark.parametrize("dtype", DTYPES)
# K = 7, 9, 10: every register-tile remainder of the CPU kernel (tiles of 4 rows, 2 x 4 blocks).
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (7, 1001), (9, 35), (10, 4099), (2, 0)])
def test_gram(backend, dtype, shape):
    rows = _data(shape[1], dtype, 9, shape[0])
    got = ops.gram(rows, backend=backend)
    want = oracle.gram(rows)
    d = want.diagonal().sqrt()
    assert_reduction_close(got, want, d[:, None] * d[None, :], dtype)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_segment_gram(backend, layout, dtype, k):
    offs = offsets_of(LAYOUTS[layout])
    rows = _data(offs[-1], dtype, 16, k)
    got = ops.segment_gram(rows, _t(offs), backend=backend)
    want = oracle.segment_gram(rows, offs)
    assert got.shape == (len(offs) - 1, k, k)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    d = want.diagonal(dim1=1, dim2=2).sqrt()
    assert_reduction_close(got, want, d[:, :, None] * d[:, None, :], dtype)
    assert torch.equal(got, got.transpose(1, 2))
    # Summed over segments it is the Gram of the whole rows.
    g = want.sum(0)
    dg = g.diagonal().sqrt()
    assert_reduction_close(got.double().sum(0), g, dg[:, None] * dg[None, :], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (10, 4099)])
def test_combine(backend, dtype, shape):
    rows = _data(shape[1], dtype, 10, shape[0])
    w = torch.linspace(-1, 2, shape[0], dtype=torch.float64)
    out = torch.empty(shape[1], dtype=dtype)
    ops.combine_(out, rows, w, backend=backend)
    torch.testing.assert_close(out.double(), oracle.combine(rows, w), **ELEMENTWISE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (4, 4099)])
def test_flat_gram(backend, dtype, shape):
    sam = _data(shape[1], dtype, 14, shape[0])
    loss = _data(shape[1], dtype, 15, shape[0])
    flat = (sam.double() - loss.double()).to(dtype)  # the stored flat rows
    g = ops.flat_gram_(sam, loss, backend=backend)
    torch.testing.assert_close(sam.double(), flat.double(), **ELEMENTWISE[dtype])
    want = oracle.gram(sam)  # Gram of the rows as stored
    d = want.diagonal().sqrt()
    assert_reduction_close(g, want, d[:, None] * d[None, :], dtype)
    assert torch.equal(g, g.T)


def test_combine_appending_zero_rows_is_exact(backend):
    rows = _data(513, torch.float32, 11, 3)
    w = torch.tensor([0.3, -1.2, 0.7])
    a = torch.empty(513)
    ops.combine_(a, rows, w, backend=backend)
    b = torch.empty(513)
    ops.combine_(b, torch.cat([rows, torch.zeros(2, 513)]), torch.cat([w, torch.ones(2)]),
                 backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sub(backend, dtype):
    a = _data(100, dtype, 12, 2)
    b = _data(100, dtype, 13, 2)
    want = a.double() - b.double()
    ops.sub_(a, b, backend=backend)
    torch.testing.assert_close(a.double(), want, **ELEMENTWISE[dtype])


def test_offsets_past_2_31_by_arithmetic():
    """Segment tables are int64: offsets beyond 2^31 are representable and validated."""
    big = 2**31 + 5
    off = torch.tensor([0, 2**31, big], dtype=torch.int64)
    from mtlsam_ext.ops import validate

    validate.offsets("offsets", off, big)
    with pytest.raises(ValueError, match="end at"):
        validate.offsets("offsets", off, big - 1)


class TestBadArguments:
    def test_not_flat(self):
        with pytest.raises(ValueError, match="1-D"):
            ops.segment_sumsq(torch.zeros(2, 2), _t([0, 4]))

    def test_offsets_do_not_cover(self):
        with pytest.raises(ValueError, match="end at 5"):
            ops.segment_sumsq(torch.zeros(5), _t([0, 4]))

    def test_offsets_decreasing(self):
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.segment_sumsq(torch.zeros(5), _t([0, 3, 2, 5]))

    def test_offsets_dtype(self):
        with pytest.raises(ValueError, match="int64"):
            ops.segment_sumsq(torch.zeros(5), torch.tensor([0, 5], dtype=torch.int32))

    def test_integer_buffer(self):
        with pytest.raises(ValueError, match="float"):
            ops.segment_sumsq(torch.zeros(5, dtype=torch.int32), _t([0, 5]))

    def test_non_contiguous(self):
        with pytest.raises(ValueError, match="contiguous"):
            ops.segment_sumsq(torch.zeros(10)[::2], _t([0, 5]))

    def test_backup_mismatch(self):
        with pytest.raises(ValueError, match="dtype"):
            ops.mix_perturb_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4),
                             torch.ones(1), _t([0, 4]))

    def test_coef_length(self):
        with pytest.raises(ValueError, match="one value per segment"):
            ops.mix_perturb_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.ones(2),
                             _t([0, 4]))

    def test_sampled_out_of_range(self):
        with pytest.raises(ValueError, match="past the flat buffer"):
            ops.gl_layer_stats(torch.zeros(4), torch.zeros(2, 4), _t([2]), _t([3]), _t([0]))

    def test_perturb_points_shapes(self):
        out, theta = torch.zeros(3, 4), torch.zeros(4)
        off = _t([0, 4])
        with pytest.raises(ValueError, match="coefs must be"):
            ops.perturb_points_(out, theta, torch.zeros(1, 4), torch.ones(2, 1), off)
        with pytest.raises(ValueError, match="directions must be"):
            ops.perturb_points_(out, theta, torch.zeros(2, 4), torch.ones(3, 1), off)
        with pytest.raises(ValueError, match="theta must be"):
            ops.perturb_points_(out, torch.zeros(5), torch.zeros(1, 4), torch.ones(3, 1), off)
        with pytest.raises(ValueError, match="local needs"):
            ops.perturb_points_(out, theta, torch.zeros(1, 4), torch.ones(3, 1), off,
                                local=torch.zeros(3, 2))
        assert torch.equal(out, torch.zeros(3, 4))

    def test_combine_weights(self):
        with pytest.raises(ValueError, match="weights"):
            ops.combine_(torch.zeros(4), torch.zeros(2, 4), torch.ones(3))

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend"):
            ops.gram(torch.zeros(2, 2), backend="cuda")

    def test_unavailable_backend_is_an_error(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter allows triton on CPU
        with pytest.raises(RuntimeError, match="triton"):
            ops.gram(torch.zeros(2, 2), backend="triton")


def test_reference_takes_cpu_tables_with_data_elsewhere():
    """The flat-buffer module keeps its segment tables on the CPU whatever the parameters'
    device; the pure-torch backend must accept them with GPU data (torch's indexing ops refuse
    to mix devices). "meta" tensors stand in for a GPU: the same device checks run."""
    from mtlsam_ext.kernels import torch_ref

    dev = torch.device("meta")
    off, st, ln, ls = _t([0, 4, 4, 10]), _t([0, 6]), _t([3, 4]), _t([0, 3])
    x, g = torch.empty(10, device=dev), torch.empty(10, device=dev)
    rows, local = torch.empty(3, 10, device=dev), torch.empty(3, 7, device=dev)
    assert torch_ref.segment_sumsq(x, off, g).shape == (3,)
    assert torch_ref.segment_sumsq(x, off).device == dev
    torch_ref.gl_layer_stats(x, local, st, ln, ls, g)
    torch_ref.mix_perturb_(x, torch.empty_like(x), g, torch.ones(3), off, local[0],
                           torch.ones(2), st, ln, ls, adaptive=True)
    torch_ref.perturb_points_(torch.empty(3, 10, device=dev), x, rows, torch.ones(3, 3), off)
    assert torch_ref.segment_gram(rows, off).shape == (3, 3, 3)
    torch_ref.combine_(torch.empty(10, device=dev), rows, torch.ones(3))
