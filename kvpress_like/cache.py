"""The cache engine: a transformers cache layer that really drops evicted KV pairs.

:class:`PressedLayer` owns its tensors as gpt-fast does: per layer, slot buffers of shape
``(batch, kv_heads, capacity, head_dim)`` written in place, with the true position of every slot (``-1``
for an empty or padding slot) and, for query-free presses, the score it got when it entered. Each forward
call is one :class:`Call`, planned before anything is written:

* ``append``: the new tokens fit under every row's target; they are written after the live slots.
* ``overwrite``: one decoding step into a full cache; each (row, KV head) evicts its lowest-scoring
  unprotected slot (an empty slot first) and the new token is written into it *before* attention, so the
  cache never exceeds its budget and nothing is reallocated. Slots are then no longer in position order;
  attention does not care, because RoPE was applied before the keys entered the cache.
* ``prune``: anything else that overflows (prefill, a prefill chunk, a chat's next turn, rows of a padded
  batch with different targets); attention sees the old kept tokens plus all new ones, then the best
  ``target`` of them are stored, in position order.

Positions are true positions: the layer reports the number of tokens *seen* as its sequence length, so
transformers gives new tokens their true RoPE positions. Left-padded rows count only their real tokens
(:meth:`PressedLayer.begin_call` receives which new tokens are real): pad tokens are never kept in place of
real ones, and each row keeps what the press promises for its own length: every row is planned as it would
be alone (its own slot count, target and re-scoring clock), so batching never changes a row's result. Sliding-window layers evict the
tokens that left the window first and never attend past it. Presses whose scores depend on the reading
position (``Scoring.READING_POSITION``) have the live slots re-scored whenever the layer must evict.

Masks: when every slot is valid and the layer attends fully, transformers' causal mask (aligned by
:func:`kvpress_like.masks.align_mask`) is right. Otherwise (padding, empty slots,
sliding windows) :meth:`PressedLayer.attention_mask` builds the mask from the slots' true positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .masks import positions_mask

if TYPE_CHECKING:
    from .base import Press

__all__ = ["SlotStore", "PressedLayer", "PressedCache", "cache_nbytes", "uncompressed", "layer_windows"]

#: ``observer(layer, plan, n_new)`` called after each update of a layer (benchmarks, diagnostics).
Observer = Callable[["PressedLayer", str, int], None]


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


@dataclass
class Call:
    """One forward call through a layer, planned before anything is written (see module docstring)."""

    plan: str  # "append" | "overwrite" | "prune"
    q: int  # new tokens (pad tokens included)
    positions: torch.Tensor  # (batch, kv_heads, q) true positions of the new tokens, -1 for padding
    reading: torch.Tensor  # (batch, 1, 1) position of the next query after this call
    targets: list[int] | None  # per row; None: no limit
    reading_int: int | None  # ``reading`` as an int when every row agrees (no padding): cheaper to compare
    #: Padded batches: per row, what the row run alone would do (:data:`APPEND` / :data:`OVERWRITE` / :data:`PRUNE`)
    #: and how many of the new tokens are real; ``None`` without padding.
    row_plans: torch.Tensor | None = None
    row_new: torch.Tensor | None = None


#: Per-row plans of a padded call (``Call.row_plans``).
APPEND, OVERWRITE, PRUNE = 0, 1, 2
#: ``_rescored_rows`` of a row never scored yet: its first eviction re-scores.
NEVER = -(1 << 62)


class SlotStore(CacheLayerMixin):
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


class PressedLayer(SlotStore):
    """Full- or sliding-attention cache layer whose contents are chosen by a :class:`~kvpress_like.base.Press`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, press: Press, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.press = press
        self.policy = press.policy
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.n = 0  # slots in use (live or empty), the same for every row and head
        self.seen = 0  # tokens given to this layer, padding included (transformers' sequence length)
        self.rows: torch.Tensor | None = None  # (batch,) real tokens seen per row, once a padded call came
        self.compressing = True  # False inside `uncompressed(cache)`
        self.observers: list[Observer] = []
        self._valid: torch.Tensor | None = None  # (batch, q) real new tokens of the coming call, from press()
        self._in_context = False  # press() announced the coming call (masks are then ours)
        self._call: Call | None = None
        self._attn_positions: torch.Tensor | None = None  # (batch, kv_heads, kv) keys the last call attended to
        self._query_positions: torch.Tensor | None = None  # (batch, q) its new tokens' positions (-1: padding)
        self._rescored_at: int | None = None  # reading position of the last stored re-scoring (rescore_every > 1)
        # Padded batches (see _plan_call): per row, the slots it would hold and its last re-scoring, run alone.
        self.row_slots: torch.Tensor | None = None
        self._rescored_rows: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.n

    @property
    def padded(self) -> bool:
        return self.rows is not None

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

    # -- planning ----------------------------------------------------------------------------------
    def begin_call(self, valid: torch.Tensor | None) -> None:
        """Announced by :func:`kvpress_like.press` before each call: which new tokens are real (left padding).

        A plan that :meth:`get_mask_sizes` made for this call stays valid unless the call is padded."""
        self._valid = valid
        self._in_context = True
        if valid is not None:
            self._call = None

    def _row_targets(self, reading: torch.Tensor | int, decoding: bool) -> list[int] | None:
        readings = [reading] if isinstance(reading, int) else reading.flatten().tolist()
        window = self.sliding_window
        targets = []
        for seen in readings:
            target = self.press.target_size(seen, decoding) if self.compressing else None
            if window is not None:  # a decoding query sees itself and the window's other tokens before them
                cap = window if decoding else window - 1
                target = cap if target is None else min(target, cap)
            if target is None:
                return None
            targets.append(target)
        return targets

    def _plan_call(self, q: int, batch: int, heads: int, device) -> Call:
        """Plan a call. Padded batches plan each row as it would be planned alone (its own slot count
        :attr:`row_slots`, target and real tokens), so batching never changes a row's result; the batch then
        takes the ``prune`` path when some row prunes, the ``overwrite`` path for other decoding steps."""
        valid = self._valid
        if valid is not None and self.rows is None and not bool(valid.all()):
            self.rows = torch.full((batch,), self.seen, dtype=torch.long, device=device)
            self.row_slots = torch.full((batch,), self.n, dtype=torch.long, device=device)
            self._rescored_rows = torch.full(
                (batch,), NEVER if self._rescored_at is None else self._rescored_at, dtype=torch.long, device=device
            )
        if self.rows is None:
            positions = torch.arange(self.seen, self.seen + q, device=device).expand(batch, heads, q)
            reading_int = self.seen + q
            reading = torch.full((batch, 1, 1), reading_int, dtype=torch.long, device=device)
            targets = self._row_targets(reading_int, q == 1)
            targets = None if targets is None else targets * batch
        else:
            real = torch.ones(batch, q, dtype=torch.bool, device=device) if valid is None else valid.to(device)
            positions = (self.rows[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, -1)
            positions = positions[:, None, :].expand(batch, heads, q)
            new = real.long().sum(-1)
            reading = (self.rows + new).view(batch, 1, 1)
            targets = self._row_targets(reading, q == 1)
            return self._plan_rows(q, positions, reading, targets, new)
        if self.policy.scoring.needs_queries or targets is None:
            plan = "append"
        elif q == 1 and self.n > 0 and all(t == self.n for t in targets):
            plan = "overwrite"
        elif all(self.n + q <= t for t in targets):
            plan = "append"
        else:
            plan = "prune"
        return Call(plan, q, positions, reading, targets, reading_int)

    def _plan_rows(self, q: int, positions, reading, targets: list[int] | None, new: torch.Tensor) -> Call:
        """A padded call: each row's plan is the one above with the row's own slot count (a row with no real
        new token does nothing, as no call at all)."""
        slots = self.row_slots
        if self.policy.scoring.needs_queries or targets is None:
            plans = torch.full_like(new, APPEND)
        else:
            t = torch.tensor(targets, device=new.device)
            overwrite = (new == 1) & (slots > 0) & (slots == t)
            plans = torch.where(overwrite, OVERWRITE, torch.where((slots + new <= t) | (new == 0), APPEND, PRUNE))
        if bool((plans == PRUNE).any()):
            plan = "prune"
        elif q == 1 and self.n > 0 and targets is not None and not self.policy.scoring.needs_queries:
            plan = "overwrite"  # rows that append fill an empty slot
        else:
            plan = "append"
        return Call(plan, q, positions, reading, targets, None, plans, new)

    # -- transformers CacheLayerMixin API ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        call = self._call if self._call is not None and self._call.q == q else self._plan_call(q, b, h, key_states.device)
        in_context, self._in_context, self._valid, self._call = self._in_context, False, None, None
        if self.rows is not None:
            self.rows = call.reading.view(b)
        self.seen += q
        press, reading = self.press, call.reading
        fast = self.rows is None and self.sliding_window is None  # no empty slot can exist
        seen = call.reading_int if call.reading_int is not None else reading
        score = self._entry_scores(key_states, value_states, call.positions, reading, empty=not fast)
        if call.plan == "append":
            self._append(key_states, value_states, call.positions, score)
            out = self.keys, self.values
            self._attn_positions = None if fast else self.positions  # only our own masks read them
        elif call.plan == "overwrite":
            if self.rows is not None:
                slot = self._padded_victims(call, reading)
            else:
                live = self._live_positions(self.positions, seen - 1)
                slot = press.victims(self._eviction_scores(live, reading, seen, empty=not fast), live, seen)
            self._write_slot(slot, key_states, value_states, call.positions, score)
            out = self.keys, self.values
            self._attn_positions = None if fast else self.positions
        else:
            hidden = self._padded_victims(call, reading, hide=True) if call.row_plans is not None and q == 1 else None
            stale = self.scores
            full_k, full_v, full_pos, live, full_score = self._candidates(
                self.n, key_states, value_states, call.positions, score, reading,
                lambda positions: self._live_positions(positions, reading),
            )
            if hidden is not None:  # evicted before attention, as the row alone would overwrite it
                full_pos, live = full_pos.masked_fill(hidden, -1), live.masked_fill(hidden, -1)
                full_score = full_score.masked_fill(hidden, float("-inf"))
            keep, widths = self._select(full_score, live, seen, call.targets)
            if call.row_plans is not None:
                pruned = call.row_plans == PRUNE
                if stale is not None and self.policy.scoring.rescores:  # rows that do not prune keep stale scores
                    stale = torch.cat([stale, score], dim=-1)
                    full_score = torch.where(pruned.view(b, 1, 1), full_score, stale.masked_fill(live < 0, float("-inf")))
                self._rescored_rows = torch.where(pruned, call.reading.view(b), self._rescored_rows)
                kept = torch.minimum(torch.tensor(widths, device=pruned.device), self.row_slots + call.row_new)
                self.row_slots = torch.where(pruned, kept, self.row_slots + call.row_new)
            self._store(full_k, full_v, full_pos, full_score, keep)
            self._rescored_at = seen if isinstance(seen, int) else None  # the kept scores are fresh at ``seen``
            out = full_k, full_v
            self._attn_positions = full_pos
        if call.row_plans is not None and call.plan != "prune":
            self.row_slots = self.row_slots + torch.where(call.row_plans == APPEND, call.row_new, 0)
        self._query_positions = None if fast else call.positions[:, 0]
        if not in_context:
            self._check_outside_context(call)
        for observer in self.observers:
            observer(self, call.plan, q)
        return out

    def _eviction_scores(self, live: torch.Tensor, reading: torch.Tensor, seen, empty: bool, rows=None) -> torch.Tensor:
        """Scores of the live slots for a decoding eviction. With ``rescore_every > 1`` (a position-dependent
        press: validated) the stored ones until that many steps have passed since the last re-scoring, whose
        result is stored. Padded batches keep that count per row; only ``rows`` (those that evict, as they
        would alone) may re-score."""
        every = self.policy.rescore_every
        if every > 1 and self.rows is not None:
            due = rows & (reading.view(-1) - self._rescored_rows >= every)
            if bool(due.any()):
                fresh = current_scores(
                    self.press, self.layer_idx, lambda: self.keys, lambda: self.values, live, self.scores, reading, empty
                )
                self.scores.copy_(torch.where(due.view(-1, 1, 1), fresh, self.scores))
                self._rescored_rows = torch.where(due, reading.view(-1), self._rescored_rows)
            return stored_scores(self.scores, live, empty)
        if every > 1 and isinstance(seen, int) and self._rescored_at is not None and seen - self._rescored_at < every:
            return stored_scores(self.scores, live, empty)
        scores = current_scores(
            self.press, self.layer_idx, lambda: self.keys, lambda: self.values, live, self.scores, reading, empty
        )
        if every > 1:
            self.scores.copy_(scores)
            self._rescored_at = seen if isinstance(seen, int) else None
        return scores

    def _padded_victims(self, call: Call, reading: torch.Tensor, hide: bool = False) -> torch.Tensor:
        """A padded decoding step, row by row as each row alone would take it: a row that overwrites evicts its
        lowest-scored live slot when it holds its target of live tokens (else an empty one, as its dead slots
        would be), other rows take an empty slot (one is appended when a row has none).

        Returns the slot ``(batch, kv_heads)`` the new token goes to; with ``hide`` (the step prunes other
        rows), a ``(batch, kv_heads, n + 1)`` mask of the live slots evicted before attention instead."""
        b = reading.shape[0]
        overwrite = call.row_plans == OVERWRITE
        targets = torch.tensor(call.targets, device=reading.device).view(b, 1, 1)
        live = self._live_positions(self.positions, reading - 1)
        count = (live >= 0).sum(-1, keepdim=True)  # (batch, heads, 1)
        evict = overwrite.view(b, 1, 1) & (count >= targets)
        if not hide and bool((~evict & (count == self.n)).any()):
            h = count.shape[1]
            self._append(self._k.new_zeros(b, h, 1, self._k.shape[-1]), self._v.new_zeros(b, h, 1, self._v.shape[-1]),
                         self._pos.new_full((b, h, 1), -1),
                         None if self._score is None else self._score.new_full((b, h, 1), float("-inf")))
            live = self._live_positions(self.positions, reading - 1)
        scores = self._eviction_scores(live, reading, reading, empty=True, rows=overwrite)
        scores = scores.masked_fill(evict & (live < 0), float("inf")).masked_fill(~evict & (live >= 0), float("inf"))
        slot = self.press.victims(scores, live, reading)
        if not hide:
            return slot
        hidden = torch.zeros(*live.shape[:2], live.shape[-1] + 1, dtype=torch.bool, device=live.device)
        return hidden.scatter_(-1, slot[..., None], True) & evict

    def _live_positions(self, positions: torch.Tensor, reading: torch.Tensor) -> torch.Tensor:
        """Positions with the tokens the query at ``reading`` can no longer see (sliding window) marked empty."""
        if self.sliding_window is None:
            return positions
        return positions.masked_fill(positions <= reading - self.sliding_window, -1)

    def _select(self, scores, positions, reading, targets: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Kept indices and, per row, how many were selected; rows with different targets (padded batches) are
        selected one by one."""
        if len(set(targets)) == 1 and self.rows is None:
            keep = self.press.select(scores, positions, reading, targets[0])
            return keep, [keep.shape[-1]] * keep.shape[0]
        rows = [
            self.press.select(scores[r : r + 1], positions[r : r + 1], reading[r : r + 1], t)
            for r, t in enumerate(targets)
        ]
        widths = [keep.shape[-1] for keep in rows]
        # Rows keeping fewer tokens are completed with the index of an empty slot appended by _store.
        empty = scores.shape[-1]
        return torch.cat(
            [torch.nn.functional.pad(keep, (0, max(widths) - keep.shape[-1]), value=empty) for keep in rows], dim=0
        ), widths

    def prune_with_queries(self, module: torch.nn.Module, queries: torch.Tensor) -> None:
        """Prune after attention for presses whose scores need the latest queries (e.g. SnapKV)."""
        if not self.policy.scoring.needs_queries or self.n == 0 or not self.compressing:
            return
        if self.rows is not None:
            raise ValueError(
                f"{type(self.press).__name__} scores keys with the prompt's last queries, which differ per row in a "
                "padded batch; run padded prompts one at a time, or use a query-free press."
            )
        target = self.press.target_size(self.seen, decoding=queries.shape[-2] == 1)
        if target is None or self.n <= target:
            return
        scores = self.press.query_scores(module, queries, self.keys, self.positions, self.seen)
        keep = self.press.select(scores, self.positions, self.seen, target)
        self._store(self.keys, self.values, self.positions, None, keep)

    def prune_by(self, scores: torch.Tensor) -> None:
        """Evict down to the press's target now, ranking the slots by ``scores`` ``(batch, kv_heads, slots)``
        (higher kept), which also become their stored scores: for presses that score after a call (KVzip)."""
        reading = self.seen if self.rows is None else self.rows.view(-1, 1, 1)
        live = self._live_positions(self.positions, reading)
        scores = scores.float().masked_fill(live < 0, float("-inf"))
        if self._score is not None:
            self._score[:, :, : self.n] = scores
        targets = self._row_targets(reading, decoding=False)
        if targets is not None and any(self.n > t for t in targets):
            keep, widths = self._select(scores, live, reading, targets)
            if self.row_slots is not None:  # padded rows: each keeps what it selected
                self.row_slots = torch.minimum(torch.tensor(widths, device=self.row_slots.device), self.row_slots)
            self._store(self.keys, self.values, self.positions, scores, keep)

    # -- masks ---------------------------------------------------------------------------------------
    def wants_own_mask(self, attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
        """Whether transformers' causal mask cannot describe what the last call's keys may see."""
        return self.sliding_window is not None or self.rows is not None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._call is None and self.is_initialized:
            self._call = self._plan_call(query_length, *self._k.shape[:2], self._k.device) if self._k is not None else None
        kv_length = self.n if self._call is not None and self._call.plan == "overwrite" else self.n + query_length
        return kv_length, self.seen + query_length - kv_length

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        """The mask of the call just made, from the true positions of the keys it returned (see
        :func:`~kvpress_like.masks.positions_mask`); per KV head only for a sliding layer
        holding old tokens, since heads keep different ones."""
        kpos, qpos = self._attn_positions, self._query_positions
        per_head = self.sliding_window is not None and kpos.shape[-1] > qpos.shape[-1]
        return positions_mask(kpos if per_head else kpos[:, :1], qpos, self.sliding_window, query, impl)

    def _check_outside_context(self, call: Call) -> None:
        """Outside press() masks are transformers' own: refuse what they cannot describe."""
        if self.press.skip_layers:
            raise ValueError(
                "this cache was compressed under press(..., skip_layers=...): its layers hold different numbers of "
                "tokens, which transformers' masks cannot describe outside press(). Continue it inside "
                "`with press(model, p):` with the same press."
            )
        if self.rows is not None:
            raise ValueError("a cache compressed from a padded batch can only be continued inside `with press(model, p):`.")
        if self.sliding_window is None:
            return
        kpos = self._attn_positions
        first = self.seen - call.q  # position of the first new token
        if kpos.shape[-1] > call.q and (call.q > 1 or bool(((kpos < 0) | (kpos <= first - self.sliding_window)).any())):
            raise ValueError(
                f"layer {self.layer_idx} is a compressed sliding-window layer whose kept tokens are not all inside the "
                "window of the new tokens, which transformers' masks cannot express. Run it inside "
                "`with press(model, p):` (masks from true positions), or give the press a budget below the window."
            )

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        budget = self.policy.capacity
        return -1 if budget is None else budget

    # -- buffer management --------------------------------------------------------------------------
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

    def _store(self, full_k, full_v, full_pos, full_score, keep: torch.Tensor) -> None:
        """Store the ``keep`` indices of the given tokens as the new contents (index ``len`` = an empty slot)."""
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
        if self.sliding_window is not None:
            kept_pos = self._live_positions(kept_pos, self.seen if self.rows is None else self.rows.view(-1, 1, 1))
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
        for name in ("_k", "_v", "_pos", "_score", "rows", "row_slots", "_rescored_rows"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reset(self) -> None:
        self._k = self._v = self._pos = self._score = self.rows = self.row_slots = self._rescored_rows = None
        self.n = self.seen = 0
        self._rescored_at = None
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
        window = f", window={self.sliding_window}" if self.sliding_window is not None else ""
        return (f"PressedLayer(layer={self.layer_idx}, slots={self.n}, seen={self.seen}{window}, "
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

    Pass it as ``past_key_values=`` to ``generate()`` for query-free presses (Q-Filters, K-norm,
    StreamingLLM): eviction then happens inside the cache. Sliding-window layers (from ``config``) are
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
        if layer_idx == self._first_pressed and not self.layers[layer_idx]._in_context:
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
