"""kvpress_like: model-agnostic KV-cache compression for Hugging Face causal LMs, built around Q-Filters.

    from kvpress_like import press, QFilterPress
    with press(model, QFilterPress(ratio=0.875)):
        out = model.generate(**inputs, max_new_tokens=64)
"""

from .base import Press, ScorerPress
from .cache import PressedCache, PressedLayer, cache_nbytes, uncompressed
from .context import press
from .hookspecs import hookimpl
from .methods import KnormPress, QFilterPress, SnapKVPress, StreamingLLMPress
from .qfilters_cache import QFiltersCache
from .registry import get_press, list_presses

__version__ = "0.1.0"

__all__ = [
    "Press",
    "ScorerPress",
    "press",
    "get_press",
    "list_presses",
    "hookimpl",
    "PressedCache",
    "PressedLayer",
    "cache_nbytes",
    "uncompressed",
    "QFilterPress",
    "KnormPress",
    "SnapKVPress",
    "StreamingLLMPress",
]
