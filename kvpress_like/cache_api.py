"""transformers' cache API across releases: under which keyword models take a cache, and finding it in a call.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (GPT-NeoX and Falcon modules say ``layer_past``);
every layer of kvpress_like that hands a cache to a model or reads one from a call goes through these.
"""

from __future__ import annotations

import functools

__all__ = ["CACHE_KEYWORDS", "cache_argument", "cache_keyword", "cache_kwargs"]

#: keywords under which an attention module's forward takes its layer's cache
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")


def cache_argument(kwargs: dict):
    """The cache passed to an attention module (one of :data:`CACHE_KEYWORDS`), or None."""
    return next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)


@functools.cache
def cache_keyword() -> str:
    """Keyword under which models' ``forward()`` and ``generate()`` take a cache in the installed transformers.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns (FutureWarning) on the old name.
    """
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{keyword: cache}`` for ``model(**inputs, **cache_kwargs(cache))`` or ``model.generate(...)``."""
    return {cache_keyword(): cache}
