"""Transformers specifics: finding attention layers, seeing their queries, and aligning their masks.

transformers' attention modules look their attention function up at every call with
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``. Inside
:func:`patched_attention`, each patched module's ``config`` attribute is replaced by a view of the same
config whose ``_attn_implementation`` names our function. The function serves the cache layer of the call
through :class:`~kvpress_like.attention_api.ServedLayer` (mask, optional kernel of its own, post-RoPE
queries), calls the original implementation (eager, sdpa, flash_attention_2, ...) and hands the queries to
an optional callback; the per-module state lives in an :class:`AttentionRoute` on the module. Nothing global is
patched: the model-level config, masks and every other module are untouched, and leaving the context puts
each module's own ``config`` back. Our function is registered under :data:`ATTENTION_NAME` in transformers'
``ALL_ATTENTION_FUNCTIONS`` while a context is open (reference-counted), never at import.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kvpress_like.cache_api import CACHE_KEYWORDS, cache_argument, cache_keyword, cache_kwargs  # noqa: F401 (re-exported)
from kvpress_like.attention_api import ServedLayer, ServedLayerDefaults
from kvpress_like.masks import align_mask, positions_mask

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


#: inputs that only cross-attention takes (its keys come from another sequence, not from a growing cache)
CROSS_INPUTS = ("cross_attention_states", "encoder_hidden_states")


def _is_decoder_self_attention(module: nn.Module) -> bool:
    params = inspect.signature(module.forward).parameters
    # a class serving both roles (GPT-2) takes cross inputs but says which role this instance has
    cross = getattr(module, "is_cross_attention", None)
    return (
        bool(getattr(module, "is_causal", True))  # False: encoder self-attention and cross-attention
        and any(name in params for name in CACHE_KEYWORDS)
        and (not cross if isinstance(cross, bool) else not any(name in params for name in CROSS_INPUTS))
    )


def _uses_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through ``ALL_ATTENTION_FUNCTIONS`` (True when unknowable)."""
    return _forward_uses_attention_interface(type(module).forward)


@functools.lru_cache(maxsize=None)
def _forward_uses_attention_interface(forward) -> bool:
    """Whether the forward's compiled code (its own or a nested function's) reads ``ALL_ATTENTION_FUNCTIONS``:
    the names its bytecode loads, not its source text (no source file needed, comments never match)."""
    code = getattr(inspect.unwrap(forward), "__code__", None)
    if code is None:
        return True
    pending = [code]
    while pending:
        code = pending.pop()
        if "ALL_ATTENTION_FUNCTIONS" in code.co_names:
            return True
        pending.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Decoder self-attention modules that take a transformers cache, found from module structure and config.

    A module qualifies when it has an integer ``layer_idx`` and a ``config``, no submodule with a
    ``layer_idx`` of its own (that excludes decoder layers, which wrap their attention), is causal (its
    ``is_causal`` is not False: that excludes encoders and cross-attention, whose keys do not grow with the
    generated sequence), and its ``forward`` takes the cache (``past_key_values`` before transformers 5.24,
    ``cache`` after, ``layer_past`` in GPT-NeoX/Falcon) and no cross-attention input (unless the module says
    ``is_cross_attention = False``, as GPT-2's shared class does). Layers are sliding
    when their config's ``layer_types`` says so or the module carries a ``sliding_window``. A qualifying
    module whose forward computes attention itself instead of calling transformers' attention interface
    cannot be compressed (its queries and masks are out of reach): that raises ``ValueError``.
    """
    indexed = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "layer_idx", None), int) and not isinstance(module.layer_idx, bool)
    ]
    wrappers = {outer for outer, _ in indexed for inner, _ in indexed if inner.startswith(outer + ".") or (outer == "" and inner)}
    found = []
    for name, module in indexed:
        if name in wrappers or not hasattr(module, "config") or not _is_decoder_self_attention(module):
            continue
        if not _uses_attention_interface(module):
            raise ValueError(
                f"{type(model).__name__} is not supported: its attention ({type(module).__name__}) computes "
                "attention inside its own forward instead of calling transformers' attention interface "
                "(ALL_ATTENTION_FUNCTIONS), so kvpress_like can neither see its queries nor fit its masks to "
                "a compressed cache. Models whose attention goes through that interface (Llama, Mistral, "
                "Qwen, Phi-3, Gemma 3, GPT-NeoX, ...) are supported."
            )
        if getattr(module.config, "alibi", False) or "alibi" in inspect.signature(module.forward).parameters:
            raise ValueError(
                f"{type(model).__name__} with ALiBi is not supported: its position bias is added through the attention "
                "mask, which a compressed cache would misalign. Use a rotary variant of the model (e.g. Falcon with "
                "alibi=False)."
            )
        idx = module.layer_idx
        layer_types = getattr(module.config, "layer_types", None)
        sliding = bool(layer_types and idx < len(layer_types) and layer_types[idx] in SLIDING_TYPES) or (
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


class _ImplementationName:
    """The attention implementation a patched module's config view names: ours, or the original one while
    the original kernel runs (``flash_attention_forward`` reads ``module.config`` too)."""

    __slots__ = ("current",)

    def __init__(self):
        self.current = ATTENTION_NAME


class AttentionRoute:
    """How one patched module's attention calls are served while :func:`patched_attention` is open.

    Kept on the module (``_kvpress_like_route``, removed on exit), read by our attention function: the
    original kernel, the optional callback and :attr:`layer`, the cache layer of the current call (set by
    :func:`set_cache_layer`), which the function talks to only through
    :class:`~kvpress_like.attention_api.ServedLayer`.
    """

    def __init__(self, module: nn.Module, original_impl: str, callback: AttentionCallback | None):
        self.original_impl = original_impl
        self.callback = callback
        self.name = _ImplementationName()
        self.layer: ServedLayer = TRANSFORMERS_MASKS
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


#: attribute of a patched module holding its :class:`AttentionRoute`
ROUTE_ATTRIBUTE = "_kvpress_like_route"


def route_of(module: nn.Module) -> AttentionRoute:
    """The route of a module patched by :func:`patched_attention`."""
    return module.__dict__[ROUTE_ATTRIBUTE]


class _ConfigView:
    """Marker base of the config views :func:`_config_view` makes."""

    __slots__ = ()


@functools.cache
def _view_class(config_class: type) -> type:
    """A subclass of ``config_class`` whose ``_attn_implementation`` is the patched module's current one."""
    plain = getattr(config_class, "_attn_implementation", None)

    def get(self) -> str:
        return self._implementation.current

    def set_(self, value) -> None:  # writes reach the real config (the view shares its __dict__)
        if isinstance(plain, property) and plain.fset is not None:
            plain.fset(self, value)
        else:
            self.__dict__["_attn_implementation"] = value

    def eq(self, other) -> bool:  # the dataclass __eq__ would require the exact same class
        return isinstance(other, config_class) and self.__dict__ == other.__dict__

    namespace = {"__slots__": ("_implementation",), "_attn_implementation": property(get, set_), "__eq__": eq,
                 "__hash__": config_class.__hash__, "__module__": config_class.__module__}
    return type(config_class.__name__, (_ConfigView, config_class), namespace)


def _config_view(config, name: _ImplementationName):
    """The module's config, except for ``_attn_implementation`` (see module docstring).

    The view is an instance of a subclass of the config's class that shares the config's ``__dict__``:
    ``isinstance(view, PretrainedConfig)`` holds, every read sees the config's current values and every
    write lands in the config itself; only ``_attn_implementation`` differs, read from ``name`` (stored in a
    slot; nothing else about the module's calls lives on the view).
    """
    view = object.__new__(_view_class(type(config)))
    object.__setattr__(view, "__dict__", config.__dict__)
    object.__setattr__(view, "_implementation", name)
    return view


class PlainLayerGeometry(ServedLayerDefaults):
    """The adapter that serves transformers' own (uncompressed) cache layers under press(): their mask, when
    transformers' cannot say it.

    transformers builds one mask per layer type, from the first layer of that type; under a press that
    layer may hold another number of tokens. A plain layer's keys are its last ``kv`` tokens (all of them,
    or a sliding window's), so their true positions follow from the call's 2-D mask of real tokens.
    """

    def __init__(self, sliding_window: int | None, real: torch.Tensor | None):
        self.sliding_window = sliding_window
        self.real = real  # (batch, past + q) real tokens, None when nothing is padded

    def wants_own_mask(self, attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
        """Padding always needs it; a sliding layer when transformers' mask was built for another length."""
        fits = attention_mask is not None and attention_mask.shape[-1] == key.shape[-2]
        return self.real is not None or (self.sliding_window is not None and not fits)

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        q, kv = query.shape[-2], key.shape[-2]
        if self.real is None:  # contiguous keys, the new ones last: relative positions are enough
            positions = torch.arange(kv, device=key.device)[None]
        else:
            real = self.real[:, -kv:].to(key.device)
            positions = ((self.real.long().cumsum(-1) - 1)[:, -kv:].to(key.device)).masked_fill(~real, -1)
        return positions_mask(positions[:, None], positions[:, -q:], self.sliding_window, query, impl)


#: a call whose keys transformers' (aligned) mask describes: no cache layer, or outside press()
TRANSFORMERS_MASKS = PlainLayerGeometry(None, None)


def _fit_mask(route: AttentionRoute, layer: ServedLayer, attention_mask, query, key):
    """The mask this layer's call needs: transformers' (aligned) when it describes the keys, else the
    layer's own, built from true positions."""
    impl = route.original_impl
    if not layer.wants_own_mask(attention_mask, key):
        return align_mask(attention_mask, query, key, impl)
    if impl.startswith("flash"):
        raise ValueError(
            "padded batches and compressed sliding-window layers need masks built from true positions, which "
            f"{impl} cannot take; load the model with attn_implementation='sdpa' or 'eager'."
        )
    return layer.attention_mask(query, key, impl)


def _attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    route = route_of(module)
    layer = route.layer
    out = layer.own_attention(module, query, key, value, **kwargs)  # e.g. the static cache's maskless decode
    if out is None:
        attention_mask = _fit_mask(route, layer, attention_mask, query, key)
        route.name.current = route.original_impl
        try:
            out = route.inner(module, query, key, value, attention_mask, *args, **kwargs)
        finally:
            route.name.current = ATTENTION_NAME
    layer.after_attention(module, query)
    if route.callback is not None:
        route.callback(module, query, key, value)
    return out


_open_contexts = 0
_registry_lock = threading.Lock()


def _register() -> None:
    """Make our function findable by name while at least one :func:`patched_attention` is open.

    It goes into the ``ALL_ATTENTION_FUNCTIONS`` mapping every modeling file looks functions up in, and
    :func:`_unregister` removes it when the last context closes, so transformers is left as it was found.
    """
    global _open_contexts
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _registry_lock:
        if _open_contexts == 0:
            ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = _attention
        _open_contexts += 1


def _unregister() -> None:
    global _open_contexts
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _registry_lock:
        _open_contexts -= 1
        if _open_contexts == 0:
            del ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]


@contextmanager
def patched_attention(
    model: nn.Module, layers: list[AttentionLayer], callback: AttentionCallback | None = None
) -> Iterator[None]:
    """Route the given layers' attention through our function; restore each module's config on exit.

    The patch is on the modules, so while the context is open it applies to every thread using them.
    """
    impl = attention_implementation(model)
    _register()
    originals = []
    try:
        for layer in layers:
            module = layer.module
            if isinstance(module.__dict__.get("config"), _ConfigView):
                raise RuntimeError(f"{layer.name} is already patched: press() contexts cannot be nested.")
            route = AttentionRoute(module, impl, callback)
            originals.append((module, module.__dict__["config"]))
            module.__dict__[ROUTE_ATTRIBUTE] = route
            module.config = _config_view(module.config, route.name)
        yield
    finally:
        for module, config in originals:
            module.config = config
            del module.__dict__[ROUTE_ATTRIBUTE]
        _unregister()


def set_cache_layer(module: nn.Module, layer: ServedLayer) -> None:
    """Tell a patched module's attention function which cache layer serves the current call (see
    :class:`~kvpress_like.attention_api.ServedLayer`: masks, an optional kernel of its own, the queries)."""
    route_of(module).layer = layer

