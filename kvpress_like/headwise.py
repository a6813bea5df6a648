"""Head-wise budgets with the memory really freed: a cache layer whose KV heads keep different numbers of pairs.

:class:`HeadwisePressedLayer` is the cache layer :func:`kvpress_like.press` gives the full-attention layers of a
head-wise press (``press.headwise``, e.g. :class:`~kvpress_like.methods.adaptive.AdaptivePress`).

Storage: one flat buffer per layer (``_k`` / ``_v``: ``(N, head_dim)``; ``_pos``: ``(N,)`` true positions,
``-1`` for a slot no segment owns; ``_score``: ``(N,)`` float32 scores for presses that store them). Each
(batch row, KV head) *segment* ``s = row x kv_heads + head`` owns the contiguous slots
``[starts[s], starts[s] + caps[s])``, of which the first ``lengths[s]`` hold its pairs. Attention reads a
**strided view** ``(batch, kv_heads, W, head_dim)`` of the buffer whose window ``s`` begins at slot ``s x S``:
windows overlap, so no slot is stored twice and nothing is copied; each segment lies inside its window, and
the slots of its window that it does not own (its neighbours' pairs, or unowned zeros) are masked per head
from ``lengths`` and ``starts``. So attention is exact with eager and sdpa, and a decoding step writes the
new token of every head at an explicit slot (a victim's, or the segment's next free one) in place, as the
uniform layer (gpt-fast) does: no per-step gather.

Layout (:func:`layout`): segments are placed greedily, ``start_s = max(s x S, end_{s-1})``. The buffer then
holds ``N(S) = n S + maxsub(caps - S)`` slots and the windows are ``W(S) = S + maxsub(caps - S)`` wide
(``maxsub``: the largest sum of consecutive entries, ``n`` segments). ``N`` grows and ``W`` shrinks with
``S``: ``S = 0`` stores exactly the kept pairs but every window spans the whole layer; ``S = max cap`` is
the padded layout (each window the longest head). :func:`layout` takes the largest ``S`` with
``N <= (1 + slack) x sum(caps)`` (``press.memory_slack``, 2.5% by default: with the bookkeeping below, a
float32 cache with 64-dim heads stays within 5% of the kept pairs' bytes), and attention reads ``batch x kv_heads x W`` slots, ``W`` no less than the
longest head (what any dense-kernel layout reads).

Capacity: after a prune, ``caps = lengths`` (exact). Appends write into a segment's free slots; a segment
without room is re-laid out with the room uniform layers grow by (``max(16, length / 8)`` per decoding
step, exact for multi-token calls). With a budget, decoding never appends once a row fills its budget.

Bookkeeping: :meth:`HeadwisePressedLayer.bookkeeping_nbytes`: 12 bytes per slot (position + score; 8
without scores) and 24 bytes per segment (``lengths``, ``starts``, ``caps``).

Attention: multi-token calls go through the model's own attention with a per-KV-head mask built from true
positions (:func:`~kvpress_like.masks.positions_mask`). Single-token calls use :meth:`decode_attention`:
each KV head's ``num_heads / kv_heads`` query heads become that head's queries (``(batch, kv_heads,
group, head_dim)``), so sdpa reads the strided view once per KV head without repeating keys for GQA.

GPU path (not implemented here): flash-attn's variable-length kernel takes the flat buffers directly, each
segment one sequence whose queries are its group of query heads (``num_heads=group``, ``num_kv_heads=1``):
``cu_seqlens_k`` from ``starts`` (a segment's run reaches the next segment's start, gap included) and
``seqused_k = lengths`` so the gap is not read; no mask, no window, exactly the kept pairs read.

Decoding: a new token enters every head. With a budget (``max_cache_tokens``, or ``decoding=True``) a row whose
kept pairs already fill its layer budget evicts, in each head, that head's own lowest-scoring unprotected pair
and writes the new token into it (lengths stay as allocated; position-dependent presses re-score the head's
live pairs first); a row under its budget appends. A call that overflows otherwise (a prompt, a prefill
chunk, a chat's next turn) re-allocates across heads over the old kept pairs plus the new tokens. Left-padded
batches are allocated row by row (pads are never kept). Beam search and batch reshuffling are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .cache import PressedLayer
from .masks import positions_mask
from .slots import current_scores

if TYPE_CHECKING:
    from .base import Press

__all__ = ["HeadwisePressedLayer", "is_headwise", "layout"]

#: attention variants :meth:`HeadwisePressedLayer.decode_attention` leaves to the model's own path
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "sliding_window")


def is_headwise(press: Press) -> bool:
    """Whether ``press`` gives each KV head its own budget (its full-attention layers are stored head-wise)."""
    return bool(getattr(press, "headwise", False))


def layout(caps: list[int], slack: float) -> tuple[list[int], int, int, int]:
    """Where segments of ``caps`` slots go (module docstring): ``(starts, stride S, window W, buffer slots N)``
    with ``N <= sum(caps) + floor(slack x sum(caps))`` and the smallest ``W`` that allows."""
    n, total = len(caps), sum(caps)
    if total == 0:
        return [0] * n, 0, 0, 0
    c = torch.tensor(caps, dtype=torch.long)
    stride = torch.arange(max(caps) + 1)
    prefix = torch.nn.functional.pad((c[None] - stride[:, None]).cumsum(1), (1, 0))
    maxsub = (prefix[:, 1:] - prefix[:, :-1].cummin(1).values).max(1).values  # best run of consecutive segments
    fits = n * stride + maxsub <= total + int(slack * total)  # N(S); S = 0 always fits (N = total)
    s = int(stride[fits].max())
    width = s + int(maxsub[s])
    starts, end = [], 0
    for k, cap in enumerate(caps):
        start = max(k * s, end)
        starts.append(start)
        end = start + cap
    return starts, s, width, n * s + int(maxsub[s])


class HeadwisePressedLayer(PressedLayer):
    """A full-attention cache layer whose (batch row, KV head) segments keep different numbers of pairs."""

    def __init__(self, press: Press, layer_idx: int, sliding_window: int | None = None):
        if sliding_window is not None:
            raise ValueError("head-wise budgets are for full-attention layers; sliding layers stay uniform PressedLayers.")
        super().__init__(press, layer_idx, None)
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) pairs kept per segment
        self.starts: torch.Tensor | None = None  # (batch, kv_heads) first slot of each segment in the flat buffers
        self.caps: torch.Tensor | None = None  # (batch, kv_heads) slots each segment owns (>= lengths)
        self.stride = 0  # S: window s begins at slot s x S
        self.width = 0  # W: slots per window (what attention reads per KV head)
        self._owned_for: tuple | None = None  # (the (lengths, starts, width) it was built for, _owned())
        self._totals_for: tuple | None = None  # (the lengths it was built for, kept pairs per row)
        self.shares: list[float] | None = None  # per row: the layer's part of a model-wide budget (scope="model")

    # -- the strided view (what attention, masks and tests read) ---------------------------------------------
    def _view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (flat, per slot) as ``(batch, kv_heads, W, ...)`` windows: a view, no copy."""
        b, h = self.lengths.shape
        inner = t.stride()[1:]
        step = t.stride(0)
        return t.as_strided((b, h, self.width, *t.shape[1:]), (h * self.stride * step, self.stride * step, step, *inner))

    def _owned(self) -> torch.Tensor:
        """``(batch, kv_heads, W)``: which slots of each window hold that segment's pairs (cached until the
        lengths or the layout change: a budgeted decoding step changes neither)."""
        key = (self.lengths, self.starts, self.width)
        if self._owned_for is not None and all(a is b for a, b in zip(self._owned_for[0], key)):
            return self._owned_for[1]
        b, h = self.lengths.shape
        first = self.starts - torch.arange(b * h, device=self.starts.device).view(b, h) * self.stride
        slot = torch.arange(self.width, device=self.starts.device)
        owned = (slot >= first[..., None]) & (slot < (first + self.lengths)[..., None])
        self._owned_for = (key, owned)
        return owned

    def _row_totals(self) -> list[int]:
        """Kept pairs per row (Python ints: a decoding step plans without reading tensors back, once per layout)."""
        if self._totals_for is None or self._totals_for[0] is not self.lengths:
            self._totals_for = (self.lengths, self.lengths.sum(-1).tolist())
        return self._totals_for[1]

    @property
    def _segments(self) -> torch.Tensor:
        """``(batch, kv_heads)``: the flat slot where each window begins (``s x S``)."""
        b, h = self.lengths.shape
        return torch.arange(b * h, device=self.lengths.device).view(b, h) * self.stride

    @property
    def n_slots(self) -> int:
        return self.width

    keys = property(lambda self: None if self._k is None else self._view(self._k), PressedLayer.keys.fset)
    values = property(lambda self: None if self._v is None else self._view(self._v), PressedLayer.values.fset)

    @property
    def positions(self) -> torch.Tensor | None:
        """True positions per window ``(batch, kv_heads, W)``, ``-1`` where a slot is not the segment's."""
        return None if self._pos is None else self._view(self._pos).masked_fill(~self._owned(), -1)

    @property
    def scores(self) -> torch.Tensor | None:
        """Stored scores per window, ``-inf`` where a slot is not the segment's (``None`` without scores)."""
        return None if self._score is None else self._view(self._score).masked_fill(~self._owned(), float("-inf"))

    @property
    def kept_pairs(self) -> int:
        """Key/value pairs stored, over every row and KV head."""
        return 0 if self.lengths is None else int(self.lengths.sum())

    def bookkeeping_nbytes(self) -> int:
        """Bytes besides keys and values: positions, scores, lengths, starts and caps."""
        tensors = (self._pos, self._score, self.lengths, self.starts, self.caps)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- writing -------------------------------------------------------------------------------------------
    def _keep(self, k, v, pos, score, keep: torch.Tensor, room: torch.Tensor | int = 0) -> None:
        """Store the ``keep`` mask ``(batch, kv_heads, n)`` of candidates as the new contents, each segment in
        position order, with ``room`` free slots after each segment; re-lays the buffers out."""
        order = pos.masked_fill(~keep, torch.iinfo(pos.dtype).max).argsort(dim=-1)
        keep = keep.gather(-1, order)
        lengths = keep.sum(-1)
        caps = lengths + room
        starts, self.stride, self.width, n = layout(caps.flatten().tolist(), self.press.memory_slack)
        self.starts = torch.tensor(starts, dtype=torch.long, device=pos.device).view_as(lengths)
        self.lengths, self.caps = lengths, caps
        dest = (self.starts[..., None] + keep.long().cumsum(-1) - 1)[keep]
        pick = lambda t: t.gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1]))[keep]  # noqa: E731
        self._k = k.new_zeros(n, k.shape[-1]).index_copy_(0, dest, pick(k))  # unowned slots: finite, masked
        self._v = v.new_zeros(n, v.shape[-1]).index_copy_(0, dest, pick(v))
        self._pos = pos.new_full((n,), -1).index_copy_(0, dest, pos.gather(-1, order)[keep])
        self._score = None
        if self.stores_scores:
            kept = (score.float().gather(-1, order)[keep] if score is not None
                    else torch.full(dest.shape, float("inf"), device=pos.device))
            self._score = torch.full((n,), float("-inf"), device=pos.device).index_copy_(0, dest, kept)
        self.n = self.width

    def _relayout(self, room: torch.Tensor) -> None:
        """Re-lay the current contents out with ``room`` free slots after each segment."""
        pos = self.positions
        self._keep(self.keys, self.values, pos, self.scores, pos >= 0, room)

    def _write(self, where: torch.Tensor, k, v, pos, score) -> None:
        """Write new pairs ``(batch, kv_heads, q, ...)`` at flat slots ``where`` ``(batch, kv_heads, q)``."""
        where = where.flatten()
        self._k.index_copy_(0, where, k.reshape(-1, k.shape[-1]))
        self._v.index_copy_(0, where, v.reshape(-1, v.shape[-1]))
        self._pos.index_copy_(0, where, pos.reshape(-1))
        if self._score is not None:
            fresh = torch.full(where.shape, float("inf"), device=where.device) if score is None else score.reshape(-1).float()
            self._score.index_copy_(0, where, fresh)

    def _allocate_rows(self, scores, pos, reading, targets: list[int], head_dim: int, budgets: list[int]) -> torch.Tensor:
        """The kept mask: each row's layer budget (``budgets`` pairs) shared across its heads by the press, each
        head's floor taken from its row's per-head ``targets``."""
        return torch.cat([self.press.allocate(scores[r : r + 1], pos[r : r + 1], self._row_seen(reading, r), target,
                                              head_dim, budgets[r]) for r, target in enumerate(targets)], dim=0)

    def _overwrite_rows(self, keep: torch.Tensor, scores, pos, seen, total: list[int], budget: list[int]):
        """In a decoding step that prunes, the rows that alone would overwrite (``0 < pairs <= budget``): they
        keep every pair but, when the new token puts them over budget, each head's lowest-scored one, evicted
        before attention as the overwrite plan does. Returns the kept mask and the pairs attention must not see
        (``None``: none)."""
        heads, w = pos.shape[1], pos.shape[-1] - 1
        alone = torch.tensor([0 < n <= m for n, m in zip(total, budget)], device=pos.device)
        if not bool(alone.any()):
            return keep, None
        full = torch.tensor([n + heads > m for n, m in zip(total, budget)], device=pos.device) & alone
        old = pos[..., :w]
        victim = self.press.victims(scores[..., :w].masked_fill(old < 0, float("inf")), old, seen)
        hidden = torch.zeros_like(pos, dtype=torch.bool)
        hidden[..., :w].scatter_(-1, victim[..., None], True)
        hidden &= full.view(-1, 1, 1)
        return torch.where(alone.view(-1, 1, 1), (pos >= 0) & ~hidden, keep), hidden

    def _row_seen(self, reading, r: int):
        return reading[r : r + 1] if self.rows.padded else int(reading[r])

    def _row_targets(self, reading, decoding: bool) -> list[int] | None:
        readings = [reading] if isinstance(reading, int) else reading.flatten().tolist()
        if not self.compressing:
            return None
        targets = [self.press.layer_target(self.layer_idx, seen, decoding) for seen in readings]
        return None if any(t is None for t in targets) else targets

    def _budgets(self, targets: list[int]) -> list[int]:
        """Pairs each row may keep: ``target x kv_heads``, times the row's share of a model-wide budget if any."""
        heads = self.lengths.shape[1]
        if self.shares is None:
            return [t * heads for t in targets]
        return [max(1, round(t * heads * share)) for t, share in zip(targets, self.shares)]

    # -- transformers CacheLayerMixin API ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        device = key_states.device
        if self._k is None:  # an empty layer: no pair kept yet
            empty = torch.zeros(b, h, 0, dtype=torch.bool, device=device)
            self.lengths = torch.zeros(b, h, dtype=torch.long, device=device)
            self._keep(key_states[:, :, :0], value_states[:, :, :0], torch.zeros(b, h, 0, dtype=torch.long, device=device),
                       None, empty)
        call, in_context = self._start_call(key_states)
        if not in_context:
            raise ValueError(
                "a head-wise compressed cache keeps a different number of tokens per KV head, which transformers' "
                "masks cannot describe: use it inside `with press(model, p):` with the press that filled it."
            )
        reading, positions = call.reading_position, call.positions
        seen = call.reading_position_int if call.reading_position_int is not None else reading
        score = self._entry_scores(key_states, value_states, positions, reading)
        targets = call.targets
        total = self._row_totals()
        budget = None if targets is None else self._budgets(targets)
        real = not self.rows.padded or bool((positions >= 0).all())
        if budget is None or all(n + q * h <= m for n, m in zip(total, budget)):
            plan = "append" if real else "prune"  # pads are never kept: a padded append re-stores (keeps all real)
        elif q == 1 and all(0 < n <= m for n, m in zip(total, budget)):
            plan = "overwrite"
        else:
            plan = "prune"
        live = None
        if plan == "append":
            if bool((self.lengths + q > self.caps).any()):
                self._relayout(q + (torch.clamp(self.lengths // 8, min=16) if q == 1 else 0))
            where = self.starts[..., None] + self.lengths[..., None] + torch.arange(q, device=device)
            self._write(where, key_states, value_states, positions, score)
            self.lengths = self.lengths + q
        elif plan == "overwrite":  # rows at their budget evict one pair per head before attention; others append
            full_rows = [n + h > m for n, m in zip(total, budget)]
            full = torch.tensor(full_rows, device=device).view(b, 1)
            if not all(full_rows) and bool((~full & (self.lengths >= self.caps)).any()):
                self._relayout(torch.where(~full, 1 + torch.clamp(self.lengths // 8, min=16), 0))
            owned = self._owned()
            live = self._view(self._pos).masked_fill(~owned, -1)
            if self.policy.scoring.rescores or self._score is None:
                scores = current_scores(self.press, self.layer_idx, lambda: self.keys, lambda: self.values, live,
                                        self.scores, reading)
                scores = scores.masked_fill(~owned, float("inf"))
            else:  # stored entry scores; slots not the segment's are never victims
                scores = self._view(self._score).masked_fill(~owned, float("inf"))
            victim = self.press.victims(scores, live, seen) if any(full_rows) else None  # (batch, kv_heads)
            if all(full_rows):
                where = self._segments + victim
                live.scatter_(-1, victim[..., None], positions)  # the ownership mask is unchanged
            else:
                where = self.starts + self.lengths
                if victim is not None:
                    where = torch.where(full, self._segments + victim, where)
                self.lengths = self.lengths + (~full).long()
                live = None
            self._write(where[..., None], key_states, value_states, positions, score)
        if plan == "prune":
            k = torch.cat([self.keys, key_states], dim=-2)
            v = torch.cat([self.values, value_states], dim=-2)
            pos = torch.cat([self.positions, positions], dim=-1)
            stored = self.scores
            cand_score = None if score is None or stored is None else torch.cat([stored, score.float()], dim=-1)
            hidden = None
            if targets is None or all(n + q * h <= m for n, m in zip(total, budget)):
                keep = pos >= 0  # a padded call under budget: keep every real token
            else:
                scores = current_scores(self.press, self.layer_idx, lambda: k, lambda: v, pos, cand_score, reading)
                keep = self._allocate_rows(scores, pos, reading, targets, d, budget)
                if q == 1:  # rows another row forced into this prune evict as they would alone (overwrite)
                    keep, hidden = self._overwrite_rows(keep, scores, pos, seen, total, budget)
            self._keep(k, v, pos, cand_score, keep)
            out = k, v
            self._attn_positions = pos if hidden is None else pos.masked_fill(hidden, -1)
        else:
            out = self.keys, self.values
            self._attn_positions = self.positions if live is None else live
        self._query_positions = positions[:, 0]
        for observer in self.observers:
            observer(self, plan, q)
        return out

    def _ranking_inputs(self, scores: torch.Tensor):
        reading = self.rows.reading_position(self)
        if isinstance(reading, int):
            reading = torch.full((self.lengths.shape[0], 1, 1), reading, device=scores.device)
        live = self.positions
        return reading, live, scores.float().masked_fill(live < 0, float("-inf"))

    def ranked_rows(self, scores: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """The press's allocation values ``(batch, kv_heads, W)`` of the kept pairs ranked by ``scores`` and each
        row's uniform per-head target (``None``: not compressing): for a budget shared across layers."""
        reading, live, scores = self._ranking_inputs(scores)
        targets = self._row_targets(reading, decoding=False)
        if targets is None:
            return scores, None
        d = self._k.shape[-1]
        values = [self.press.ranked(scores[r : r + 1], live[r : r + 1], self._row_seen(reading, r), t, d)
                  for r, t in enumerate(targets)]
        return torch.cat(values, dim=0), targets

    def prune_by(self, scores: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Re-allocate across heads now, ranking the kept pairs by ``scores`` ``(batch, kv_heads, W)`` (higher
        kept; they become the stored scores): for presses that score after a call (KVzip). ``keep``: the pairs a
        budget shared across layers chose here; each row's count is kept as its share of this layer's budget."""
        reading, live, scores = self._ranking_inputs(scores)
        targets = self._row_targets(reading, decoding=False)
        if targets is not None and keep is not None:
            heads = self.lengths.shape[1]
            self.shares = [int(n) / (t * heads) for n, t in zip(keep.sum((1, 2)), targets)]
        elif targets is not None:
            budgets = self._budgets(targets)
            if any(n > m for n, m in zip(self._row_totals(), budgets)):
                keep = self._allocate_rows(scores, live, reading, targets, self._k.shape[-1], budgets)
        self._keep(self.keys, self.values, live, scores, live >= 0 if keep is None else keep)

    def wants_own_mask(self, attention_mask, key) -> bool:
        return True  # heads hold different tokens: only a per-head mask from true positions describes them

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        return positions_mask(self._attn_positions, self._query_positions, None, query, impl)

    def decode_attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         **kwargs) -> tuple[torch.Tensor, None] | None:
        """One query per row: each KV head's group of query heads attends to that head's window (masked to
        the segment's slots) in one sdpa call, without repeating keys per query head. Declines (``None``)
        attention variants it does not implement, which then take the model's path with our mask."""
        if any(kwargs.get(name) is not None for name in _UNSUPPORTED_ATTENTION_KWARGS) or kwargs.get("dropout"):
            return None
        b, heads, _, d = query.shape
        h = key.shape[1]
        visible = self._attn_positions >= 0  # every kept pair precedes the new token, which every head holds
        out = F.scaled_dot_product_attention(query.view(b, h, heads // h, d), key, value, attn_mask=visible[:, :, None],
                                             scale=kwargs.get("scaling"))
        return out.reshape(b, heads, 1, -1).transpose(1, 2), None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Our own mask replaces transformers' (wants_own_mask); these sizes only keep its builder consistent.
        kv_length = self.n_slots + query_length
        return kv_length, max(0, self.tokens_given + query_length - kv_length)

    # -- batch operations ---------------------------------------------------------------------------------
    def _rows_op(self, fn) -> None:
        """Repeat or select rows (``fn`` on dimension 0), re-laying the kept pairs out: the pipeline's batched
        questions and generate()'s ``num_return_sequences`` expand one compressed row."""
        if self._k is not None:
            pos, score = fn(self.positions), self.scores
            self._keep(fn(self.keys), fn(self.values), pos, None if score is None else fn(score), pos >= 0)
        self.rows = self.rows.map(fn)
        if self.shares is not None:
            self.shares = fn(torch.tensor(self.shares)).tolist()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows_op(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "beam search reorders a head-wise compressed cache at every step, which it does not support; use "
            "num_beams=1, or a uniform press."
        )

    def _map_buffers(self, fn) -> None:  # device moves (offload/prefetch) only
        for name in ("_k", "_v", "_pos", "_score", "lengths", "starts", "caps"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.rows = self.rows.map(fn)

    def reset(self) -> None:
        super().reset()
        self.lengths = self.starts = self.caps = self._owned_for = self._totals_for = None
        self.shares = None
        self.stride = self.width = 0

    def __repr__(self) -> str:
        lengths = None if self.lengths is None else self.lengths.tolist()
        return (f"HeadwisePressedLayer(layer={self.layer_idx}, lengths={lengths}, window={self.width}, tokens_given={self.tokens_given}, "
                f"press={type(self.press).__name__})")
