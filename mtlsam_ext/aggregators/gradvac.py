"""GradVac: gradient vaccine, with pairwise cosine targets kept as an EMA (stateful)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._common import check_nonneg_float, to_output, validate_gram

__all__ = ["GradVac", "gradvac", "check_gradvac_options", "draw_orders"]


def check_gradvac_options(beta: object = 0.5, eps: object = 1e-8) -> tuple[float, float]:
    try:
        b = float(beta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"gradvac: beta must be a real number in [0, 1], got {beta!r}") from None
    if not math.isfinite(b) or not 0.0 <= b <= 1.0:
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta!r}")
    return b, check_nonneg_float(eps, "eps", "gradvac")


def draw_orders(K: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The visiting orders of :func:`gradvac`, a CPU int64 tensor [K, K - 1]: row ``i`` lists
    the tasks ``j != i`` in the order ``torch.randperm(K - 1, generator=generator)`` (the
    i-th of K consecutive calls, i = 0..K-1) picks them from ``[0..i-1, i+1..K-1]``."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"gradvac: generator must be a CPU torch.Generator, got one on "
                         f"{generator.device}")
    rows = []
    for i in range(K):
        others = torch.cat([torch.arange(i), torch.arange(i + 1, K)])
        rows.append(others[torch.randperm(K - 1, generator=generator)])
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)


def gradvac(
    G: torch.Tensor,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GradVac weights (Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine:
    Investigating and Improving Multi-task Optimization in Massively Multilingual Models",
    ICLR 2021, section 3.2, eq. 2 and Algorithm 1).

    For each task i, from ``g_i^PC = g_i`` and for every other task j in a random order, the
    cosine ``phi = cos(g_i^PC, g_j)`` is compared with the target ``phi_hat_ij``; if
    ``phi < phi_hat`` the vaccine adds

        ``||g_i^PC|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
        / (||g_j|| sqrt(1 - phi_hat^2)) g_j``

    to ``g_i^PC`` (eq. 2: after it, the cosine equals the target), and the target follows
    the observed cosine as an EMA, ``phi_hat <- (1 - beta) phi_hat + beta phi``
    (``beta`` in [0, 1], default 0.5). ``d = sum_i g_i^PC``. ``eps`` (default 1e-8, as in
    TorchJD 0.18) is added to the two denominators; note it is absolute, so it matters when
    ``||g_i|| ||g_j||`` is below ~1e-6.

    ``targets`` is the [K, K] float64 tensor of ``phi_hat`` (zeros, the paper's start, if
    ``None``); it is updated in place, which is how :class:`GradVac` keeps its state. As in
    :func:`pcgrad`, each ``g_i^PC`` is a coefficient row over the original gradients and
    the K tasks advance together, one visited j each per step (K - 1 steps on G's device,
    no host read); the orders come from :func:`draw_orders` on the CPU.
    """
    beta, eps = check_gradvac_options(beta, eps)
    G64 = validate_gram(G, "gradvac")
    K = G64.shape[0]
    dev = G64.device
    if targets is None:
        targets = torch.zeros(K, K, dtype=torch.float64, device=dev)
    orders = draw_orders(K, generator).to(dev)
    rows = torch.arange(K, device=dev)
    norm = G64.diagonal().clamp_min(0.0).sqrt()
    C = torch.eye(K, dtype=torch.float64, device=dev)
    CG = G64.clone()  # CG[i, k] = <g_i^PC, g_k>
    for t in range(K - 1):
        j = orders[:, t]
        dot = CG[rows, j]
        norm_i = (CG * C).sum(dim=1).clamp_min(0.0).sqrt()
        norm_j = norm.index_select(0, j)
        phi = dot / (norm_i * norm_j + eps)
        hat = targets[rows, j]
        root_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        root_hat = (1.0 - hat * hat).clamp_min(0.0).sqrt()
        coef = norm_i * (hat * root_phi - phi * root_hat) / (norm_j * root_hat + eps)
        coef = torch.where(phi < hat, coef, 0.0)
        C = C.index_put((rows, j), coef, accumulate=True)
        CG = CG + coef.unsqueeze(1) * G64.index_select(0, j)
        targets.index_put_((rows, j), (1.0 - beta) * hat + beta * phi)
    return to_output(C.sum(dim=0), G)


class GradVac:
    """:func:`gradvac` with its targets ``phi_hat`` kept across calls: what
    ``get_aggregator("gradvac", beta=..., eps=...)`` builds (options checked here).

    ``state_dict()`` / ``load_state_dict()`` save and restore the targets bit for bit
    (MTLSAM stores them in its own state dict and puts them back when a step fails or is
    skipped). The targets start at 0 and restart at 0 if K changes.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        self.beta, self.eps = check_gradvac_options(beta, eps)
        self.targets: torch.Tensor | None = None

    def __call__(self, G: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if not isinstance(G, torch.Tensor) or G.dim() != 2:
            return gradvac(G, beta=self.beta, eps=self.eps, generator=generator)  # raises
        K = G.shape[0]
        t = self.targets
        # A copy is worked on and kept only once the call has succeeded.
        work = (torch.zeros(K, K, dtype=torch.float64, device=G.device)
                if t is None or t.shape != (K, K) else t.to(G.device).clone())
        w = gradvac(G, beta=self.beta, eps=self.eps, targets=work, generator=generator)
        self.targets = work
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "targets" not in state:
            raise ValueError("gradvac: not a GradVac state (expected the key 'targets')")
        t = state["targets"]
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2
                              or t.shape[0] != t.shape[1]):
            raise ValueError("gradvac: state 'targets' must be a square tensor or None")
        self.targets = None if t is None else t.detach().to(torch.float64).clone()
