"""Shared validation and conversion helpers for the Gram-matrix aggregators.

Every aggregator maps a K x K Gram matrix ``G[i, j] = <g_i, g_j>`` to K weights ``w`` so
that the combined update is ``d = sum_i w_i g_i``.  The helpers here keep the input
checks and the float64 round trip identical across aggregators.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "validate_gram",
    "to_output",
    "uniform_weights",
    "to_cpu_numpy",
    "from_numpy",
    "check_nonneg_float",
    "check_positive_float",
    "check_positive_int",
]


def validate_gram(G: object, name: str) -> torch.Tensor:
    """Check ``G`` and return it detached, symmetrised and in float64 on its own device.

    Raises ``ValueError`` (never ``assert``: asserts vanish under ``python -O``) when ``G`` is
    not a tensor, not 2-D, not square, empty, not floating point, or not finite.

    The finiteness test needs one host read of a boolean (a device sync on CUDA): raising a
    ``ValueError`` requires knowing the answer on the host.
    """
    if not isinstance(G, torch.Tensor):
        raise ValueError(f"{name}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(
            f"{name}: G must be a 2-D square Gram matrix [K, K], got shape {tuple(G.shape)}"
        )
    if G.shape[0] != G.shape[1]:
        raise ValueError(f"{name}: G must be square [K, K], got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError(f"{name}: G must have K >= 1 tasks, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"{name}: G must have a floating dtype, got {G.dtype}")
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{name}: G contains NaN or infinite entries")
    # The weights are treated as constants of the step, so gradients never flow into them.
    G64 = G.detach().to(torch.float64)
    # A fused kernel may round G[i, j] and G[j, i] differently; the maths assumes symmetry.
    return 0.5 * (G64 + G64.transpose(0, 1))


def to_output(w64: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Cast float64 weights back to the dtype and device of the caller's ``G``."""
    return w64.to(device=G.device, dtype=G.dtype)


def uniform_weights(K: int, G: torch.Tensor) -> torch.Tensor:
    """``ones(K) / K`` in ``G``'s dtype and device (the agreed answer when every g_i is 0)."""
    return torch.full((K,), 1.0 / K, dtype=G.dtype, device=G.device)


def to_cpu_numpy(G64: torch.Tensor) -> np.ndarray:
    """One device-to-host copy of the (small) K x K matrix for the iterative CPU solvers."""
    return G64.cpu().numpy().astype(np.float64, copy=True)


def from_numpy(w: np.ndarray, G: torch.Tensor) -> torch.Tensor:
    """Float64 NumPy weights -> tensor with ``G``'s dtype and device (one host-to-device copy)."""
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).to(
        device=G.device, dtype=G.dtype
    )


def check_nonneg_float(value: object, option: str, name: str) -> float:
    """Return ``value`` as a finite float >= 0, else raise ``ValueError``."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {option} must be a real number, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name}: {option} must be finite and >= 0, got {value!r}")
    return out


def check_positive_float(value: object, option: str, name: str) -> float:
    """Return ``value`` as a finite float > 0, else raise ``ValueError``."""
    out = check_nonneg_float(value, option, name)
    if out == 0:
        raise ValueError(f"{name}: {option} must be > 0, got {value!r}")
    return out


def check_positive_int(value: object, option: str, name: str) -> int:
    """Return ``value`` as an int >= 1, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: {option} must be an integer >= 1, got {value!r}")
    return int(value)


def check_pref_vector(value: object, name: str) -> torch.Tensor | None:
    """``pref_vector`` as a float64 CPU tensor (``None`` stays ``None``: the mean ``1/K``).

    Raises ``ValueError`` unless it is a 1-D sequence or tensor of finite entries >= 0 with
    a positive sum. Its length is checked against K when G is known (:func:`pref_weights`).
    """
    if value is None:
        return None
    try:
        p = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: pref_vector must be a 1-D sequence of numbers, got "
                         f"{value!r}") from None
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"{name}: pref_vector must be a non-empty 1-D vector, got shape "
                         f"{tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError(f"{name}: pref_vector must have finite entries >= 0 and a positive "
                         f"sum, got {p.tolist()}")
    return p


def pref_weights(pref: torch.Tensor | None, K: int, G64: torch.Tensor, name: str
                 ) -> torch.Tensor:
    """The preference weights ``u`` for K tasks on ``G64``'s device: ``pref_vector`` (checked
    to have K entries) or the mean ``1/K``."""
    if pref is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=G64.device)
    if pref.numel() != K:
        raise ValueError(f"{name}: pref_vector has {pref.numel()} entries for {K} tasks")
    return pref.to(G64.device)
