"""Head-wise budgets with the memory really freed: a cache layer whose KV heads keep different numbers of pairs.

:class:`HeadwisePressedLayer` is the cache layer :func:`kvpress_like.press` gives the full-attention layers of a
head-wise press (``press.headwise``, e.g. :class:`~kvpress_like.methods.adaptive.AdaptivePress`). Storage is
flattened per layer, the layout flash-attn's variable-length kernels take:

* ``_k`` / ``_v``: ``(total kept pairs, head_dim)``, the segments of every (batch row, KV head) one after the
  other (row-major), each in position order after a prune (overwritten slots stay where they are);
* ``_pos``: ``(total,)`` true positions (int64); ``_score``: ``(total,)`` float32 scores for presses that store
  them (the uniform :class:`~kvpress_like.cache.PressedLayer` keeps the same two per slot);
* ``lengths`` / ``offsets``: ``(batch, kv_heads)`` int64, each segment's length and start.

So the key/value bytes are exactly ``kept pairs x 2 x head_dim x dtype bytes`` (what
:func:`~kvpress_like.cache.cache_nbytes` counts) and the bookkeeping is :meth:`HeadwisePressedLayer.bookkeeping_nbytes`:
12 bytes per pair (position + score; 8 without scores) and 16 bytes per (row, KV head).

Attention (CPU, eager and sdpa): at each call the layer materialises a padded view ``(batch, kv_heads,
longest head, head_dim)`` whose slots past a head's length have position ``-1``, and the mask is built from
the true positions per KV head (:func:`~kvpress_like.masks.positions_mask`), so attention
is exact. The transient cost is one layer's padded view at a time (keys and values of ``batch x kv_heads x
longest head`` slots, freed after the layer's attention), on top of what eager/sdpa allocate anyway (GQA
repetition of the keys for eager, the score matrix). A multi-token call that prunes attends over the old kept
pairs plus all new tokens, as the uniform layer does.

GPU path (not implemented here): flash-attn's ``flash_attn_varlen_func`` takes the flattened keys/values
directly with ``cu_seqlens_k = [0, offsets..., total]`` when each (row, KV head) is one sequence and its group
of ``num_heads / kv_heads`` query heads are that sequence's queries (queries reshaped to ``(batch x kv_heads x
q, group, head_dim)`` with ``num_heads=group``, ``num_kv_heads=1``): no padded view, no mask, reading exactly
the kept pairs (AdaKV's own implementation does this). Positions are not needed by the kernel: RoPE was applied
before keys entered the cache, and every kept key precedes the new queries.

Decoding: a new token enters every head. With a budget (``max_cache_tokens``, or ``decoding=True``) a row whose
kept pairs already fill its layer budget evicts, in each head, that head's own lowest-scoring unprotected pair
and writes the new token into it in place (lengths stay as allocated; position-dependent presses re-score the
head's live pairs first); a row under its budget appends (the flattened buffers are rebuilt: O(kept pairs)).
A call that overflows otherwise (a prompt, a prefill chunk, a chat's next turn) re-allocates across heads
over the old kept pairs plus the new tokens. Left-padded batches are allocated row by row (pads are never
kept). Beam search and batch reshuffling are refused (a flattened layout has no batch dimension to index).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cache import PressedLayer
from .masks import positions_mask
from .slots import current_scores

if TYPE_CHECKING:
    from .base import Press

__all__ = ["HeadwisePressedLayer", "is_headwise"]


def is_headwise(press: Press) -> bool:
    """Whether ``press`` gives each KV head its own budget (its full-attention layers are stored head-wise)."""
    return bool(getattr(press, "headwise", False))


class HeadwisePressedLayer(PressedLayer):
    """A full-attention cache layer whose (batch row, KV head) segments keep different numbers of pairs."""

    def __init__(self, press: Press, layer_idx: int, sliding_window: int | None = None):
        if sliding_window is not None:
            raise ValueError("head-wise budgets are for full-attention layers; sliding layers stay uniform PressedLayers.")
        super().__init__(press, layer_idx, None)
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) pairs kept per segment
        self.offsets: torch.Tensor | None = None  # (batch, kv_heads) start of each segment in the flat buffers

    # -- the padded view (what attention, masks and tests read) -------------------------------------------
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat index ``(batch, kv_heads, longest)`` of the padded view and its validity mask."""
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        slot = torch.arange(longest, device=self.lengths.device)
        valid = slot < self.lengths[..., None]
        index = (self.offsets[..., None] + slot).masked_fill(~valid, 0)
        return index, valid

    def _padded(self, index: tuple | None = None, parts: str = "kvps") -> tuple:
        """Keys, values, positions (``-1``: padding) and scores (``-inf``: padding, or ``None``) as
        ``(batch, kv_heads, longest head[, head_dim])``; only the ``parts`` asked for (others ``None``), at a
        precomputed :meth:`_index` when given."""
        index, valid = self._index() if index is None else index
        k = self._k[index] if "k" in parts else None
        v = self._v[index] if "v" in parts else None
        pos = self._pos[index].masked_fill(~valid, -1) if "p" in parts else None
        score = None
        if "s" in parts and self._score is not None:
            score = self._score[index].masked_fill(~valid, float("-inf"))
        return k, v, pos, score

    @property
    def n_slots(self) -> int:
        return 0 if self.lengths is None or not self.lengths.numel() else int(self.lengths.max())

    # padded views; the setters are SlotStore's (contents only change through update())
    keys = property(lambda self: None if self._k is None else self._padded()[0], PressedLayer.keys.fset)
    values = property(lambda self: None if self._v is None else self._padded()[1], PressedLayer.values.fset)

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self._pos is None else self._padded()[2]

    @property
    def scores(self) -> torch.Tensor | None:
        return None if self._score is None else self._padded()[3]

    @property
    def kept_pairs(self) -> int:
        """Key/value pairs stored, over every row and KV head."""
        return 0 if self._k is None else self._k.shape[0]

    def bookkeeping_nbytes(self) -> int:
        """Bytes besides keys and values: positions, scores, lengths and offsets."""
        tensors = (self._pos, self._score, self.lengths, self.offsets)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- writing -------------------------------------------------------------------------------------------
    def _keep(self, k, v, pos, score, keep: torch.Tensor) -> None:
        """Store the ``keep`` mask ``(batch, kv_heads, n)`` of candidates as the new contents, in position order."""
        order = pos.masked_fill(~keep, torch.iinfo(pos.dtype).max).argsort(dim=-1)
        keep = keep.gather(-1, order)
        pick = lambda t: t.gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1]))[keep]  # noqa: E731
        self._k, self._v = pick(k), pick(v)
        self._pos = pos.gather(-1, order)[keep]
        self._score = None if score is None or not self.stores_scores else score.float().gather(-1, order)[keep]
        self.lengths = keep.sum(-1)
        self.offsets = self.lengths.flatten().cumsum(0).sub(self.lengths.flatten()).view_as(self.lengths)
        self.n = self.n_slots

    def _allocate_rows(self, scores, pos, reading, targets: list[int], head_dim: int) -> torch.Tensor:
        """The kept mask: each row's layer budget (``target x kv_heads``) shared across its heads by the press."""
        rows = []
        for r, target in enumerate(targets):
            seen = reading[r : r + 1] if self.rows.padded else int(reading[r])
            rows.append(self.press.allocate(scores[r : r + 1], pos[r : r + 1], seen, target, head_dim))
        return torch.cat(rows, dim=0)

    def _row_targets(self, reading, decoding: bool) -> list[int] | None:
        readings = [reading] if isinstance(reading, int) else reading.flatten().tolist()
        if not self.compressing:
            return None
        targets = [self.press.layer_target(self.layer_idx, seen, decoding) for seen in readings]
        return None if any(t is None for t in targets) else targets

    # -- transformers CacheLayerMixin API ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        if self._k is None:  # an empty layer: no pair kept yet
            self._k, self._v = key_states.new_empty(0, d), value_states.new_empty(0, value_states.shape[-1])
            self._pos = torch.empty(0, dtype=torch.long, device=key_states.device)
            self._score = torch.empty(0, device=key_states.device) if self.stores_scores else None
            self.lengths = torch.zeros(b, h, dtype=torch.long, device=key_states.device)
            self.offsets = torch.zeros_like(self.lengths)
        call, in_context = self._start_call(key_states)
        if not in_context:
            raise ValueError(
                "a head-wise compressed cache keeps a different number of tokens per KV head, which transformers' "
                "masks cannot describe: use it inside `with press(model, p):` with the press that filled it."
            )
        reading = call.reading_position
        seen = call.reading_position_int if call.reading_position_int is not None else reading
        score = self._entry_scores(key_states, value_states, call.positions, reading)
        index = self._index()
        _, _, old_pos, old_score = self._padded(index, "ps")
        old = lambda: self._padded(index, "kv")[:2]  # noqa: E731  (decoding evictions need no keys: gathered late)
        targets = call.targets
        total = self.lengths.sum(-1)  # (batch,)
        budget = None if targets is None else torch.tensor(targets, device=total.device) * h
        if budget is None or bool((total + q * h <= budget).all()):
            plan = "append"
        elif q == 1 and bool((total > 0).all()) and bool((total <= budget).all()):
            plan = "overwrite"
        else:
            plan = "prune"
        if plan == "overwrite":  # rows at their budget evict one pair per head before attention; others append
            full = (total + h > budget).view(b, 1, 1)
            live = old_pos
            scores = current_scores(self.press, self.layer_idx, lambda: old()[0], lambda: old()[1], live, old_score, reading)
            scores = scores.masked_fill(live < 0, float("inf"))  # padding is no pair: never a victim
            victim = self.press.victims(scores, live, seen)  # (batch, kv_heads)
            if bool(full.all()):
                where = (self.offsets + victim).flatten()
                self._k.index_copy_(0, where, key_states.reshape(-1, d))
                self._v.index_copy_(0, where, value_states.reshape(-1, value_states.shape[-1]))
                self._pos.index_copy_(0, where, call.positions.reshape(-1))
                if self._score is not None:
                    self._score.index_copy_(0, where, score.reshape(-1))
                plan = "overwritten"
            else:
                evicted = torch.zeros_like(live, dtype=torch.bool).scatter_(-1, victim[..., None], True) & full
                old_pos = old_pos.masked_fill(evicted, -1)
        if plan != "overwritten":
            old_k, old_v = old()
            k = torch.cat([old_k, key_states], dim=-2)
            v = torch.cat([old_v, value_states], dim=-2)
            pos = torch.cat([old_pos, call.positions], dim=-1)
            cand_score = None if score is None or old_score is None else torch.cat([old_score, score.float()], dim=-1)
        if plan in ("append", "overwrite"):
            self._keep(k, v, pos, cand_score, pos >= 0)
            plan = "append"
        if plan == "prune":
            scores = current_scores(self.press, self.layer_idx, lambda: k, lambda: v, pos, cand_score, reading)
            self._keep(k, v, pos, cand_score, self._allocate_rows(scores, pos, reading, targets, d))
            out = k, v
            self._attn_positions = pos
        else:
            out_k, out_v, self._attn_positions, _ = self._padded(index if plan == "overwritten" else None, "kvp")
            out = out_k, out_v
        self._query_positions = call.positions[:, 0]
        for observer in self.observers:
            observer(self, "overwrite" if plan == "overwritten" else plan, q)
        return out

    def wants_own_mask(self, attention_mask, key) -> bool:
        return True  # heads hold different tokens: only a per-head mask from true positions describes them

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        return positions_mask(self._attn_positions, self._query_positions, None, query, impl)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Our own mask replaces transformers' (wants_own_mask); these sizes only keep its builder consistent.
        kv_length = self.n_slots + query_length
        return kv_length, max(0, self.tokens_given + query_length - kv_length)

    # -- batch operations ---------------------------------------------------------------------------------
    def _refuse_batch_ops(self, *args) -> None:
        raise NotImplementedError(
            "a head-wise compressed cache stores its rows flattened and cannot be reordered or repeated by row "
            "(beam search, batch expansion); use num_beams=1, or a uniform press."
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _refuse_batch_ops

    def _map_buffers(self, fn) -> None:  # device moves (offload/prefetch) only
        for name in ("_k", "_v", "_pos", "_score", "lengths", "offsets"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.rows = self.rows.map(fn)

    def reset(self) -> None:
        super().reset()
        self.lengths = self.offsets = None

    def __repr__(self) -> str:
        lengths = None if self.lengths is None else self.lengths.tolist()
        return (f"HeadwisePressedLayer(layer={self.layer_idx}, lengths={lengths}, tokens_given={self.tokens_given}, "
                f"press={type(self.press).__name__})")
