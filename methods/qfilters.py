"""Q-Filters (Godey et al., 2025, arXiv 2503.02812): score keys by their projection on the queries' main direction.

Queries of a given head share a dominant direction ``u`` (the first right singular vector of the query
matrix). The attention a key receives on average grows with ``<k, u>``, so keys with a large projection
are kept. One vector per layer and KV head is enough: filters have shape
``[num_layers, num_kv_heads, head_dim]``.

Sign convention. The published ``*_qfilt`` repositories store the *negated* direction ``f = -u`` under the
key ``q_filters``, and the original method keeps the keys with the largest ``-<k, f>``. kvpress_like keeps
that convention everywhere (files, :func:`~kvpress_like.integrations.calibration.calibrate`'s return value,
:attr:`QFilterPress.active_filters`), so a published file and a locally calibrated one are
interchangeable: ``score(k) = -<k, f>``, higher is kept.

This module holds the press only. The filter store (files, store keys, hub lookup) is
:mod:`kvpress_like.filters`, the calibration algorithm :mod:`kvpress_like.calibration` (run on a model by
:mod:`kvpress_like.integrations.calibration`); the core's public names are re-exported here because this was
their historical import path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress
from kvpress_like.calibration import calibration_ids, filters_from_queries
from kvpress_like.filters import (
    FILTER_FILE,
    FILTER_KEY,
    SIGN_CONVENTION,
    as_filters,
    check_filters,
    expected_shape,
    filters_for,
    load_filters,
    save_filters,
    store_key,
    store_path,
)

__all__ = [
    "QFilterPress",
    # re-exported from kvpress_like.calibration and kvpress_like.filters (historical import path)
    "FILTER_FILE",
    "FILTER_KEY",
    "SIGN_CONVENTION",
    "as_filters",
    "calibration_ids",
    "check_filters",
    "expected_shape",
    "filters_for",
    "filters_from_queries",
    "load_filters",
    "save_filters",
    "store_key",
    "store_path",
]


@dataclass
class QFilterPress(ScorerPress):
    """Keep the keys with the largest ``-<k, f>`` for their layer and KV head's filter ``f``.

    ``filters`` is a tensor, an array-like (numpy array, nested lists) or a path (safetensors file or
    directory in the published format); NaN/Inf values are refused. Left as ``None``, :meth:`prepare`
    (run by :func:`kvpress_like.press`) finds the filters of each model it is used with
    (:func:`kvpress_like.filters.filters_for`), so one press reused on another model switches to that
    model's filters.
    """

    name = "qfilters"
    filters: torch.Tensor | str | os.PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._explicit = None if self.filters is None else as_filters(self.filters)
        self._found: dict[str, torch.Tensor] = {}  # store key -> filters found for that model
        self._active = self._explicit
        self._on: dict[tuple, torch.Tensor] = {}

    @property
    def active_filters(self) -> torch.Tensor | None:
        """The filters scores use now: the explicit ones, or those found for the last prepared model."""
        return self._active

    def prepare(self, model) -> None:
        if self._explicit is None:
            key = store_key(model)
            if key not in self._found:
                self._found[key] = filters_for(model)
            self._active = self._found[key]
        check_filters(self._active, model)
        self._on.clear()

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        if self._active is None:
            raise ValueError(
                "QFilterPress has no filters: pass filters=<path or tensor>, or use it inside "
                "`with press(model, ...)`, which finds or computes them for the model."
            )
        where = (keys.device, layer_idx)
        f = self._on.get(where)
        if f is None:
            f = self._on[where] = self._active[layer_idx].to(keys.device, torch.float32)
            if not bool(f.any()):
                raise ValueError(
                    f"QFilterPress: layer {layer_idx} has all-zero Q-Filters (files calibrated before sliding-window "
                    "layers were, or a layer left out), yet it is being compressed: scores would be arbitrary. "
                    "Recalibrate with `kvpress-like calibrate --model ...`, or keep the layer uncompressed."
                )
        return -torch.einsum("bhnd,hd->bhn", keys.float(), f)
