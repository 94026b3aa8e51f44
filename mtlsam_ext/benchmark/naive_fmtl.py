"""Naive F-MTL baselines, written the way the F-MTL authors' public training scripts are
structured (Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat
Regions"); this is our own code reproducing that *structure*, so that benchmarks compare
MTLSAM against what users of those scripts actually run.

What makes it "naive" (on purpose; do not optimise):

* gradients are Python lists of per-parameter tensors, one full ``.clone()`` per task and
  per pass; the old shared weights are saved as another list of clones;
* K perturbation lists ``e_i`` are built and kept for the whole step (K more copies);
* parameters are swapped with ``p.data = (old + e_i).clone()`` and restored by clone;
* aggregators run on those lists (or on a freshly concatenated [K, N] matrix where the
  reference implementations do so) with host round trips (``.item()``, NumPy / SciPy).

Memory: g (K copies) + e (K) + SAM (K) + flat (K) + old (1) + the aggregators' temporaries
~ 4K-5K copies of the shared parameters, against MTLSAM's (2K + 1).

Classes (same constructor shape as :class:`mtlsam_ext.MTLSAM`: shared part, base optimizer
class, ``heads=``, ``aggregator=``, ``rho``, ``rho_heads``, ``adaptive``, ``**base_kwargs``;
``step(closure)`` where ``closure()`` runs a forward and returns the K task losses):

* :class:`NaiveFMTL` (``recompute=False``): one forward, K backwards with
  ``retain_graph=True``, then K (forward, backward) at the perturbed points:
  K + 1 forwards, 2K backwards.
* :class:`NaiveFMTL` (``recompute=True``): the many-task script's layout, which recomputes
  the forward for every task's loss gradient (its backbone graph is not retained):
  2K forwards, 2K backwards.
* :class:`NaiveSAMPerTask`: a per-task loop over a SAM optimizer written in the style of
  the popular single-task SAM implementation (``first_step`` / ``second_step`` over the
  parameters, one joint norm over shared + head i, ``state[p]["old_p"]``), collecting each
  task's SAM gradient and aggregating them directly, ``M(g_1^SAM..g_K^SAM)``:
  2K forwards, 2K backwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

__all__ = [
    "NAIVE_AGGREGATORS",
    "NaiveFMTL",
    "NaiveSAMPerTask",
    "agg_cagrad",
    "agg_imtl",
    "agg_ls",
    "agg_mean",
    "agg_mgda",
    "agg_pcgrad",
    "MinNormSolverFW",
]

GradList = list[Tensor]  # one tensor per shared parameter


def _params(p: Any) -> list[Tensor]:
    if isinstance(p, nn.Module):
        return [q for q in p.parameters() if q.requires_grad]
    if isinstance(p, dict):
        out: list[Tensor] = []
        for v in p.values():
            out.extend(_params(v))
        return out
    if isinstance(p, Tensor):
        return [p]
    return [q for q in p if q.requires_grad] if isinstance(p, Iterable) else list(p)


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


def _as_list(losses: Any) -> list[Tensor]:
    if isinstance(losses, Tensor):
        return list(losses.unbind(0)) if losses.dim() else [losses]
    return list(losses)


# ================================================================================================
# Aggregators, as the reference scripts run them (lists of per-parameter tensors per task).
# ================================================================================================
def agg_ls(grads: list[GradList], **_: Any) -> GradList:
    """Linear scalarisation: the plain sum over tasks, parameter by parameter."""
    return [torch.stack([g[k] for g in grads]).sum(0) for k in range(len(grads[0]))]


def agg_mean(grads: list[GradList], **_: Any) -> GradList:
    return [torch.stack([g[k] for g in grads]).mean(0) for k in range(len(grads[0]))]


class MinNormSolverFW:
    """Frank-Wolfe min-norm solver in the style of Sener & Koltun's public ``MinNormSolver``:
    pairwise dot products are accumulated parameter by parameter with ``.item()`` into a dict,
    the start point is the best pair's closed-form 2-point solution (which is returned as is
    for K = 2, where it is optimal), then Frank-Wolfe steps with the 2-point line search
    until the L1 change of the weights drops below ``STOP_CRIT`` or ``MAX_ITER`` steps.
    The 2-point solver clamps a boundary solution to 0.999 / 0.001 like the original."""

    MAX_ITER = 250
    STOP_CRIT = 1e-5

    @staticmethod
    def _min_norm_element_from2(v1v1: float, v1v2: float, v2v2: float) -> tuple[float, float]:
        """Weight ``gamma`` of v1 minimising ``||gamma v1 + (1 - gamma) v2||^2``, and the cost."""
        if v1v2 >= v1v1:
            return 0.999, v1v1
        if v1v2 >= v2v2:
            return 0.001, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        cost = v2v2 + gamma * (v1v2 - v2v2)
        return gamma, cost

    @classmethod
    def _min_norm_2d(cls, vecs: list[GradList], dps: dict) -> tuple[tuple, dict]:
        dmin = float("inf")
        sol: tuple = ((0, 0), 1.0, 0.0)
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                if (i, j) not in dps:
                    dps[(i, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, j)] += torch.dot(vecs[i][k].reshape(-1),
                                                 vecs[j][k].reshape(-1)).item()
                    dps[(j, i)] = dps[(i, j)]
                if (i, i) not in dps:
                    dps[(i, i)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, i)] += torch.dot(vecs[i][k].reshape(-1),
                                                 vecs[i][k].reshape(-1)).item()
                if (j, j) not in dps:
                    dps[(j, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(j, j)] += torch.dot(vecs[j][k].reshape(-1),
                                                 vecs[j][k].reshape(-1)).item()
                c, d = cls._min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
                if d < dmin:
                    dmin = d
                    sol = ((i, j), c, d)
        return sol, dps

    @classmethod
    def find_min_norm_element_fw(cls, vecs: list[GradList]) -> tuple[np.ndarray, float]:
        dps: dict = {}
        init_sol, dps = cls._min_norm_2d(vecs, dps)
        n = len(vecs)
        sol_vec = np.zeros(n)
        sol_vec[init_sol[0][0]] = init_sol[1]
        sol_vec[init_sol[0][1]] = 1 - init_sol[1]
        if n < 3:
            return sol_vec, init_sol[2]  # the 2-point solution is optimal for K = 2
        grad_mat = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                grad_mat[i, j] = dps[(i, j)] if i != j else dps[(i, i)]
        nd = init_sol[2]
        for _ in range(cls.MAX_ITER):
            t_iter = int(np.argmin(np.dot(grad_mat, sol_vec)))
            v1v1 = float(np.dot(sol_vec, np.dot(grad_mat, sol_vec)))
            v1v2 = float(np.dot(sol_vec, grad_mat[:, t_iter]))
            v2v2 = float(grad_mat[t_iter, t_iter])
            nc, nd = cls._min_norm_element_from2(v1v1, v1v2, v2v2)
            new_sol_vec = nc * sol_vec
            new_sol_vec[t_iter] += 1 - nc
            change = new_sol_vec - sol_vec
            if np.sum(np.abs(change)) < cls.STOP_CRIT:
                return sol_vec, nd
            sol_vec = new_sol_vec
        return sol_vec, nd


def agg_mgda(grads: list[GradList], **_: Any) -> GradList:
    """MGDA through the Sener-style Frank-Wolfe solver; ``d = sum_i sol_i g_i``.

    The authors' scripts differ in how they scale MGDA (some normalise each gradient by its
    loss or norm before the solver, as Sener & Koltun's ``gradient_normalizers`` do, some
    rescale the result). We follow Alg. 1 of the F-MTL paper: the aggregator acts on the
    raw gradients and the convex combination is used as is (this is also what
    ``mtlsam_ext.aggregators.mgda`` returns).
    """
    sol, _ = MinNormSolverFW.find_min_norm_element_fw(grads)
    return [sum(float(sol[i]) * grads[i][k] for i in range(len(grads)))
            for k in range(len(grads[0]))]


def agg_pcgrad(grads: list[GradList], rng: random.Random | None = None, **_: Any) -> GradList:
    """PCGrad on per-layer gradient lists, the common public implementation's loop: for every
    task, copy its gradient, ``random.shuffle`` the task list and project away each
    conflicting component (dot products summed layer by layer; the comparison ``< 0`` reads
    the value back to the host); then sum the projected gradients."""
    shuffle = (rng or random).shuffle
    pc_grad = [[t.clone() for t in g] for g in grads]
    others = list(grads)
    for g_i in pc_grad:
        shuffle(others)
        for g_j in others:
            g_i_g_j = sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g_i, g_j))
            if g_i_g_j < 0:
                g_j_sq = sum(torch.dot(b.reshape(-1), b.reshape(-1)) for b in g_j)
                for a, b in zip(g_i, g_j):
                    a -= g_i_g_j * b / g_j_sq
    return [torch.stack([g[k] for g in pc_grad]).sum(0) for k in range(len(grads[0]))]


def _grad2vec(grads: list[GradList]) -> Tensor:
    """The [N, K] matrix of flattened task gradients (the reference code's ``grad2vec``)."""
    n = sum(t.numel() for t in grads[0])
    mat = torch.zeros(n, len(grads), dtype=grads[0][0].dtype, device=grads[0][0].device)
    for i, g in enumerate(grads):
        beg = 0
        for t in g:
            mat[beg:beg + t.numel(), i].copy_(t.reshape(-1))
            beg += t.numel()
    return mat


def _vec2grad(vec: Tensor, like: GradList) -> GradList:
    out, beg = [], 0
    for t in like:
        out.append(vec[beg:beg + t.numel()].view_as(t).clone())
        beg += t.numel()
    return out


def agg_cagrad(grads: list[GradList], c: float = 0.4, rescale: int = 1, **_: Any) -> GradList:
    """CAGrad as in the authors' public code: Gram matrix on the CPU, SciPy ``minimize``
    (SLSQP, the default with constraints) on the dual ``w^T G b + c ||g0|| sqrt(w^T G w)``
    over the simplex from the uniform start, then ``g = mean + (c ||g0|| / ||g_w||) g_w``
    and the ``(1 + c^2)`` rescale; the reference's ``1e-8`` safety terms are kept."""
    mat = _grad2vec(grads)  # [N, K]
    num_tasks = mat.shape[1]
    GG = mat.t().mm(mat).cpu()
    g0_norm = (GG.mean() + 1e-8).sqrt()
    x_start = np.ones(num_tasks) / num_tasks
    bnds = tuple((0, 1) for _ in x_start)
    cons = ({"type": "eq", "fun": lambda x: 1 - sum(x)},)
    A = GG.numpy()
    b = x_start.copy()
    cc = (c * g0_norm + 1e-8).item()

    def objfn(x: np.ndarray) -> float:
        return float((x.reshape(1, num_tasks).dot(A).dot(b.reshape(num_tasks, 1))
                      + cc * np.sqrt(x.reshape(1, num_tasks).dot(A).dot(
                          x.reshape(num_tasks, 1)) + 1e-8)).sum())

    res = minimize(objfn, x_start, bounds=bnds, constraints=cons)
    # The reference converts with torch.Tensor (float32); we keep the gradients' dtype so a
    # float64 comparison measures the solver, not a cast.
    ww = torch.tensor(res.x, dtype=mat.dtype, device=mat.device)
    gw = (mat * ww.view(1, -1)).sum(1)
    gw_norm = gw.norm()
    lmbda = cc / (gw_norm + 1e-8)
    g = mat.mean(1) + lmbda * gw
    if rescale == 1:
        g = g / (1 + c ** 2)
    elif rescale == 2:
        g = g / (1 + c)
    return _vec2grad(g, grads[0])


def agg_imtl(grads: list[GradList], **_: Any) -> GradList:
    """IMTL-G closed form on the stacked [K, N] gradients with ``torch.inverse``:
    ``alpha_{2..K} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum``, ``d = sum alpha_i g_i``."""
    mat = _grad2vec(grads).t()  # [K, N]
    unit = mat / torch.norm(mat, p=2, dim=-1, keepdim=True)
    k = mat.shape[0]
    D = mat[0:1].repeat(k - 1, 1) - mat[1:]
    U = unit[0:1].repeat(k - 1, 1) - unit[1:]
    alpha = torch.matmul(torch.matmul(mat[0], U.t()), torch.inverse(torch.matmul(D, U.t())))
    alpha = torch.cat((1 - alpha.sum().unsqueeze(0), alpha), dim=0)
    return _vec2grad((alpha.view(-1, 1) * mat).sum(0), grads[0])


NAIVE_AGGREGATORS: dict[str, Callable[..., GradList]] = {
    "ls": agg_ls,
    "mean": agg_mean,
    "mgda": agg_mgda,
    "pcgrad": agg_pcgrad,
    "cagrad": agg_cagrad,
    "imtl": agg_imtl,
}


# ================================================================================================
# The training-step loops.
# ================================================================================================
class _Base:
    def __init__(self, shared: Any, base_optimizer: type[torch.optim.Optimizer], *,
                 heads: Sequence[Any] | None = None, aggregator: str = "ls", rho: float = 0.05,
                 rho_heads: float | None = None, adaptive: bool = False,
                 aggregator_options: dict[str, Any] | None = None,
                 seed: int | None = None, **base_kwargs: Any) -> None:
        if aggregator not in NAIVE_AGGREGATORS:
            raise ValueError(f"naive aggregator must be one of {list(NAIVE_AGGREGATORS)}")
        self.shared_params = _params(shared)
        self.head_params = [_params(h) for h in heads] if heads is not None else None
        groups = [{"params": self.shared_params}]
        if self.head_params:
            groups.append({"params": [p for h in self.head_params for p in h]})
        self.base_optimizer = base_optimizer(groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.aggregator = aggregator
        self.agg_fn = NAIVE_AGGREGATORS[aggregator]
        self.agg_kwargs = dict(aggregator_options or {})
        if aggregator == "pcgrad":
            self.agg_kwargs["rng"] = random.Random(seed) if seed is not None else None
        self.rho = float(rho)
        self.rho_heads = float(rho if rho_heads is None else rho_heads)
        self.adaptive = bool(adaptive)

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad(set_to_none=True)

    def _all_params(self) -> list[Tensor]:
        out = list(self.shared_params)
        for h in self.head_params or []:
            out.extend(h)
        return out

    def aggregate(self, grads: list[GradList]) -> GradList:
        return self.agg_fn(grads, **self.agg_kwargs)

    def _perturbation(self, params: list[Tensor], grads: GradList, rho: float) -> GradList:
        """``e = (p**2 if adaptive else 1) * g * rho / ||(|p| if adaptive else 1) * g||``."""
        grad_norm = torch.norm(torch.stack([
            ((torch.abs(p) if self.adaptive else 1.0) * g).norm(p=2)
            for p, g in zip(params, grads)]), p=2)
        scale = rho / (grad_norm + 1e-12)
        return [(torch.pow(p, 2) if self.adaptive else 1.0) * g * scale
                for p, g in zip(params, grads)]


class NaiveFMTL(_Base):
    """F-MTL step as the authors' scripts lay it out (see the module docstring).

    ``recompute=True`` is the many-task script's layout (a fresh forward per task for the
    loss gradients: 2K forwards). ``decompose=False`` aggregates the SAM gradients directly.
    """

    def __init__(self, *args: Any, recompute: bool = False, decompose: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recompute = recompute
        self.decompose = decompose

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:
        shared = self.shared_params
        heads = self.head_params
        # 1. loss gradients, one full clone per task.
        grads: list[GradList] = []
        head_grads: list[GradList] = []
        if self.recompute:
            first_losses = []
            k_tasks = len(heads) if heads else None
            i = 0
            while k_tasks is None or i < k_tasks:
                self.zero_grad()
                with torch.enable_grad():
                    losses = _as_list(closure())
                    k_tasks = len(losses) if k_tasks is None else k_tasks
                    losses[i].backward()
                first_losses.append(losses[i].detach())
                grads.append([_grad_or_zeros(p) for p in shared])
                if heads:
                    head_grads.append([_grad_or_zeros(p) for p in heads[i]])
                i += 1
            out = torch.stack(first_losses)
        else:
            # As in the scripts, every backward retains the graph and ``losses`` stays
            # referenced for the whole step, so the first forward's activations stay alive
            # during the K perturbed passes (part of the naive peak memory).
            with torch.enable_grad():
                losses = _as_list(closure())
                for i in range(len(losses)):
                    self.zero_grad()
                    losses[i].backward(retain_graph=True)
                    grads.append([_grad_or_zeros(p) for p in shared])
                    if heads:
                        head_grads.append([_grad_or_zeros(p) for p in heads[i]])
            out = torch.stack([x.detach() for x in losses])
        k = len(grads)
        # 2. old weights and the K perturbation lists (shared and head norms taken separately).
        old_shared = [p.data.clone() for p in shared]
        old_heads = [[p.data.clone() for p in h] for h in heads] if heads else None
        e_shared = [self._perturbation(shared, grads[i], self.rho) for i in range(k)]
        e_heads = [self._perturbation(heads[i], head_grads[i], self.rho_heads)
                   for i in range(k)] if heads else None
        # 3. per task: move to theta + e_i, forward, backward of l_i, clone, restore by clone.
        sam_grads: list[GradList] = []
        head_sam: list[GradList] = []
        for i in range(k):
            for p, o, e in zip(shared, old_shared, e_shared[i]):
                p.data = (o + e).clone()
            if heads:
                for p, o, e in zip(heads[i], old_heads[i], e_heads[i]):
                    p.data = (o + e).clone()
            self.zero_grad()
            with torch.enable_grad():
                loss_i = _as_list(closure())[i]
                loss_i.backward()
            sam_grads.append([_grad_or_zeros(p) for p in shared])
            if heads:
                head_sam.append([_grad_or_zeros(p) for p in heads[i]])
            for p, o in zip(shared, old_shared):
                p.data = o.clone()
            if heads:
                for p, o in zip(heads[i], old_heads[i]):
                    p.data = o.clone()
        # 4. flat gradients and the two aggregations.
        if self.decompose:
            flat = [[s - g for s, g in zip(sam_grads[i], grads[i])] for i in range(k)]
            d_loss = self.aggregate(grads)
            d_flat = self.aggregate(flat)
            d = [a + b for a, b in zip(d_loss, d_flat)]
        else:
            d = self.aggregate(sam_grads)
        self.zero_grad()
        for p, g in zip(shared, d):
            p.grad = g
        if heads:
            for i in range(k):
                for p, g in zip(heads[i], head_sam[i]):
                    p.grad = g
        self.base_optimizer.step()
        return out


class NaiveSAMPerTask(_Base):
    """Per-task loop over a single-task SAM optimizer in the popular implementation's style.

    For each task i: forward, ``l_i.backward()``, ``first_step`` (one joint norm over shared
    + head i parameters that have a gradient, ``state[p]["old_p"] = p.data.clone()``,
    ``p.add_(e_w)``), forward, ``l_i.backward()``, clone the SAM gradients, ``second_step``
    restoring ``p.data = old_p`` (the base step is deferred). Then the shared gradient is
    ``M(g_1^SAM..g_K^SAM)``, each head takes its SAM gradient, and the base optimizer steps.
    With no heads this is F-MTL's "direct" variant (``MTLSAM(decompose=False)``); with heads,
    the joint shared+head norm and the single radius differ from F-MTL's separate norms.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def _task_params(self, i: int) -> list[Tensor]:
        return self.shared_params + (self.head_params[i] if self.head_params else [])

    @torch.no_grad()
    def _grad_norm(self, params: list[Tensor]) -> Tensor:
        return torch.norm(torch.stack([
            ((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2)
            for p in params if p.grad is not None]), p=2)

    @torch.no_grad()
    def first_step(self, params: list[Tensor]) -> None:
        grad_norm = self._grad_norm(params)
        scale = self.rho / (grad_norm + 1e-12)
        for p in params:
            if p.grad is None:
                continue
            self.state.setdefault(p, {})["old_p"] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self, params: list[Tensor]) -> None:
        for p in params:
            if p in self.state and "old_p" in self.state[p]:
                p.data = self.state[p].pop("old_p")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:
        k = len(self.head_params) if self.head_params else None
        sam_grads: list[GradList] = []
        head_sam: list[GradList] = []
        first: list[Tensor] = []
        i = 0
        while k is None or i < k:
            params = self._task_params(i)
            self.zero_grad()
            with torch.enable_grad():
                losses = _as_list(closure())
                if k is None:
                    k = len(losses)
                losses[i].backward()
            first.append(losses[i].detach())
            self.first_step(params)
            with torch.enable_grad():
                _as_list(closure())[i].backward()
            sam_grads.append([_grad_or_zeros(p) for p in self.shared_params])
            if self.head_params:
                head_sam.append([_grad_or_zeros(p) for p in self.head_params[i]])
            self.second_step(params)
            i += 1
        d = self.aggregate(sam_grads)
        self.zero_grad()
        for p, g in zip(self.shared_params, d):
            p.grad = g
        if self.head_params:
            for i in range(k):
                for p, g in zip(self.head_params[i], head_sam[i]):
                    p.grad = g
        self.base_optimizer.step()
        return torch.stack(first)
