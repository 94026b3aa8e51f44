"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

import torch

from ._common import (
    check_nonneg_float,
    check_positive_float,
    check_pref_vector,
    pref_weights,
    to_output,
    validate_gram,
)
from .dual_cone import project_weights

__all__ = ["upgrad", "dualproj", "check_projection_options"]


def check_projection_options(name: str, pref_vector: object = None, norm_eps: object = 1e-4,
                             reg_eps: object = 1e-4) -> tuple[torch.Tensor | None, float, float]:
    """Validated ``(pref_vector, norm_eps, reg_eps)`` of :func:`upgrad` / :func:`dualproj`."""
    return (check_pref_vector(pref_vector, name), check_nonneg_float(norm_eps, "norm_eps", name),
            check_positive_float(reg_eps, "reg_eps", name))


def upgrad(
    G: torch.Tensor,
    *,
    pref_vector: object = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UPGrad weights (P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024, section 3, eq. 5, with the projection of eq. 3).

    Every task gradient, scaled by its preference ``u_i`` (``pref_vector``, default
    ``1/K``), is projected onto the dual cone ``{y : <g_j, y> >= 0 for all j}`` of the task
    gradients, and the projections are summed: ``d = sum_i pi_J(u_i g_i)``. By the paper's
    Proposition 1, ``pi_J(J^T u_i e_i) = J^T v_i`` with
    ``v_i = argmin_{v >= u_i e_i} v^T G v``, so ``w = sum_i v_i``: K small QPs solved
    together by :func:`mtlsam_ext.aggregators.dual_cone.solve_nonneg_qp` on G's device.

    Options and defaults as in the authors' library (TorchJD 0.18, ``UPGradWeighting``):
    G is divided by its trace unless the trace is below ``norm_eps`` (then G is taken as
    0 and ``w = u``: the answer for all-zero gradients; note this threshold is absolute,
    so gradients with ``sum_i ||g_i||^2 < 1e-4`` get the mean weights by default), and
    ``reg_eps I`` (must be > 0) is added so that the QPs are strictly convex even for a
    singular G. The weights have the scale of ``u``: with no conflict, ``w = u``.
    ``generator`` is accepted for a uniform signature and ignored.
    """
    pref, norm_eps, reg_eps = check_projection_options("upgrad", pref_vector, norm_eps, reg_eps)
    G64 = validate_gram(G, "upgrad")
    u = pref_weights(pref, G64.shape[0], G64, "upgrad")
    V = project_weights(G64, torch.diag(u), norm_eps, reg_eps)
    return to_output(V.sum(dim=0), G)


def dualproj(
    G: torch.Tensor,
    *,
    pref_vector: object = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DualProj weights (Quinton & Rey 2024, section 3; the projection of GEM, D. Lopez-Paz,
    M. Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eq. 11).

    The preference-weighted average ``J^T u`` (``pref_vector``, default ``u = 1/K``) is
    projected onto the dual cone of the task gradients: ``d = pi_J(J^T u) = J^T w`` with
    ``w = argmin_{v >= u} v^T G v`` (Quinton & Rey, Proposition 1), one QP solved by
    :func:`mtlsam_ext.aggregators.dual_cone.solve_nonneg_qp` on G's device. ``norm_eps``
    and ``reg_eps`` as in :func:`upgrad` (TorchJD 0.18's ``DualProjWeighting`` defaults).
    ``generator`` is accepted for a uniform signature and ignored.
    """
    pref, norm_eps, reg_eps = check_projection_options("dualproj", pref_vector, norm_eps,
                                                       reg_eps)
    G64 = validate_gram(G, "dualproj")
    u = pref_weights(pref, G64.shape[0], G64, "dualproj")
    return to_output(project_weights(G64, u.unsqueeze(0), norm_eps, reg_eps)[0], G)
