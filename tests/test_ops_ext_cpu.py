"""The compiled CPU kernels beyond the shared op tests: error no worse than the pure-torch
path's, determinism across thread counts, and the C++ argument checks themselves."""

import pytest
import torch

from mtlsam_ext import ops
from tests.layouts import LAYOUTS, offsets_of, sampled_of
from tests.oracles import ops as oracle
from tests.tolerances import DTYPES, REDUCE

pytestmark = pytest.mark.skipif("ext" not in ops.available_backends("cpu"),
                                reason="compiled CPU extension not built")


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _run_all(backend, dtype, lengths):
    """Every op once on a fixed input; returns the list of outputs."""
    offs = offsets_of(lengths)
    n = offs[-1]
    table = sampled_of(lengths)
    m = sum(t[1] for t in table)
    x, scale, g0 = _data(n, dtype, 1), _data(n, dtype, 2), _data(n, dtype, 3)
    local = _data((3, m), dtype, 4)
    st, ln, ls = (_t([t[j] for t in table]) for j in range(3))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.linspace(0.1, 0.3, len(lengths), dtype=acc)
    lcoef = torch.linspace(-0.2, 0.2, len(table), dtype=acc)
    theta, backup = x.clone(), torch.empty_like(x)
    ops.mix_perturb_(theta, backup, g0, coef, _t(offs), local[1].contiguous(), lcoef, st, ln, ls,
                     adaptive=True, backend=backend)
    rows = _data((4, n), dtype, 5)
    out = torch.empty(n, dtype=dtype)
    ops.combine_(out, rows, torch.tensor([0.5, -1.0, 2.0, 0.25]), backend=backend)
    return [ops.segment_sumsq(x, _t(offs), scale, backend=backend),
            *ops.gl_layer_stats(g0, local, st, ln, ls, scale, backend=backend),
            theta, ops.gram(rows, backend=backend), out]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["ragged", "long", "many_tiny"])
def test_same_bits_for_any_thread_count(dtype, layout):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all("ext", dtype, LAYOUTS[layout] * 7)
        torch.set_num_threads(2)
        two = _run_all("ext", dtype, LAYOUTS[layout] * 7)
        again = _run_all("ext", dtype, LAYOUTS[layout] * 7)
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_at_most_twice_the_reference_error(dtype):
    """Issue rule: |ext - f64| <= 2 |torch - f64| + atol, for every reduction output."""
    lengths = [1, 4099, 7, 20000, 3]
    ext = _run_all("ext", dtype, lengths)
    ref = _run_all("torch", dtype, lengths)
    offs = offsets_of(lengths)
    x, scale = _data(offs[-1], dtype, 1), _data(offs[-1], dtype, 2)
    exact = oracle.segment_sumsq(x, offs, scale)
    atol = REDUCE[dtype]["atol"] * float(exact.abs().max())
    err_ext = (ext[0].double() - exact).abs()
    err_ref = (ref[0].double() - exact).abs()
    assert bool((err_ext <= 2 * err_ref + atol).all())
    rows = _data((4, offs[-1]), dtype, 5)
    g_exact = oracle.gram(rows)
    atol = REDUCE[dtype]["atol"] * float(g_exact.abs().max())
    assert bool(((ext[4].double() - g_exact).abs()
                 <= 2 * (ref[4].double() - g_exact).abs() + atol).all())


def test_elementwise_ops_match_the_reference_bit_for_bit():
    """mix_perturb_ and combine_ use the reference's operation order: same bits in fp32."""
    ext = _run_all("ext", torch.float32, LAYOUTS["ragged"])
    ref = _run_all("torch", torch.float32, LAYOUTS["ragged"])
    assert torch.equal(ext[3], ref[3])
    assert torch.equal(ext[5], ref[5])


class TestCppChecks:
    """Call the registered ops directly, bypassing the Python validation layer."""

    op = torch.ops.mtlsam

    def test_dtype_mismatch(self):
        with pytest.raises(RuntimeError, match="backup has dtype"):
            self.op.restore_(torch.zeros(3), torch.zeros(3, dtype=torch.float64))

    def test_offsets_bounds(self):
        with pytest.raises(RuntimeError, match="end at 5"):
            self.op.segment_sumsq(torch.zeros(5), _t([0, 4]), None)

    def test_offsets_int32(self):
        with pytest.raises(RuntimeError, match="int64"):
            self.op.segment_sumsq(torch.zeros(5), torch.tensor([0, 5], dtype=torch.int32), None)

    def test_not_contiguous(self):
        with pytest.raises(RuntimeError, match="contiguous"):
            self.op.segment_sumsq(torch.zeros(10)[::2], _t([0, 5]), None)

    def test_sampled_overlap(self):
        with pytest.raises(RuntimeError, match="sorted by start"):
            self.op.gl_layer_stats(torch.zeros(8), torch.zeros(1, 8), _t([0, 2]), _t([4, 2]),
                                   _t([0, 4]), None)

    def test_sampled_past_local(self):
        with pytest.raises(RuntimeError, match="local-gradient buffer"):
            self.op.gl_layer_stats(torch.zeros(8), torch.zeros(1, 3), _t([0]), _t([4]), _t([0]),
                                   None)

    def test_coef_count(self):
        with pytest.raises(RuntimeError, match="one value per segment"):
            self.op.mix_perturb_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.ones(2),
                                 _t([0, 4]), None, None, None, None, None, False, True)

    def test_written_buffer_sharing_memory(self):
        # the element-wise loops are compiled assuming separate buffers
        x = torch.zeros(8)
        args = (torch.ones(1), _t([0, 4]), None, None, None, None, None, False)
        with pytest.raises(RuntimeError, match="param and backup share memory"):
            self.op.mix_perturb_(x[:4], x[2:6], torch.zeros(4), *args, True)
        with pytest.raises(RuntimeError, match="param and g0 share memory"):
            self.op.mix_perturb_(x[:4], torch.zeros(4), x[:4], *args, False)
        with pytest.raises(RuntimeError, match="backup and g0 share memory"):
            self.op.mix_perturb_(torch.zeros(4), x[4:], x[3:7], *args, True)
        # a backup that is only read may share memory with g0
        self.op.mix_perturb_(torch.zeros(4), x[4:], x[4:], *args, False)

    def test_points_written_buffer_sharing_memory(self):
        x = torch.zeros(2, 8)
        off = _t([0, 4])
        with pytest.raises(RuntimeError, match="out and theta share memory"):
            self.op.perturb_points_(x.view(4, 4)[:2], x.view(-1)[4:8], torch.zeros(1, 4),
                                    torch.ones(2, 1), off, None, None, None, None, None, False)
        with pytest.raises(RuntimeError, match="out and directions share memory"):
            self.op.perturb_points_(x.view(4, 4)[:2], torch.zeros(4), x.view(4, 4)[1:3],
                                    torch.ones(2, 1), off, None, None, None, None, None, False)
        with pytest.raises(RuntimeError, match="out and local share memory"):
            self.op.perturb_points_(x.view(4, 4)[:2], torch.zeros(4), torch.zeros(1, 4),
                                    torch.ones(2, 1), off, x.view(4, 4)[:2], torch.ones(2, 1),
                                    _t([0]), _t([2]), _t([0]), False)

    def test_points_shapes(self):
        args = (_t([0, 4]), None, None, None, None, None, False)
        with pytest.raises(RuntimeError, match=r"directions must be contiguous \[1, 4\]"):
            self.op.perturb_points_(torch.zeros(2, 4), torch.zeros(4), torch.zeros(3, 4),
                                    torch.ones(2, 1), *args)
        with pytest.raises(RuntimeError, match=r"coefs must be \[2, 1\]"):
            self.op.perturb_points_(torch.zeros(2, 4), torch.zeros(4), torch.zeros(1, 4),
                                    torch.ones(1, 1), *args)
        with pytest.raises(RuntimeError, match="theta must be a flat"):
            self.op.perturb_points_(torch.zeros(2, 4), torch.zeros(5), torch.zeros(1, 4),
                                    torch.ones(2, 1), _t([0, 4]), None, None, None, None, None,
                                    False)
        with pytest.raises(RuntimeError, match=r"local_coefs must be \[2, 1\]"):
            self.op.perturb_points_(torch.zeros(2, 4), torch.zeros(4), torch.zeros(1, 4),
                                    torch.ones(2, 1), _t([0, 4]), torch.zeros(2, 2),
                                    torch.ones(2, 2), _t([0]), _t([2]), _t([0]), False)

    def test_combine_out_sharing_memory_with_rows(self):
        # fp32/fp64 accumulate in out itself
        rows = torch.ones(3, 4)
        with pytest.raises(RuntimeError, match="out and rows share memory"):
            self.op.combine_(rows[1], rows, torch.ones(3))

    def test_combine_shape(self):
        with pytest.raises(RuntimeError, match="columns"):
            self.op.combine_(torch.zeros(4), torch.zeros(2, 5), torch.ones(2))

    def test_empty_inputs(self):
        assert self.op.segment_sumsq(torch.zeros(0), _t([0, 0, 0]), None).tolist() == [0.0, 0.0]
        assert self.op.gram(torch.zeros(3, 0)).abs().sum() == 0
        out = torch.zeros(0)
        self.op.combine_(out, torch.zeros(2, 0), torch.ones(2))


def test_opcheck_schemas_and_fakes():
    """torch.library.opcheck: schema (mutation annotations), fake kernels, dispatcher use."""
    import mtlsam_ext.kernels.ext  # noqa: F401  (registers the fakes)

    x = _data(37, torch.float32, 20)
    off = _t([0, 5, 5, 37])
    rows = _data((3, 37), torch.float32, 21)
    st, ln, ls = _t([0, 10]), _t([5, 7]), _t([0, 5])
    local = _data((2, 12), torch.float32, 22)
    cases = [
        (torch.ops.mtlsam.segment_sumsq.default, (x, off, None)),
        (torch.ops.mtlsam.gl_layer_stats.default, (x, local, st, ln, ls, x.abs())),
        (torch.ops.mtlsam.mix_perturb_.default,
         (x.clone(), torch.empty(37), x, torch.ones(3), off, local[0].contiguous(),
          torch.ones(2), st, ln, ls, True, True)),
        (torch.ops.mtlsam.perturb_points_.default,
         (torch.empty(2, 37), x, rows[:2], torch.ones(2, 3), off, local, torch.ones(2, 2),
          st, ln, ls, True)),
        (torch.ops.mtlsam.restore_.default, (x.clone(), x)),
        (torch.ops.mtlsam.gram.default, (rows,)),
        (torch.ops.mtlsam.combine_.default, (torch.empty(37), rows, torch.ones(3))),
        (torch.ops.mtlsam.sub_.default, (rows.clone(), rows)),
        (torch.ops.mtlsam.flat_gram_.default, (rows.clone(), rows * 0.5)),
        (torch.ops.mtlsam.segment_gram.default, (rows, off)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_flat_gram_equals_sub_then_gram(dtype):
    """The fused pass gives the bits of sub_ followed by gram, on any thread count."""
    sam, loss = _data((3, 9000), dtype, 30), _data((3, 9000), dtype, 31)
    a = sam.clone()
    ops.sub_(a, loss, backend="ext")
    want = ops.gram(a, backend="ext")
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            b = sam.clone()
            got = ops.flat_gram_(b, loss, backend="ext")
            assert torch.equal(b, a) and torch.equal(got, want)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_gram_is_thread_count_independent(dtype):
    rows = _data((3, 20000), dtype, 32)
    off = _t([0, 1, 9000, 9000, 20000])
    old = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(ops.segment_gram(rows, off, backend="ext"))
        assert torch.equal(got[0], got[1])
    finally:
        torch.set_num_threads(old)


def _every_op(dtype):
    """_run_all on two layouts plus the two Gram ops not in it."""
    out = _run_all("ext", dtype, LAYOUTS["ragged"] * 7) + _run_all("ext", dtype,
                                                                    LAYOUTS["long"])
    rows, loss = _data((3, 20000), dtype, 33), _data((3, 20000), dtype, 34)
    out.append(ops.segment_gram(rows, _t([0, 1, 9000, 9000, 20000]), backend="ext"))
    out.append(ops.flat_gram_(rows, loss, backend="ext"))
    # mix_perturb_'s other loops (the one above saves the backup, mixes and is adaptive)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    backup, d, local = _data(20000, dtype, 35), _data(20000, dtype, 36), _data(9000, dtype, 37)
    coef, lcoef = torch.tensor([0.3, -0.7], dtype=acc), torch.tensor([0.45], dtype=acc)
    sampled = (_t([9000]), _t([9000]), _t([0]))
    for use_local, adaptive in ((False, False), (True, False), (False, True)):
        theta = torch.empty_like(backup)
        ops.mix_perturb_(theta, backup, d, coef, _t([0, 9000, 20000]),
                         local if use_local else None, lcoef if use_local else None,
                         *(sampled if use_local else (None, None, None)), adaptive=adaptive,
                         save_backup=False, backend="ext")
        out.append(theta)
    # all K points in one call (K direction rows; one direction with per-task local rows)
    pts = torch.empty(3, 20000, dtype=dtype)
    ops.perturb_points_(pts, backup, _data((3, 20000), dtype, 38),
                        torch.tensor([[0.3, -0.7], [0.1, 0.2], [-0.5, 0.05]], dtype=acc),
                        _t([0, 9000, 20000]), adaptive=True, backend="ext")
    out.append(pts.clone())
    ops.perturb_points_(pts, backup, d.unsqueeze(0), coef.expand(3, 2).contiguous(),
                        _t([0, 9000, 20000]), _data((3, 9000), dtype, 39),
                        torch.tensor([[0.45], [-0.2], [0.7]], dtype=acc), *sampled,
                        backend="ext")
    out.append(pts)
    return out


_BASELINE_RUN = """
import sys, torch
from tests.test_ops_ext_cpu import _every_op
from tests.tolerances import DTYPES
import mtlsam_ext._C as c
assert c.cpu_isa() == "baseline", c.cpu_isa()
torch.save({str(d): _every_op(d) for d in DTYPES}, sys.argv[1])
"""


def test_same_bits_on_every_instruction_set(tmp_path):
    """The AVX2 reductions and the x86-64 baseline ones (MTLSAM_CPU_ISA=baseline, run in a
    child process because the choice is made once per process) give the same bits: one
    wheel, one result, whatever CPU it lands on."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mtlsam_ext._C as c

    if c.cpu_isa() != "avx2":
        pytest.skip(f"this CPU runs the {c.cpu_isa()} path only")
    path = tmp_path / "baseline.pt"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MTLSAM_CPU_ISA="baseline", PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", _BASELINE_RUN, str(path)], env=env, check=True,
                   cwd=root, timeout=300)
    baseline = torch.load(path)
    for dtype in DTYPES:
        for a, b in zip(_every_op(dtype), baseline[str(dtype)], strict=True):
            assert torch.equal(a, b), dtype


def _fp16_patterns() -> torch.Tensor:
    """[3, 30720] float16 rows holding every finite positive float16: the normals in row 0,
    the subnormals and zero tiled in row 1, half of each with random signs in row 2."""
    normal = torch.arange(0x0400, 0x7C00, dtype=torch.int32)  # 30720 patterns
    sub = torch.arange(0, 0x0400, dtype=torch.int32).repeat(30)
    g = torch.Generator().manual_seed(5)
    mixed = torch.cat([normal[torch.randperm(30720, generator=g)[:15360]], sub[:15360]])
    mixed = mixed | (torch.randint(0, 2, (30720,), generator=g, dtype=torch.int32) << 15)
    return torch.stack([normal, sub, mixed]).to(torch.int16).view(torch.float16).contiguous()


_FP16_TABLE = ([0, 10000], [7000, 20720], [0, 7000])  # starts, lengths, local starts


def _fp16_every_value():
    """The fp16 Gram and gl statistics over :func:`_fp16_patterns`, read in registers
    (widened by F16C or by the portable conversion)."""
    rows = _fp16_patterns()
    st, ln, ls = (_t(v) for v in _FP16_TABLE)
    return [ops.gram(rows, backend="ext"),
            *ops.gl_layer_stats(rows[2].contiguous(), rows[:, :27720].contiguous(), st, ln, ls,
                                None, backend="ext")]


_FP16_BASELINE_RUN = """
import sys, torch
from tests.test_ops_ext_cpu import _fp16_every_value
import mtlsam_ext._C as c
assert c.cpu_isa() == "baseline", c.cpu_isa()
torch.save(_fp16_every_value(), sys.argv[1])
"""


def test_fp16_every_finite_value_widens_exactly(tmp_path):
    """Every finite float16 (subnormals included) read by the in-register widening: the Gram
    and gl statistics equal float64 sums of the exact values to fp32 rounding, and the F16C
    path gives the same bits as the portable one (a child process on the baseline path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mtlsam_ext._C as c

    gram, dots, sq = _fp16_every_value()
    r64 = _fp16_patterns().double()  # torch's conversion: exact

    def close(got, a, b):  # fp32 sums of n products: within 2e-6 of sum |a_j b_j|
        assert (got.double() - a @ b).abs().max() <= 2e-6 * (a.abs() @ b.abs()).max()
        assert ((got.double() - a @ b).abs() <= 2e-6 * (a.abs() @ b.abs())).all()

    close(gram, r64, r64.T)
    g0, loc = r64[2], r64[:, :27720]
    for i in range(3):
        for p, (s, n, ls) in enumerate(zip(*_FP16_TABLE)):
            close(dots[i, p], loc[i, ls:ls + n], g0[s:s + n])
            close(sq[i, p], loc[i, ls:ls + n], loc[i, ls:ls + n])
    if c.cpu_isa() != "avx2":
        pytest.skip(f"this CPU runs the {c.cpu_isa()} path only")
    path = tmp_path / "fp16.pt"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MTLSAM_CPU_ISA="baseline", PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", _FP16_BASELINE_RUN, str(path)], env=env,
                   check=True, cwd=root, timeout=300)
    for a, b in zip((gram, dots, sq), torch.load(path), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_16bit_sums_equal_the_widened_float_sums_bit_for_bit(dtype, scaled):
    """16-bit segment_sumsq reads its data in place, widened in registers, with the float
    path's lanes and tree: the same bits as summing the exactly widened float copy (ragged
    segments, tails shorter than the 32 lanes, more than one chunk per segment)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300_017, generator=g) * 5).to(dtype)
    t = torch.randn(300_017, generator=g).to(dtype) if scaled else None
    off = _t([0, 1, 33, 33, 100_000, 300_017])
    got = ops.segment_sumsq(x, off, t, backend="ext")
    want = ops.segment_sumsq(x.float(), off, None if t is None else t.float(), backend="ext")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_sub_rounds_like_the_reference(dtype):
    """sub_ and flat_gram_ subtract 16-bit rows in registers: round to nearest even exactly as
    the float difference converted by torch (ties, overflow to inf, inf - inf = NaN)."""
    g = torch.Generator().manual_seed(9)
    big = torch.finfo(dtype).max
    a = (torch.randn(3, 4099, generator=g) * 4).to(dtype)
    b = (torch.randn(3, 4099, generator=g) * 4).to(dtype)
    a[0, :4] = torch.tensor([big, float("inf"), float("nan"), -big]).to(dtype)
    b[0, :4] = torch.tensor([-big, float("inf"), 1.0, big]).to(dtype)
    want = (a.float() - b.float()).to(dtype)
    for op in ("sub_", "flat_gram_"):
        got = a.clone()
        getattr(ops, op)(got, b, backend="ext")
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), op


def test_perturb_points_is_one_fused_call(monkeypatch):
    """The ops layer takes the fused kernel (no per-row mix_perturb_), with the bits of the
    per-row calls; the per-row fallback stays for a build without the op."""
    from mtlsam_ext.kernels import ext

    lengths = LAYOUTS["ragged"]
    offs = offsets_of(lengths)
    n, k = offs[-1], 4
    theta, dirs = _data(n, torch.float32, 40), _data((k, n), torch.float32, 41)
    coefs = torch.linspace(-0.3, 0.3, k * len(lengths)).reshape(k, -1)
    want = torch.empty(k, n)
    for i in range(k):
        ops.mix_perturb_(want[i], theta, dirs[i], coefs[i], _t(offs), save_backup=False,
                         backend="ext")

    def refuse(*a, **kw):
        raise AssertionError("per-row mix_perturb_ called")

    monkeypatch.setattr(ext, "mix_perturb_", refuse)
    got = torch.empty(k, n)
    ops.perturb_points_(got, theta, dirs, coefs, _t(offs), backend="ext")
    assert torch.equal(got, want)
    monkeypatch.undo()
    monkeypatch.delattr(ext, "perturb_points_")
    again = torch.empty(k, n)
    ops.perturb_points_(again, theta, dirs, coefs, _t(offs), backend="ext")
    assert torch.equal(again, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 4, 5, 9])
def test_combine_equals_the_reference_bit_for_bit(dtype, k):
    """Rows added in groups of four per pass over the accumulator, in row order: the
    reference's sums and roundings (no FMA), for every dtype and a row count on each side of
    a group; signed zeros included (0 + -0 = +0, as the reference's zeros give)."""
    from mtlsam_ext.kernels import torch_ref

    n = 3 * 4096 + 77  # chunks and a ragged tail
    rows = _data((k, n), dtype, 50 + k)
    rows[:, :5] = 0.0  # with k = 1 (weight -1.5): 0 + (-0) = +0 in the reference
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(-1.5, 2.0, k, dtype=acc)
    got, want = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    ops.combine_(got, rows, w, backend="ext")
    torch_ref.combine_(want, rows, w)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.view(bits), want.view(bits))  # (bits: -0.0 == +0.0 as values)


def test_bf16_combine_rounds_ties_and_nan_like_the_reference():
    """The bf16 store rounds in registers: ties to even and infinities kept, as the
    reference's .to(bfloat16); NaN stays NaN (its payload is c10's scalar 0x7FC0, where torch's
    vectorised conversion gives 0xFFFF: NaN bits are not compared)."""
    from mtlsam_ext.kernels import torch_ref

    vals = [1.0, 1.0078125, -1.0, -1.0078125, 3.0, float("nan"), float("inf"), -0.0, 1e-40]
    rows = torch.tensor([vals * 3], dtype=torch.bfloat16)  # 27 columns: vector part and tail
    w = torch.tensor([1.0 + 2.0 ** -8])  # x * w lands halfway between two bf16 values
    got, want = torch.empty(27, dtype=torch.bfloat16), torch.empty(27, dtype=torch.bfloat16)
    ops.combine_(got, rows, w, backend="ext")
    torch_ref.combine_(want, rows, w)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
