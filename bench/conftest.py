"""Fixtures for the pytest-benchmark entries in ``bench/``.

Run: ``pytest bench/ --benchmark-only``.

The repository's ``pytest`` collects only ``tests/`` (``testpaths`` in pyproject.toml), so
these never run with the test suite. ``MTLSAM_BENCH_THREADS`` sets torch's thread count
(default: torch's own choice, i.e. all cores).
"""

import os

import pytest
import torch

from mtlsam_ext.ops import available_backends

if os.environ.get("MTLSAM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MTLSAM_BENCH_THREADS"]))


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases() -> list[tuple[str, str]]:
    """(device, backend): torch everywhere, plus every compiled backend the device offers."""
    out = []
    for dev in _devices():
        for be in available_backends(dev):
            out.append((dev, be))
    return out


@pytest.fixture(params=_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def device_backend(request) -> tuple[str, str]:
    return request.param
