"""Smoke test of an installed mtlsam_ext wheel, run with the Python of the venv it is installed in.

Run it from outside the source tree, with ``python -I`` (the script's directory and the working
directory are then not on ``sys.path``), so that only the installed package is tested:

    cd /tmp && /path/to/venv/bin/python -I /path/to/smoke_wheel.py --expect loads

``--expect loads`` (a wheel built for this torch): the package imports from site-packages, the
compiled extension loads, ``python -m mtlsam_ext.info`` runs, every CPU op of ``backend="ext"``
equals ``backend="torch"`` on a ragged segment layout, one MTLSAM step of each method equals
the torch backend's step, and for a CUDA wheel the CUDA kernels are registered for every op
(no GPU is needed for that).

``--expect refused`` (a wheel built for another torch): exactly one warning naming both torch
versions and the wheel to install, ``backend="auto"`` resolves to ``torch`` and a step runs,
``backend="ext"`` raises a clear error.

Prints a line per check and, last, one JSON line with the outcome; exits 1 on any failure.
Uses only the installed package and torch (nothing from tests/).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import warnings

# Ragged layout: a 1-element segment, an empty one, odd sizes, one over a SIMD width.
LENGTHS = [1, 7, 0, 33, 2, 129, 1, 64]
METHODS = ("erm", "sam", "fmtl", "gl")
# ext vs torch, same inputs: float64 results agree to rounding of a different summation order.
RTOL, ATOL = 1e-10, 1e-12
OPS = ("segment_sumsq", "gl_layer_stats", "mix_perturb_", "perturb_points_", "restore_", "gram",
       "combine_", "sub_")


def _check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def _ops_outputs(backend: str) -> list:
    """Every CPU op once on the ragged layout, in float64."""
    import torch

    from mtlsam_ext import ops

    g = torch.Generator().manual_seed(0)
    offs = [0]
    for n in LENGTHS:
        offs.append(offs[-1] + n)
    n = offs[-1]
    sampled = [(offs[s], LENGTHS[s]) for s in range(0, len(LENGTHS), 2)]
    local_starts, m = [], 0
    for _, length in sampled:
        local_starts.append(m)
        m += length

    def t(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int64)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, scale, g0, local, rows = r(n), r(n), r(n), r(3, m), r(4, n)
    st, ln, ls = t([s for s, _ in sampled]), t([c for _, c in sampled]), t(local_starts)
    coef = torch.linspace(0.1, 0.3, len(LENGTHS), dtype=torch.float64)
    lcoef = torch.linspace(-0.2, 0.2, len(sampled), dtype=torch.float64)
    theta, backup = x.clone(), torch.empty_like(x)
    ops.mix_perturb_(theta, backup, g0, coef, t(offs), local[1].contiguous(), lcoef, st, ln,
                     ls, adaptive=True, backend=backend)
    points = torch.empty(3, n, dtype=torch.float64)
    ops.perturb_points_(points, x, g0.unsqueeze(0), torch.stack([coef, -coef, 2 * coef]),
                        t(offs), local, torch.stack([lcoef, 3 * lcoef, -lcoef]), st, ln, ls,
                        adaptive=True, backend=backend)
    restored = theta.clone()
    ops.restore_(restored, backup, backend=backend)
    out = torch.empty(n, dtype=torch.float64)
    ops.combine_(out, rows, torch.tensor([0.5, -1.0, 2.0, 0.25]), backend=backend)
    diff = rows.clone()
    ops.sub_(diff, r(4, n), backend=backend)
    return [ops.segment_sumsq(x, t(offs), scale, backend=backend),
            *ops.gl_layer_stats(g0, local, st, ln, ls, scale, backend=backend),
            theta, points, restored, ops.gram(rows, backend=backend),
            ops.segment_gram(rows, t(offs), backend=backend), out, diff]


def _step(method: str, backend: str) -> list:
    """One MTLSAM step of a small 2-task model in float64; the parameters after it."""
    import torch

    from mtlsam_ext import MTLSAM

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8),
                               torch.nn.Tanh()).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)

    def losses() -> list:
        h = body(x)
        return [((head(h).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(heads)]

    opt = MTLSAM(body, torch.optim.SGD, heads=heads, method=method, lr=0.1, backend=backend,
                 generator=torch.Generator().manual_seed(2))
    opt.step(losses)
    return [p.detach().clone() for p in [*body.parameters(),
                                         *(q for h in heads for q in h.parameters())]]


def _close(a: list, b: list) -> tuple[bool, float]:
    import torch

    worst = max((float((u - v).abs().max()) if u.numel() else 0.0) for u, v in zip(a, b))
    return all(torch.allclose(u, v, rtol=RTOL, atol=ATOL) for u, v in zip(a, b)), worst


def check_loads() -> dict:
    import torch

    import mtlsam_ext
    from mtlsam_ext.kernels.build_record import ext_status
    from mtlsam_ext.ops import available_backends, resolve_backend

    res: dict = {}
    oks = []
    site = sysconfig.get_paths()["purelib"]
    oks.append(_check("imported from site-packages", mtlsam_ext.__file__.startswith(site),
                      mtlsam_ext.__file__))
    status = ext_status()
    oks.append(_check("compiled extension loads", status.module is not None,
                      status.reason or status.module.__file__))
    if status.module is None:
        return {"ok": False, **res}
    res["record"] = status.record
    oks.append(_check("abi3 module", status.module.__file__.endswith(".abi3.so")))
    info = subprocess.run([sys.executable, "-I", "-m", "mtlsam_ext.info"], capture_output=True,
                          text=True)
    oks.append(_check("python -m mtlsam_ext.info", info.returncode == 0 and
                      "built_against_torch" in info.stdout, info.stderr[-500:]))
    print("\n".join("    " + ln for ln in info.stdout.splitlines()))
    installed = importlib.metadata.version("mtlsam_ext")
    oks.append(_check("info shows the wheel's full version (its local label)",
                      f"mtlsam_ext: {installed}\n" in info.stdout and "+" in installed, installed))
    oks.append(_check("auto on cpu is ext", resolve_backend("auto", "cpu") == "ext",
                      str(available_backends("cpu"))))
    ok, worst = _close(_ops_outputs("ext"), _ops_outputs("torch"))
    oks.append(_check("CPU ops: ext == torch on a ragged layout", ok, f"max |diff| {worst:.1e}"))
    for method in METHODS:
        ok, worst = _close(_step(method, "ext"), _step(method, "torch"))
        oks.append(_check(f"MTLSAM step, method={method}: ext == torch", ok,
                          f"max |diff| {worst:.1e}"))
    if status.record and status.record.get("with_cuda"):
        missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"mtlsam::{op}", "CUDA")]
        oks.append(_check("CUDA kernels registered for every op", not missing,
                          f"missing: {missing}" if missing else ", ".join(OPS)))
    return {"ok": all(oks), **res}


def check_refused() -> dict:
    import torch

    from mtlsam_ext.kernels.build_record import read_record
    from mtlsam_ext.ops import resolve_backend

    oks = []
    record = read_record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = resolve_backend("auto", "cpu")
        resolve_backend("auto", "cpu")
    msgs = [str(w.message) for w in caught if "mtlsam_ext" in str(w.message)]
    for m in msgs:
        print(f"    warning: {m}")
    oks.append(_check("exactly one warning", len(msgs) == 1, str(len(msgs))))
    built = (record or {}).get("torch", "?")
    oks.append(_check("warning names both torch versions and the wheel",
                      bool(msgs) and built in msgs[0] and torch.__version__ in msgs[0]
                      and "mtlsam_ext==" in msgs[0]))
    oks.append(_check("backend='auto' -> torch", auto == "torch", auto))
    try:
        resolve_backend("ext", "cpu")
        err = None
    except RuntimeError as e:
        err = str(e)
    print(f"    backend='ext' error: {err}")
    oks.append(_check("backend='ext' raises a clear error", bool(err) and built in err))
    params = _step("sam", "auto")
    oks.append(_check("a step runs with backend='auto'", all(bool(p.isfinite().all())
                                                            for p in params)))
    return {"ok": all(oks), "warning": msgs[0] if msgs else None, "ext_error": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expect", choices=["loads", "refused"], default="loads",
                    help="loads: a wheel for this torch; refused: one built for another torch")
    args = ap.parse_args()
    if os.path.exists(os.path.join(os.getcwd(), "mtlsam_ext")):
        sys.exit("smoke_wheel: run this from outside the source tree (cd /tmp)")
    import torch

    print(f"smoke_wheel: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"expect {args.expect}", flush=True)
    res = check_loads() if args.expect == "loads" else check_refused()
    res.update(expect=args.expect, torch=torch.__version__,
               python=sys.version.split()[0])
    print(json.dumps(res, sort_keys=True))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
