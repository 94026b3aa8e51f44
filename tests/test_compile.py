"""A ``torch.compile``d model inside the closure, for every method: the step matches the same
step with the eager model (CPU, small model; inductor compiles each graph once)."""

import time

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import BNNet

METHODS = [dict(method="gl"), dict(method="gl", local_grad="lagged"),
           dict(method="gl", local_grad="zo", n_dirs=1), dict(method="fmtl"),
           dict(method="sam"), dict(method="erm")]
IDS = ["gl", "gl-lagged", "gl-zo", "fmtl", "sam", "erm"]


class Wrapped(torch.nn.Module):
    """The whole forward (backbone and heads) as one module, compiled as one graph."""

    def __init__(self, net: BNNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net.body(x)
        return torch.stack([((hd(h).squeeze(1) - y[:, i]) ** 2).mean()
                            for i, hd in enumerate(self.net.heads)])


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    net = BNNet(k=2)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    return net, init, torch.compile(Wrapped(net))


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_compiled_model_in_the_closure(compiled, cfg):
    net, init, fn = compiled
    net.load_state_dict(init)
    eager = BNNet(k=2)
    eager.load_state_dict(init)
    opt_c = MTLSAM(net.body, torch.optim.SGD, heads=list(net.heads), aggregator="mgda",
                   lr=0.05, backend="torch", generator=torch.Generator().manual_seed(0), **cfg)
    opt_e = MTLSAM(eager.body, torch.optim.SGD, heads=list(eager.heads), aggregator="mgda",
                   lr=0.05, backend="torch", generator=torch.Generator().manual_seed(0), **cfg)
    start = time.perf_counter()
    for _ in range(3):
        lc = opt_c.step(lambda: fn(net.x, net.y))
        le = opt_e.step(eager.losses)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key, want in eager.bn_state().items():
        torch.testing.assert_close(net.bn_state()[key], want, rtol=1e-5, atol=1e-6)
    assert time.perf_counter() - start < 120


class Leaky(Wrapped):
    """Loss 1 also depends on head 0: must still be refused through the compiled region."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = super().forward(x, y)
        return losses + torch.stack([losses.new_zeros(()), 0.1 * losses[0]])


def test_compiled_head_leak_is_still_refused():
    net = BNNet(k=2)
    fn = torch.compile(Leaky(net))
    opt = MTLSAM(net.body, torch.optim.SGD, heads=list(net.heads), method="gl", lr=0.05,
                 backend="torch")
    with pytest.raises(ValueError, match="head 0's parameters receive gradient from loss 1"):
        opt.step(lambda: fn(net.x, net.y))
