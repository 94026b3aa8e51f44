"""One timing / memory helper shared by the benchmark programs in ``bench/``.

Timing
    :func:`time_fn` runs ``fn`` ``warmup`` times untimed, then ``repeats`` timed times and
    returns a :class:`Stats` (median, quartiles / IQR, min, max, all samples).
    On CUDA every sample is a pair of CUDA events around ``fn`` followed by a synchronize
    (device time of everything ``fn`` queued, host work included as far as it delays the
    queue); on CPU it is ``time.perf_counter`` around ``fn``.

Peak memory
    :class:`PeakMemory` is a context manager that reports the peak *extra* memory over the
    moment it was entered (``base``): everything allocated and alive at the same time inside
    the block, persistent optimizer state included, minus what already existed (model, data).

    * CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, then
      ``torch.cuda.max_memory_allocated() - memory_allocated(at entry)``. Exact for tensors
      made through PyTorch's caching allocator (not the allocator's reserved-but-free cache,
      not cuBLAS / cuDNN workspaces allocated outside it).
    * CPU: the process's resident-set high-water mark. On entry we write ``5`` to
      ``/proc/self/clear_refs`` (Linux >= 4.0), which resets ``VmHWM`` to the current RSS,
      and read ``VmRSS``; on exit peak = ``VmHWM - VmRSS(at entry)``. To make freed tensor
      memory really leave the process (else glibc keeps it and later allocations are free),
      :func:`cpu_allocator_setup` fixes glibc's mmap threshold at 64 KiB via ``mallopt``,
      so every tensor buffer >= 64 KiB is its own ``mmap`` and is unmapped on free.
      Limits, documented rather than hidden: page granularity (4 KiB); it counts *touched*
      pages only (an allocated but never written buffer costs nothing; ``torch.empty`` rows
      count once written); it includes non-tensor memory (Python objects, autograd graph
      nodes, first-use library initialisation: warm up before entering); small tensors
      (< 64 KiB) come from malloc arenas whose memory may have been reserved earlier;
      other threads of the process count too. If ``clear_refs`` cannot be written
      (non-Linux, restricted /proc) the CPU number is ``None`` and ``method`` says so.
      ``tracemalloc`` is deliberately not used: it sees only Python-level allocations, not
      tensor storage.

Records
    :func:`record` appends one JSON object per line with the environment (:func:`env_info`):
    git commit (``+dirty`` when the work tree differs from HEAD), torch / triton / CUDA
    versions, device name, torch thread count, host name, UTC timestamp.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]  # the checkout root, for the commit

__all__ = [
    "PeakMemory",
    "Stats",
    "cpu_allocator_setup",
    "env_info",
    "git_commit",
    "limit_blas_threads",
    "record",
    "sync",
    "time_fn",
    "time_once",
]


# -- statistics ---------------------------------------------------------------------------------
@dataclass
class Stats:
    """Summary of repeated timings, in seconds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int
    samples: list[float] = field(default_factory=list)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stats:
        xs = sorted(float(x) for x in samples)
        if not xs:
            raise ValueError("no samples")
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(median=statistics.median(xs), q1=q1, q3=q3, min=xs[0], max=xs[-1],
                   n=len(xs), samples=xs)

    def as_dict(self, prefix: str = "", samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        d["iqr"] = self.iqr
        return {f"{prefix}{k}": v for k, v in d.items()}

    def fmt_ms(self) -> str:
        return f"{1e3 * self.median:.2f} [{1e3 * self.q1:.2f}-{1e3 * self.q3:.2f}]"


# -- timing -------------------------------------------------------------------------------------
def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def sync(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_once(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Seconds of one call of ``fn``: CUDA events around it on the device's current stream (not
    the current device's: cuda:1 while cuda:0 is current would time nothing) and a wait for the
    end event -- the GPU time of everything it queued, host time included as far as it delays
    the queue; ``perf_counter`` on the CPU."""
    dev = _device(device)
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], Any], *, device: torch.device | str | None = None,
            warmup: int = 2, repeats: int = 10,
            on_sample: Callable[[], None] | None = None) -> Stats:
    """Median/IQR/min/max of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones.

    ``on_sample`` is called after every call (warm-up included), e.g. to advance a progress bar.
    """
    dev = _device(device)
    for _ in range(warmup):
        fn()
        if on_sample:
            on_sample()
    sync(dev)
    samples: list[float] = []
    for _ in range(repeats):
        samples.append(time_once(fn, dev))
        if on_sample:
            on_sample()
    return Stats.of(samples)


class Timer:
    """Accumulating wall-clock timer for instrumented runs (syncs the device at both ends)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = _device(device)
        self.total = 0.0
        self.calls = 0
        self._t0 = 0.0
        self._depth = 0

    def __enter__(self) -> Timer:
        if self._depth == 0:
            sync(self.device)
            self._t0 = time.perf_counter()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync(self.device)
            self.total += time.perf_counter() - self._t0
            self.calls += 1


# -- memory -------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_set = False


def cpu_allocator_setup(mmap_threshold: int = 64 * 1024) -> bool:
    """Make glibc hand every allocation >= ``mmap_threshold`` bytes its own ``mmap`` (and
    disable the dynamic threshold), so freed tensor buffers leave the RSS at once. Returns
    whether it took effect (False off glibc)."""
    global _allocator_set
    if _allocator_set:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold)) == 1
    except (OSError, AttributeError):
        return False
    _allocator_set = bool(ok)
    return _allocator_set


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (extra over entry) and
    ``m.method`` (how it was measured; see the module docstring for the limits)."""

    def __init__(self, device: torch.device | str | None = None, collect: bool = True) -> None:
        self.device = _device(device)
        self.collect = collect
        self.peak_bytes: int | None = None
        self.base_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            cpu_allocator_setup()
            self._ok = _reset_hwm()
            rss = _status_kb("VmRSS")
            self.base_bytes = None if rss is None else rss * 1024
            self.method = "rss_hwm(clear_refs)" if self._ok and rss is not None \
                else "unavailable"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
        elif self.method != "unavailable":
            hwm = _status_kb("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self.base_bytes)


# -- threads -------------------------------------------------------------------------------------
_BLAS_LIMITER: Any = None


def limit_blas_threads(n: int | None) -> str:
    """Cap the BLAS / OpenMP pools of NumPy and SciPy (not torch's) at ``n`` threads, through
    ``threadpoolctl`` when it is installed. The aggregators solve K x K systems in NumPy; with
    torch's OpenMP threads still spinning, a multi-threaded OpenBLAS can be 20x slower on a
    busy machine (seen: ``nash`` at K = 100, 0.9 s vs 0.04 s with one BLAS thread). Returns a
    short description for the records."""
    global _BLAS_LIMITER
    if n is None:
        return "default"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "default (threadpoolctl not installed; set OPENBLAS_NUM_THREADS instead)"
    _BLAS_LIMITER = threadpool_limits(limits=int(n), user_api="blas")
    return str(int(n))


# -- environment and records ---------------------------------------------------------------------
def git_commit(repo: Path = REPO) -> str:
    """``git rev-parse HEAD``, with ``+dirty`` when tracked or untracked-unignored files differ,
    results (``bench/results/``, ``python/results/``) aside: a program appending to its own
    records file must not call the next run's code dirty. Read-only: ``--no-optional-locks``
    keeps ``git status`` from refreshing the index.

    ``MTLSAM_COMMIT`` overrides it: a copy of the tree made for another machine may carry a
    stale ``.git`` (one such copy reported the checkout's first commit, "+dirty"), or none."""
    named = os.environ.get("MTLSAM_COMMIT", "").strip()
    if named:
        return named
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        st = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain",
                             "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in st.splitlines() if line.strip()]
    code = [p for p in changed if not p.startswith(RESULTS_DIRS)]
    return head + ("+dirty" if code else "")


RESULTS_DIRS = ("bench/results/", "python/results/")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ENV: dict[str, Any] | None = None


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    nums = [d.get("num_threads") for d in threadpool_info() if d.get("user_api") == "blas"]
    return max(nums) if nums else None


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and machine facts recorded with every result (git status read once)."""
    global _ENV
    if _ENV is None:
        try:
            import triton  # type: ignore

            triton_v = triton.__version__
        except Exception:  # noqa: BLE001 - absent or broken triton: record None
            triton_v = None
        try:
            from mtlsam_ext import __version__ as ext_v
        except Exception:  # noqa: BLE001
            ext_v = None
        _ENV = {
            "commit": git_commit(),
            "mtlsam_ext": ext_v,
            "torch": torch.__version__,
            "triton": triton_v,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
        }
    dev = _device(device)
    out = dict(_ENV)
    out["threads"] = torch.get_num_threads()
    out["blas_threads"] = _blas_threads()
    out["device"] = str(dev)
    out["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else out["cpu"]
    if dev.type == "cuda":
        out["gpu_driver"] = _gpu_driver()
        out["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(dev))
    return out


@functools.lru_cache(maxsize=1)
def _gpu_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``; torch reports only the CUDA API level)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split("\n")[0].strip() or None


def record(path: str | os.PathLike | None, rows: Iterable[dict[str, Any]], *,
           device: torch.device | str | None = None, **meta: Any) -> list[dict[str, Any]]:
    """Add environment, timestamp and ``meta`` to every row; append them to ``path`` as JSON
    lines (``path=None``: only return them)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = env_info(device)
    full = [{**row, **meta, **env, "timestamp": stamp} for row in rows]
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            for r in full:
                f.write(json.dumps(r, default=str) + "\n")
    return full


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """All JSON objects of the given JSON-lines files (blank lines skipped)."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows
