"""The constructor's steps that need the model: the heads as flat buffers, the modules whose
BatchNorm layers a step manages, the sampled layers, the default generator.

``MTLSAM.__init__`` calls these in a fixed order (it decides which of two problems is reported:
the shared parameters' before the heads'), after :class:`~mtlsam_ext.optim.options.Options`
has checked the arguments that need no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlsam_ext.flat import FlatParams
from mtlsam_ext.optim.distributed import unwrap_ddp
from mtlsam_ext.optim.layer_selection import DEFAULT_N_SAMPLED, LAYER_MODES, default_layers


def split_heads(heads: Any) -> tuple[list[Any] | None, list[str] | None, list[nn.Module]]:
    """``(heads, names, ddp wrappers)``: the heads as a list (``None``: none), their names (a
    dict / ``nn.ModuleDict`` names the tasks) and the DDP wrappers taken off them."""
    names: list[str] | None = None
    if isinstance(heads, (Mapping, nn.ModuleDict)):  # names: the tasks' names
        names = [str(key) for key in heads.keys()]
        heads = list(heads.values())
    elif isinstance(heads, str) or (isinstance(heads, nn.Module)
                                    and not hasattr(type(heads), "__iter__")):
        # one module (an nn.Linear) is not K heads; containers (ModuleList, Sequential) are
        raise ValueError(f"heads must be a list of K heads (modules or parameter lists), an "
                         f"nn.ModuleList, or an nn.ModuleDict / dict {{task name: head}}; "
                         f"got {type(heads).__name__}")
    if heads is None:
        return None, names, []
    unwrapped = [unwrap_ddp(h) for h in heads]
    return [h for h, _ in unwrapped], names, [d for _, d in unwrapped if d is not None]


def flat_heads(heads: list[Any] | None, names: list[str] | None,
               shared: FlatParams) -> FlatParams | None:
    """The heads' flat buffers, one layer per head (named by ``names`` or ``head{i}``),
    checked against the shared parameters (same device, no parameter in both)."""
    if heads is None:
        return None
    if not heads:
        raise ValueError("heads must be a non-empty list (one entry per task) or None")
    named = dict(zip(names, heads)) if names is not None else \
        {f"head{i}": h for i, h in enumerate(heads)}
    flat = FlatParams(named, "heads")
    if len(flat.layers) != len(heads):
        have = {la.name for la in flat.layers}
        empty = [n for n in named if n not in have]
        raise ValueError(f"heads {empty} have no trainable parameters (or repeat "
                         "another head's)")
    if flat.device != shared.device:
        raise ValueError(f"heads are on {flat.device} but shared parameters are "
                         f"on {shared.device}")
    if shared.ids() & flat.ids():
        raise ValueError("a parameter appears in both shared and heads")
    return flat


def module_roots(shared: Any, heads: list[Any] | None,
                 bn_modules: Sequence[nn.Module] | nn.Module | None) -> list[object]:
    """Where BatchNorm layers are looked for: ``shared`` (and a dict's values), the heads and
    ``bn_modules``."""
    roots: list[object] = [shared]
    if isinstance(shared, dict):
        roots.extend(shared.values())
    roots.extend(heads or [])
    roots.extend([bn_modules] if isinstance(bn_modules, nn.Module) else (bn_modules or []))
    return roots


def constant_weights(aggregator: Any, options: dict[str, Any] | None) -> str | None:
    """``"ls"`` / ``"mean"`` when the weights do not depend on the Gram matrix (the step then
    skips computing it), unless a normalisation or scaling convention makes them depend on
    it; ``None`` otherwise."""
    conv = {k: v for k, v in (options or {}).items()
            if k in ("normalize", "scale") and v != "none"}
    return (aggregator.lower() if isinstance(aggregator, str)
            and aggregator.lower() in ("ls", "mean") and not conv else None)


def layer_choice(layers: Sequence[int | str] | str | None, shared: FlatParams,
                 n_sampled: int | None) -> tuple[str | None, list[int], int]:
    """``(mode, fixed layer indices, n_sampled)`` of ``layers=``: a mode, one layer's name,
    ``None`` (first, middle and last) or indices / names."""
    n_layers = len(shared.layers)
    mode = None
    if isinstance(layers, str):  # a mode or one layer's name, never its characters
        if layers in LAYER_MODES:
            mode, picked = layers, []
        else:
            picked = [shared.layer_index(layers)]
    elif layers is None:
        picked = default_layers(n_layers)
    else:
        picked = sorted({shared.layer_index(s) for s in layers})
        if not picked:
            raise ValueError("layers must name at least one layer (or be None)")
    # the default fits any backbone; an explicit value is checked by the layer selector
    return mode, picked, min(DEFAULT_N_SAMPLED, n_layers) if n_sampled is None else n_sampled


def default_generator(sync: Any, device: torch.device) -> torch.Generator:
    """A CPU generator seeded from the global RNG (rank 0's seed on every rank)."""
    generator = torch.Generator()
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if sync is not None:
        seed = sync.broadcast_seed(seed, device)
    generator.manual_seed(seed)
    return generator
