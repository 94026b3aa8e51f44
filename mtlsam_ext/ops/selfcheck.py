"""First-use self-check of the compiled kernels: a wrong kernel never reaches training.

Our CUDA and Triton kernels meet GPUs, drivers and torch releases that no one here ran them on,
and the CPU kernels pick their instruction set at load. So before a compiled op (the extension
on CPU or CUDA, Triton) first runs on a device and dtype in a process, it runs on a small fixed
problem built to reach its edge cases (:mod:`mtlsam_ext.ops.selfcheck_problem`) and its
results are compared with the pure-torch reference (:mod:`mtlsam_ext.kernels.torch_ref`)
under the package's one tolerance table (:mod:`mtlsam_ext.ops.tolerances`). Both results are
within the table's tolerance of the exact value when both kernels are right, so they may
differ by twice it (plus a few ulps of the accumulation dtype at the terms' magnitude, where
the two sum or fuse in different orders); ``restore_`` and the backup ``mix_perturb_`` saves
must be bit copies. A larger difference, a non-finite value, a wrong shape or dtype, or an
exception fails the op:

* ``backend="auto"``: one warning (:class:`SelfCheckWarning`: op, backend, device, dtype,
  worst error against its tolerance) and that op runs on the reference for that device and
  dtype for the rest of the process (``MTLSAM.info()["selfcheck"]`` lists it);
* an explicit backend (``"ext"``, ``"triton"``, ``"ext+triton"``, or ``MTLSAM_BACKEND`` naming
  one): ``ValueError`` naming op, device and error. ``MTLSAM`` checks at construction, before
  any step; a direct op call raises before its kernel touches the arguments.

Each (op, backend, device, dtype) is checked once per process; the ops of one (device, dtype)
are checked together, with one host synchronisation at the end on a GPU (the comparisons run
on the device and are read back at once). ``MTLSAM_SELFCHECK=0`` turns the check off.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from mtlsam_ext.kernels import torch_ref
from mtlsam_ext.ops import selfcheck_problem as prob
from mtlsam_ext.ops.dispatch import kernels as _kernels
from mtlsam_ext.ops.dispatch import op_backend
from mtlsam_ext.ops.tolerances import ELEMENTWISE, REDUCE, REFERENCE_ULPS, accumulation_eps

OPS = prob.OPS
ENV = "MTLSAM_SELFCHECK"


class SelfCheckWarning(RuntimeWarning):
    """A compiled kernel failed its first-use check; ``backend="auto"`` runs the reference."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one op's check on one backend, device and dtype."""

    op: str
    backend: str
    device: torch.device
    dtype: torch.dtype
    where: str            # the device in words: GPU name and compute capability, or CPU ISA
    ok: bool
    error: float          # |compiled - reference| at the worst element (nan, inf: non-finite)
    tolerance: float      # the bound at that element
    ratio: float          # the largest error / tolerance over the op's outputs
    failure: str | None   # an exception's or a mismatch's text, when there was one
    seconds: float        # the whole batch this op was checked in (all ops of device, dtype)

    def reason(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        what = self.failure or (f"worst error {self.error:.3g} against a tolerance of "
                                f"{self.tolerance:.3g}")
        return f"op {self.op!r} on {self.backend}, {self.where}, {dt}: {what}"

    def as_dict(self) -> dict[str, object]:
        return {"op": self.op, "backend": self.backend, "device": str(self.device),
                "where": self.where, "dtype": str(self.dtype).removeprefix("torch."),
                "error": self.error, "tolerance": self.tolerance, "failure": self.failure}


_Key = tuple[str, str, torch.device, torch.dtype]
_VERDICTS: dict[_Key, Verdict] = {}
_FELL_BACK: dict[_Key, Verdict] = {}
# What else must forget with the verdicts: the op entry points' cache of resolved kernels
# (ops.core registers its clear at import). A registry rather than an import of ops.core here,
# because ops.core imports this module.
_ON_RESET: list[Callable[[], None]] = []


def on_reset(forget: Callable[[], None]) -> None:
    """Have :func:`reset` call ``forget()`` too (a cache built on the verdicts)."""
    _ON_RESET.append(forget)


def enabled() -> bool:
    """Whether the check runs (``MTLSAM_SELFCHECK=0`` turns it off), read at each first use."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def reset(ops: tuple[str, ...] | None = None) -> None:
    """Forget the verdicts and fallbacks of ``ops`` (default: all) and every resolved kernel,
    so that the next use checks again (tests; a process that changed ``MTLSAM_SELFCHECK`` or
    replaced kernels)."""
    for table in (_VERDICTS, _FELL_BACK):
        for key in [k for k in table if ops is None or k[0] in ops]:
            del table[key]
    for forget in _ON_RESET:
        forget()


def where(device: torch.device, backend: str) -> str:
    """The device in words, for messages: a GPU's name and compute capability, the CPU
    kernels' instruction set."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
    if backend == "triton":
        return f"{device} (Triton interpreter)"
    isa = platform.machine()
    if backend == "ext":
        from mtlsam_ext.kernels.build_record import ext_status

        module = ext_status().module
        if module is not None and hasattr(module, "cpu_isa"):
            isa = module.cpu_isa()
    return f"{device} ({isa})"


def verdicts(resolved: str, device: torch.device, dtype: torch.dtype,
             ops: tuple[str, ...] = OPS,
             kernels: Callable[[str], ModuleType] = _kernels) -> dict[str, Verdict]:
    """The verdict of every compiled op of ``ops`` under the resolved backend ``resolved``
    (``ext+triton``: each op on its own backend) on ``device`` and ``dtype``; the ones not
    checked yet in this process are checked now, together."""
    device = torch.device(device)
    named = [(op, op_backend(resolved, op)) for op in ops]
    named = [(op, be) for op, be in named if be != "torch"]
    todo = [(op, be) for op, be in named if (op, be, device, dtype) not in _VERDICTS]
    if todo:
        for v in _check(todo, device, dtype, kernels):
            _VERDICTS[(v.op, v.backend, device, dtype)] = v
    return {op: _VERDICTS[(op, be, device, dtype)] for op, be in named}


def fall_back(v: Verdict) -> None:
    """``backend="auto"``: record that ``v``'s op runs on the reference from now on, and warn
    (once per op, backend, device and dtype)."""
    key = (v.op, v.backend, v.device, v.dtype)
    if key in _FELL_BACK:
        return
    _FELL_BACK[key] = v
    warnings.warn(
        f"mtlsam_ext: the compiled kernel failed its first-use self-check: {v.reason()}. "
        f"backend='auto' runs {v.op!r} on the pure-torch reference on this device and dtype for "
        f"the rest of the process. Please report this with the output of "
        f"`python -m mtlsam_ext.info --selfcheck`.", SelfCheckWarning, stacklevel=4)


def refusal(bad: list[Verdict], requested: str) -> ValueError:
    """The error an explicit backend raises for ops that failed their check."""
    lines = "; ".join(v.reason() for v in bad)
    if requested == "auto":  # made explicit by the environment
        requested = f"auto' with MTLSAM_BACKEND='{os.environ.get('MTLSAM_BACKEND')}"
    return ValueError(
        f"backend='{requested}': the compiled kernel failed its first-use self-check "
        f"against the pure-torch reference: {lines}. Nothing was run or changed. "
        f"backend='auto' would run the failing op on the reference instead; "
        f"`python -m mtlsam_ext.info --selfcheck` shows every op's verdict ({ENV}=0 skips the "
        f"check).")


def fell_back(device: torch.device | None = None,
              dtypes: tuple[torch.dtype, ...] | None = None) -> list[dict[str, object]]:
    """The ops that run on the reference because their compiled kernel failed (optionally
    only those of ``device`` and ``dtypes``), with why."""
    return [v.as_dict() for (_, _, dev, dt), v in _FELL_BACK.items()
            if (device is None or dev == torch.device(device))
            and (dtypes is None or dt in dtypes)]


def prepare(resolved: str, device: torch.device, dtypes: tuple[torch.dtype, ...],
            fallback: bool, requested: str) -> None:
    """Check every op the resolved backend would run on ``device`` for each dtype now (the
    optimizer's construction): failed ops fall back with a warning (``fallback``, auto) or
    raise :func:`refusal` before anything runs."""
    if not enabled():
        return
    for dtype in dtypes:
        bad = [v for v in verdicts(resolved, device, dtype).values() if not v.ok]
        if bad and not fallback:
            raise refusal(bad, requested)
        for v in bad:
            fall_back(v)


# -- the check itself ---------------------------------------------------------------------------

def _compare(kind: str, got: Tensor, want: Tensor, bound: Tensor | None,
             dtype: torch.dtype) -> Tensor:
    """``[error / tolerance, error, tolerance]`` at the worst element, on the device (no
    synchronisation). NaN compares as infinitely wrong."""
    if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
        raise _Mismatch(f"returned {got.dtype} {tuple(got.shape)} on {got.device}, the "
                        f"reference {want.dtype} {tuple(want.shape)} on {want.device}")
    if got.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=got.device)
    g, w = got.reshape(-1).double(), want.reshape(-1).double()
    err = (g - w).abs()
    if kind == "exact":
        limit = torch.zeros_like(err)
        ratio = torch.where(g != w, float("inf"), 0.0)  # (NaN != anything)
    else:
        tol = (REDUCE if kind == "reduce" else ELEMENTWISE)[dtype]
        limit = (2 * tol["rtol"]) * (w.abs() if bound is None else bound.reshape(-1)) \
            + 2 * tol["atol"]
        if bound is not None:
            limit += REFERENCE_ULPS * accumulation_eps(dtype) * bound.reshape(-1)
        ratio = err / limit  # NaN where the kernel gave NaN: max picks it, ok fails on it
    # (indices as tensors: indexing with a device scalar could read it back on the host)
    i = ratio.max(dim=0).indices.view(1)
    return torch.cat([ratio.gather(0, i), err.gather(0, i), limit.gather(0, i)])


class _Mismatch(Exception):
    pass


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _check(todo: list[tuple[str, str]], device: torch.device, dtype: torch.dtype,
           kernels: Callable[[str], ModuleType]) -> list[Verdict]:
    if torch.compiler.is_compiling():
        # A first use inside a region torch.compile traces: the check runs eagerly (a graph
        # break). Not a decorator: that would import torch._dynamo (~1 s, and Triton with it)
        # with this module.
        return torch.compiler.disable(_check_eagerly)(todo, device, dtype, kernels)
    return _check_eagerly(todo, device, dtype, kernels)


def _check_eagerly(todo: list[tuple[str, str]], device: torch.device, dtype: torch.dtype,
                   kernels: Callable[[str], ModuleType]) -> list[Verdict]:
    # One intra-op thread on the CPU: the problem is far too small for threads to pay, and on
    # a busy machine every parallel region may wait a scheduler time slice for its second
    # thread (the fp16 check took 0.6 s with 2 threads instead of 7 ms with one, on the 2-core
    # development machine while another process kept both cores busy).
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads != 1:
        torch.set_num_threads(1)
    try:
        return _check_all(todo, device, dtype, kernels)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _check_all(todo: list[tuple[str, str]], device: torch.device, dtype: torch.dtype,
               kernels: Callable[[str], ModuleType]) -> list[Verdict]:
    start = time.perf_counter()
    stats: dict[tuple[str, str], Tensor] = {}
    failures: dict[tuple[str, str], str] = {}
    problems: dict[bool, prob.Problem] = {}
    refs: dict[tuple[str, bool], tuple[list[Tensor], list[Tensor]]] = {}
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for op, be in todo:
            case = prob.CASES[op]
            # the CPU kernels take sorted, disjoint sampled tables only (as the ops check)
            any_order = not (be == "ext" and device.type == "cpu")
            try:
                p = problems.get(any_order)
                if p is None:
                    p = problems[any_order] = prob.problem(device, dtype, any_order)
                if (op, any_order) not in refs:
                    want = case.run(torch_ref, p)
                    bounds = case.bounds(p, want) if case.bounds is not None else \
                        [None] * len(want)
                    refs[(op, any_order)] = (want, bounds)
                want, bounds = refs[(op, any_order)]
                got = case.run(kernels(be), p)
                if len(got) != len(want):
                    raise _Mismatch(f"gave {len(got)} outputs, the reference {len(want)}")
                per_output = [_compare(kind, g, w, b, dtype)
                              for kind, g, w, b in zip(case.kinds, got, want, bounds)]
                rows = torch.stack(per_output)
                stats[(op, be)] = rows.index_select(0, rows[:, 0].max(dim=0).indices.view(1))[0]
            except _Mismatch as e:
                failures[(op, be)] = f"output {e}"
            except Exception as e:  # a kernel that raises fails its check, with the reason
                failures[(op, be)] = f"raised {type(e).__name__}: {_first_line(e)}"
        keys = list(stats)
        try:
            # the check's one host synchronisation
            values = torch.stack([stats[k] for k in keys]).tolist() if keys else []
        except Exception as e:  # an asynchronous device error: nothing from this batch counts
            values = []
            for k in keys:
                failures[k] = f"device error {type(e).__name__}: {_first_line(e)}"
            keys = []
    seconds = time.perf_counter() - start
    out = []
    for op, be in todo:
        here = where(device, be)
        if (op, be) in failures:
            out.append(Verdict(op, be, device, dtype, here, False, float("nan"), float("nan"),
                               float("inf"), failures[(op, be)], seconds))
            continue
        ratio, err, tol = values[keys.index((op, be))]
        out.append(Verdict(op, be, device, dtype, here, ratio <= 1.0, err, tol, ratio, None,
                           seconds))
    return out
