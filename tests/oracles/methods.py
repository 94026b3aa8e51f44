"""Float64 oracle of one MTLSAM optimizer step, written straight from the method formulas.

Deliberately independent of ``mtlsam_ext``: plain torch autograd on float64 vectors, one
backward per gradient, explicit vectors instead of flat buffers / fused ops / coefficient
tricks.  The only thing the caller supplies besides the model is the aggregator ``M``
(a callable ``G -> w`` on a K x K float64 Gram matrix), so that non-trivial aggregators can
be the (separately tested) production ones evaluated on this oracle's own Gram matrix.

Notation (K tasks, losses l_i, shared vector theta in layer order, head i vector phi_i):

* task weights ``w`` (default 1/K), ``l_0 = sum_i w_i l_i``;
* ``sam_eps(g) = rho T^2 g / ||T g||`` with ``T = |theta|`` (adaptive) or ``T = 1``; a vector
  whose (weighted) norm is zero gives a zero perturbation;
* head i: ``eps_h^i = sam_eps(g_h^i)`` over head i's parameters only, radius ``rho_heads``;
* ``erm``: ``d = M(G) . [g_i]`` at the current point;
* ``sam``: ``eps0 = sam_eps(grad l_0)``; all heads perturbed by their own eps_h^i; the task
  gradients at ``(theta + eps0, phi + eps_h)`` are aggregated;
* ``fmtl``: ``eps_i = sam_eps(g_i^loss)``; task i's SAM gradient at ``(theta + eps_i,
  phi_i + eps_h^i)``; ``d = M(G_loss) . loss rows + M(G_flat) . flat rows`` (decompose) or
  ``M(G_SAM) . SAM rows``;
* ``gl``: per-layer mixtures ``m_il = alpha g0_l + (1 - alpha) ghat_il`` on the sampled layers,
  magnitude-matched (``norm="match"``) or globally normalised (``norm="global"``), then the
  SAM gradients at ``(theta + eps_i, phi_i + eps_h^i)`` are aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OracleResult", "oracle_step", "ls_weights", "mean_weights"]

F64 = torch.float64

LossFn = Callable[[list[Tensor], list[list[Tensor]]], Sequence[Tensor]]
Aggregate = Callable[[Tensor], Tensor]


def ls_weights(G: Tensor) -> Tensor:
    """Linear scalarisation: w = 1."""
    return torch.ones(G.shape[0], dtype=F64)


def mean_weights(G: Tensor) -> Tensor:
    """Mean: w = 1/K."""
    return torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=F64)


class _Flat:
    """A list of tensors seen as one float64 vector (concatenation in order)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.shapes = [tuple(t.shape) for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.n = sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        if not tensors:
            return torch.zeros(0, dtype=F64)
        return torch.cat([t.detach().to(F64).reshape(-1) for t in tensors])

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        out, s = [], 0
        for shape, n in zip(self.shapes, self.numels):
            out.append(vec[s:s + n].view(shape))
            s += n
        return out


@dataclass
class OracleResult:
    shared_update: list[Tensor]          # per shared tensor (layer order), float64
    head_updates: list[list[Tensor]]     # per head, per tensor, float64 ([] without heads)
    losses: Tensor                       # [K] losses at the unperturbed point
    sam_rows: Tensor | None              # [K, N] SAM gradients (gl/fmtl/sam), for "lagged"
    shared_vec: Tensor                   # the shared update as one vector
    head_vec: Tensor                     # all head updates as one vector


class _Model:
    def __init__(self, loss_fn: LossFn, shared_layers: Sequence[Sequence[Tensor]],
                 heads: Sequence[Sequence[Tensor]] | None) -> None:
        self.loss_fn = loss_fn
        tensors = [t for layer in shared_layers for t in layer]
        self.sflat = _Flat(tensors)
        self.theta = self.sflat.flatten(tensors)
        self.layer_slices: list[slice] = []
        s = 0
        for layer in shared_layers:
            n = sum(t.numel() for t in layer)
            self.layer_slices.append(slice(s, s + n))
            s += n
        self.heads = [list(h) for h in heads] if heads is not None else []
        self.hflats = [_Flat(h) for h in self.heads]
        self.phis = [hf.flatten(h) for hf, h in zip(self.hflats, self.heads)]

    def evaluate(self, theta: Tensor, phis: Sequence[Tensor]
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Fresh leaves at (theta, phis) and the K losses there."""
        th = theta.detach().clone().requires_grad_(True)
        ph = [p.detach().clone().requires_grad_(True) for p in phis]
        with torch.enable_grad():
            losses = list(self.loss_fn(self.sflat.unflatten(th),
                                       [hf.unflatten(p) for hf, p in zip(self.hflats, ph)]))
        return th, ph, losses


def _grad(out: Tensor, wrt: Sequence[Tensor]) -> list[Tensor]:
    got = torch.autograd.grad(out, list(wrt), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(got, wrt)]


def _sam_eps(g: Tensor, T: Tensor, rho: float) -> Tensor:
    """rho T^2 g / ||T g|| (zero for a zero weighted norm)."""
    n = torch.linalg.vector_norm(T * g)
    if float(n) == 0.0:
        return torch.zeros_like(g)
    return rho * T * T * g / n


def _combine(aggregate: Aggregate, rows: Tensor) -> Tensor:
    G = rows @ rows.T
    w = aggregate(G).to(F64)
    return w @ rows


def oracle_step(loss_fn: LossFn, shared_layers: Sequence[Sequence[Tensor]],
                heads: Sequence[Sequence[Tensor]] | None, *, method: str,
                aggregate: Aggregate, rho: float = 0.05, rho_heads: float | None = None,
                alpha: float = 0.5, sampled: Sequence[int] | None = None,
                norm: str = "match", adaptive: bool = False, decompose: bool = True,
                task_weights: Sequence[float] | None = None, lagged: Tensor | None = None
                ) -> OracleResult:
    """One step of ``method`` at the point given by ``shared_layers`` / ``heads``.

    ``loss_fn(shared_tensors, head_tensors)`` returns the K task losses, where
    ``shared_tensors`` is the flat list of shared tensors in layer order and
    ``head_tensors[i]`` the list of head i's tensors.  ``sampled``: resolved indices of the
    sampled layers of ``gl`` (``None`` = {0, L // 2, L - 1}).  ``lagged``: for ``gl`` with
    ``local_grad="lagged"``, the previous step's ``[K, N]`` SAM rows (``None`` on the first
    step, which then uses the exact task gradients).
    Returns the updates (minus the new parameters plus the old ones, for SGD with lr=1).
    """
    m = _Model(loss_fn, shared_layers, heads)
    rho_h = rho if rho_heads is None else rho_heads
    theta, phis = m.theta, m.phis
    has_heads = len(phis) > 0
    th, ph, losses = m.evaluate(theta, phis)
    K = len(losses)
    if has_heads and len(phis) != K:
        raise ValueError("one head per task")
    tw = (torch.full((K,), 1.0 / K, dtype=F64) if task_weights is None
          else torch.as_tensor(task_weights, dtype=F64))
    T = theta.abs() if adaptive else torch.ones_like(theta)
    Th = [p.abs() if adaptive else torch.ones_like(p) for p in phis]
    unperturbed = torch.stack([x.detach() for x in losses])

    def head_eps(head_grads: list[Tensor]) -> list[Tensor]:
        return [_sam_eps(g, t, rho_h) for g, t in zip(head_grads, Th)]

    def at_task_point(i: int, eps: Tensor, eps_h: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        """(grad_theta l_i, grad_phi_i l_i) at (theta + eps, phi_i + eps_h[i]), other heads
        unperturbed."""
        ph_i = [p + eps_h[j] if (eps_h is not None and j == i) else p
                for j, p in enumerate(phis)]
        t2, p2, l2 = m.evaluate(theta + eps, ph_i)
        gs = _grad(l2[i], [t2] + ([p2[i]] if has_heads else []))
        return gs[0], (gs[1] if has_heads else torch.zeros(0, dtype=F64))

    sam_rows = None
    if method == "erm":
        rows = torch.stack([_grad(losses[i], [th])[0] for i in range(K)])
        d = _combine(aggregate, rows)
        head_upd = [_grad(losses[i], [ph[i]])[0] for i in range(K)] if has_heads else []

    elif method == "sam":
        l0 = sum(tw[i] * losses[i] for i in range(K))
        g0 = _grad(l0, [th])[0]
        eps0 = _sam_eps(g0, T, rho)
        eh = head_eps([_grad(losses[i], [ph[i]])[0] for i in range(K)]) if has_heads else []
        t2, p2, l2 = m.evaluate(theta + eps0, [p + e for p, e in zip(phis, eh)])
        rows = torch.stack([_grad(l2[i], [t2])[0] for i in range(K)])
        head_upd = [_grad(l2[i], [p2[i]])[0] for i in range(K)] if has_heads else []
        sam_rows = rows
        d = _combine(aggregate, rows)

    elif method == "fmtl":
        loss_rows = torch.stack([_grad(losses[i], [th])[0] for i in range(K)])
        eh = head_eps([_grad(losses[i], [ph[i]])[0] for i in range(K)]) if has_heads else None
        sam, head_upd = [], []
        for i in range(K):
            g_sam, g_head = at_task_point(i, _sam_eps(loss_rows[i], T, rho), eh)
            sam.append(g_sam)
            head_upd.append(g_head)
        if not has_heads:
            head_upd = []
        sam_rows = torch.stack(sam)
        if decompose:
            flat_rows = sam_rows - loss_rows
            # Aggregator order matters for random aggregators: loss Gram first, then flat.
            a = aggregate(loss_rows @ loss_rows.T).to(F64)
            b = aggregate(flat_rows @ flat_rows.T).to(F64)
            d = a @ loss_rows + b @ flat_rows
        else:
            d = _combine(aggregate, sam_rows)

    elif method == "gl":
        L = len(m.layer_slices)
        S = sorted({0, L // 2, L - 1}) if sampled is None else sorted(set(sampled))
        l0 = sum(tw[i] * losses[i] for i in range(K))
        g0 = _grad(l0, [th])[0]
        if lagged is not None:
            ghat = lagged.to(F64)
        else:
            ghat = torch.stack([_grad(losses[i], [th])[0] for i in range(K)])
        eps0 = _sam_eps(g0, T, rho)
        norm_g0 = torch.linalg.vector_norm(T * g0)
        eh = (head_eps(_grad(l0, ph)) if has_heads else None)  # from grad_{phi_i} l_0
        sam, head_upd = [], []
        for i in range(K):
            eps = torch.zeros_like(theta)
            if norm == "match":
                for li, sl in enumerate(m.layer_slices):
                    if li not in S:
                        eps[sl] = eps0[sl]
                        continue
                    mix = alpha * g0[sl] + (1 - alpha) * ghat[i, sl]
                    nm = torch.linalg.vector_norm(T[sl] * mix)
                    if float(nm) == 0.0:
                        eps[sl] = eps0[sl]
                    elif float(norm_g0) == 0.0:
                        eps[sl] = 0.0
                    else:
                        size = rho * torch.linalg.vector_norm(T[sl] * g0[sl]) / norm_g0
                        eps[sl] = size * T[sl] ** 2 * mix / nm
            elif norm == "global":
                mix = alpha * g0.clone()
                for li in S:
                    sl = m.layer_slices[li]
                    mix[sl] = alpha * g0[sl] + (1 - alpha) * ghat[i, sl]
                eps = _sam_eps(mix, T, rho)
            else:
                raise ValueError(norm)
            g_sam, g_head = at_task_point(i, eps, eh)
            sam.append(g_sam)
            head_upd.append(g_head)
        if not has_heads:
            head_upd = []
        sam_rows = torch.stack(sam)
        d = _combine(aggregate, sam_rows)
    else:
        raise ValueError(f"unknown method {method!r}")

    head_vec = torch.cat(head_upd) if head_upd else torch.zeros(0, dtype=F64)
    return OracleResult(
        shared_update=m.sflat.unflatten(d),
        head_updates=[hf.unflatten(u) for hf, u in zip(m.hflats, head_upd)],
        losses=unperturbed,
        sam_rows=sam_rows,
        shared_vec=d,
        head_vec=head_vec,
    )
