"""Flat buffers: layout, layer rule, views, and gradient accumulation into the buffer."""

import pytest
import torch
from torch import nn

from mtlsam_ext import FlatParams


def test_module_layer_rule_and_views():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1)))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    f = FlatParams(m, "shared")
    assert f.layer_names == ["0", "2.0", "2.1"]
    assert [len(la.params) for la in f.layers] == [2, 2, 2]
    (b,) = f.buckets
    assert b.numel == sum(p.numel() for p in m.parameters()) == f.numel
    assert b.seg_offsets.tolist() == [0, 16, 26, 29]
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
        assert p.data_ptr() >= b.data.data_ptr()
        assert p.grad is not None and p.grad.data_ptr() >= b.grad.data_ptr()
    # Writing the flat buffer writes the parameters.
    b.data.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in m.parameters())


def test_autograd_accumulates_into_flat_grad():
    m = nn.Linear(3, 2)
    f = FlatParams(m)
    ptrs = [p.grad.data_ptr() for p in m.parameters()]
    m(torch.randn(5, 3)).sum().backward()
    assert [p.grad.data_ptr() for p in m.parameters()] == ptrs
    assert torch.equal(f.buckets[0].grad[:6], m.weight.grad.reshape(-1))
    assert float(f.buckets[0].grad.abs().sum()) > 0


def test_attach_grads_after_set_to_none():
    m = nn.Linear(3, 2)
    f = FlatParams(m)
    m.zero_grad(set_to_none=True)
    assert m.weight.grad is None
    f.attach_grads()
    m(torch.randn(5, 3)).sum().backward()
    assert torch.equal(f.buckets[0].grad[:6], m.weight.grad.reshape(-1))


def test_iterable_and_named_layers():
    a, b, c = (torch.randn(n, requires_grad=True) for n in (1, 5, 2))
    f = FlatParams([a, b, c], "p")
    assert f.layer_names == ["p[0]", "p[1]", "p[2]"]
    first = [torch.randn(2, requires_grad=True), torch.randn(3, requires_grad=True)]
    g = FlatParams({"first": first, "second": torch.randn(4, requires_grad=True)})
    assert g.layer_names == ["first", "second"]
    assert g.buckets[0].seg_offsets.tolist() == [0, 5, 9]
    assert g.layer_index("second") == 1 and g.layer_index(-1) == 1
    with pytest.raises(ValueError, match="unknown layer"):
        g.layer_index("third")
    with pytest.raises(ValueError, match="out of range"):
        g.layer_index(2)


def test_frozen_and_tied_parameters():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m[1].weight = m[0].weight  # tied
    m[0].bias.requires_grad_(False)
    f = FlatParams(m)
    assert f.numel == 9 + 3
    assert [len(la.params) for la in f.layers] == [1, 1]


def test_one_bucket_per_dtype():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, requires_grad=True)
    f = FlatParams([a, b, c])
    assert [bk.dtype for bk in f.buckets] == [torch.float32, torch.float64]
    assert [bk.numel for bk in f.buckets] == [7, 2]
    assert f.buckets[0].seg_layers == [0, 2]


def test_bad_parameters():
    with pytest.raises(ValueError, match="no trainable"):
        FlatParams([])
    with pytest.raises(ValueError, match="dtype"):
        FlatParams([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="leaf"):
        FlatParams([torch.randn(2, requires_grad=True) * 2])
    meta = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="mixed devices"):
        FlatParams([torch.zeros(2, requires_grad=True), meta])
