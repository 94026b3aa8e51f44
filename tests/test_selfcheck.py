"""The compiled kernels' first-use self-check (mtlsam_ext.ops.selfcheck).

A kernel replaced by a wrong one -- off by a factor, one element wrong, a NaN, an exception --
is caught on first use: backend="auto" warns once, naming the op, and trains with the reference
for that op (the same parameters, bit for bit, as a run with the reference there); an explicit
backend raises ValueError naming the op before anything changes; with MTLSAM_SELFCHECK=0 the
wrong result does reach training (so these tests detect something). The extension's kernels
are replaced at the dispatcher (torch.library CPU implementations of the mtlsam:: ops), the
Triton ones in the kernel module, run on CPU tensors by Triton's interpreter.
"""

import importlib.util
import os
import warnings
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tests.tolerances  # noqa: E402
from mtlsam_ext import MTLSAM, ops  # noqa: E402
from mtlsam_ext.info import selfcheck_table  # noqa: E402
from mtlsam_ext.kernels import torch_ref  # noqa: E402
from mtlsam_ext.ops import core, dispatch, selfcheck  # noqa: E402
from mtlsam_ext.ops import tolerances as package_tolerances  # noqa: E402
from mtlsam_ext.ops.selfcheck import SelfCheckWarning  # noqa: E402
from tests.models import TwoTask  # noqa: E402

CPU = torch.device("cpu")
HAS_EXT = "ext" in ops.available_backends("cpu")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled CPU extension not built")

WRONG = ("factor", "element", "nan", "raise")


def _wrong(result: torch.Tensor, how: str) -> None:
    """Make a correct result wrong in place."""
    if how == "factor":
        result.mul_(1.01)
    elif how == "element":
        result.view(-1)[-1] += 1.0
    elif how == "nan":
        result.view(-1)[-1] = float("nan")
    else:
        raise AssertionError(how)


def _fail(how: str) -> None:
    if how == "raise":
        raise RuntimeError("mtlsam test: this kernel fails")


# -- the extension's CPU kernels replaced at the dispatcher ---------------------------------------

# The kernel to break: (mtlsam:: op, the self-check's op name). segment_sumsq and mix_perturb_
# are broken only in their plain form (no scale, no local rows), which is one op of the check.
EXT_OPS = {"gram": "gram", "segment_sumsq": "segment_sumsq", "mix_perturb_": "mix_perturb_",
           "combine_": "combine_", "flat_gram_": "flat_gram_"}


class ReferenceExt:
    """Every ``mtlsam::`` CPU kernel replaced by the pure-torch reference, one of them (``op``)
    made wrong in the way ``how``: the extension backend then computes exactly what the torch
    backend does, except for that op."""

    def __init__(self) -> None:
        self.op: str | None = None
        self.how: str | None = None
        self.lib = torch.library.Library("mtlsam", "IMPL")
        impls = {
            "segment_sumsq": self.segment_sumsq, "gl_layer_stats": torch_ref.gl_layer_stats,
            "mix_perturb_": self.mix_perturb_, "perturb_points_": torch_ref.perturb_points_,
            "restore_": torch_ref.restore_, "gram": self.gram,
            "segment_gram": torch_ref.segment_gram, "combine_": self.combine_,
            "sub_": torch_ref.sub_, "flat_gram_": self.flat_gram_,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name, fn in impls.items():
                self.lib.impl(name, fn, "CPU")

    def _breaks(self, op: str) -> bool:
        if self.op != op:
            return False
        _fail(self.how)
        return True

    def segment_sumsq(self, x, offsets, scale):
        out = torch_ref.segment_sumsq(x, offsets, scale)
        if scale is None and self._breaks("segment_sumsq"):
            _wrong(out, self.how)
        return out

    def mix_perturb_(self, param, backup, g0, coef, offsets, local, local_coef, starts,
                     lengths, local_starts, adaptive, save_backup):
        torch_ref.mix_perturb_(param, backup, g0, coef, offsets, local, local_coef, starts,
                               lengths, local_starts, adaptive, save_backup)
        if local is None and self._breaks("mix_perturb_"):
            _wrong(param, self.how)

    def gram(self, rows):
        out = torch_ref.gram(rows)
        if self._breaks("gram"):
            _wrong(out, self.how)
        return out

    def combine_(self, out, rows, weights):
        torch_ref.combine_(out, rows, weights)
        if self._breaks("combine_"):
            _wrong(out, self.how)

    def flat_gram_(self, sam, loss):
        out = torch_ref.flat_gram_(sam, loss)
        if self._breaks("flat_gram_"):
            _wrong(out, self.how)
        return out


@pytest.fixture
def reference_ext(monkeypatch):
    """The extension's CPU kernels replaced by the reference (see ReferenceExt); the check's
    verdicts forgotten before and after, so that it checks these kernels, then the real ones."""
    if not HAS_EXT:
        pytest.skip("compiled CPU extension not built")
    monkeypatch.delenv("MTLSAM_SELFCHECK", raising=False)
    monkeypatch.delenv("MTLSAM_BACKEND", raising=False)
    selfcheck.reset()
    kernels = ReferenceExt()
    yield kernels
    kernels.lib._destroy()
    selfcheck.reset()


def _train(backend: str, steps: int = 3) -> tuple[list[torch.Tensor], MTLSAM]:
    """F-MTL with MGDA (every op the issue's example used) for a few steps."""
    m = TwoTask(k=3)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="fmtl",
                 aggregator="mgda", lr=0.05, backend=backend,
                 generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.step(m.losses)
    return [p.detach().clone() for p in m.parameters()], opt


def _selfcheck_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, SelfCheckWarning)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_reference_ext_is_the_torch_backend(reference_ext):
    """The stand-in extension with no op broken passes the check and trains exactly as the
    torch backend (what the fallback comparisons below rely on)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, opt = _train("auto")
    assert opt.info()["backend"] == "ext" and not _selfcheck_warnings(record)
    assert _same(got, _train("torch")[0])


@pytest.mark.parametrize("how", WRONG)
@pytest.mark.parametrize("op", list(EXT_OPS))
def test_auto_falls_back_to_the_reference(reference_ext, op, how):
    reference_ext.op, reference_ext.how = op, how
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, opt = _train("auto")
    messages = _selfcheck_warnings(record)
    assert len(messages) == 1, messages
    assert f"op {EXT_OPS[op]!r} on ext" in messages[0] and "cpu" in messages[0]
    assert "float32" in messages[0]
    assert _same(got, _train("torch")[0])
    fell = opt.info()["selfcheck_fallbacks"]
    assert [(f["op"], f["backend"], f["dtype"]) for f in fell] == [(EXT_OPS[op], "ext",
                                                                    "float32")]
    # once per process: a second optimizer neither warns nor checks again
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert _same(_train("auto", steps=1)[0], _train("torch", steps=1)[0])
    assert not _selfcheck_warnings(again)


@pytest.mark.parametrize("how", WRONG)
@pytest.mark.parametrize("op", list(EXT_OPS))
def test_explicit_backend_raises_before_anything_changes(reference_ext, op, how):
    reference_ext.op, reference_ext.how = op, how
    m = TwoTask(k=3)
    before = m.snapshot()
    with pytest.raises(ValueError, match=f"backend='ext'.*op {EXT_OPS[op]!r} on ext, cpu"):
        MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="fmtl", lr=0.05,
               backend="ext")
    assert _same(m.snapshot(), before)
    # MTLSAM_BACKEND naming the backend is as explicit as the argument
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLSAM_BACKEND", "ext")
        with pytest.raises(ValueError, match=f"MTLSAM_BACKEND='ext'.*op {EXT_OPS[op]!r}"):
            MTLSAM(m.body, torch.optim.SGD, method="fmtl", lr=0.05)


@pytest.mark.parametrize("how", WRONG)
@pytest.mark.parametrize("op", list(EXT_OPS))
def test_without_the_check_the_wrong_kernel_reaches_training(reference_ext, monkeypatch, op,
                                                             how):
    reference_ext.op, reference_ext.how = op, how
    monkeypatch.setenv("MTLSAM_SELFCHECK", "0")
    want = _train("torch")[0]
    if how == "raise":
        with pytest.raises(RuntimeError, match="this kernel fails"):
            _train("auto")
        return
    try:
        got = _train("auto")[0]
    except ValueError:  # a NaN the step's own finiteness check refused
        assert how == "nan"
        return
    assert not _same(got, want)


def test_direct_op_calls_raise_for_an_explicit_backend_and_change_nothing(reference_ext):
    reference_ext.op, reference_ext.how = "mix_perturb_", "element"
    n = 10
    param, backup = torch.arange(n, dtype=torch.float32), torch.zeros(n)
    g0, coef, off = torch.ones(n), torch.tensor([0.5, 0.25]), torch.tensor([0, 4, n])
    before = param.clone(), backup.clone()
    with pytest.raises(ValueError, match="op 'mix_perturb_' on ext"):
        ops.mix_perturb_(param, backup, g0, coef, off, backend="ext")
    assert torch.equal(param, before[0]) and torch.equal(backup, before[1])
    with pytest.raises(ValueError, match="op 'mix_perturb_' on ext"):  # every call, not once
        ops.mix_perturb_(param, backup, g0, coef, off, backend="ext")
    # auto: the reference's result, and one warning
    with pytest.warns(SelfCheckWarning, match="op 'mix_perturb_' on ext"):
        ops.mix_perturb_(param, backup, g0, coef, off)
    want = before[0].clone()
    torch_ref.mix_perturb_(want, torch.empty(n), g0, coef, off)
    assert torch.equal(param, want)
    # another dtype is checked on its own first use
    with pytest.raises(ValueError, match="float64"):
        ops.mix_perturb_(param.double(), backup.double(), g0.double(), coef.double(), off,
                         backend="ext")


# -- once per (op, backend, device, dtype) --------------------------------------------------------

@needs_ext
def test_checked_once_per_op_device_and_dtype_not_per_step(monkeypatch):
    monkeypatch.delenv("MTLSAM_SELFCHECK", raising=False)
    monkeypatch.delenv("MTLSAM_BACKEND", raising=False)
    checked: list[tuple[str, str, torch.dtype]] = []
    real = selfcheck._check_all

    def counting(todo, device, dtype, kernels):
        checked.extend((op, be, dtype) for op, be in todo)
        return real(todo, device, dtype, kernels)

    monkeypatch.setattr(selfcheck, "_check_all", counting)
    selfcheck.reset()
    try:
        for _ in range(2):  # two optimizers, several steps each
            m = TwoTask(k=3)
            opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="gl", lr=0.05)
            for _ in range(3):
                opt.step(m.losses)
        # a direct op call on an already checked dtype, then on a new one
        ops.gram(torch.ones(2, 5))
        ops.gram(torch.ones(2, 5, dtype=torch.float64))
        ops.gram(torch.ones(2, 5, dtype=torch.float64), backend="ext")
        want = [(op, "ext", dt) for dt in (torch.float32, torch.float64)
                for op in selfcheck.OPS]
        assert Counter(checked) == Counter(want)  # each exactly once
    finally:
        selfcheck.reset()


@needs_ext
def test_disabled_check_runs_nothing(monkeypatch):
    monkeypatch.setenv("MTLSAM_SELFCHECK", "0")
    calls = []
    monkeypatch.setattr(selfcheck, "_check_all", lambda *a: calls.append(a))
    selfcheck.reset()
    try:
        _train("auto", steps=1)
        _train("ext", steps=1)
        assert calls == []
    finally:
        selfcheck.reset()


# -- the real kernels pass; the table; the one tolerance table ------------------------------------

@needs_ext
@pytest.mark.parametrize("dtype", package_tolerances.DTYPES)
def test_the_real_cpu_kernels_pass(dtype):
    verdicts = selfcheck.verdicts("ext", CPU, dtype)
    assert set(verdicts) == set(selfcheck.OPS)
    bad = [v.reason() for v in verdicts.values() if not v.ok]
    assert not bad, bad
    assert all(v.ratio <= 0.5 for v in verdicts.values())  # a wide margin, not a near miss


@needs_ext
def test_verdict_table(reference_ext):
    reference_ext.op, reference_ext.how = "gram", "factor"
    table, ok = selfcheck_table(backends=("ext",))
    assert not ok
    gram_row = next(line for line in table.splitlines() if line.strip().startswith("gram "))
    assert gram_row.count("falls back") == 4  # every dtype
    assert "FAILED op 'gram' on ext" in table and "worst error" in table
    combine_row = next(line for line in table.splitlines()
                       if line.strip().startswith("combine_ "))
    assert "falls back" not in combine_row and "(0%)" in combine_row


def test_every_dispatched_op_has_a_case(monkeypatch):
    """Every op name the entry points dispatch on is checked (and the CUDA table's names)."""
    seen = set()
    real = core._k
    monkeypatch.setattr(core, "_k", lambda b, like, op: seen.add(op) or real(b, like, op))
    n, k = 8, 2
    x = torch.zeros(n)
    off = torch.tensor([0, 3, n])
    st, ln, ls = torch.tensor([3]), torch.tensor([5]), torch.tensor([0])
    be = "torch"
    ops.segment_sumsq(x, off, backend=be)
    ops.segment_sumsq(x, off, x, backend=be)
    ops.gl_layer_stats(x, torch.zeros(k, 5), st, ln, ls, backend=be)
    ops.mix_perturb_(x, torch.zeros(n), x, torch.ones(2), off, backend=be)
    ops.mix_perturb_(x, torch.zeros(n), x, torch.ones(2), off, torch.zeros(5), torch.ones(1),
                     st, ln, ls, backend=be)
    out = torch.zeros(k, n)
    ops.perturb_points_(out, x, torch.zeros(1, n), torch.ones(k, 2), off, backend=be)
    ops.perturb_points_(out, x, torch.zeros(1, n), torch.ones(k, 2), off, torch.zeros(k, 5),
                        torch.ones(k, 1), st, ln, ls, backend=be)
    ops.restore_(x, torch.zeros(n), backend=be)
    ops.gram(out, backend=be)
    ops.segment_gram(out, off, backend=be)
    ops.combine_(x, out, torch.ones(k), backend=be)
    ops.flat_gram_(out, torch.zeros(k, n), backend=be)
    ops.sub_(out, torch.zeros(k, n), backend=be)
    assert seen == set(selfcheck.OPS)
    assert set(dispatch.CUDA_AUTO) <= set(selfcheck.OPS)


def test_one_tolerance_table():
    for name in ("REDUCE", "ELEMENTWISE", "DTYPES", "REFERENCE_ULPS"):
        assert getattr(tests.tolerances, name) is getattr(package_tolerances, name)


def test_the_check_leaves_thread_count_and_rng_alone():
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    selfcheck.reset(("restore_",))
    selfcheck.verdicts("torch", CPU, torch.float32)  # nothing compiled: nothing checked
    if HAS_EXT:
        selfcheck.verdicts("ext", CPU, torch.float32)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)


# -- the Triton kernels, through the interpreter --------------------------------------------------

def _interpreted_triton() -> bool:
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return False
    return dispatch._interpreted_triton()


needs_interpreter = pytest.mark.skipif(not _interpreted_triton(),
                                       reason="needs triton and TRITON_INTERPRET=1 (no GPU)")
# (op, how): each way of being wrong once, on ops whose Triton kernel no other op calls
TRITON_CASES = [("combine_", "factor"), ("mix_perturb_", "element"), ("segment_sumsq", "nan"),
                ("combine_", "raise")]


@pytest.fixture(scope="module")
def triton_checked():
    """Every Triton op checked once for float32 (the interpreter takes seconds); the tests
    then forget and re-check only the op they break."""
    if not _interpreted_triton():
        pytest.skip("needs triton and TRITON_INTERPRET=1 (no GPU)")
    verdicts = selfcheck.verdicts("triton", CPU, torch.float32)
    assert all(v.ok for v in verdicts.values()), [v.reason() for v in verdicts.values()
                                                  if not v.ok]
    return verdicts


@pytest.fixture
def broken_triton(triton_checked, monkeypatch):
    """``break_(op, how)``: the Triton kernel of ``op`` wrapped to be wrong, its verdict
    forgotten; "auto" on CPU tensors resolves to Triton (as it does on a GPU)."""
    from mtlsam_ext.kernels import triton_kernels as tk

    monkeypatch.delenv("MTLSAM_SELFCHECK", raising=False)
    monkeypatch.delenv("MTLSAM_BACKEND", raising=False)
    real_available = dispatch._available
    monkeypatch.setattr(dispatch, "_available", lambda d: ("triton", "torch")
                        if d.type == "cpu" else real_available(d))

    originals: dict[str, object] = {}

    def break_(op: str, how: str, replacement=None) -> None:
        real = originals.setdefault(op, getattr(tk, op))

        def wrong(*args, **kwargs):
            plain = (op == "segment_sumsq" and (len(args) < 3 or args[2] is None)) or (
                op == "mix_perturb_" and (len(args) < 6 or args[5] is None)) or op == "combine_"
            if replacement is not None:
                return replacement(*args, **kwargs)
            if plain:
                _fail(how)
            out = real(*args, **kwargs)
            if plain:
                _wrong(out if out is not None else args[0], how)
            return out

        monkeypatch.setattr(tk, op, wrong)
        selfcheck.reset((op,))

    yield break_
    monkeypatch.undo()
    selfcheck.reset(tuple({op for op, _ in TRITON_CASES}))


def _train_small(backend: str) -> list[torch.Tensor]:
    m = TwoTask(k=2, width=8)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="sam", aggregator="mgda",
                 lr=0.05, backend=backend, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.step(m.losses)
    return [p.detach().clone() for p in m.parameters()]


@needs_interpreter
@pytest.mark.parametrize("op,how", TRITON_CASES)
def test_triton_auto_falls_back_to_the_reference(broken_triton, op, how, monkeypatch):
    # what auto promises: this op on the reference, every other op on Triton
    broken_triton(op, how, replacement=getattr(torch_ref, op))
    monkeypatch.setenv("MTLSAM_SELFCHECK", "0")
    selfcheck.reset((op,))
    want = _train_small("auto")
    monkeypatch.delenv("MTLSAM_SELFCHECK")
    broken_triton(op, how)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _train_small("auto")
    messages = _selfcheck_warnings(record)
    assert len(messages) == 1 and f"op {op!r} on triton" in messages[0], messages
    assert "Triton interpreter" in messages[0]
    assert _same(got, want)


@needs_interpreter
@pytest.mark.parametrize("op,how", TRITON_CASES)
def test_triton_explicit_raises_and_unchecked_reaches_training(broken_triton, op, how,
                                                               monkeypatch):
    broken_triton(op, how)
    m = TwoTask(k=2, width=8)
    before = m.snapshot()
    with pytest.raises(ValueError, match=f"backend='triton'.*op {op!r} on triton"):
        MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), method="sam", lr=0.05,
               backend="triton")
    assert _same(m.snapshot(), before)
    monkeypatch.setenv("MTLSAM_SELFCHECK", "0")
    selfcheck.reset((op,))
    if how == "raise":
        with pytest.raises(RuntimeError, match="this kernel fails"):
            _train_small("triton")
        return
    try:
        got = _train_small("triton")
    except ValueError:  # a NaN the step's own finiteness check refused
        assert how == "nan"
        return
    monkeypatch.undo()
    assert not _same(got, _train_small("torch"))


# -- on a GPU: the real kernels pass, with one host synchronisation -------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_cuda_kernels_pass_with_one_host_sync(backend):
    dev = torch.device("cuda", torch.cuda.current_device())
    if backend not in ops.available_backends(dev):
        pytest.skip(f"{backend} not available on {dev}")
    selfcheck.reset()
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            verdicts = selfcheck.verdicts(backend, dev, torch.float32)
            torch.cuda.set_sync_debug_mode(old)
    finally:
        torch.cuda.set_sync_debug_mode(old)
    bad = [v.reason() for v in verdicts.values() if not v.ok]
    assert not bad, bad
    syncs = [str(w.message) for w in record if "synchroniz" in str(w.message).lower()]
    print(f"{backend}: {len(syncs)} synchronising calls during the check")
    if backend == "ext":  # (Triton builds its work tables on the host: its own first use)
        assert len(syncs) <= 1, syncs
