"""Host-side work tables: which program handles which range of the flat buffer.

Segment tables arrive as int64 tensors (the flat-buffer module keeps them on the CPU; device
tables are copied back, which synchronises). From them we build, with a few vectorised torch
ops on the CPU, small int64 tables that are copied to the kernels' device in one transfer:

* a *chunk table* for reductions: rows ``(start, length[, local_start])`` of at most
  ``chunk`` elements, every chunk inside one segment, chunks of segment ``s`` at rows
  ``chunk_ptr[s]:chunk_ptr[s + 1]`` (empty segments own no chunk and sum to 0);
* a *block table* for ``mix_perturb_``: the buffer cut at every segment and sampled-segment
  boundary into pieces with ONE global coefficient and at most one local one, each piece cut
  into blocks of ``BLOCK`` elements: rows ``(start, length, segment, sampled or -1, shift)``
  where ``local[i + shift]`` pairs with ``x[i]``.

Tables are cached by their contents (never by pointer: a freed and reused allocation could
alias), so a training loop calling with the same layout builds them once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

_CACHE: OrderedDict[tuple, object] = OrderedDict()
_CACHE_SIZE = 64


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.int64).contiguous()


def _key(*parts) -> tuple:
    return tuple(p.numpy().tobytes() if isinstance(p, Tensor) else p for p in parts)


def _cached(key: tuple, build):
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    value = build()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _split(starts: Tensor, lengths: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut each range ``[starts[s], starts[s] + lengths[s])`` into pieces of ``size``.

    Returns ``(owner, piece_start, piece_len, ptr)``: owner range index, start and length of
    every piece in range order, and ``ptr[s]:ptr[s+1]`` the pieces of range ``s``.
    """
    count = (lengths + size - 1) // size
    ptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(count, 0, out=ptr[1:])
    total = int(ptr[-1])
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), count, output_size=total)
    j = torch.arange(total, dtype=torch.int64) - ptr[owner]
    start = starts[owner] + j * size
    length = torch.minimum(lengths[owner] - j * size, torch.full_like(j, size))
    return owner, start, length, ptr


def segment_chunks(offsets: Tensor, chunk: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Chunk table ``[C, 2]`` (start, length), ``chunk_ptr [S + 1]`` (both on ``device``), C."""
    off = _cpu(offsets)

    def build():
        _, start, length, ptr = _split(off[:-1], off[1:] - off[:-1], chunk)
        table = torch.stack([start, length], 1)
        both = torch.cat([table.reshape(-1), ptr]).to(device)
        c = start.numel()
        return both[:2 * c].view(c, 2), both[2 * c:], c

    return _cached(("seg", chunk, str(device), *_key(off)), build)


def sampled_chunks(starts: Tensor, lengths: Tensor, local_starts: Tensor, chunk: int,
                   device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Chunk table ``[C, 3]`` (start, length, local start) and ``chunk_ptr [P + 1]``."""
    st, ln, ls = _cpu(starts), _cpu(lengths), _cpu(local_starts)

    def build():
        owner, start, length, ptr = _split(st, ln, chunk)
        lstart = start - st[owner] + ls[owner]
        table = torch.stack([start, length, lstart], 1)
        both = torch.cat([table.reshape(-1), ptr]).to(device)
        c = start.numel()
        return both[:3 * c].view(c, 3), both[3 * c:], c

    return _cached(("samp", chunk, str(device), *_key(st, ln, ls)), build)


def uniform_chunks(n: int, chunk: int, device: torch.device) -> tuple[Tensor, int]:
    """Chunk table ``[C, 2]`` of ``[0, n)`` (gram's column ranges)."""

    def build():
        _, start, length, _ = _split(torch.zeros(1, dtype=torch.int64),
                                     torch.tensor([n], dtype=torch.int64), chunk)
        return torch.stack([start, length], 1).to(device), start.numel()

    return _cached(("uni", n, chunk, str(device)), build)


def whole_range(n_chunks: int, device: torch.device) -> Tensor:
    """``[0, n_chunks]``: one segment over all chunks (gram's second stage), made once per
    size and device (built per call it was a host-to-device copy per Gram)."""
    return _cached(("whole", n_chunks, str(device)),
                   lambda: torch.tensor([0, n_chunks], dtype=torch.int64, device=device))


def sampled_overlap(starts: Tensor, lengths: Tensor) -> bool:
    """Whether two non-empty sampled segments share an element (the reference then adds both
    local terms; the block table gives each element one local term)."""
    st, ln = _cpu(starts), _cpu(lengths)

    def build():
        keep = ln > 0
        s, n = st[keep], ln[keep]
        if s.numel() < 2:
            return False
        s, order = torch.sort(s, stable=True)
        return bool((s[1:] < (s + n[order])[:-1]).any())

    return _cached(("overlap", *_key(st, ln)), build)


def mix_blocks(offsets: Tensor, block: int, device: torch.device, starts: Tensor | None = None,
               lengths: Tensor | None = None, local_starts: Tensor | None = None
               ) -> tuple[Tensor, int]:
    """Block table ``[B, 5]`` (start, length, segment, sampled or -1, local shift) on
    ``device``. Sampled segments must not overlap (see :func:`sampled_overlap`)."""
    off = _cpu(offsets)
    has_local = starts is not None
    st = _cpu(starts) if has_local else None
    ln = _cpu(lengths) if has_local else None
    ls = _cpu(local_starts) if has_local else None

    def build():
        n = int(off[-1])
        if has_local:
            keep = torch.nonzero(ln > 0).flatten()
            s_st, s_ln, s_ls = st[keep], ln[keep], ls[keep]
            s_st, order = torch.sort(s_st, stable=True)
            keep, s_ln, s_ls = keep[order], s_ln[order], s_ls[order]
            cuts = torch.unique(torch.cat([off, s_st, s_st + s_ln]))  # sorted
        else:
            cuts = torch.unique(off)
        p_start, p_len = cuts[:-1], cuts[1:] - cuts[:-1]
        seg = torch.searchsorted(off, p_start, right=True) - 1
        samp = torch.full_like(p_start, -1)
        shift = torch.zeros_like(p_start)
        if has_local and s_st.numel():
            j = torch.searchsorted(s_st, p_start, right=True) - 1
            jc = j.clamp(min=0)
            inside = (j >= 0) & (p_start < s_st[jc] + s_ln[jc])
            samp = torch.where(inside, keep[jc], samp)
            shift = torch.where(inside, s_ls[jc] - s_st[jc], shift)
        owner, b_start, b_len, _ = _split(p_start, p_len, block)
        table = torch.stack([b_start, b_len, seg[owner], samp[owner], shift[owner]], 1)
        assert n == 0 or int(b_len.sum()) == n
        return table.to(device), b_start.numel()

    key = ("mix", block, str(device), *_key(off))
    if has_local:
        key += _key(st, ln, ls)
    return _cached(key, build)
