"""Device copies of the CPU segment tables: made once per table, remade after an in-place
edit, dropped with the table. "meta" stands in for a GPU (no data is read)."""

import gc

import torch

from mtlsam_ext.kernels import device_tables


def test_one_copy_per_table_and_device():
    dev = torch.device("meta")
    t = torch.tensor([0, 4, 10])
    first = device_tables.on_device(t, dev)
    assert first.device == dev and first.shape == t.shape
    assert device_tables.on_device(t, dev) is first  # kept: no copy per op call
    assert device_tables.on_device(t, torch.device("cpu")) is t  # already there
    assert device_tables.on_device(None, dev) is None
    t[1] = 5  # an in-place edit: the kept copy is stale
    assert device_tables.on_device(t, dev) is not first


def test_copy_dropped_with_its_table():
    dev = torch.device("meta")
    t = torch.tensor([0, 3])
    device_tables.on_device(t, dev)
    key = (id(t), dev)
    assert key in device_tables._COPIES
    del t
    gc.collect()
    assert key not in device_tables._COPIES


def test_a_new_table_reusing_an_id_gets_its_own_copy():
    dev = torch.device("meta")
    for n in range(50):  # ids of freed tensors are reused; each new table must get its copy
        t = torch.arange(n + 2)
        assert device_tables.on_device(t, dev).shape == t.shape
        del t
