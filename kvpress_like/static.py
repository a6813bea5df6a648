"""A static compressed cache: fixed-size slot buffers that ``torch.compile`` / CUDA graphs can capture.

:class:`~kvpress_like.cache.PressedLayer` is fast to reason about but grows and shrinks Python-side: its
live length is a Python int, so a compiled decode step would be re-traced whenever it changes.
:class:`StaticPressedLayer` keeps the same selection rules in buffers of exactly ``budget`` slots per
(batch row, KV head), allocated once (like transformers' ``StaticLayer``) and marked as static addresses:

* **prefill** (any call with more than one token, whole or chunked) runs eagerly and chooses the kept
  tokens exactly as :class:`PressedLayer` does (append while under the target, otherwise
  ``press.select`` over old kept + new tokens); it may read counters back to the host.
* **decode** (one token) is branch-free on tensor values: the new token's score is computed, the victim is
  ``press.victims`` (an ``argmin`` over unprotected slots) and the token is ``scatter_``-ed into it in
  place before attention. Counters (tokens seen, filled slots) are 0-d tensors updated in place, so the
  traced graph is the same at every step and evictions never cause a recompilation. Each batch row and
  KV head evicts its own slot.

Attention over the slots (see :meth:`StaticPressedLayer.decode_attention`, used by :func:`kvpress_like.press`)
reads each slot once with GQA-native SDPA (``enable_gqa=True``, no K/V repetition) and **no mask** once the
budget is full, which is the usual case: a compressed prompt fills its budget at prefill. Only when a prompt
is shorter than the budget does the layer run in *masked* mode, where empty slots are filled first (in slot
order, exactly where :class:`PressedLayer` would append) and a ``(budget,)`` validity mask hides them. The
mode is a Python flag set at prefill, so it costs at most one extra graph.

Positions: ``get_seq_length()`` returns the number of tokens seen as a tensor (true RoPE positions, like
``StaticLayer.cumulative_length``); ``get_query_offset`` returns the filled-slot count and ``get_mask_sizes``
a slot-based ``(kv_length, 0)``, so even transformers' own masks (outside :func:`press`) are correct: slot
``j`` is visible to the new query iff ``j <= filled``.

Budget semantics: the cache holds ``budget`` slots for its whole life. Created by ``press(..., static=True)``
for ``generate()``, the budget is ``max_cache_tokens`` (capped by the generation's length) or, for a
ratio-only press, the number of prompt tokens the ratio keeps; in the latter case every decoded token then
evicts one (a dynamic cache would grow instead). ``uncompressed(cache)`` does not apply: a static cache never
holds more than its budget. Batch rows must stay together (no beam search or batch reshuffling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .slots import SlotStore, current_scores, gather_kept, refuse_crop

if TYPE_CHECKING:
    from .base import Press

__all__ = ["StaticPressedLayer", "StaticPressedCache", "static_budget", "check_static_press"]

#: Attention keyword arguments that the static decode path does not implement (it then falls back).
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "sliding_window")


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def check_static_press(press: Press) -> None:
    """Raise ``ValueError`` when a press cannot drive a fixed-size cache."""
    name = type(press).__name__
    if press.scoring.needs_queries:
        raise ValueError(
            f"{name} scores keys with queries, after attention; the static cache evicts inside the cache and needs "
            "a query-free press (QFilterPress, KnormPress, StreamingLLMPress). Use static=False."
        )
    if getattr(press, "headwise", False):
        raise ValueError(f"{name} keeps a different number of tokens per KV head; the static cache has one fixed length "
                         "for every head. Use static=False.")
    if press.skip_layers:
        raise ValueError("skip_layers leaves layers uncompressed, which a fixed-size static cache cannot hold; "
                         "drop skip_layers or use static=False.")
    if press.policy.rescore_every > 1:
        raise ValueError(
            f"{name}(rescore_every={press.policy.rescore_every}): a compiled static step cannot skip re-scoring on some "
            "steps without branching; use rescore_every=1 or static=False."
        )
    if press.decoding:
        raise ValueError(
            f"{name}(decoding=True) grows its target with every token, but a static cache holds a fixed number of "
            "slots; set max_cache_tokens for a decoding budget instead."
        )


def static_budget(press: Press, prompt_tokens: int, max_tokens: int | None = None) -> int:
    """Slots per layer and KV head for a static cache that will see a ``prompt_tokens`` prompt.

    ``max_cache_tokens`` when set, otherwise what the ratio keeps of the prompt; capped by ``max_tokens``
    (the most tokens the cache will ever see), since slots beyond it would stay empty.
    """
    budget = press.policy.capacity
    if budget is None:
        budget = press.target_size(prompt_tokens, decoding=False)
    if budget is None:
        raise ValueError(
            f"{type(press).__name__} sets no size (ratio=0 and no max_cache_tokens): a static compressed cache "
            "needs a budget. Give the press a ratio or max_cache_tokens."
        )
    if max_tokens is not None:
        budget = min(budget, max_tokens)
    return max(int(budget), 1)


class StaticPressedLayer(SlotStore):
    """Full-attention cache layer of ``budget`` fixed slots per (batch row, KV head), chosen by a press."""

    is_compileable = True
    is_croppable = False
    is_sliding = False

    def __init__(self, press: Press, layer_idx: int, budget: int):
        super().__init__()
        if budget < 1:
            raise ValueError(f"budget must be a positive number of slots, got {budget}")
        self.press = press
        self.policy = press.policy
        self.layer_idx = layer_idx
        self.budget = int(budget)
        # 0-d tensors updated in place: a compiled step reads them without guarding on their values.
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # tokens seen (true positions 0..seen-1)
        self.filled = torch.tensor(0, dtype=torch.long)  # live slots (== budget once full)
        self.masked = True  # empty slots exist (or existed when decoding started): attention needs a mask

    @property
    def n_slots(self) -> int:
        return self.budget

    # -- transformers CacheLayerMixin API ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the slot buffers once (zeros: masked empty slots must hold finite values)."""
        self.device = key_states.device
        b, h = key_states.shape[:2]
        self._k = key_states.new_zeros(b, h, self.budget, key_states.shape[-1])
        self._v = value_states.new_zeros(b, h, self.budget, value_states.shape[-1])
        self._pos = torch.zeros(b, h, self.budget, dtype=torch.long, device=self.device)
        self._score = (
            torch.zeros(b, h, self.budget, dtype=torch.float32, device=self.device) if self.stores_scores else None
        )
        self.slot_ids = torch.arange(self.budget, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.filled = self.filled.to(self.device)
        if not _is_tracing():  # static addresses let CUDA graphs keep the in-place writes (see StaticLayer)
            for t in (self._k, self._v, self._pos, self._score, self.slot_ids,
                      self.cumulative_length, self.filled):
                if t is not None:
                    torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            return self._decode(key_states, value_states)
        if _is_tracing():
            raise RuntimeError("StaticPressedLayer compiles the decode step only: run the prefill eagerly.")
        return self._prefill(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Slot coordinates: the query offset is the filled count (StaticPressedCache.get_query_offset).
        if query_length == 1:
            return self.budget, 0
        return int(self.filled) + query_length, 0

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.budget

    # -- the two paths ---------------------------------------------------------------------------
    def _decode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: evict in place, with static shapes and no host reads."""
        b, h = k.shape[:2]
        pos = self.cumulative_length.expand(b, h, 1).clone()
        self.cumulative_length.add_(1)
        reading = self.cumulative_length.expand(b, 1, 1)
        score = self._entry_scores(k, v, pos, reading, empty=False)
        # Position-dependent presses re-score every slot (O(budget), like attention), branch-free.
        scores = current_scores(
            self.press, self.layer_idx, lambda: self._k, lambda: self._v, self._pos, self._score, reading, empty=False
        )
        slot = self.press.victims(scores, self._pos, self.cumulative_length)  # (b, h)
        if self.masked:
            has_room = self.filled < self.budget
            slot = torch.where(has_room, self.filled, slot)  # empty slots first, in order: an append
            self.filled.add_(has_room.long())
        self._write_slot(slot, k, v, pos, score)
        return self._k, self._v

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Several tokens: the same choice as PressedLayer (append under the target, else select)."""
        b, h, q, _ = k.shape
        seen, n = int(self.cumulative_length), int(self.filled)
        pos = torch.arange(seen, seen + q, device=k.device).expand(b, h, q)
        seen += q
        reading = torch.full((b, 1, 1), seen, dtype=torch.long, device=k.device)
        score = self._entry_scores(k, v, pos, reading)
        self.cumulative_length.fill_(seen)
        target = self.press.target_size(seen, decoding=False)
        target = self.budget if target is None else min(target, self.budget)
        if n + q <= target:
            end = n + q
            self._write(slice(n, end), k, v, pos, score)
            self._set_filled(end)
            return self._k[:, :, :end], self._v[:, :, :end]
        full_k, full_v, full_pos, _, full_score = self._candidates(n, k, v, pos, score, reading)
        keep = self.press.select(full_score, full_pos, seen, target)
        m = keep.shape[-1]
        if m > self.budget:
            raise ValueError(
                f"layer {self.layer_idx}: the press keeps {m} protected tokens (n_sink + window), more than the "
                f"{self.budget} slots of the static cache; raise max_cache_tokens or shrink the window."
            )
        self._write(slice(0, m), *gather_kept(keep, full_k, full_v, full_pos, full_score))
        self._set_filled(m)
        return full_k, full_v

    def _set_filled(self, n: int) -> None:
        self.filled.fill_(n)
        self.masked = n < self.budget

    # -- attention ---------------------------------------------------------------------------------
    def decode_attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, None] | None:
        """Single-query attention over the slots: each slot read once, no mask once full.

        Called by kvpress_like's attention function after :meth:`update`; returns ``None`` for attention
        variants it does not implement (soft-capping, sinks, sliding windows), which then take the model's
        own path with transformers' mask (also correct for this layer).
        """
        if any(kwargs.get(name) is not None for name in _UNSUPPORTED_ATTENTION_KWARGS) or getattr(
            module, "sliding_window", None
        ):
            return None
        mask = (self.slot_ids < self.filled).view(1, 1, 1, -1) if self.masked else None
        groups = getattr(module, "num_key_value_groups", None)  # a Python int even when shapes are symbolic
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=kwargs.get("scaling"),
            enable_gqa=bool(query.shape[1] != key.shape[1]) if groups is None else groups > 1,
        )
        return out.transpose(1, 2).contiguous(), None

    # -- housekeeping ----------------------------------------------------------------------------
    def reset(self) -> None:
        if self.is_initialized:
            for t in (self._k, self._v, self._pos, self._score):
                if t is not None:
                    t.zero_()
        self.cumulative_length.zero_()
        self.filled.zero_()
        self.masked = True

    def crop(self, tokens_to_remove: int) -> None:
        refuse_crop(tokens_to_remove)

    def _fixed_batch(self, *_args) -> None:
        raise NotImplementedError(
            "The static compressed cache has a fixed batch size (its buffers are captured by CUDA graphs): beam "
            "search and batch reshuffling are not supported; use static=False."
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _fixed_batch

    def __repr__(self) -> str:
        return (f"StaticPressedLayer(layer={self.layer_idx}, budget={self.budget}, "
                f"press={type(self.press).__name__})")


class StaticPressedCache(Cache):
    """A cache of :class:`StaticPressedLayer` s, one per layer, for models whose layers all attend fully.

    Use it under :func:`kvpress_like.press` (which gives decode steps the maskless GQA attention), either
    through ``press(model, p, static=True)`` + ``generate()``, or directly::

        cache = StaticPressedCache(p, model.config, budget=4096)
        with press(model, p):
            model(prompt_ids, past_key_values=cache)            # eager prefill (whole or in chunks)
            step = torch.compile(model, mode="reduce-overhead")  # then compiled one-token steps
    """

    def __init__(self, press: Press, config, budget: int | None = None):
        check_static_press(press)
        text = config.get_text_config(decoder=True)
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        others = sorted({t for t in layer_types if t != "full_attention"})
        if others or getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
            raise ValueError(
                f"the static compressed cache supports models whose layers all use full attention; this "
                f"{text.model_type} model has {', '.join(others) or 'sliding-window'} layers. Use static=False."
            )
        budget = budget if budget is not None else press.policy.capacity
        if budget is None:
            raise ValueError("StaticPressedCache needs budget=<slots per layer and KV head> (or a press with "
                             "max_cache_tokens).")
        super().__init__(layers=[StaticPressedLayer(press, i, budget) for i in range(len(layer_types))])
        self.press = press
        self.budget = int(budget)

    def get_query_offset(self, layer_idx: int = 0) -> torch.Tensor | int:
        layer = self.layers[layer_idx]
        return layer.filled if layer.is_initialized else 0
