"""The cache engine: a transformers cache layer that really drops evicted KV pairs.

:class:`PressedLayer` owns its tensors as gpt-fast does: per layer, slot buffers of shape
``(batch, kv_heads, capacity, head_dim)`` written in place (:class:`~kvpress_like.slots.SlotStore`), with
the true position of every slot (``-1`` for an empty or padding slot) and, for query-free presses, the score
it got when it entered. Each forward call is one :class:`~kvpress_like.plan.Call`, planned by
:func:`~kvpress_like.plan.plan_call` before anything is written: append, overwrite (one decoding step into a
full cache, written in place *before* attention) or prune (attention sees the old kept tokens plus all new
ones, then the best ``target`` of them are stored, in position order). Slots are not kept in position
order; attention does not care, because RoPE was applied before the keys entered the cache.

Positions are true positions: the layer reports the number of tokens given to it as its sequence length,
so transformers gives new tokens their true RoPE positions. Two small pieces carry what varies between
layers and batches, so the layer itself never branches on them:

* its span (:mod:`~kvpress_like.windows`): full attention, or a sliding window whose tokens that left the
  window are evicted first and never attended to;
* its rows (:mod:`~kvpress_like.rows`): uniform, or left-padded rows each planned as it would be alone (its
  own slot count, target and re-scoring clock; :meth:`PressedLayer.begin_call` receives which new tokens are
  real), so pad tokens are never kept and batching never changes a row's result.

Presses whose scores depend on the reading position (``Scoring.READING_POSITION``) have the live slots re-scored
whenever the layer must evict. Masks: when every slot is valid and the layer attends fully, transformers'
causal mask (aligned by :func:`kvpress_like.masks.align_mask`) is right. Otherwise (padding, empty slots,
sliding windows) :meth:`PressedLayer.attention_mask` builds the mask from the slots' true positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .plan import Call, Plan
from .rows import PaddedRows, UniformRows
from .slots import GrowingSlots, SlotStore
from .windows import attention_span

if TYPE_CHECKING:
    from .base import Press

__all__ = ["SlotStore", "PressedLayer", "PressedCache", "cache_nbytes", "uncompressed", "layer_windows"]

#: ``PressedLayer._announced`` when press() announced nothing: the call runs outside press()
_NOT_ANNOUNCED = object()

#: ``observer(layer, plan, n_new)`` called after each update of a layer (benchmarks, diagnostics).
Observer = Callable[["PressedLayer", Plan, int], None]


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: its sliding window, or ``None`` for full (or chunked) attention.

    Follows transformers' own rule for the cache layers it creates (``layer_types``, else a config-wide
    ``sliding_window``), so a Mistral-style config without ``layer_types`` is sliding everywhere.
    """
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if types is None:
        return [window] * text.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


class PressedLayer(GrowingSlots):
    """Full- or sliding-attention cache layer whose contents are chosen by a :class:`~kvpress_like.base.Press`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, press: Press, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.press = press
        self.policy = press.policy
        self.layer_idx = layer_idx
        self.span = attention_span(sliding_window)
        self.rows: UniformRows | PaddedRows = UniformRows()
        self.tokens_given = 0  # tokens given to this layer, padding included (transformers' sequence length)
        self.compressing = True  # False inside `uncompressed(cache)`
        self.observers: list[Observer] = []
        #: what press() announced of the coming call: its real new tokens, ``(batch, q)`` or None for all; a
        #: call not announced (``_NOT_ANNOUNCED``) runs outside press(), with transformers' masks
        self._announced: torch.Tensor | None | object = _NOT_ANNOUNCED
        self._attn_positions: torch.Tensor | None = None  # (batch, kv_heads, kv) keys the last call attended to
        self._query_positions: torch.Tensor | None = None  # (batch, q) its new tokens' positions (-1: padding)

    @property
    def sliding_window(self) -> int | None:
        return self.span.window

    @property
    def seen(self) -> int:
        """Tokens given to this layer (:attr:`tokens_given`), the name presses written before it still read."""
        return self.tokens_given

    @property
    def padded(self) -> bool:
        return self.rows.padded

    @property
    def announced(self) -> bool:
        """Whether press() announced the coming call (:meth:`begin_call`): its masks are then built by press()."""
        return self._announced is not _NOT_ANNOUNCED

    @property
    def _may_hold_empty(self) -> bool:
        """Whether some slot may be empty (padding, or a token that left the window): scores then need masking."""
        return self.rows.padded or self.span.window is not None

    @classmethod
    def from_dynamic(cls, layer: DynamicLayer, press: Press, layer_idx: int, sliding_window: int | None = None) -> PressedLayer:
        """Take over a plain layer, e.g. a cache filled before :func:`press` was entered."""
        new = cls(press, layer_idx, sliding_window)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.cumulative_length > layer.keys.shape[-2]:
                raise ValueError(
                    f"layer {layer_idx} already dropped tokens that left its sliding window; start compressing from "
                    "an empty cache (enter press() before the first forward call)."
                )
            new.begin_call(None)  # a takeover, not a forward call: no mask to check
            new.update(layer.keys, layer.values)
        return new

    # -- one call ----------------------------------------------------------------------------------
    def begin_call(self, real: torch.Tensor | None) -> None:
        """Announced by :func:`kvpress_like.press` before each call: which new tokens are real ``(batch, q)``
        (left padding; ``None``: all of them). The next :meth:`update` consumes it."""
        self._announced = real

    def _row_targets(self, reading: torch.Tensor | int, decoding: bool) -> list[int] | None:
        """Per row at ``reading`` (an int, or ``(batch, 1, 1)``): the most tokens it may keep (``None``: no limit)."""
        readings = [reading] if isinstance(reading, int) else reading.flatten().tolist()
        targets = []
        for at in readings:
            target = self.span.cap(self.press.target_size(at, decoding) if self.compressing else None, decoding)
            if target is None:
                return None
            targets.append(target)
        return targets

    def _start_call(self, key_states: torch.Tensor) -> tuple[Call, bool]:
        """Plan the call of these new keys and count its tokens; also whether press() announced it."""
        b, h, q, _ = key_states.shape
        announced = self.announced
        real = self._announced if announced else None
        self._announced = _NOT_ANNOUNCED
        self.rows = self.rows.admit(real, self)
        call = self.rows.plan(self, q, b, h, key_states.device, real)
        self.rows.advance(call)
        self.tokens_given += q
        return call, announced

    # -- transformers CacheLayerMixin API ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        call, announced = self._start_call(key_states)
        empty = self._may_hold_empty
        score = self._entry_scores(key_states, value_states, call.positions, call.reading_position, empty=empty)
        if call.plan is Plan.PRUNE:
            out = self._prune(call, key_states, value_states, score)
        else:
            if call.plan is Plan.APPEND:
                self._append(key_states, value_states, call.positions, score)
            else:
                slot = self.rows.overwrite_slot(self, call, empty)
                self._write_slot(slot, key_states, value_states, call.positions, score)
            out = self.keys, self.values
            self._attn_positions = self.positions if empty else None  # only our own masks read them
            self.rows.after_call(call)
        self._query_positions = call.positions[:, 0] if empty else None
        if not announced:
            self._check_outside_context(call)
        for observer in self.observers:
            observer(self, call.plan, call.q)
        return out

    def _prune(self, call: Call, key_states, value_states, score) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the kept slots plus every new token, then store the best of them."""
        reading = call.reading_position
        at = call.reading_position_int if call.reading_position_int is not None else reading
        hidden = self.rows.hidden_before_prune(self, call)
        stale = self.scores
        full_k, full_v, full_pos, live, full_score = self._candidates(
            self.n, key_states, value_states, call.positions, score, reading,
            lambda positions: self.span.live(positions, reading),
        )
        if hidden is not None:  # evicted before attention, as the row alone would overwrite it
            full_pos, live = full_pos.masked_fill(hidden, -1), live.masked_fill(hidden, -1)
            full_score = full_score.masked_fill(hidden, float("-inf"))
        keep, widths = self.rows.select(self.press, full_score, live, at, call.targets)
        full_score = self.rows.pruned(self.press, call, widths, full_score, stale, score, live)
        self._store(full_k, full_v, live, full_score, keep)
        self._attn_positions = full_pos
        return full_k, full_v

    def prune_with_queries(self, module: torch.nn.Module, queries: torch.Tensor) -> None:
        """Prune after attention for presses whose scores need the latest queries (e.g. SnapKV)."""
        if not self.policy.scoring.needs_queries or self.n == 0 or not self.compressing:
            return
        self.rows.refuse_query_scores(self.press)
        target = self.press.target_size(self.tokens_given, decoding=queries.shape[-2] == 1)
        if target is None or self.n <= target:
            return
        scores = self.press.query_scores(module, queries, self.keys, self.positions, self.tokens_given)
        keep = self.press.select(scores, self.positions, self.tokens_given, target)
        self._store(self.keys, self.values, self.span.live(self.positions, self.tokens_given), None, keep)

    def prune_by(self, scores: torch.Tensor) -> None:
        """Evict down to the press's target now, ranking the slots by ``scores`` ``(batch, kv_heads, slots)``
        (higher kept), which also become their stored scores: for presses that score after a call (KVzip)."""
        reading = self.rows.reading_position(self)
        live = self.span.live(self.positions, reading)
        scores = scores.float().masked_fill(live < 0, float("-inf"))
        if self._score is not None:
            self._score[:, :, : self.n] = scores
        targets = self._row_targets(reading, decoding=False)
        if targets is not None and any(self.n > t for t in targets):
            keep, widths = self.rows.select(self.press, scores, live, reading, targets)
            self.rows.kept(widths)
            self._store(self.keys, self.values, live, scores, keep)

    # -- the attention function's contract (kvpress_like.attention_api.ServedLayer) -----------------
    def wants_own_mask(self, attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
        """Whether transformers' causal mask cannot describe what the last call's keys may see."""
        return self._may_hold_empty

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        """The mask of the call just made, from the true positions of the keys it returned (see
        :func:`~kvpress_like.masks.positions_mask`)."""
        return self.span.mask(self._attn_positions, self._query_positions, query, impl)

    def after_attention(self, module: torch.nn.Module, query: torch.Tensor) -> None:
        self.prune_with_queries(module, query)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        overwrite = self._k is not None and self.rows.plan_only(self, query_length) is Plan.OVERWRITE
        kv_length = self.n if overwrite else self.n + query_length
        return kv_length, self.tokens_given + query_length - kv_length

    def _check_outside_context(self, call: Call) -> None:
        """Outside press() masks are transformers' own: refuse what they cannot describe."""
        if self.press.skip_layers:
            raise ValueError(
                "this cache was compressed under press(..., skip_layers=...): its layers hold different numbers of "
                "tokens, which transformers' masks cannot describe outside press(). Continue it inside "
                "`with press(model, p):` with the same press."
            )
        self.rows.refuse_outside_context()
        self.span.check_outside_context(self.layer_idx, self._attn_positions, call.q, self.tokens_given - call.q)

    def get_seq_length(self) -> int:
        return self.tokens_given

    def get_max_length(self) -> int:
        budget = self.policy.capacity
        return -1 if budget is None else budget

    def _map_buffers(self, fn) -> None:
        super()._map_buffers(fn)
        self.rows = self.rows.map(fn)

    def reset(self) -> None:
        self._k = self._v = self._pos = self._score = None
        self.rows = UniformRows()
        self.n = self.tokens_given = 0
        self.is_initialized = False

    def __repr__(self) -> str:
        return (f"PressedLayer(layer={self.layer_idx}, slots={self.n}, tokens_given={self.tokens_given}{self.span!r}, "
                f"press={type(self.press).__name__})")


def stays_plain(press: Press, window: int, first_call_tokens: int) -> bool:
    """Whether a sliding layer's window already bounds it below the press's target from its first call on.

    A plain sliding layer stores ``window - 1`` tokens and a decoding query sees ``window``. Targets of
    ratio and budget presses never shrink as tokens arrive, so when both hold from the first call on,
    the layer can stay the transformers layer it is (bit-identical to no press).
    """
    stored = press.target_size(first_call_tokens, decoding=first_call_tokens == 1)
    decoding = press.target_size(first_call_tokens + 1, decoding=True)
    return (stored is None or stored >= window - 1) and (decoding is None or decoding >= window)


def _refuse_padding(kwargs: dict) -> None:
    """A bare cache never sees the attention mask; rows whose position ids differ (left padding, as generate()
    numbers them) would keep pad tokens as if they were real, so they are refused."""
    positions = (kwargs.get("kwargs") or {}).get("position_ids", kwargs.get("position_ids"))
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[0] > 1:
        if not bool((positions == positions[:1]).all()):
            raise ValueError(
                "a PressedCache/QFiltersCache used without press() cannot see the attention mask, and this batch is "
                "padded (its rows have different positions): pad tokens would be kept as real ones. Run it inside "
                "`with press(model, p):` (padded rows compressed one by one), or one prompt at a time."
            )


class PressedCache(Cache):
    """A cache whose attention layers are :class:`PressedLayer` s, usable without :func:`press`.

    Pass it as ``cache=`` to ``generate()`` (the old ``past_key_values=`` still works, with transformers'
    FutureWarning) for query-free presses (Q-Filters, K-norm, StreamingLLM): eviction then happens inside the cache. Sliding-window layers (from ``config``) are
    compressed too when the press keeps fewer tokens than their window; without :func:`press` their kept
    tokens must stay inside the window of each new token (true with a budget below the window), or the
    layer refuses the call. Presses that need queries or leave layers uncompressed need :func:`press`,
    which also builds masks from true positions; so do left-padded batches (a bare cache never sees the
    attention mask: rows whose position ids differ are refused).
    """

    def __init__(self, press: Press, config=None):
        if press.scoring.needs_queries:
            raise ValueError(
                f"{type(press).__name__} scores keys with queries; use `with press(model, ...)` instead of a bare cache."
            )
        if getattr(press, "headwise", False):
            raise ValueError(f"{type(press).__name__} keeps a different number of tokens per KV head, whose masks only "
                             "press() builds; use `with press(model, ...)` instead of a bare cache.")
        if press.skip_layers:
            raise ValueError("skip_layers needs `with press(model, ...)`, which aligns the masks of uncompressed layers.")
        press.validate()
        super().__init__(layers=[])
        self.press = press
        self._windows = [] if config is None else layer_windows(config)
        self._first_pressed: int | None = None  # the layer that checks a call's padding (once per forward call)

    def _make_layer(self, idx: int, q: int):
        window = self._windows[idx] if idx < len(self._windows) else None
        if window is not None and stays_plain(self.press, window, q):
            return DynamicSlidingWindowLayer(sliding_window=window)
        if self._first_pressed is None:
            self._first_pressed = idx
        return PressedLayer(self.press, idx, window)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers), key_states.shape[-2]))
        if layer_idx == self._first_pressed and not self.layers[layer_idx].announced:
            _refuse_padding(kwargs)  # the same position ids reach every layer of a call: one check (and sync) per call
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer (allocated capacity, not only live slots)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, PressedLayer):
            tensors = (layer._k, layer._v)
        else:
            tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


@contextmanager
def uncompressed(cache: Cache) -> Iterator[Cache]:
    """Add tokens to a pressed cache without evicting, e.g. a question after a compressed context.

    Inside this block every :class:`PressedLayer` only appends (budgets may be exceeded; sliding layers
    still drop what leaves their window); on exit compression resumes.
    """
    if any(isinstance(layer, SlotStore) and not isinstance(layer, PressedLayer) for layer in cache.layers):
        raise ValueError(
            "uncompressed() needs a dynamic pressed cache: a static compressed cache has a fixed number of slots, "
            "so tokens added beyond its budget must evict. Use press(..., static=False) to append uncompressed tokens."
        )
    layers = [layer for layer in cache.layers if isinstance(layer, PressedLayer)]
    for layer in layers:
        layer.compressing = False
    try:
        yield cache
    finally:
        for layer in layers:
            layer.compressing = True
