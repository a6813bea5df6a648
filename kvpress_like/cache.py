"""Cache surgery: a transformers cache layer that really drops evicted KV pairs.

:class:`PressedLayer` owns its tensors as gpt-fast does: per layer, buffers of shape
``(batch, kv_heads, capacity, head_dim)`` written in place, with the true position of every slot (and, for
query-free presses, the score it got when it entered) kept beside it. Three things can happen to a layer
on each forward call, decided by :meth:`PressedLayer._plan`:

* ``append``: the new tokens fit under the target; they are written after the live slots.
* ``overwrite``: one decoding step with a full cache; the lowest-scoring unprotected slot is evicted and
  the new token written into it *before* attention, so the cache never exceeds its budget and nothing
  is reallocated. Slots are then no longer in position order; attention does not care, because RoPE was
  applied before the keys entered the cache and causal masking is irrelevant for a single new query.
* ``prune``: a multi-token call (prefill, a prefill chunk, a chat's next turn) that overflows the target;
  attention sees the old kept tokens plus all new ones, then only the best ``target`` are stored, in
  position order.

The layer reports ``get_seq_length()`` as the number of tokens *seen*, so transformers gives new tokens
their true RoPE positions, and ``get_mask_sizes()`` as the keys attention will really receive, with an
offset that keeps the causal mask aligned to the new tokens (which always come last).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

if TYPE_CHECKING:
    from .base import Press

__all__ = ["PressedLayer", "PressedCache", "cache_nbytes", "uncompressed"]


def gather_kept(keep: torch.Tensor, keys, values, positions, scores=None) -> tuple:
    """The ``keep`` indices ``(batch, kv_heads, m)`` of keys, values, positions and (optional) scores."""
    kept = (
        keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1])),
        values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[-1])),
        positions.gather(-1, keep),
    )
    return kept + (None if scores is None else scores.float().gather(-1, keep),)


def refuse_crop(tokens_to_remove: int) -> None:
    """Compressed caches cannot roll back: what was evicted is gone."""
    if tokens_to_remove:
        raise NotImplementedError(
            "A compressed cache cannot be cropped: evicted tokens cannot be restored. Assisted/speculative "
            "decoding is not supported under press(); run it without a press."
        )


class PressedLayer(DynamicLayer):
    """Full-attention cache layer whose contents are chosen by a :class:`~kvpress_like.base.Press`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, press: Press, layer_idx: int):
        self._k = self._v = self._pos = self._score = None
        self.n = 0  # live slots
        self.compressing = True  # False inside `uncompressed(cache)`
        self.seen = 0  # tokens given to this layer so far (true positions run 0..seen-1)
        super().__init__()
        self.press = press
        self.layer_idx = layer_idx

    # ``keys``/``values`` are the live views of the buffers, as transformers' layers expose them.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.n]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("PressedLayer owns its buffers; use update() to add tokens.")
        self._k = None

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.n]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("PressedLayer owns its buffers; use update() to add tokens.")
        self._v = None

    @property
    def positions(self) -> torch.Tensor | None:
        """True positions ``(batch, kv_heads, n)`` of the live slots."""
        return None if self._pos is None else self._pos[:, :, : self.n]

    @property
    def scores(self) -> torch.Tensor | None:
        """Stored scores ``(batch, kv_heads, n)`` of the live slots (query-free presses only)."""
        return None if self._score is None else self._score[:, :, : self.n]

    @classmethod
    def from_dynamic(cls, layer: DynamicLayer, press: Press, layer_idx: int) -> PressedLayer:
        """Take over a plain layer, e.g. a cache filled before :func:`press` was entered."""
        new = cls(press, layer_idx)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            new.update(layer.keys, layer.values)
        return new

    # -- transformers CacheLayerMixin API ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _plan(self, q: int) -> tuple[str, int | None]:
        """What the next call with ``q`` new tokens does: ('append' | 'overwrite' | 'prune', target)."""
        if not self.press.query_free or not self.compressing:
            return "append", None  # query-dependent presses prune after attention (prune_with_queries)
        target = self.press.target_size(self.seen + q, decoding=q == 1)
        if target is None or self.n + q <= target:
            return "append", target
        if q == 1 and self.n == target:
            return "overwrite", target
        return "prune", target

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        plan, target = self._plan(q)
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        self.seen += q
        score = self.press.key_scores(self.layer_idx, key_states, pos) if self.press.query_free else None

        if plan == "append":
            self._append(key_states, value_states, pos, score)
            return self.keys, self.values
        if plan == "overwrite":
            slot = self.press.victims(self.scores, self.positions, self.seen)
            self._write_slot(slot, key_states, value_states, pos, score)
            return self.keys, self.values
        full_k = torch.cat([self.keys, key_states], dim=-2) if self.n else key_states
        full_v = torch.cat([self.values, value_states], dim=-2) if self.n else value_states
        full_pos = torch.cat([self.positions, pos], dim=-1) if self.n else pos
        full_score = torch.cat([self.scores, score], dim=-1) if self.n else score
        keep = self.press.select(full_score, full_pos, self.seen, target)
        self._store(full_k, full_v, full_pos, full_score, keep)
        return full_k, full_v

    def prune_with_queries(self, module: torch.nn.Module, queries: torch.Tensor) -> None:
        """Prune after attention for presses whose scores need the latest queries (e.g. SnapKV)."""
        if self.press.query_free or self.n == 0 or not self.compressing:
            return
        target = self.press.target_size(self.seen, decoding=queries.shape[-2] == 1)
        if target is None or self.n <= target:
            return
        scores = self.press.query_scores(module, queries, self.keys, self.positions, self.seen)
        keep = self.press.select(scores, self.positions, self.seen, target)
        self._store(self.keys, self.values, self.positions, None, keep)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan, _ = self._plan(query_length)
        kv_length = self.n if plan == "overwrite" else self.n + query_length
        return kv_length, self.seen + query_length - kv_length

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        budget = getattr(self.press, "max_cache_tokens", None)
        return -1 if budget is None else budget

    # -- buffer management --------------------------------------------------------------------------
    def _budget(self) -> int | None:
        return getattr(self.press, "max_cache_tokens", None)

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        """(Re)allocate buffers of ``capacity`` slots, keeping the live contents."""
        b, h, _, dk = like_k.shape
        dv = like_v.shape[-1]
        k = like_k.new_empty(b, h, capacity, dk)
        v = like_v.new_empty(b, h, capacity, dv)
        pos = torch.empty(b, h, capacity, dtype=torch.long, device=like_k.device)
        score = torch.empty(b, h, capacity, dtype=torch.float32, device=like_k.device)
        if self.n:
            k[:, :, : self.n] = self.keys
            v[:, :, : self.n] = self.values
            pos[:, :, : self.n] = self.positions
            if self._score is not None:
                score[:, :, : self.n] = self.scores
        self._k, self._v, self._pos, self._score = k, v, pos, score

    def _append(self, k, v, pos, score) -> None:
        q = k.shape[-2]
        capacity = 0 if self._k is None else self._k.shape[-2]
        if self.n + q > capacity:
            budget = self._budget()
            if budget is not None and self.n + q <= budget:
                new_capacity = budget  # a budgeted layer allocates its budget once, like a static cache
            elif q == 1:
                new_capacity = self.n + 1 + max(16, self.n // 8)  # amortized growth while decoding
            else:
                new_capacity = self.n + q  # prefill: exact, so KV bytes match what is kept
            self._allocate(k, v, new_capacity)
        end = self.n + q
        self._k[:, :, self.n : end] = k
        self._v[:, :, self.n : end] = v
        self._pos[:, :, self.n : end] = pos
        if score is not None:
            self._score[:, :, self.n : end] = score
        self.n = end

    def _write_slot(self, slot: torch.Tensor, k, v, pos, score) -> None:
        """Overwrite one slot per (batch, head) in place."""
        idx = slot[..., None]
        self._k.scatter_(2, idx[..., None].expand(-1, -1, 1, k.shape[-1]), k)
        self._v.scatter_(2, idx[..., None].expand(-1, -1, 1, v.shape[-1]), v)
        self._pos.scatter_(2, idx, pos)
        self._score.scatter_(2, idx, score.float())

    def _store(self, full_k, full_v, full_pos, full_score, keep: torch.Tensor) -> None:
        """Store the ``keep`` indices of the given tokens as the new live contents."""
        kept_k, kept_v, kept_pos, kept_score = gather_kept(keep, full_k, full_v, full_pos, full_score)
        m = keep.shape[-1]
        budget = self._budget()
        if budget is not None and m <= budget:
            if self._k is None or self._k.shape[-2] != budget:
                self.n = 0
                self._allocate(kept_k, kept_v, budget)
            self._k[:, :, :m] = kept_k
            self._v[:, :, :m] = kept_v
            self._pos[:, :, :m] = kept_pos
            if kept_score is not None:
                self._score[:, :, :m] = kept_score
        else:
            self._k, self._v, self._pos = kept_k, kept_v, kept_pos
            self._score = kept_score
        self.n = m

    def _map_buffers(self, fn) -> None:
        for name in ("_k", "_v", "_pos", "_score"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reset(self) -> None:
        self._k = self._v = self._pos = self._score = None
        self.n = self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        refuse_crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map_buffers(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self._k is not None and self._k.device != self.device:
            self._map_buffers(lambda t: t.to(self.device, non_blocking=True))

    def __repr__(self) -> str:
        return f"PressedLayer(layer={self.layer_idx}, live={self.n}, seen={self.seen}, press={type(self.press).__name__})"


def _layer_types(config) -> list[str] | None:
    return None if config is None else getattr(config.get_text_config(), "layer_types", None)


class PressedCache(Cache):
    """A cache whose full-attention layers are :class:`PressedLayer` s, usable without :func:`press`.

    Pass it as ``past_key_values=`` to ``generate()`` for query-free presses (Q-Filters, K-norm,
    StreamingLLM): eviction then happens inside the cache. Sliding-window layers (from ``config``) keep
    transformers' own bounded layer. Presses that need queries or leave layers uncompressed need
    :func:`kvpress_like.press`, which also aligns masks across layers of different lengths.
    """

    def __init__(self, press: Press, config=None):
        if not press.query_free:
            raise ValueError(
                f"{type(press).__name__} scores keys with queries; use `with press(model, ...)` instead of a bare cache."
            )
        if getattr(press, "skip_layers", ()):
            raise ValueError("skip_layers needs `with press(model, ...)`, which aligns the masks of uncompressed layers.")
        super().__init__(layers=[])
        self.press = press
        self._types = _layer_types(config)
        self._config = None if config is None else config.get_text_config()

    def _make_layer(self, idx: int):
        kind = self._types[idx] if self._types and idx < len(self._types) else "full_attention"
        if kind in ("sliding_attention", "chunked_attention"):
            window = self._config.sliding_window if kind == "sliding_attention" else self._config.attention_chunk_size
            return DynamicSlidingWindowLayer(sliding_window=window)
        return PressedLayer(self.press, idx)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers)))
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

    Inside this block every :class:`PressedLayer` only appends (budgets may be exceeded); on exit
    compression resumes.
    """
    layers = [layer for layer in cache.layers if isinstance(layer, PressedLayer)]
    for layer in layers:
        layer.compressing = False
    try:
        yield cache
    finally:
        for layer in layers:
            layer.compressing = True
