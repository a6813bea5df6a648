"""What front-ends do with a whole cache: copy it (all rows, some rows, or each row repeated) and prefill it.

The pipeline answers several questions on copies of one compressed context, lm-eval scores several
continuations on copies of one prefix, the evaluations compress one shared prefill once per press: each
goes through :func:`fork_cache` and :func:`chunked_prefill`, so a copy is made, and a prompt fed, one way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache

from .base import Press
from .cache import PressedLayer
from .cache_api import cache_kwargs
from .static import StaticPressedLayer

__all__ = ["cache_presses", "fork_cache", "chunked_prefill"]


def cache_presses(cache: Cache) -> list[Press]:
    """The presses driving ``cache``'s layers (each once, in layer order; empty for a plain cache)."""
    found = {id(layer.press): layer.press for layer in cache.layers if isinstance(layer, (PressedLayer, StaticPressedLayer))}
    return list(found.values())


def fork_cache(
    cache: Cache, rows: int | Sequence[int] = 1, *, in_place: bool = False, share_storage: bool = False
) -> Cache:
    """A copy of ``cache`` that can grow without touching the original.

    ``rows``: a count (every row repeated that many times along the batch, e.g. one copy per question) or
    the indices of the rows to keep (e.g. one per continuation). The presses are shared, not copied: pressed
    layers must stay tied to the press object that is active. ``in_place``: reshape ``cache`` itself (its
    last use, no copy). ``share_storage``: layers copied but their tensors shared, which costs no memory and
    is safe for transformers' plain layers (their appends build new tensors); pressed layers write into
    their slots in place, so they are refused.
    """
    if share_storage:
        if in_place or cache_presses(cache):
            raise ValueError("share_storage copies plain layers only (pressed layers write in place), never in place.")
        copied = copy.copy(cache)
        copied.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        copied = cache if in_place else copy.deepcopy(cache, {id(p): p for p in cache_presses(cache)})
    if isinstance(rows, int):
        if rows > 1:
            copied.batch_repeat_interleave(rows)
    else:
        copied.batch_select_indices(torch.tensor(list(rows)))  # CPU indices work for layers on any device
    return copied


def chunked_prefill(
    model: nn.Module, ids: torch.Tensor, cache: Cache, chunk: int | None = None, mask: torch.Tensor | None = None
) -> None:
    """Feed ``ids`` into ``cache``, ``chunk`` tokens per forward call (all at once for ``None``), logits of
    each call's last token only.

    ``mask``: the 2-D mask of real tokens over the cached tokens and ``ids`` (left padding, or pads between
    a cached context and a padded question); each call then gets the mask of everything up to its last
    token and each row its true positions, as ``generate()`` derives them from the mask.
    """
    chunk = chunk or ids.shape[1]
    padded = mask is not None and not bool(mask.all())
    past = mask.shape[1] - ids.shape[1] if padded else 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        rows = {"attention_mask": mask[:, : past + end], "position_ids": positions[:, past + start : past + end]} if padded else {}
        model(ids[:, start:end], use_cache=True, logits_to_keep=1, **rows, **cache_kwargs(cache))
