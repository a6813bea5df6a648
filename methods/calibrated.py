"""Shared machinery of the position-targeted presses: pre-RoPE query statistics, keys un-rotated to the reader.

Queries at position ``p`` are ``R(p) q`` with ``q`` drawn from a distribution that barely moves with
position; a key's expected logit from such a query is a function of ``R(p)^T k``. So these presses keep
pre-RoPE statistics per query head (:mod:`kvpress_like.calibration`) and, once per scoring call, rotate
the few statistics to the reading position (rotary dims only): ``<R(p) x, k> = <x, R(p)^T k>``, so a score
costs one projection of the keys, like Q-Filters.

Every layer is read at the same position within a forward call, and on CPU the cost of re-scoring is
mostly per-op overhead, so the first layer scored at a new reading position rotates the statistics of all
layers at once (one set of ops instead of one per layer); the others reuse them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress, Scoring
from kvpress_like.filters import STATS_FILE, check_query_stats, filters_dir, load_query_stats, query_stats_for, store_key
from kvpress_like.rope import Rotary, rotary
from kvpress_like.models import head_dim as head_dim_of, kv_heads

__all__ = ["CalibratedPress"]


@dataclass
class CalibratedPress(ScorerPress):
    """A position-dependent query-free scorer built from pre-RoPE query statistics.

    ``stats`` is a directory or file written by ``kvpress-like calibrate`` (``query_stats.safetensors``);
    left as ``None``, :meth:`prepare` finds the statistics of each model in the local filter store and
    calibrates embedded models on first use (:func:`kvpress_like.filters.query_stats_for`).
    Subclasses implement :meth:`build` (per-layer tensors from the statistics) and :meth:`score`.
    """

    scoring = Scoring.READING_POSITION
    stats: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._explicit = None if self.stats is None else load_query_stats(self.stats)
        self._found: dict[str, tuple[dict, dict]] = {}
        self._layers: dict[int, tuple] = {}
        self._rotary: dict[int, Rotary | None] = {}
        self._on: dict[tuple, tuple] = {}
        self._stack: dict[int, int] = {}  # layer -> index into the stacked statistics (static frequencies)
        self._stacked: tuple | None = None  # (rows, turned, frequencies) of those layers, stacked
        self._rotated: tuple | None = None  # (reading key, rows of every stacked layer rotated there)

    def prepare(self, model) -> None:
        if self._explicit is not None:
            (tensors, meta), source = self._explicit, self.stats
        else:
            key = store_key(model)
            if key not in self._found:
                self._found[key] = query_stats_for(model)
            (tensors, meta), source = self._found[key], filters_dir() / key / STATS_FILE
        check_query_stats(tensors, model, source)
        cfg = model.config.get_text_config()
        head_dim = head_dim_of(cfg)
        n_kv = kv_heads(cfg)
        calibrated = [int(i) for i in (tensors["count"] > 0).nonzero().flatten()]
        scaling = meta.get("scaling", {})
        self._rotary = {idx: rotary(model, idx, head_dim) for idx in calibrated}
        self._layers = {}
        for idx in calibrated:
            rows, *rest = self.build({k: v[idx] for k, v in tensors.items()}, n_kv, float(scaling.get(str(idx), head_dim**-0.5)))
            rot = self._rotary[idx]
            turned = torch.zeros_like(rows) if rot is None else rot.quarter_turn(rows)
            self._layers[idx] = (rows, turned, *rest)
        self._on.clear()
        self._rotated = None
        stackable = [i for i in calibrated if self._rotary[i] is not None and self._rotary[i].frequencies is not None]
        stackable = [i for i in stackable if self._layers[i][0].shape == self._layers[stackable[0]][0].shape]
        self._stack = {idx: j for j, idx in enumerate(stackable)}
        self._stacked = None if not stackable else tuple(
            torch.stack(parts) for parts in zip(*[(*self._layers[i][:2], self._rotary[i].frequencies) for i in stackable])
        )

    def build(self, layer: dict[str, torch.Tensor], num_kv_heads: int, scaling: float) -> tuple[torch.Tensor, ...]:
        """Per-layer scoring tensors from that layer's statistics (``mean``/``direction`` ``[hq, d]``,
        ``covariance`` ``[hq, d, d]``); ``scaling`` is the layer's attention logit scale. The first tensor
        holds the vectors (last dim ``head_dim``) that :meth:`layer_tensors` returns rotated to the reader."""
        raise NotImplementedError

    def layer_tensors(self, layer_idx: int, reading_position: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`build`'s tensors for a layer on the reading position's device, the first one rotated to each
        row's reading position ``p``: ``(batch, *rows.shape)``. Rotating these few vectors instead of the ``n``
        keys makes ``<R(p) x, k> = <x, R(p)^T k>`` cost one projection of the keys, as for Q-Filters."""
        device = reading_position.device
        found = self._on.get((device, layer_idx))
        if found is None:
            if layer_idx not in self._layers:
                raise ValueError(
                    f"{type(self).__name__} has no query statistics for layer {layer_idx} (count 0: a layer left out, "
                    "or a sliding-window layer in statistics calibrated before those were), yet it is being "
                    "compressed: recalibrate with `kvpress-like calibrate --model ...` and pass stats=<that dir>, or "
                    "use the press inside `with press(model, ...)`, which finds or computes them."
                )
            found = self._on[(device, layer_idx)] = tuple(t.to(device) for t in self._layers[layer_idx])
        rows, turned, *rest = found
        b = reading_position.shape[0]
        rot = self._rotary[layer_idx]
        if rot is None:
            return (rows.expand(b, *rows.shape), *rest)
        rotated = self._rotated_stack(reading_position) if layer_idx in self._stack else None
        if rotated is not None:
            return (rotated[:, self._stack[layer_idx]], *rest)
        cos, sin = rot.cos_sin(reading_position.reshape(b, *[1] * rows.dim())[..., 0])  # (b, 1, ..., d)
        return (rows * cos + turned * sin, *rest)

    def _rotated_stack(self, reading_position: torch.Tensor) -> torch.Tensor | None:
        """Rows of every stacked layer rotated to ``reading_position``: ``(batch, layers, *rows.shape)``,
        computed once per reading position. Only for CPU tensors outside compilation, where reading the
        position's value costs no device sync and no graph break; elsewhere each layer rotates its own."""
        if reading_position.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        key = tuple(reading_position.flatten().tolist())
        if self._rotated is None or self._rotated[0] != key:
            rows, turned, freq = self._stacked  # (L, *rows.shape), same, (L, d)
            angles = reading_position.reshape(-1, 1, 1).float() * freq  # (b, L, d): as Rotary.cos_sin computes them
            shape = (len(key), rows.shape[0], *[1] * (rows.dim() - 2), rows.shape[-1])
            self._rotated = (key, rows * angles.cos().view(shape) + turned * angles.sin().view(shape))
        return self._rotated[1]
