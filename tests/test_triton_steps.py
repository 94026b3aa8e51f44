"""Whole MTLSAM steps through the Triton backend (``backend="triton"`` on CPU tensors under
``TRITON_INTERPRET=1``, explicit request only; on CUDA tensors where a GPU is present),
against the torch backend."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mtlsam_ext import MTLSAM  # noqa: E402
from mtlsam_ext.kernels.triton import config  # noqa: E402
from mtlsam_ext.ops import resolve_backend  # noqa: E402
from tests.models import TwoTask  # noqa: E402

if not config.INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

# the interpreter runs the kernels on CPU tensors; without it they need the GPU's
DEV = torch.device("cpu" if config.INTERPRET else "cuda")


def _model(dtype: torch.dtype) -> TwoTask:
    m = TwoTask(k=3, dtype=dtype, width=8).to(DEV)
    m.x, m.y = m.x.to(DEV), m.y.to(DEV)  # (plain attributes: .to does not move them)
    return m


METHODS = {"gl": dict(method="gl"), "gl-lagged": dict(method="gl", local_grad="lagged"),
           "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1),
           "gl-adaptive": dict(method="gl", layers="adaptive", n_sampled=2, resample_every=1),
           "fmtl": dict(method="fmtl"), "sam": dict(method="sam"), "erm": dict(method="erm")}
# Per dtype: the trajectories of two backends differ by the reductions' summation order.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=0.05, atol=0.02)}


def test_auto_never_picks_triton_on_cpu():
    assert resolve_backend("auto", "cpu") != "triton"
    if config.INTERPRET:  # explicit request only
        assert resolve_backend("triton", "cpu") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", METHODS)
def test_whole_steps_match_the_torch_backend(name, dtype):
    models = {}
    for be in ("torch", "triton"):
        m = _model(dtype)
        opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, momentum=0.9,
                     aggregator="mgda", backend=be, generator=torch.Generator().manual_seed(0),
                     **METHODS[name])
        assert opt.info()["backend"] == be
        for _ in range(2):
            opt.step(m.losses)
        models[be] = m
    for a, b in zip(models["torch"].parameters(), models["triton"].parameters()):
        torch.testing.assert_close(b.float(), a.float(), **TOL[dtype])
    assert not all(torch.equal(a, b) for a, b in zip(_model(dtype).parameters(),
                                                     models["triton"].parameters()))
