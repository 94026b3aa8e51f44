"""The compiled backend: thin wrappers over the ``torch.ops.mtlsam`` ops of ``mtlsam_ext._C``.

Importing this module raises ``ImportError`` when the extension was not built or was built
against another torch (see :mod:`mtlsam_ext.kernels.build_record`), which the dispatcher
treats as "backend not available". Fake (meta) implementations are registered so
the ops are traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlsam_ext.kernels.build_record import ext_status
from mtlsam_ext.kernels.device_tables import on_device

# Checks the build record against the running torch, then imports mtlsam_ext._C (which
# registers torch.ops.mtlsam.*).
if ext_status().module is None:
    raise ImportError(ext_status().reason)

_ops = torch.ops.mtlsam


def supports(device: torch.device) -> bool:
    """Whether the extension has kernels for ``device``'s dispatch key."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mtlsam::gram", key)


def _table(t: Tensor | None, device: torch.device) -> Tensor | None:
    """CUDA kernels read segment tables from device memory; the flat-buffer module keeps them
    on the CPU: each table is copied over once and the copy kept (see device_tables)."""
    return on_device(t, device)


def segment_sumsq(x: Tensor, offsets: Tensor, scale: Tensor | None = None) -> Tensor:
    return _ops.segment_sumsq(x, _table(offsets, x.device), scale)


def gl_layer_stats(g0, local, starts, lengths, local_starts, scale=None):
    d = g0.device
    return _ops.gl_layer_stats(g0, local, _table(starts, d), _table(lengths, d),
                               _table(local_starts, d), scale)


def mix_perturb_(param, backup, g0, coef, offsets, local=None, local_coef=None, starts=None,
                 lengths=None, local_starts=None, adaptive=False, save_backup=True) -> None:
    d = param.device
    _ops.mix_perturb_(param, backup, g0, coef.to(d), _table(offsets, d), local,
                      None if local_coef is None else local_coef.to(d), _table(starts, d),
                      _table(lengths, d), _table(local_starts, d), adaptive, save_backup)


def _perturb_points_(out, theta, directions, coefs, offsets, local=None, local_coefs=None,
                     starts=None, lengths=None, local_starts=None, adaptive=False) -> None:
    d = out.device
    _ops.perturb_points_(out, theta, directions, coefs.to(d), _table(offsets, d), local,
                         None if local_coefs is None else local_coefs.to(d), _table(starts, d),
                         _table(lengths, d), _table(local_starts, d), adaptive)


def restore_(param: Tensor, backup: Tensor) -> None:
    _ops.restore_(param, backup)


def gram(rows: Tensor) -> Tensor:
    return _ops.gram(rows)


def combine_(out: Tensor, rows: Tensor, weights: Tensor) -> None:
    _ops.combine_(out, rows, weights.to(out.device))


def sub_(rows: Tensor, other: Tensor) -> None:
    _ops.sub_(rows, other)


def flat_gram_(sam: Tensor, loss: Tensor) -> Tensor:
    key = "CUDA" if sam.device.type == "cuda" else "CPU"
    if torch._C._dispatch_has_kernel_for_dispatch_key("mtlsam::flat_gram_", key):
        return _ops.flat_gram_(sam, loss)
    # No fused kernel for this device yet (CUDA): the same result from sub_ then gram.
    _ops.sub_(sam, loss)
    return _ops.gram(sam)


def segment_gram(rows: Tensor, offsets: Tensor) -> Tensor:
    key = "CUDA" if rows.device.type == "cuda" else "CPU"
    if _has_schema("segment_gram") and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mtlsam::segment_gram", key):
        return _ops.segment_gram(rows, _table(offsets, rows.device))
    # No kernel for this device (CUDA so far): the reference, one matmul per segment.
    from mtlsam_ext.kernels import torch_ref

    return torch_ref.segment_gram(rows, offsets)


def _has_schema(name: str) -> bool:
    """Whether the loaded extension defines ``mtlsam::name`` (an older build may not)."""
    try:
        torch._C._get_schema(f"mtlsam::{name}", "")
    except RuntimeError:
        return False
    return True


# All K points in one call where the loaded build has the op (an older build lacks it: the ops
# layer then calls mix_perturb_ once per row, the same bits).
if _has_schema("perturb_points_"):
    perturb_points_ = _perturb_points_

    @torch.library.register_fake("mtlsam::perturb_points_")
    def _(out, theta, directions, coefs, offsets, local, local_coefs, starts, lengths,
          local_starts, adaptive):
        return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mtlsam::segment_sumsq")
def _(x, offsets, scale):
    return x.new_empty(offsets.shape[0] - 1, dtype=_acc(x.dtype))


@torch.library.register_fake("mtlsam::gl_layer_stats")
def _(g0, local, starts, lengths, local_starts, scale):
    shape = (local.shape[0], starts.shape[0])
    return g0.new_empty(shape, dtype=_acc(g0.dtype)), g0.new_empty(shape, dtype=_acc(g0.dtype))


@torch.library.register_fake("mtlsam::flat_gram_")
def _(sam, loss):
    return sam.new_empty((sam.shape[0], sam.shape[0]), dtype=_acc(sam.dtype))


@torch.library.register_fake("mtlsam::gram")
def _(rows):
    return rows.new_empty((rows.shape[0], rows.shape[0]), dtype=_acc(rows.dtype))


if _has_schema("segment_gram"):
    @torch.library.register_fake("mtlsam::segment_gram")
    def _(rows, offsets):
        r = rows.shape[0]
        return rows.new_empty((offsets.shape[0] - 1, r, r), dtype=_acc(rows.dtype))


# The in-place ops return nothing; their fakes only need to exist for tracing.
@torch.library.register_fake("mtlsam::mix_perturb_")
def _(param, backup, g0, coef, offsets, local, local_coef, starts, lengths, local_starts,
      adaptive, save_backup):
    return None


@torch.library.register_fake("mtlsam::restore_")
def _(param, backup):
    return None


@torch.library.register_fake("mtlsam::combine_")
def _(out, rows, weights):
    return None


@torch.library.register_fake("mtlsam::sub_")
def _(rows, other):
    return None
