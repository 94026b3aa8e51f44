"""Whole MTLSAM steps with the parameters on a GPU: backends "ext" (the CUDA kernels),
"triton" and "torch" (which must run there too: its segment tables stay on the CPU), against
each other and against the same steps on the CPU. The op tests (tests/test_ops_cuda.py) check
kernels one by one; these catch what only a whole step mixes: tables, coefficients, weights
and check vectors created on one device and used on another. Skipped without a GPU.
"""

import pytest
import torch

from mtlsam_ext import MTLSAM, ops
from tests.models import TwoTask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

METHODS = {"gl": dict(method="gl"), "gl-lagged": dict(method="gl", local_grad="lagged"),
           "gl-zo": dict(method="gl", local_grad="zo", n_dirs=1),
           "gl-adaptive": dict(method="gl", layers="adaptive", n_sampled=2, resample_every=1),
           "gl-random": dict(method="gl", layers="random", n_sampled=2),
           "fmtl": dict(method="fmtl"), "fmtl-sam-rows": dict(method="fmtl", decompose=False),
           "sam": dict(method="sam"), "erm": dict(method="erm")}
# Per dtype: two backends (or devices) sum in different orders.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=0.05, atol=0.02)}


def _backends() -> list[str]:
    have = ops.available_backends("cuda")
    # ext+triton: what "auto" runs on CUDA (each op on its measured-faster backend)
    mixed = ["ext+triton"] if "ext" in have and "triton" in have else []
    return [b for b in ("ext", "triton", "torch") if b in have] + mixed


def _run(device: str, backend: str, cfg: dict, dtype: torch.dtype, agg: str, steps: int = 3,
         **more) -> list[torch.Tensor]:
    m = TwoTask(k=3, dtype=dtype, width=8).to(device)
    m.x, m.y = m.x.to(device), m.y.to(device)  # (plain attributes: .to does not move them)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=list(m.heads), lr=0.05, momentum=0.9,
                 aggregator=agg, backend=backend, generator=torch.Generator().manual_seed(0),
                 **cfg, **more)
    assert opt.info()["backend"] == backend
    for _ in range(steps):
        losses = opt.step(m.losses)
        assert losses.device.type == device.split(":")[0]
    return [p.detach().cpu() for p in m.parameters()]


@pytest.mark.parametrize("agg", ["ls", "mgda", "pcgrad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("name", METHODS)
def test_gpu_steps_match_the_cpu(name, dtype, agg):
    # (zo draws its directions from a generator on the parameters' device: a CUDA generator's
    # numbers are not the CPU one's, so there the GPU backends are compared with each other)
    ref_dev = "cuda" if name == "gl-zo" else "cpu"
    want = _run(ref_dev, "torch", METHODS[name], dtype, agg)
    for be in _backends():
        got = _run("cuda", be, METHODS[name], dtype, agg)
        for a, b in zip(want, got):
            torch.testing.assert_close(b.float(), a.float(), **TOL[dtype])


@pytest.mark.parametrize("batched", [True, "auto"])
@pytest.mark.parametrize("name", ["gl", "gl-lagged", "fmtl"])
def test_gpu_batched_points_match_the_sequential_passes(name, batched):
    for be in _backends():
        seq = _run("cuda", be, METHODS[name], torch.float64, "mgda", steps=4)
        bat = _run("cuda", be, METHODS[name], torch.float64, "mgda", steps=4, batched=batched)
        for a, b in zip(seq, bat):
            torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_gpu_user_aggregator_with_cpu_weights():
    """A user aggregator building its weights on the CPU works with a GPU model."""
    agg = lambda G: torch.ones(G.shape[0]) / G.shape[0]  # noqa: E731
    want = _run("cpu", "torch", METHODS["gl"], torch.float64, agg)
    got = _run("cuda", _backends()[0], METHODS["gl"], torch.float64, agg)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
