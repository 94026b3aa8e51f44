"""Global-local SAM's perturbation coefficients (report Alg. 1, line 9; docs/design.md §1a,
step 3): from ``g_0`` and the local gradients ``ghat_i``, the ``[K, L]`` coefficients
``A, B`` of ``eps_il = A_il g_0,l + B_il ghat_il``.

Two fused reads give every statistic they need: ``||g_0,l||^2`` per layer
(``segment_sumsq``), and ``<g_0,l, ghat_il>`` and ``||ghat_il||^2`` per task on the sampled
layers (``gl_layer_stats``); :func:`~mtlsam_ext.optim.perturbation.global_local_coefs` turns
these tiny tensors into ``A`` and ``B`` (mixing with ``alpha``, magnitude normalisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsam_ext import ops
from mtlsam_ext.optim.amp import scale_ratio
from mtlsam_ext.optim.perturbation import global_local_coefs

if TYPE_CHECKING:
    from mtlsam_ext.optim.run import Run


def mixing_coefs(run: Run, g0: list[Tensor], local: list[Tensor], local_scale: Tensor | None,
                 sampled: list[int], tables: list
                 ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """``(A, B, seg_layers, samp_layers)``: the ``[K, L]`` coefficients, and per bucket the
    layer of each segment and of each sampled segment (to gather A and B per segment)."""
    opt = run.opt
    sh = run.shared
    k = run.k
    n_layers = len(sh.layers)
    dev = sh.device
    layer_sq = torch.zeros(n_layers, dtype=torch.float64, device=dev)
    dots = torch.zeros(k, n_layers, dtype=torch.float64, device=dev)
    loc_sq = torch.zeros_like(dots)
    seg_layers = sh.segment_layers()
    samp_layers, mask = opt.work.sampled_index(sampled)
    for j, b in enumerate(sh.buckets):
        scale = b.data if opt.adaptive else None
        layer_sq.index_add_(0, seg_layers[j], ops.segment_sumsq(
            g0[j][0], b.seg_offsets, scale, backend=run.be).double())
        st, ln, ls, _ = tables[j]
        ids = samp_layers[j]
        if st.numel():
            d, q = ops.gl_layer_stats(g0[j][0], local[j], st, ln, ls, scale, backend=run.be)
            dots.index_add_(1, ids, d.double())
            loc_sq.index_add_(1, ids, q.double())
    layer_sq, dots, loc_sq = run.comm.partial_sums(layer_sq, dots, loc_sq)  # (sharded: summed)
    rescale = scale_ratio(run.scaling.factor(run.global_sync), local_scale)
    if rescale is not None:
        # g0 carries this step's loss scale S, the local gradients the scale S' they were
        # computed with: <g0, r ghat> and ||r ghat||^2 with r = S / S' put them on g0's scale
        # (the perturbation is invariant to a scale common to g0 and ghat).
        dots *= rescale
        loc_sq *= rescale * rescale
    coef_a, coef_b = global_local_coefs(layer_sq, dots, loc_sq, mask, opt.rho, opt.alpha,
                                        opt.norm)
    if rescale is not None:
        coef_b = coef_b * rescale  # B (r ghat) with ghat as stored
    return coef_a, coef_b, seg_layers, samp_layers
