"""``press(model, p)``: compress the KV cache of a Hugging Face causal LM inside a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .base import Press
from .cache import PressedLayer
from .integrations.transformers import attention_layers, cache_argument, patched_attention
from .registry import get_press

__all__ = ["press"]


def _adopt(cache: Cache, idx: int, p: Press) -> PressedLayer:
    """The cache layer ``idx`` as a :class:`PressedLayer` driven by ``p`` (converting a plain layer)."""
    layers = cache.layers
    while len(layers) <= idx:
        if cache.layer_class_to_replicate is None:
            raise TypeError(f"{type(cache).__name__} has no layer {idx} and cannot create one.")
        layers.append(cache.layer_class_to_replicate())
    layer = layers[idx]
    if isinstance(layer, PressedLayer):
        if layer.press is not p:
            raise ValueError(
                f"cache layer {idx} was compressed by another press ({type(layer.press).__name__}); "
                "continue it under that press or start a new cache."
            )
        return layer
    if type(layer) is not DynamicLayer:
        raise TypeError(
            f"press() compresses transformers' DynamicCache (the default of generate()); layer {idx} of the "
            f"given cache is a {type(layer).__name__}. Pass no cache, a DynamicCache, or a PressedCache."
        )
    layers[idx] = PressedLayer.from_dynamic(layer, p, idx)
    return layers[idx]


def _reject_padding(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    tokens = ids if ids is not None else embeds
    mask = kwargs.get("attention_mask")
    if tokens is None or tokens.shape[1] == 1 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    if not bool(mask.all()):
        raise ValueError(
            "press() does not support padded batches: pad tokens would be scored and kept like real ones, "
            "and each sequence's cache would be pruned against the wrong positions. Batch prompts of equal "
            "length, or run them one at a time."
        )


@contextmanager
def press(model: nn.Module, p: Press | str, **settings) -> Iterator[Press]:
    """Compress ``model``'s KV cache with press ``p`` (an instance, or a registered name plus settings).

    Every non-sliding attention layer is routed through kvpress_like's attention function; the caches
    that flow through it (the ``DynamicCache`` that ``generate()`` creates, or one you pass) get
    :class:`~kvpress_like.cache.PressedLayer` s that evict as ``p`` decides. Sliding-window layers are left
    alone: their cache is already bounded. On exit, even through an exception, the model is restored
    exactly (configs, hooks and generation config); caches created inside keep their pressed layers.
    """
    if isinstance(p, str):
        p = get_press(p, **settings)
    elif settings:
        raise TypeError("settings are only accepted with a press name, e.g. press(model, 'knorm', ratio=0.5)")
    if not isinstance(p, Press):
        raise TypeError(f"press() needs a kvpress_like Press or a registered name, got {type(p).__name__}")
    layers = attention_layers(model)
    full = [layer for layer in layers if not layer.sliding]
    if not full:
        raise ValueError(
            f"{type(model).__name__} has no full-attention layers to compress"
            + (" (all of its attention layers are sliding-window, already bounded)." if layers else
               ": no module with a layer_idx takes a transformers cache (is it a Hugging Face causal LM?).")
        )
    p.prepare(model)
    compressed = {layer.layer_idx for layer in full if p.compresses_layer(layer.layer_idx)}
    active: dict[int, PressedLayer | None] = {}

    def adopt_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_argument(kwargs)
        idx = module.layer_idx
        active[idx] = _adopt(cache, idx, p) if cache is not None and idx in compressed else None

    def after_attention(module: nn.Module, query: torch.Tensor, key, value) -> None:
        layer = active.get(module.layer_idx)
        if layer is not None:
            layer.prune_with_queries(module, query)

    generation_config = getattr(model, "generation_config", None)
    with ExitStack() as stack:
        stack.enter_context(patched_attention(model, full, None if p.query_free else after_attention))
        for layer in full:
            handle = layer.module.register_forward_pre_hook(adopt_cache, with_kwargs=True)
            stack.callback(handle.remove)
        handle = model.register_forward_pre_hook(_reject_padding, with_kwargs=True)
        stack.callback(handle.remove)
        chunk = getattr(p, "prefill_chunk_size", None)
        if chunk is not None and generation_config is not None:
            stack.callback(setattr, generation_config, "prefill_chunk_size", generation_config.prefill_chunk_size)
            generation_config.prefill_chunk_size = chunk
        yield p
