"""``python -m bench.triton_ops_bench``: memory bandwidth of the Triton kernels on a GPU.

For every op and dtype (fp32, bf16) on two layouts of the flat parameter buffer

* ``resnet18``: the 62 parameter tensors of torchvision's ResNet-18 (11,689,512 elements),
* ``tiny2000``: 2,000 tiny tensors of 1..512 elements (the many-small-layers worst case),

it times the Triton kernel (and the pure-torch reference) with CUDA events and reports the
effective bandwidth, ``bytes the op must move / median time``, next to a device-to-device
``copy_`` moving the same number of bytes (half read, half written). ``triton/copy`` near 1
means the kernel runs at copy speed. Bytes counted per op (N elements, element size ``e``,
``K`` task rows, ``M`` sampled columns, every other segment sampled):

==================  ==========================================
segment_sumsq       ``N e`` (+ ``N e`` with the adaptive scale)
gl_layer_stats      ``(M + K M) e``
mix_perturb_        ``4 N e`` (read param, g0; write backup, param) (+ ``M e`` local)
restore_            ``2 N e``
gram                ``K N e``
combine_            ``(K + 1) N e``
sub_                ``3 K N e``
==================  ==========================================

Prints a table; ``--out FILE`` appends one JSON line per row with the torch / triton
versions, device name and git commit (``bench/harness.py``). Needs a CUDA GPU and triton;
elsewhere it exits with a message (the interpreter is for tests, not for timing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from bench.harness import record, time_fn


def resnet18_sizes() -> list[int]:
    """Element counts of ResNet-18's parameters (conv weights, BN weight/bias, fc)."""
    sizes = [64 * 3 * 7 * 7, 64, 64]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            sizes += [cout * c_in * 9, cout, cout, cout * cout * 9, cout, cout]
            if block == 0 and (stride != 1 or cin != cout):
                sizes += [cout * cin, cout, cout]
        cin = cout
    sizes += [1000 * 512, 1000]
    return sizes


def tiny_sizes(count: int = 2000, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 513, (count,), generator=g).tolist()


LAYOUTS: dict[str, Callable[[], list[int]]] = {"resnet18": resnet18_sizes,
                                               "tiny2000": tiny_sizes}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _offsets(sizes: list[int]) -> torch.Tensor:
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0, out=off[1:])
    return off


def cases(sizes: list[int], dtype: torch.dtype, k: int, dev: torch.device):
    """``(op name, bytes moved, callable(kernel module))`` for every op on one layout."""
    off = _offsets(sizes)  # CPU tables, as the flat-buffer module keeps them
    n = int(off[-1])
    e = torch.empty((), dtype=dtype).element_size()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sampled = list(range(0, len(sizes), 2))
    starts = off[:-1][sampled].clone()
    lengths = torch.tensor([sizes[i] for i in sampled], dtype=torch.int64)
    local_starts = torch.zeros_like(lengths)
    torch.cumsum(lengths[:-1], 0, out=local_starts[1:])
    m = int(lengths.sum())

    def r(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dtype)

    x, g0, scale, param = r(n), r(n), r(n), r(n)
    backup = torch.empty_like(param)
    local, rows = r(k, m), r(k, n)
    rows_b = r(k, n)
    out = torch.empty(n, device=dev, dtype=dtype)
    coef = torch.full((len(sizes),), 1e-3, device=dev, dtype=acc)
    lcoef = torch.full((len(sampled),), 1e-3, device=dev, dtype=acc)
    w = torch.linspace(-1, 1, k, device=dev, dtype=acc)
    lrow = local[0]
    return [
        ("segment_sumsq", n * e, lambda K: K.segment_sumsq(x, off)),
        ("segment_sumsq_adaptive", 2 * n * e, lambda K: K.segment_sumsq(x, off, scale)),
        ("gl_layer_stats", (m + k * m) * e,
         lambda K: K.gl_layer_stats(g0, local, starts, lengths, local_starts)),
        ("mix_perturb_", 4 * n * e, lambda K: K.mix_perturb_(param, backup, g0, coef, off)),
        ("mix_perturb_local_adaptive", (4 * n + m) * e,
         lambda K: K.mix_perturb_(param, backup, g0, coef, off, lrow, lcoef, starts, lengths,
                                  local_starts, True, False)),
        ("restore_", 2 * n * e, lambda K: K.restore_(param, backup)),
        ("gram", k * n * e, lambda K: K.gram(rows)),
        ("combine_", (k + 1) * n * e, lambda K: K.combine_(out, rows, w)),
        ("sub_", 3 * k * n * e, lambda K: K.sub_(rows_b, rows)),
    ]


def copy_seconds(nbytes: int, dev: torch.device, warmup: int, repeats: int) -> float:
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=dev, warmup=warmup, repeats=repeats).median


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--layouts", default="resnet18,tiny2000", help="comma list")
    ap.add_argument("--tasks", type=int, default=4, help="rows K of gram/combine/gl stats")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference timings")
    ap.add_argument("--out", help="append JSON lines here")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("triton_ops_bench needs a CUDA GPU (none found); the Triton interpreter is for "
              "tests, not for timing. Nothing was measured.", file=sys.stderr)
        return 2
    try:
        from mtlsam_ext.kernels import triton_kernels as tk
    except ImportError as err:
        print(f"triton_ops_bench needs the 'triton' package: {err}", file=sys.stderr)
        return 2
    from mtlsam_ext.kernels import torch_ref

    dev = torch.device("cuda")
    if not tk.supports(dev):
        print("triton cannot run on this GPU (supports() is False; TRITON_INTERPRET set?)",
              file=sys.stderr)
        return 2
    rows_out = []
    head = (f"{'layout':9} {'dtype':5} {'op':28} {'MB':>8} {'triton ms':>10} {'GB/s':>8} "
            f"{'torch GB/s':>10} {'copy GB/s':>10} {'triton/copy':>11}")
    print(head)
    print("-" * len(head))
    for lname in args.layouts.split(","):
        sizes = LAYOUTS[lname]()
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for op, nbytes, fn in cases(sizes, dtype, args.tasks, dev):
                t_tri = time_fn(lambda fn=fn: fn(tk), device=dev, warmup=args.warmup,
                                repeats=args.repeats).median
                t_ref = None if args.no_torch else time_fn(
                    lambda fn=fn: fn(torch_ref), device=dev, warmup=args.warmup,
                    repeats=args.repeats).median
                t_copy = copy_seconds(nbytes, dev, args.warmup, args.repeats)
                row = dict(bench="triton_ops", layout=lname, segments=len(sizes),
                           elements=sum(sizes), dtype=dname, op=op, tasks=args.tasks,
                           bytes=nbytes, triton_s=t_tri, triton_gbs=nbytes / t_tri / 1e9,
                           torch_s=t_ref,
                           torch_gbs=None if t_ref is None else nbytes / t_ref / 1e9,
                           copy_s=t_copy, copy_gbs=nbytes / t_copy / 1e9,
                           triton_over_copy=t_copy / t_tri)
                rows_out.append(row)
                tg = "-" if t_ref is None else f"{row['torch_gbs']:.0f}"
                print(f"{lname:9} {dname:5} {op:28} {nbytes / 1e6:8.1f} {1e3 * t_tri:10.3f} "
                      f"{row['triton_gbs']:8.0f} {tg:>10} {row['copy_gbs']:10.0f} "
                      f"{row['triton_over_copy']:11.2f}")
    full = record(args.out, rows_out, device=dev,
                  command="python -m bench.triton_ops_bench " + " ".join(argv or sys.argv[1:]))
    env = full[0] if full else {}
    print(f"\ntorch {env.get('torch')}, triton {env.get('triton')}, "
          f"{env.get('device_name')}, commit {env.get('commit')}")
    if args.out:
        print(f"appended {len(full)} JSON lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
