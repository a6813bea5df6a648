"""``press(model, p)``: compress the KV cache of a Hugging Face causal LM inside a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvpress_like.base import Press
from kvpress_like.cache import PressedLayer, layer_windows, stays_plain
from kvpress_like.headwise import HeadwisePressedLayer, is_headwise
from kvpress_like.integrations.generation import compile_settings, static_generation
from kvpress_like.integrations.transformers import (
    TRANSFORMERS_MASKS,
    PlainLayerGeometry,
    attention_layers,
    cache_argument,
    patched_attention,
    set_cache_layer,
)
from kvpress_like.registry import resolve_press
from kvpress_like.static import StaticPressedCache, StaticPressedLayer, check_static_press, static_budget

__all__ = ["press", "adopt_layer"]

#: ``id(press) -> model`` while a press() context is open: a press keeps per-model state (filters, statistics)
#: for the model it was last prepared on, so one instance cannot serve two models at once.
_OPEN: dict[int, nn.Module] = {}


def adopt_layer(
    cache: Cache, idx: int, p: Press, window: int | None = None, q: int = 0, real: torch.Tensor | None = None
) -> PressedLayer | StaticPressedLayer | None:
    """The cache layer ``idx`` as a pressed layer driven by ``p`` (converting a plain layer: its tokens are
    compressed as one prefill), or ``None`` when it stays a transformers layer (a sliding layer its window
    already bounds below the press's target, judged on the shortest row's real tokens of this ``q``-token
    call). press() adopts every layer of every call through this; code that prepares a cache outside a
    forward call (a shared prefill compressed per press) calls it too, so it compresses as press() would."""
    layers = cache.layers
    while len(layers) <= idx:
        if cache.layer_class_to_replicate is None:
            raise TypeError(f"{type(cache).__name__} has no layer {idx} and cannot create one.")
        layers.append(cache.layer_class_to_replicate())
    layer = layers[idx]
    if isinstance(layer, (PressedLayer, StaticPressedLayer)):
        if layer.press is not p:
            raise ValueError(
                f"cache layer {idx} was compressed by another press ({type(layer.press).__name__}); "
                "continue it under that press or start a new cache."
            )
        return layer
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise TypeError(
            f"press() compresses transformers' DynamicCache (the default of generate()); layer {idx} of the "
            f"given cache is a {type(layer).__name__}. Pass no cache, a DynamicCache, or a PressedCache."
        )
    if window is not None:
        if p.scoring.needs_queries or layer.is_initialized:
            return None
        if stays_plain(p, window, q if real is None else int(real[:, -q:].sum(-1).min())):
            return None
    layer_class = HeadwisePressedLayer if window is None and is_headwise(p) else PressedLayer  # sliding: uniform
    layers[idx] = layer_class.from_dynamic(layer, p, idx, window)
    return layers[idx]


def _real_tokens(kwargs: dict, args: tuple) -> torch.Tensor | None:
    """The 2-D attention mask of a padded call, its new tokens checked to be left-padded; ``None`` when
    nothing is padded. Pads among the cached tokens are fine (e.g. a left-padded question after a cached
    context): only a call whose own tokens follow a pad would give real tokens a wrong neighbourhood."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    mask = mask.bool()
    tokens = kwargs.get("input_ids", args[0] if args else None)
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    new = mask[:, -tokens.shape[1]:] if isinstance(tokens, torch.Tensor) else mask
    if bool((new[:, 1:] < new[:, :-1]).any()):
        raise ValueError(
            "press() supports left-padded batches only: this attention mask has padding after real tokens (right "
            "padding or holes), so new tokens would follow pads. Pad on the left (tokenizer.padding_side = 'left'), "
            "or run the prompts one at a time."
        )
    return mask


@contextmanager
def press(
    model: nn.Module, p: Press | str, *, static: bool = False, compile=None, **settings
) -> Iterator[Press]:
    """Compress ``model``'s KV cache with press ``p`` (an instance, or a registered name plus settings).

    Every decoder self-attention layer is routed through kvpress_like's attention function; the caches
    that flow through it (the ``DynamicCache`` that ``generate()`` creates, or one you pass) get
    :class:`~kvpress_like.cache.PressedLayer` s that evict as ``p`` decides. A sliding-window layer is
    compressed when the press keeps fewer tokens than its window (tokens that left the window go first,
    and attention never reaches past it); one its window already bounds below the press's target stays
    transformers' layer. Left-padded batches are compressed row by row (true positions, pads never kept);
    right padding is refused. On exit, even through an exception, the model is restored exactly (configs,
    hooks and generation config); caches created inside keep their pressed layers.

    The patch is on the model object, so while the context is open it applies to every thread using that
    model, not only to the one that entered it. One press instance serves one model at a time (it holds that
    model's filters or statistics); calls with ``use_cache=False`` are refused (nothing would be compressed).

    ``static=True`` selects the fast decoding path: ``generate()`` (when given no cache) uses a
    :class:`~kvpress_like.static.StaticPressedCache` of fixed-size slot buffers, prefills eagerly, then runs
    one-token steps that ``torch.compile`` / CUDA graphs capture once (transformers compiles them
    automatically on GPUs, with ``generation_config.compile_config``). Query-free presses and unpadded batches only; the budget
    is ``max_cache_tokens`` (or the prompt's kept size for a ratio-only press, see :mod:`kvpress_like.static`).
    ``compile`` (static only): ``None`` follows transformers' rule (compile on accelerators), ``False``
    disables compilation, ``True`` or a ``transformers.CompileConfig`` compiles on every device, CPU included.
    """
    p = resolve_press(p, settings)
    if p is None:
        raise TypeError("press() needs a kvpress_like Press or a registered name, got None")
    if static:
        check_static_press(p)
    elif compile is not None:
        raise ValueError("compile= selects how the static cache's decode steps are compiled; pass static=True too.")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no full-attention layers to compress: no decoder self-attention layer "
            "takes a transformers cache (is it a Hugging Face causal LM?)."
        )
    windows = layer_windows(model.config)
    window_of = {layer.layer_idx: windows[layer.layer_idx] if layer.layer_idx < len(windows) else None for layer in layers}
    p.validate(num_layers=len(windows))
    policy = p.policy
    if static and any(w is not None for w in window_of.values()):
        raise ValueError(f"static=True needs a model whose layers all use full attention; {type(model).__name__} "
                         "has sliding-window layers. Use static=False.")
    if policy.scoring.needs_queries and all(window_of[idx] is not None for idx in window_of):
        raise ValueError(
            f"{type(p).__name__} scores keys with queries after attention, which press() does not do for sliding-window "
            f"layers, and every layer of {type(model).__name__} is one: nothing would be compressed. Use a query-free "
            "press (qfilters, knorm, streaming_llm, ...)."
        )
    owner = _OPEN.get(id(p))
    if owner is not None and owner is not model:
        raise ValueError(
            f"this {type(p).__name__} instance is already open on another model ({type(owner).__name__}); a press holds "
            "the filters/statistics of one model at a time. Use one press instance per model, e.g. "
            "press(a, QFilterPress(...)) and press(b, QFilterPress(...))."
        )
    p.prepare(model)
    compressed = {idx for idx in window_of if p.compresses_layer(idx)}
    call = {"real": None}  # the current call's 2-D mask of real tokens (left padding), set by the model hook

    def check_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("use_cache") is False:
            raise ValueError(
                "press() compresses the KV cache, and this call has use_cache=False: nothing would be compressed. "
                "Drop use_cache=False, or run the call outside `with press(...)`."
            )
        call["real"] = real = _real_tokens(kwargs, args)
        if real is not None and static:
            raise ValueError("the static compressed cache has one length for every row: padded batches need static=False.")

    # The layer of each call is kept on the module's attention route (not in a dict here): a compiled
    # decode step traces this hook, and a store on an object adds no guard, so no recompilation follows.
    def adopt_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_argument(kwargs)
        idx, real = module.layer_idx, call["real"]
        if cache is None:
            set_cache_layer(module, TRANSFORMERS_MASKS)
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q = hidden.shape[1]
        layer = adopt_layer(cache, idx, p, window_of[idx], q, real) if idx in compressed else None
        if isinstance(layer, PressedLayer):
            layer.begin_call(None if real is None else real[:, -q:])
        elif layer is None:
            layer = PlainLayerGeometry(window_of[idx], real)
        set_cache_layer(module, layer)

    generation_config = getattr(model, "generation_config", None)
    with ExitStack() as stack:
        if owner is None:
            _OPEN[id(p)] = model
            stack.callback(_OPEN.pop, id(p), None)
        stack.enter_context(patched_attention(model, layers))  # queries reach the layers (ServedLayer.after_attention)
        for layer in layers:
            handle = layer.module.register_forward_pre_hook(adopt_cache, with_kwargs=True)
            stack.callback(handle.remove)
        handle = model.register_forward_pre_hook(check_call, with_kwargs=True)
        stack.callback(handle.remove)
        stack.enter_context(p.attach(model))
        chunk = policy.prefill_chunk
        if chunk is not None and generation_config is not None:
            stack.callback(setattr, generation_config, "prefill_chunk_size", generation_config.prefill_chunk_size)
            generation_config.prefill_chunk_size = chunk
        if static:
            static_generation(
                model, lambda prompt, most: StaticPressedCache(p, model.config, static_budget(p, prompt, most)), stack
            )
            if generation_config is not None:
                compile_settings(generation_config, compile, stack)
        yield p
