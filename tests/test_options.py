"""The constructor's options: every bad keyword argument gets today's message, and when two
are bad the same one wins as before the options were gathered in one object
(:class:`mtlsam_ext.optim.options.Options`)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtlsam_ext import MTLSAM
from mtlsam_ext.optim.options import Options
from tests.models import TwoTask

# One bad value per argument, in the order the constructor checks them (the first listed of
# two bad arguments is the one reported). "base_optimizer" stands for the positional argument.
BAD = [
    ("method", "adam", "method must be one of"),
    ("local_grad", "exact", "local_grad must be one of"),
    ("norm", "l1", "norm must be one of"),
    ("rho", -1.0, "^rho must be a finite number >= 0"),
    ("rho_heads", float("nan"), "^rho_heads must be a finite number >= 0"),
    ("n_dirs", 0, "n_dirs must be a positive int"),
    ("mu", 0.0, "mu must be a finite number > 0"),
    ("alpha", 1.5, r"alpha must be in \[0, 1\]"),
    ("base_optimizer", None, "base_optimizer must be a torch.optim.Optimizer class"),
    ("bn_stats", "some", "bn_stats must be one of"),
    ("max_grad_norm", -1.0, "max_grad_norm must be None or a finite number > 0"),
    ("bn_modules", [1], "bn_modules must be an nn.Module or a list of nn.Modules"),
    # a CUDA generator, stood in for by its device attribute (no GPU needed)
    ("generator", SimpleNamespace(device=torch.device("cuda", 0)),
     "generator must be a CPU torch.Generator"),
    ("backend", "cuda", "backend must be one of"),
    ("perturb_sync", "both", "perturb_sync must be one of"),
    ("heads", "head", "heads must be a list of K heads"),
    ("aggregator", "adam", "aggregator"),
    ("batched_grads", "yes", "batched_grads must be True or False"),
    ("batched", "sometimes", "batched must be True, False, 'auto' or 'points'"),
    ("task_chunk", 0, "task_chunk must be None or a positive int"),
    ("layers", [], "layers must name at least one layer"),
    ("grad_scaler", object(), "grad_scaler must be a torch.amp.GradScaler"),
]


def _build(bad: dict) -> MTLSAM:
    m = TwoTask()
    kw = dict(heads=list(m.heads), lr=0.1, backend="torch")
    base = torch.optim.SGD
    for name, value in bad.items():
        if name == "base_optimizer":
            base = torch.optim.SGD(m.parameters(), lr=0.1)
        else:
            kw[name] = value
    return MTLSAM(m.body, base, **kw)


@pytest.mark.parametrize("name, value, msg", BAD, ids=[b[0] for b in BAD])
def test_each_bad_argument_has_its_message(name, value, msg):
    with pytest.raises(ValueError, match=msg):
        _build({name: value})


def test_the_first_bad_argument_in_the_order_of_checks_wins():
    for (a, va, msg), (b, vb, _) in itertools.combinations(BAD, 2):
        with pytest.raises(ValueError, match=msg):
            _build({a: va, b: vb})


def test_options_hold_every_keyword_argument_with_the_constructors_defaults():
    """The options object mirrors the signature: same names (``heads`` aside: it is the
    model's structure, wired with ``shared``), same defaults."""
    sig = inspect.signature(MTLSAM.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(Options)}
    keywords = [n for n, p in sig.items() if p.kind is p.KEYWORD_ONLY and n != "heads"]
    assert list(fields) == ["base_optimizer"] + keywords
    for name in keywords:
        assert fields[name].default == sig[name].default, name


def test_options_normalise_as_the_constructor_did():
    opts = Options(torch.optim.SGD, rho=1, alpha=True, mu=1, max_grad_norm=2,
                   adaptive=1, decompose=0, bn_modules=(nn.BatchNorm1d(2),))
    assert opts.rho == 1.0 and type(opts.rho) is float
    assert opts.rho_heads == 1.0 and type(opts.rho_heads) is float  # None: rho's value
    assert opts.alpha == 1.0 and type(opts.alpha) is float
    assert type(opts.mu) is float and type(opts.max_grad_norm) is float
    assert opts.adaptive is True and opts.decompose is False
    assert isinstance(opts.bn_modules, list)
    assert Options(torch.optim.SGD, rho=0.1, rho_heads=0.0).rho_heads == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rho = 0.5  # type: ignore[misc]
