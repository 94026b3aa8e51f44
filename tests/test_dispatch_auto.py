"""backend="auto" on CUDA: each op on the backend CUDA_AUTO names (ext+triton), checked without a
GPU by pretending that a CUDA device has both compiled backends and recording which kernel
module each op entry point calls."""

from types import SimpleNamespace

import pytest
import torch

from mtlsam_ext import ops
from mtlsam_ext.ops import core, dispatch

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Both compiled backends 'available' on CUDA; kernels() returns recording stand-ins."""
    real = dispatch._available

    def available(device):
        return ("ext", "triton", "torch") if device.type == "cuda" else real(device)

    calls = []

    def module(name):
        def record(op):
            return lambda *a, **k: calls.append((op, name))
        return SimpleNamespace(**{op: record(op) for op in (
            "segment_sumsq", "gl_layer_stats", "mix_perturb_", "perturb_points_", "restore_",
            "gram", "segment_gram", "combine_", "flat_gram_", "sub_")})

    monkeypatch.setattr(dispatch, "_available", available)
    monkeypatch.setattr(core, "kernels", module)
    monkeypatch.setattr(core, "_RESOLVED", {})
    monkeypatch.delenv("MTLSAM_BACKEND", raising=False)
    # the recording stand-ins compute nothing: the kernels' self-check would fail them all
    monkeypatch.setenv("MTLSAM_SELFCHECK", "0")
    return calls


def test_auto_on_cuda_is_the_per_op_mix(fake_cuda):
    assert ops.resolve_backend("auto", CUDA) == dispatch.MIXED
    assert ops.resolve_backend(dispatch.MIXED, CUDA) == dispatch.MIXED
    assert ops.resolve_backend("ext", CUDA) == "ext"


def test_mix_is_refused_where_it_cannot_run():
    with pytest.raises(RuntimeError, match="ext\\+triton"):
        ops.resolve_backend(dispatch.MIXED, "cpu")
    assert ops.resolve_backend("auto", "cpu") != dispatch.MIXED


def test_op_backend_table():
    for op, be in dispatch.CUDA_AUTO.items():
        assert be in ("ext", "triton") and dispatch.op_backend(dispatch.MIXED, op) == be
    assert dispatch.op_backend(dispatch.MIXED, "mix_perturb_") == "ext"
    assert dispatch.op_backend("ext", "gram") == "ext"  # an explicit backend runs every op


@pytest.mark.parametrize("backend", ["auto", dispatch.MIXED])
def test_entry_points_route_per_op(fake_cuda, backend, monkeypatch):
    # CPU tensors stand in for CUDA ones: the entry points validate them, then resolve the
    # backend for their device, here reported as CUDA
    monkeypatch.setattr(core, "resolve_backend", lambda b, d: dispatch.resolve_backend(b, CUDA))
    n, k = 8, 2
    x, g = torch.zeros(n), torch.zeros(n)
    off = torch.tensor([0, 3, n])
    st, ln, ls = torch.tensor([3]), torch.tensor([5]), torch.tensor([0])
    ops.segment_sumsq(x, off, backend=backend)
    ops.segment_sumsq(x, off, x, backend=backend)
    ops.gl_layer_stats(x, torch.zeros(k, 5), st, ln, ls, backend=backend)
    ops.mix_perturb_(x, torch.zeros(n), g, torch.ones(2), off, backend=backend)
    ops.mix_perturb_(x, torch.zeros(n), g, torch.ones(2), off, torch.zeros(5), torch.ones(1),
                     st, ln, ls, backend=backend)
    out = torch.zeros(k, n)
    ops.perturb_points_(out, x, torch.zeros(1, n), torch.ones(k, 2), off, backend=backend)
    ops.perturb_points_(out, x, torch.zeros(1, n), torch.ones(k, 2), off, torch.zeros(k, 5),
                        torch.ones(k, 1), st, ln, ls, backend=backend)
    ops.restore_(x, torch.zeros(n), backend=backend)
    ops.gram(out, backend=backend)
    ops.segment_gram(out, off, backend=backend)
    ops.combine_(x, out, torch.ones(k), backend=backend)
    ops.flat_gram_(out, torch.zeros(k, n), backend=backend)
    ops.sub_(out, torch.zeros(k, n), backend=backend)
    assert fake_cuda == [
        ("segment_sumsq", "ext"), ("segment_sumsq", "ext"), ("gl_layer_stats", "ext"),
        ("mix_perturb_", "ext"), ("mix_perturb_", "triton"),
        ("perturb_points_", "ext"), ("perturb_points_", "triton"),
        ("restore_", "ext"), ("gram", "ext"), ("segment_gram", "triton"),
        ("combine_", "ext"), ("flat_gram_", "ext"), ("sub_", "ext")]
