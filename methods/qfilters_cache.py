"""``QFiltersCache``: the entry point of the original Q-Filters repository, on kvpress_like's machinery.

Users of the original code write::

    cache = QFiltersCache(window_length=64, max_length=128, model=model)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=4096)

(``cache=cache`` on transformers >= 5.24, which warns on the old keyword), and the cache never holds more than ``max_length`` tokens per layer and KV head, the ``window_length``
most recent of them protected. It is nothing but a :class:`~kvpress_like.cache.PressedCache` driven by a
:class:`~kvpress_like.methods.qfilters.QFilterPress` with ``max_cache_tokens=max_length``; filters come
from a path, a tensor or the local filter store, never from a hub download.
"""

from __future__ import annotations

import os

import torch

from kvpress_like.cache import PressedCache
from kvpress_like.filters import FILTER_FILE, filters_for, load_filters, store_path
from kvpress_like.models import EMBEDDED_MODELS

from .qfilters import QFilterPress

__all__ = ["QFiltersCache"]


def _store_filters(model) -> torch.Tensor:
    """Filters for ``model`` from the local store (embedded models calibrate once); never the hub."""
    name = str(getattr(model.config, "_name_or_path", ""))
    if (store_path(model) / FILTER_FILE).exists() or name in EMBEDDED_MODELS:
        return filters_for(model)
    raise ValueError(
        f"no local Q-Filters for {name or type(model).__name__}. Compute them once with "
        f"`kvpress-like calibrate --model {name or '<model>'} --out <dir>` and pass QFiltersCache(filters=<dir>), "
        "or download the published `*_qfilt` repository yourself and pass its directory."
    )


def _named_filters(model_name: str) -> torch.Tensor:
    """The original signature named a hub model whose filters it downloaded; here only a local path works."""
    if os.path.exists(model_name):
        return load_filters(model_name)
    raise ValueError(
        f"model_name={model_name!r}: the original repository downloaded its filters from the hub; kvpress_like "
        "does not. Pass model=<the loaded model> (filters come from the local store) or "
        "filters=<path to a *_qfilt directory or safetensors file>."
    )


class QFiltersCache(PressedCache):
    """A KV cache capped at ``max_length`` tokens per layer and KV head, evicting by Q-Filters scores.

    Args:
        window_length: most recent tokens never evicted (the original repository's recent window).
        max_length: hard budget per layer and KV head; must exceed ``window_length + n_sink``.
        filters: a ``[num_layers, num_kv_heads, head_dim]`` tensor or a path in the published format.
        model: the model the cache is for: source of filters (when ``filters`` is None), of the layer types
            (sliding-window layers keep transformers' own bounded layer) and of a shape check.
        n_sink: first tokens never evicted.
        config: model config, when ``model`` is not given (layer types).
        model_name: the original signature's filter source; here only a local path to filters.
    """

    def __init__(
        self,
        window_length: int = 64,
        max_length: int = 128,
        filters: torch.Tensor | str | os.PathLike | None = None,
        model: torch.nn.Module | None = None,
        n_sink: int = 0,
        config=None,
        model_name: str | None = None,
    ):
        if filters is None:
            if model is not None:
                filters = _store_filters(model)
            elif model_name is not None:
                filters = _named_filters(model_name)
            else:
                raise ValueError(
                    "QFiltersCache needs Q-Filters: pass model=<model> (local filter store) or "
                    "filters=<tensor or path to a *_qfilt directory>."
                )
        qpress = QFilterPress(max_cache_tokens=max_length, window=window_length, n_sink=n_sink, filters=filters)
        if model is not None:
            qpress.prepare(model)  # explicit filters: only the shape check
            config = model.config if config is None else config
        super().__init__(qpress, config=config)
        self.window_length = window_length
        self.max_length = max_length
