"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

import torch

from ._common import to_output, validate_gram

__all__ = ["pcgrad", "draw_permutations"]


def draw_permutations(K: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random visiting orders used by :func:`pcgrad`, as a CPU int64 tensor [K, K].

    Draw order (part of the API, so that tests and users can reproduce it): row ``i`` is
    ``torch.randperm(K, generator=generator)`` from the i-th of K consecutive calls, for
    ``i = 0, ..., K - 1``, drawn on the CPU.  ``generator=None`` uses torch's global CPU RNG.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"pcgrad: generator must be a CPU torch.Generator, got one on {generator.device}"
        )
    return torch.stack([torch.randperm(K, generator=generator) for _ in range(K)])


def pcgrad(G: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad weights (T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient
    Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1).

    For each task i: ``g_i^PC = g_i``; for j in a random permutation of all K tasks, if
    ``<g_i^PC, g_j> < 0`` then ``g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 g_j`` (tasks
    with ``||g_j|| = 0`` are skipped).  ``d = sum_i g_i^PC`` (a sum, as in appendix B.2 of
    the F-MTL paper).

    Each ``g_i^PC`` is tracked as a coefficient row ``C[i]`` over the original gradients
    (``g_i^PC = sum_k C[i, k] g_k``), so ``<g_i^PC, g_j> = (C G)[i, j]`` and the result is
    ``w = sum_i C[i]``.  The K tasks i are processed together: step t visits
    ``j_i = perm_i[t]`` for every i at once, with ``torch.where`` instead of branches, so the
    K sequential steps run on G's device with no host sync (the input finiteness check is
    the only one).  The permutations are drawn on the CPU by :func:`draw_permutations`
    (K calls of ``torch.randperm(K, generator)`` for i = 0..K-1) and copied to the device
    once.  ``generator`` must be a CPU generator (``None``: torch's global CPU RNG).
    """
    G64 = validate_gram(G, "pcgrad")
    K = G64.shape[0]
    perms = draw_permutations(K, generator).to(G64.device)
    diag = G64.diagonal()
    C = torch.eye(K, dtype=torch.float64, device=G64.device)
    for t in range(K):
        j = perms[:, t]  # task visited by every i at step t
        # <g_i^PC, g_{j_i}> = sum_k C[i, k] G[k, j_i]; G is symmetric so G[k, j_i] = G[j_i, k].
        inner = (C * G64.index_select(0, j)).sum(dim=1)
        sq = diag.index_select(0, j)  # ||g_{j_i}||^2
        conflict = (inner < 0.0) & (sq > 0.0)
        coef = torch.where(conflict, inner / torch.where(sq > 0.0, sq, 1.0), 0.0)
        C = C.scatter_add(1, j.unsqueeze(1), -coef.unsqueeze(1))
    return to_output(C.sum(dim=0), G)
