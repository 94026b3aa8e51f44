"""Probe: can the mtlsam ops be built once against libtorch's stable ABI and loaded under several
torch releases? Builds csrc/stable_probe/segment_sumsq_stable.cpp (segment_sumsq's CPU kernel on
torch/csrc/stable only, ``TORCH_TARGET_VERSION`` = 2.10) with the current Python's torch, then
loads that one library under other Pythons' torch and compares it with a float64 reference.

    python python/stable_abi_probe.py build --out /tmp/probe          # with this torch
    /other/venv/bin/python python/stable_abi_probe.py check /tmp/probe/libmtlsam_stable.so

``build`` also lists the undefined symbols of the library that come from libtorch/libc10: a
library on the stable ABI needs only C symbols (``aoti_torch_*``, ``torch_*``), no mangled C++.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch 2.10: the first release with STABLE_TORCH_LIBRARY, parallel_for and new_empty.
TARGET = "0x020A000000000000"
LENGTHS = [1, 7, 0, 33, 2, 129, 1, 64, 5000]


def build(out: Path) -> None:
    import torch
    from torch.utils import cpp_extension

    out.mkdir(parents=True, exist_ok=True)
    so = out / "libmtlsam_stable.so"
    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib = Path(torch.__file__).parent / "lib"
    cmd = ["c++", "-O3", "-shared", "-fPIC", "-std=c++17", "-Wall",
           f"-DTORCH_TARGET_VERSION={TARGET}", *inc,
           str(ROOT / "csrc/stable_probe/segment_sumsq_stable.cpp"),
           str(ROOT / "csrc/cpu/simd_sums.cpp"), f"-L{lib}", "-ltorch_cpu", "-lc10",
           "-o", str(so)]
    subprocess.run(cmd, check=True)
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                        text=True, check=True).stdout.split("\n")
    syms = [ln.split()[-1] for ln in nm if ln.strip()]
    torch_cxx = [s for s in syms if s.startswith("_ZN") and ("c10" in s or "torch" in s
                                                             or "at" in s[:8])]
    torch_c = [s for s in syms if s.startswith(("aoti_torch", "torch_"))]
    print(json.dumps({"built_with": torch.__version__, "so": str(so), "target": TARGET,
                      "torch_c_symbols": torch_c, "torch_cxx_symbols": torch_cxx}, indent=1))


def check(so: Path) -> None:
    import torch

    res: dict = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError) as e:
        res.update(ok=False, error=f"load: {e}")
        print(json.dumps(res))
        sys.exit(1)
    g = torch.Generator().manual_seed(0)
    offs = [0]
    for n in LENGTHS:
        offs.append(offs[-1] + n)
    worst = 0.0
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(offs[-1], generator=g, dtype=torch.float64).to(dtype)
        t = torch.randn(offs[-1], generator=g, dtype=torch.float64).to(dtype)
        offsets = torch.tensor(offs, dtype=torch.int64)
        for scale in (None, t):
            got = torch.ops.mtlsam_stable.segment_sumsq(x, offsets, scale).double()
            v = x.double() * (1 if scale is None else scale.double())
            ref = torch.stack([v[a:b].pow(2).sum() for a, b in zip(offs[:-1], offs[1:])])
            rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
            worst = max(worst, rel if dtype == torch.float32 else rel * 1e6)
    # float32 within 1e-5 relative, float64 within 1e-11 (scaled into the same number above)
    res.update(ok=worst < 1e-5, worst_rel=worst)
    print(json.dumps(res))
    sys.exit(0 if res["ok"] else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the probe with this Python's torch")
    b.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) /
                   "mtlsam-stable-probe")
    c = sub.add_parser("check", help="load a built probe under this Python's torch and test it")
    c.add_argument("so", type=Path)
    args = ap.parse_args()
    build(args.out) if args.cmd == "build" else check(args.so)


if __name__ == "__main__":
    main()
