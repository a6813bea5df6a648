"""kvpress_like: model-agnostic KV-cache compression for Hugging Face causal LMs, built around Q-Filters.

    from kvpress_like import press, QFilterPress
    with press(model, QFilterPress(ratio=0.875)):
        out = model.generate(**inputs, max_new_tokens=64)

Names are imported on first access (PEP 562), so ``import kvpress_like`` and the command line's ``--help``
do not import torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)

#: public name -> submodule defining it
_EXPORTS = {
    "Press": ".base",
    "ScorerPress": ".base",
    "Scoring": ".base",
    "press": ".integrations.context",
    "get_press": ".registry",
    "list_presses": ".registry",
    "hookimpl": ".hookspecs",
    "PressedCache": ".cache",
    "PressedLayer": ".cache",
    "cache_nbytes": ".cache",
    "uncompressed": ".cache",
    "QFilterPress": ".methods",
    "KnormPress": ".methods",
    "KeyDiffPress": ".methods",
    "KVzipPress": ".methods",
    "SnapKVPress": ".methods",
    "StreamingLLMPress": ".methods",
    "QFiltersCache": ".methods.qfilters_cache",
    "calibrate": ".integrations.calibration",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvpress_like' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
