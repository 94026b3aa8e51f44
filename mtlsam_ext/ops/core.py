"""The op entry points: validate arguments, pick a backend, call its kernel."""

from __future__ import annotations

import os

from torch import Tensor

from mtlsam_ext.ops import selfcheck, validate
from mtlsam_ext.ops.dispatch import kernels, op_backend, request_policy, resolve_backend
from mtlsam_ext.ops.points import perturb_points

# Resolved kernel modules per (backend asked for, device, dtype, the environment variable that
# can change the answer: MTLSAM_BACKEND for "auto", TRITON_INTERPRET for "triton", op): a step
# makes ~30 op calls, and resolving each one anew (environment, device object, backend list,
# module lookup) cost ~5 us per call on the 2-core CPU. The optimizer passes its resolved
# backend, so its calls read no environment variable at all. A miss also runs the compiled
# kernels' self-check for that device and dtype (once per process, see ops.selfcheck).
_RESOLVED: dict[tuple, object] = {}
_ENV = {"auto": "MTLSAM_BACKEND", "triton": "TRITON_INTERPRET"}


def _forget_resolved() -> None:
    """Empty the cache (``selfcheck.reset``: the verdicts it was built on are gone). Reads
    the module's ``_RESOLVED`` at call time, so a replaced cache is the one cleared."""
    _RESOLVED.clear()


selfcheck.on_reset(_forget_resolved)


def _k(backend: str, like: Tensor, op: str):
    # Explicit names are resolved too: asking for a backend that cannot run on these tensors
    # is an error, never a silent fallback (errors are raised again on every call, not cached).
    # `op` matters only where the backend resolves to a per-op choice (ext+triton on CUDA).
    var = _ENV.get(backend)
    key = (backend, like.device, like.dtype, None if var is None else os.environ.get(var), op)
    mod = _RESOLVED.get(key)
    if mod is None:
        mod = _RESOLVED[key] = _choose(backend, like.device, like.dtype, op)
    return mod


def _choose(backend: str, device, dtype, op: str):
    """The kernel module that runs ``op`` on ``device`` and ``dtype``: the backend's, once its
    kernel passed the self-check there; else the reference (auto, with a warning) or an error
    (an explicit backend)."""
    requested, fallback = request_policy(backend)
    resolved = resolve_backend(requested, device)
    name = op_backend(resolved, op)
    mod = kernels(name)
    if name == "torch" or not selfcheck.enabled():
        return mod
    verdict = selfcheck.verdicts(resolved, device, dtype, kernels=kernels)[op]
    if verdict.ok:
        return mod
    if not fallback:
        raise selfcheck.refusal([verdict], backend)
    selfcheck.fall_back(verdict)
    return kernels("torch")


def segment_sumsq(x: Tensor, offsets: Tensor, scale: Tensor | None = None, *,
                  backend: str = "auto") -> Tensor:
    """Per-segment ``sum (T x)^2``; see :func:`mtlsam_ext.kernels.torch_ref.segment_sumsq`."""
    validate.flat("x", x)
    validate.offsets("offsets", offsets, x.numel())
    if scale is not None:
        validate.flat("scale", scale, like=x)
    op = "segment_sumsq" if scale is None else "segment_sumsq_adaptive"
    return _k(backend, x, op).segment_sumsq(x, offsets, scale)


def gl_layer_stats(g0: Tensor, local: Tensor, starts: Tensor, lengths: Tensor,
                   local_starts: Tensor, scale: Tensor | None = None, *,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per sampled layer ``<T g0, T ghat_i>`` and ``||T ghat_i||^2`` for all tasks in one read."""
    validate.flat("g0", g0)
    validate.rows("local", local)
    if local.device != g0.device or local.dtype != g0.dtype:
        raise ValueError(f"local ({local.dtype}, {local.device}) must match g0 "
                         f"({g0.dtype}, {g0.device})")
    validate.sampled(starts, lengths, local_starts, g0.numel(), local.shape[1])
    if scale is not None:
        validate.flat("scale", scale, like=g0)
    return _k(backend, g0, "gl_layer_stats").gl_layer_stats(g0, local, starts, lengths,
                                                            local_starts, scale)


def mix_perturb_(param: Tensor, backup: Tensor, g0: Tensor, coef: Tensor, offsets: Tensor,
                 local: Tensor | None = None, local_coef: Tensor | None = None,
                 starts: Tensor | None = None, lengths: Tensor | None = None,
                 local_starts: Tensor | None = None, *, adaptive: bool = False,
                 save_backup: bool = True, backend: str = "auto") -> None:
    """``theta = theta0 + T^2 (a g0 + b ghat)`` in place, ``theta0`` kept in ``backup``."""
    validate.flat("param", param)
    validate.flat("backup", backup, like=param)
    validate.flat("g0", g0, like=param)
    validate.offsets("offsets", offsets, param.numel())
    if coef.dim() != 1 or coef.numel() != offsets.numel() - 1:
        raise ValueError(f"coef must hold one value per segment ({offsets.numel() - 1}), "
                         f"got shape {tuple(coef.shape)}")
    if local is not None:
        validate.flat("local", local, like=None)
        if local.dtype != param.dtype or local.device != param.device:
            raise ValueError("local must match param's dtype and device")
        if local_coef is None or starts is None or lengths is None or local_starts is None:
            raise ValueError("local needs local_coef, starts, lengths and local_starts")
        validate.sampled(starts, lengths, local_starts, param.numel(), local.numel())
        if local_coef.dim() != 1 or local_coef.numel() != starts.numel():
            raise ValueError("local_coef must hold one value per sampled segment")
    op = "mix_perturb_" if local is None else "mix_perturb_local"
    _k(backend, param, op).mix_perturb_(param, backup, g0, coef, offsets, local, local_coef,
                                        starts, lengths, local_starts, adaptive, save_backup)


def perturb_points_(out: Tensor, theta: Tensor, directions: Tensor, coefs: Tensor,
                    offsets: Tensor, local: Tensor | None = None,
                    local_coefs: Tensor | None = None, starts: Tensor | None = None,
                    lengths: Tensor | None = None, local_starts: Tensor | None = None, *,
                    adaptive: bool = False, backend: str = "auto") -> None:
    """``out[i] = theta + T^2 (A_i d_i + B_i ghat_i)`` for all K points in one call (the
    parameters of every perturbed pass, for the batched passes); see
    :func:`mtlsam_ext.kernels.torch_ref.perturb_points_`."""
    validate.rows("out", out)
    validate.flat("theta", theta, like=None)
    if theta.dtype != out.dtype or theta.device != out.device or theta.numel() != out.shape[1]:
        raise ValueError(f"theta must be a flat {out.dtype} tensor of {out.shape[1]} elements on "
                         f"{out.device}, got {theta.dtype} {tuple(theta.shape)} on {theta.device}")
    k, n = out.shape
    validate.rows("directions", directions, n)
    if directions.shape[0] not in (1, k) or directions.dtype != out.dtype \
            or directions.device != out.device:
        raise ValueError(f"directions must be [1, {n}] or [{k}, {n}] {out.dtype} rows on "
                         f"{out.device}, got {directions.dtype} {tuple(directions.shape)}")
    validate.offsets("offsets", offsets, n)
    if coefs.shape != (k, offsets.numel() - 1):
        raise ValueError(f"coefs must be [{k}, {offsets.numel() - 1}] (task x segment), got "
                         f"{tuple(coefs.shape)}")
    if local is not None:
        validate.rows("local", local)
        if local.shape[0] != k or local.dtype != out.dtype or local.device != out.device:
            raise ValueError(f"local must be [{k}, M] {out.dtype} rows on {out.device}")
        if local_coefs is None or starts is None or lengths is None or local_starts is None:
            raise ValueError("local needs local_coefs, starts, lengths and local_starts")
        validate.sampled(starts, lengths, local_starts, n, local.shape[1])
        if local_coefs.shape != (k, starts.numel()):
            raise ValueError(f"local_coefs must be [{k}, {starts.numel()}] (task x sampled "
                             f"segment), got {tuple(local_coefs.shape)}")
    op = "perturb_points_" if local is None else "perturb_points_local"
    perturb_points(_k(backend, out, op), out, theta, directions, coefs, offsets, local,
                   local_coefs, starts, lengths, local_starts, adaptive)


def restore_(param: Tensor, backup: Tensor, *, backend: str = "auto") -> None:
    """Bit-exact restore of the parameters saved by :func:`mix_perturb_`."""
    validate.flat("param", param)
    validate.flat("backup", backup, like=param)
    _k(backend, param, "restore_").restore_(param, backup)


def gram(rows: Tensor, *, backend: str = "auto") -> Tensor:
    """K x K Gram matrix of an ``[K, N]`` row matrix, in the accumulation dtype."""
    validate.rows("rows", rows)
    return _k(backend, rows, "gram").gram(rows)


def segment_gram(rows: Tensor, offsets: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-segment ``[S, K, K]`` Gram matrices of an ``[K, N]`` row matrix (one read)."""
    validate.rows("rows", rows)
    validate.offsets("offsets", offsets, rows.shape[1])
    return _k(backend, rows, "segment_gram").segment_gram(rows, offsets)


def combine_(out: Tensor, rows: Tensor, weights: Tensor, *, backend: str = "auto") -> None:
    """``out = sum_i w_i rows_i`` written into the flat buffer ``out``."""
    validate.flat("out", out)
    validate.rows("rows", rows, out.numel())
    if rows.dtype != out.dtype or rows.device != out.device:
        raise ValueError("rows must match out's dtype and device")
    if weights.dim() != 1 or weights.numel() != rows.shape[0]:
        raise ValueError(f"weights must have {rows.shape[0]} entries, got shape "
                         f"{tuple(weights.shape)}")
    _k(backend, out, "combine_").combine_(out, rows, weights)


def flat_gram_(sam: Tensor, loss: Tensor, *, backend: str = "auto") -> Tensor:
    """F-MTL's ``sam -= loss`` in place and the K x K Gram of the resulting flat rows."""
    validate.rows("sam", sam)
    validate.rows("loss", loss, sam.shape[1])
    if sam.shape != loss.shape or sam.dtype != loss.dtype or sam.device != loss.device:
        raise ValueError("flat_gram_ needs sam and loss rows of equal shape, dtype and device")
    return _k(backend, sam, "flat_gram_").flat_gram_(sam, loss)


def sub_(rows: Tensor, other: Tensor, *, backend: str = "auto") -> None:
    """``rows -= other`` (F-MTL's flat gradients over the SAM rows, in place)."""
    if rows.shape != other.shape or rows.dtype != other.dtype or rows.device != other.device:
        raise ValueError("sub_ needs two tensors of equal shape, dtype and device")
    _k(backend, rows, "sub_").sub_(rows, other)
