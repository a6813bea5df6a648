"""Transformers specifics: finding attention layers, seeing their queries, and aligning their masks.

transformers' attention modules look their attention function up at every call with
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``. Inside
:func:`patched_attention`, each patched module's ``config`` attribute is replaced by a view of the same
config whose ``_attn_implementation`` names our function, which then calls the original implementation
(eager, sdpa, flash_attention_2, ...) and hands the post-RoPE queries to a callback. Nothing global is
patched: the model-level config, masks and every other module are untouched, and leaving the context puts
each module's own ``config`` back. Our function is registered under :data:`ATTENTION_NAME` in transformers'
``AttentionInterface`` on first use, never at import.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_NAME = "kvpress_like"
SLIDING_TYPES = ("sliding_attention", "chunked_attention")
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")

#: ``callback(module, query, key, value)`` run after each patched attention call.
AttentionCallback = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class AttentionLayer:
    """One attention module of a model, as press() sees it."""

    name: str
    module: nn.Module
    layer_idx: int
    sliding: bool


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Self-attention modules that take a transformers cache, found from module structure and config.

    A module qualifies when it has an integer ``layer_idx``, a ``config`` and a ``forward`` accepting the
    cache keyword (``past_key_values`` before transformers 5.24, ``cache`` after). Layers are sliding when
    their config's ``layer_types`` says so or the module carries a ``sliding_window``.
    """
    found = []
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or not hasattr(module, "config") or "Attention" not in type(module).__name__:
            continue
        params = inspect.signature(module.forward).parameters
        if "past_key_values" not in params and "cache" not in params:
            continue
        layer_types = getattr(module.config, "layer_types", None)
        sliding = bool(layer_types and layer_types[idx] in SLIDING_TYPES) or (
            getattr(module, "sliding_window", None) is not None
        )
        found.append(AttentionLayer(name, module, idx, sliding))
    return found


def attention_implementation(model: nn.Module) -> str:
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {impl!r} is not supported by kvpress_like; load the model with "
            f"attn_implementation set to one of {', '.join(SUPPORTED_IMPLEMENTATIONS)}."
        )
    return impl


class _State:
    """Per-module state of a patched attention module (lives only inside the context)."""

    def __init__(self, module: nn.Module, original_impl: str, callback: AttentionCallback | None):
        self.original_impl = original_impl
        self.current_impl = ATTENTION_NAME
        self.callback = callback
        self.layer = None  # cache layer of the current call (set by press()); may take over decode attention
        if original_impl == "eager":
            modeling = sys.modules[type(module).__module__]
            self.inner = getattr(modeling, "eager_attention_forward", None)
            if self.inner is None:
                raise ValueError(
                    f"{type(module).__name__} has no eager_attention_forward in {modeling.__name__}; "
                    "load the model with attn_implementation='sdpa'."
                )
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            self.inner = ALL_ATTENTION_FUNCTIONS[original_impl]


class _ConfigView:
    """The module's config, except for ``_attn_implementation`` (see module docstring)."""

    def __init__(self, config, state: _State):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_state", state)

    @property
    def _attn_implementation(self) -> str:
        return self._state.current_impl

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


def align_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor | None:
    """Fit a causal mask built for another layer's cache length to this layer's keys.

    Under a press, layers hold different numbers of keys, but transformers builds one mask per layer type.
    Without padding (which press() rejects), every cached key precedes the new queries and the new tokens'
    keys come last, so the right mask is: all cached keys visible, and the original mask's last ``q``
    columns for the new keys. sdpa's ``is_causal`` aligns top-left, so a causal mask is materialized
    whenever there are more keys than queries.
    """
    q, kv = query.shape[-2], key.shape[-2]
    if impl.startswith("flash") or (mask is None and (q == 1 or q == kv)):
        return mask
    if mask is not None and mask.shape[-1] == kv:
        return mask
    boolean = impl == "sdpa" if mask is None else mask.dtype == torch.bool
    if mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
        if not boolean:
            new = torch.zeros(new.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~new, torch.finfo(query.dtype).min
            )
    else:
        new = mask[..., -q:]
    visible = torch.ones if boolean else torch.zeros
    old = visible(*new.shape[:-1], kv - q, dtype=new.dtype, device=new.device)
    return torch.cat([old, new], dim=-1)


def _attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    state: _State = module.config._state
    decode = getattr(state.layer, "decode_attention", None) if query.shape[-2] == 1 else None
    out = None if decode is None else decode(module, query, key, value, **kwargs)
    if out is not None:  # e.g. the static cache: maskless GQA attention over its slots
        if state.callback is not None:
            state.callback(module, query, key, value)
        return out
    attention_mask = align_mask(attention_mask, query, key, state.original_impl)
    state.current_impl = state.original_impl  # flash_attention_forward reads module.config too
    try:
        out = state.inner(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        state.current_impl = ATTENTION_NAME
    if state.callback is not None:
        state.callback(module, query, key, value)
    return out


def _register() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, _attention)


@contextmanager
def patched_attention(
    model: nn.Module, layers: list[AttentionLayer], callback: AttentionCallback | None = None
) -> Iterator[None]:
    """Route the given layers' attention through our function; restore each module's config on exit."""
    impl = attention_implementation(model)
    _register()
    originals = []
    try:
        for layer in layers:
            module = layer.module
            if isinstance(module.__dict__.get("config"), _ConfigView):
                raise RuntimeError(f"{layer.name} is already patched: press() contexts cannot be nested.")
            originals.append((module, module.__dict__["config"]))
            module.config = _ConfigView(module.config, _State(module, impl, callback))
        yield
    finally:
        for module, config in originals:
            module.config = config


def set_cache_layer(module: nn.Module, layer) -> None:
    """Tell a patched module's attention function which cache layer the current call uses.

    A layer with a ``decode_attention(module, query, key, value, **kwargs)`` method computes single-query
    attention itself (returning ``None`` to decline); other layers get the model's implementation.
    """
    module.config._state.layer = layer


def cache_layer(module: nn.Module):
    """The cache layer :func:`set_cache_layer` gave a patched module for its current call (or None)."""
    return module.config._state.layer


def cache_argument(kwargs: dict):
    """The cache passed to an attention module (``cache`` since transformers 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


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
