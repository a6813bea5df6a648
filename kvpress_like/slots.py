"""Slot storage: the per-layer buffers a press fills, shared by every pressed cache layer.

Per (batch row, KV head): keys, values, the true position of each slot (``-1``: empty or padding) and, for
presses that keep them, the float32 score a slot is evicted by. :class:`SlotStore` owns the writes, the
candidates of a multi-token call and entry-time scoring; how slots are counted and allocated is the
layer's (:class:`~kvpress_like.cache.PressedLayer` grows, :class:`~kvpress_like.static.StaticPressedLayer`
holds ``budget`` slots once). The scoring helpers here are the one place a press's ``score`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention_api import ServedLayerDefaults

if TYPE_CHECKING:
    from .base import Press

__all__ = ["GrowingSlots", "SlotStore", "current_scores", "gather_kept", "refuse_crop", "scores_for", "stored_scores"]


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


def scores_for(press: Press, layer_idx: int, keys, values, positions, reading, empty: bool = True) -> torch.Tensor:
    """``press.score`` as float32, with ``-inf`` for empty/padding slots (``positions < 0``) unless the
    caller knows there are none (``empty=False``)."""
    scores = press.score(layer_idx, keys, values, positions, reading).float()
    return scores.masked_fill(positions < 0, float("-inf")) if empty else scores


def current_scores(press: Press, layer_idx: int, keys, values, positions, stored, reading, empty: bool = True):
    """Scores to evict by: re-computed at ``reading`` for position-dependent presses, else the stored
    entry-time ones. Empty slots score ``-inf`` (``empty=False``: the caller knows stored scores already do,
    the fast path of an unpadded full-attention layer)."""
    if press.scoring.rescores:
        return scores_for(press, layer_idx, keys(), values(), positions, reading, empty)
    return stored_scores(stored, positions, empty)


def stored_scores(stored: torch.Tensor, positions: torch.Tensor, empty: bool = True) -> torch.Tensor:
    """Stored scores with ``-inf`` for empty slots (``empty=False``: the caller knows there are none)."""
    return stored.masked_fill(positions < 0, float("-inf")) if empty else stored


class SlotStore(ServedLayerDefaults, CacheLayerMixin):
    """Slot buffers a press fills, shared by the dynamic :class:`PressedLayer` and the static layer.

    Per (batch row, KV head): keys, values, the true position of each slot (``-1``: empty) and the
    float32 score it is evicted by (:attr:`stores_scores`). The two layers differ only in how they count (Python ints here, 0-d
    tensors in the static layer, so a compiled step never re-traces) and in allocation (grow to what is
    kept vs. ``budget`` slots once); writes, candidates and scoring are these methods.
    """

    press: Press
    layer_idx: int

    def __init__(self):
        self._k = self._v = self._pos = self._score = None
        super().__init__()

    @property
    def n_slots(self) -> int:
        """Slots exposed as ``keys``/``values`` (in use, live or empty)."""
        raise NotImplementedError

    # ``keys``/``values`` are views of the buffers, as transformers' layers expose them.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.n_slots]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.n_slots]

    @keys.setter
    def keys(self, value) -> None:  # the mixin's constructor clears them; contents only change through update()
        if value is not None:
            raise AttributeError(f"{type(self).__name__} owns its buffers; use update() to add tokens.")

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError(f"{type(self).__name__} owns its buffers; use update() to add tokens.")

    @property
    def positions(self) -> torch.Tensor | None:
        """True positions ``(batch, kv_heads, slots)`` (``-1``: empty)."""
        return None if self._pos is None else self._pos[:, :, : self.n_slots]

    @property
    def stores_scores(self) -> bool:
        """Whether slots keep a score (:attr:`~kvpress_like.base.EnginePolicy.stores_scores`)."""
        return self.policy.stores_scores

    @property
    def scores(self) -> torch.Tensor | None:
        """Stored scores ``(batch, kv_heads, slots)``, see :attr:`stores_scores` (``None`` when none are kept)."""
        return None if self._score is None else self._score[:, :, : self.n_slots]

    def _entry_scores(self, k, v, pos, reading, empty: bool = True) -> torch.Tensor | None:
        """Scores of new keys, to store; keys of a position-dependent press get ``+inf`` (not scored yet: kept
        until the next re-scoring)."""
        if not self.stores_scores:
            return None
        if self.policy.scoring.rescores:
            return torch.full(pos.shape, float("inf"), device=pos.device)
        return scores_for(self.press, self.layer_idx, k, v, pos, reading, empty)

    def _write(self, where: slice, k, v, pos, score) -> None:
        self._k[:, :, where] = k
        self._v[:, :, where] = v
        self._pos[:, :, where] = pos
        if score is not None and self._score is not None:  # no buffer: the press keeps no scores
            self._score[:, :, where] = score

    def _write_slot(self, slot: torch.Tensor, k, v, pos, score) -> None:
        """Overwrite one slot per (batch, head) in place."""
        idx = slot[..., None]
        self._k.scatter_(2, idx[..., None].expand(-1, -1, 1, k.shape[-1]), k)
        self._v.scatter_(2, idx[..., None].expand(-1, -1, 1, v.shape[-1]), v)
        self._pos.scatter_(2, idx, pos)
        if score is not None:
            self._score.scatter_(2, idx, score.float())

    def _candidates(self, n: int, k, v, pos, score, reading, live=lambda positions: positions) -> tuple:
        """The first ``n`` slots followed by the new tokens: what a multi-token call attends to and selects from.

        Returns ``(keys, values, positions, live positions, scores)``; scores are the stored and new ones, or
        fresh ones at ``reading`` for position-dependent presses (``None`` for presses that need queries)."""
        if n:
            k = torch.cat([self._k[:, :, :n], k], dim=-2)
            v = torch.cat([self._v[:, :, :n], v], dim=-2)
            pos = torch.cat([self._pos[:, :, :n], pos], dim=-1)
            score = None if score is None else torch.cat([self._score[:, :, :n], score], dim=-1)
        live_pos = live(pos)
        if not self.policy.scoring.needs_queries:
            score = current_scores(self.press, self.layer_idx, lambda: k, lambda: v, live_pos, score, reading)
        return k, v, pos, live_pos, score


class GrowingSlots(SlotStore):
    """Slots that grow to what is kept (the dynamic layers): ``n`` slots in use, the same for every row and
    head, in buffers allocated exactly at prefill, once at the press's budget, or amortized while decoding."""

    def __init__(self):
        super().__init__()
        self.n = 0  # slots in use (live or empty)

    @property
    def n_slots(self) -> int:
        return self.n

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        """(Re)allocate buffers of ``capacity`` slots, keeping the live contents."""
        b, h, _, dk = like_k.shape
        dv = like_v.shape[-1]
        k = like_k.new_empty(b, h, capacity, dk)
        v = like_v.new_empty(b, h, capacity, dv)
        pos = torch.empty(b, h, capacity, dtype=torch.long, device=like_k.device)
        score = torch.empty(b, h, capacity, dtype=torch.float32, device=like_k.device) if self.stores_scores else None
        if self.n:
            k[:, :, : self.n] = self.keys
            v[:, :, : self.n] = self.values
            pos[:, :, : self.n] = self.positions
            if score is not None and self._score is not None:
                score[:, :, : self.n] = self.scores
        self._k, self._v, self._pos, self._score = k, v, pos, score

    def _append(self, k, v, pos, score) -> None:
        q = k.shape[-2]
        capacity = 0 if self._k is None else self._k.shape[-2]
        if self.n + q > capacity:
            budget = self.policy.capacity
            if budget is not None and self.n + q <= budget:
                new_capacity = budget  # a budgeted layer allocates its budget once, like a static cache
            elif q == 1:
                new_capacity = self.n + 1 + max(16, self.n // 8)  # amortized growth while decoding
            else:
                new_capacity = self.n + q  # prefill: exact, so KV bytes match what is kept
            self._allocate(k, v, new_capacity)
        self._write(slice(self.n, self.n + q), k, v, pos, score)
        self.n += q

    def _append_empty_slot(self) -> None:
        """One more slot, empty in every row and head (a padded row that must append while others overwrite)."""
        b, h = self._k.shape[:2]
        self._append(self._k.new_zeros(b, h, 1, self._k.shape[-1]), self._v.new_zeros(b, h, 1, self._v.shape[-1]),
                     self._pos.new_full((b, h, 1), -1),
                     None if self._score is None else self._score.new_full((b, h, 1), float("-inf")))

    def _store(self, full_k, full_v, full_pos, full_score, keep: torch.Tensor) -> None:
        """Store the ``keep`` indices of the given tokens as the new contents (index ``len`` = an empty slot).

        ``full_pos`` are the positions to store: the caller marks those its queries can no longer see."""
        if not self.stores_scores:
            full_score = None
        if bool((keep == full_pos.shape[-1]).any()):
            b, h = full_pos.shape[:2]
            full_k = torch.cat([full_k, full_k.new_zeros(b, h, 1, full_k.shape[-1])], dim=-2)
            full_v = torch.cat([full_v, full_v.new_zeros(b, h, 1, full_v.shape[-1])], dim=-2)
            full_pos = torch.cat([full_pos, full_pos.new_full((b, h, 1), -1)], dim=-1)
            if full_score is not None:
                full_score = torch.cat([full_score, full_score.new_full((b, h, 1), float("-inf"))], dim=-1)
        kept_k, kept_v, kept_pos, kept_score = gather_kept(keep, full_k, full_v, full_pos, full_score)
        m = keep.shape[-1]
        budget = self.policy.capacity
        if budget is not None and m <= budget:
            if self._k is None or self._k.shape[-2] != budget:
                self.n = 0
                self._allocate(kept_k, kept_v, budget)
            self._write(slice(0, m), kept_k, kept_v, kept_pos, kept_score)
        else:
            self._k, self._v, self._pos = kept_k, kept_v, kept_pos
            self._score = kept_score
        self.n = m

    def _map_buffers(self, fn) -> None:
        for name in ("_k", "_v", "_pos", "_score"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.rows = self.rows.map(fn)

    def _map_buffers(self, fn) -> None:
        for name in ("_k", "_v", "_pos", "_score"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

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
