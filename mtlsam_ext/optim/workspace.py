"""``Workspace``: the optimizer's persistent work buffers and the tables cached per layer
selection, reused from step to step.

The ``[rows, N_b]`` row matrices of a step (per-task gradients, the backup of theta, the
heads' directions) are allocated once and kept; a shape change (another K) makes them anew.
The segment tables of the sampled layers are built once per selection (the random layer mode
caches a bounded number).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlsam_ext.flat import FlatParams


class Workspace:
    """Named persistent buffers (``bufs``) and cached tables over the shared and head
    parameters' flat layout."""

    def __init__(self, shared: FlatParams, heads: FlatParams | None) -> None:
        self.shared = shared
        self.heads = heads
        self.bufs: dict[str, list[Tensor]] = {}
        self._tables: dict[tuple, list] = {}
        self._views: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}

    def sampled_tables(self, layers: list[int]) -> list:
        """Segment tables of the sampled layers (compact local layout), cached per selection."""
        key = tuple(layers)
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 64:  # random mode: bounded cache
                self._tables.clear()
            t = self._tables[key] = self.shared.sampled_tables(layers, compact=True)
        return t

    def sampled_index(self, layers: list[int]) -> tuple[list[Tensor], Tensor]:
        """Per bucket the layer index of each sampled segment, and the ``[L]`` mask of the
        sampled layers, on the parameters' device, cached per selection (built each step they
        were two to three host-to-device copies per step on a GPU)."""
        key = ("index", tuple(layers))
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 64:  # random mode: bounded cache
                self._tables.clear()
            dev, chosen = self.shared.device, set(layers)
            ids = [torch.tensor([li for li in b.seg_layers if li in chosen], dtype=torch.int64,
                                device=dev) for b in self.shared.buckets]
            mask = torch.zeros(len(self.shared.layers), dtype=torch.bool)
            mask[list(layers)] = True
            t = self._tables[key] = (ids, mask.to(dev))
        return t

    def head_views(self, head_out: list[Tensor], i: int) -> tuple[list[Tensor], list[Tensor]]:
        """Head ``i``'s slices of ``head_out`` and of the heads' flat gradients, per bucket
        that holds it (built once per buffers and head: taken after every perturbed pass)."""
        key = ("head", i, tuple(h.data_ptr() for h in head_out),
               tuple(b.grad.data_ptr() for b in self.heads.buckets))
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 4096:
                self._views.clear()
            dst, src = [], []
            for h, b in zip(head_out, self.heads.buckets):
                s, e = b.layer_range(i)
                if e > s:
                    dst.append(h[0][s:e])
                    src.append(b.grad[s:e])
            views = self._views[key] = (dst, src)
        return views

    def sampled_runs(self, layers: list[int]) -> list[list[tuple[int, int, int]]]:
        """Per bucket, the sampled columns as ``(flat start, length, compact start)`` runs:
        the segments of :meth:`sampled_tables` with neighbours that are adjacent in both
        layouts merged (a layer's weight and bias, consecutive sampled layers), as Python ints,
        cached per selection."""
        key = ("runs",) + tuple(layers)
        runs = self._tables.get(key)
        if runs is None:
            runs = []
            for st, ln, ls, _ in self.sampled_tables(layers):
                merged: list[tuple[int, int, int]] = []
                for s, n, q in zip(st.tolist(), ln.tolist(), ls.tolist()):
                    if merged and merged[-1][0] + merged[-1][1] == s \
                            and merged[-1][2] + merged[-1][1] == q:
                        merged[-1] = (merged[-1][0], merged[-1][1] + n, merged[-1][2])
                    else:
                        merged.append((s, n, q))
                runs.append(merged)
            self._tables[key] = runs
        return runs


    def buffers(self, name: str, rows: int, flat: FlatParams | None = None) -> list[Tensor]:
        """Persistent ``[rows, N_b]`` work buffers per bucket (allocated once, reused)."""
        flat = flat or self.shared
        bufs = self.bufs.get(name)
        if bufs is None or bufs[0].shape[0] != rows:
            bufs = flat.new_rows(rows)
            self.bufs[name] = bufs
        return bufs

    def scratch(self, name: str, specs: list[tuple[tuple[int, ...], torch.dtype]]
                ) -> list[Tensor]:
        """Persistent work tensors of the given shapes and dtypes on the parameters' device,
        reused from step to step (made anew when a shape changes). A fresh tensor of a few MB
        every step pays its page faults on the CPU: the zo estimator's ``[K, M]`` zeros took
        0.5-1.8 ms per step on the main job's MLP (K = 10, M = 148k), several times the
        zeroing of warm memory."""
        bufs = self.bufs.get(name)
        if bufs is None or [(tuple(b.shape), b.dtype) for b in bufs] != specs:
            bufs = self.bufs[name] = [torch.empty(s, dtype=d, device=self.shared.device)
                                          for s, d in specs]
        return bufs
