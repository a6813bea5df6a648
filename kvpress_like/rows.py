"""How a pressed layer counts its batch rows: all alike, or left-padded rows each planned as if alone.

:class:`UniformRows` is the common case: every row has the same real tokens, so counters are the layer's
Python ints and one selection serves the batch. A layer switches to :class:`PaddedRows` at its first call
with pad tokens (announced by :func:`kvpress_like.press`) and keeps it until reset: per row, the real tokens
given, the slots it would hold alone and its last re-scoring, so batching never changes a row's result.
The layer delegates every row-dependent step here (planning, decoding victims, selection, re-scoring clock,
refusals), so it never branches on padding itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .plan import ROW_APPEND, ROW_OVERWRITE, ROW_PRUNE, Call, Plan, plan_call
from .slots import current_scores, stored_scores

if TYPE_CHECKING:
    from .base import Press
    from .cache import PressedLayer

__all__ = ["PaddedRows", "UniformRows", "select_rows"]

#: A padded row's last re-scoring when it was never scored: its first eviction re-scores.
NEVER = -(1 << 62)


def select_rows(press: Press, scores, positions, reading, targets: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Kept indices, selected row by row (rows with different targets), and how many each row kept.

    Rows keeping fewer tokens are completed with the index of an empty slot appended by the layer's ``_store``."""
    rows = [press.select(scores[r : r + 1], positions[r : r + 1], reading[r : r + 1], t) for r, t in enumerate(targets)]
    widths = [keep.shape[-1] for keep in rows]
    empty = scores.shape[-1]
    padded = [torch.nn.functional.pad(keep, (0, max(widths) - keep.shape[-1]), value=empty) for keep in rows]
    return torch.cat(padded, dim=0), widths


def fresh_scores(layer: PressedLayer, live: torch.Tensor, reading, empty: bool) -> torch.Tensor:
    """The live slots' scores at ``reading``: re-computed for position-dependent presses, else stored."""
    return current_scores(
        layer.press, layer.layer_idx, lambda: layer.keys, lambda: layer.values, live, layer.scores, reading, empty
    )


class UniformRows:
    """Every row alike (no padding): the reading position is the layer's count of tokens given."""

    padded = False

    def __init__(self):
        self.rescored_at: int | None = None  # reading position of the last stored re-scoring (rescore_every > 1)

    def admit(self, real: torch.Tensor | None, layer: PressedLayer) -> UniformRows | PaddedRows:
        """The rows of a call whose real new tokens are ``real`` ``(batch, q)`` (``None``: all real)."""
        if real is None or bool(real.all()):
            return self
        return PaddedRows.start(real.shape[0], layer, NEVER if self.rescored_at is None else self.rescored_at)

    def reading_position(self, layer: PressedLayer) -> int:
        """Where the next query sits."""
        return layer.tokens_given

    def plan(self, layer: PressedLayer, q: int, batch: int, heads: int, device, real=None) -> Call:
        reading = layer.tokens_given + q
        positions = torch.arange(layer.tokens_given, reading, device=device).expand(batch, heads, q)
        targets = layer._row_targets(reading, q == 1)
        targets = None if targets is None else targets * batch
        plan = plan_call(q, layer.n, targets, not layer.policy.scoring.needs_queries).plan
        return Call(plan, q, positions, torch.full((batch, 1, 1), reading, dtype=torch.long, device=device), targets, reading)

    def plan_only(self, layer: PressedLayer, q: int) -> Plan:
        """The plan of a ``q``-token call, without building its tensors (mask sizes)."""
        return plan_call(q, layer.n, layer._row_targets(layer.tokens_given + q, q == 1), not layer.policy.scoring.needs_queries).plan

    def advance(self, call: Call) -> None:
        """Count the call's tokens (the layer counts them for uniform rows)."""

    def overwrite_slot(self, layer: PressedLayer, call: Call, empty: bool) -> torch.Tensor:
        """The slot ``(batch, kv_heads)`` each head's new token overwrites in a decoding step."""
        reading = call.reading_position_int
        live = layer.span.live(layer.positions, reading - 1)
        return layer.press.victims(self.eviction_scores(layer, live, call.reading_position, reading, empty), live, reading)

    def eviction_scores(self, layer: PressedLayer, live, reading: torch.Tensor, at: int, empty: bool) -> torch.Tensor:
        """Scores of the live slots for a decoding eviction. With ``rescore_every > 1`` (a position-dependent
        press: validated) the stored ones until that many steps have passed since the last re-scoring, whose
        result is stored."""
        every = layer.policy.rescore_every
        if every > 1 and self.rescored_at is not None and at - self.rescored_at < every:
            return stored_scores(layer.scores, live, empty)
        scores = fresh_scores(layer, live, reading, empty)
        if every > 1:
            layer.scores.copy_(scores)
            self.rescored_at = at
        return scores

    def hidden_before_prune(self, layer: PressedLayer, call: Call) -> torch.Tensor | None:
        """Slots evicted before a pruning call's attention (only padded decoding steps have any)."""
        return None

    def select(self, press: Press, scores, positions, reading, targets: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Kept indices for the batch and, per row, how many were kept."""
        keep = press.select(scores, positions, reading, targets[0])
        return keep, [keep.shape[-1]] * keep.shape[0]

    def pruned(self, press: Press, call: Call, widths: list[int], full_score, stale, score, live) -> torch.Tensor | None:
        """After a pruning call's selection: the scores to store with the kept slots; the kept scores are fresh."""
        self.rescored_at = call.reading_position_int
        return full_score

    def kept(self, widths: list[int]) -> None:
        """After a selection outside a call (:meth:`PressedLayer.prune_by`): rows kept ``widths`` slots."""

    def after_call(self, call: Call) -> None:
        """Row bookkeeping of a call that appended or overwrote."""

    def refuse_query_scores(self, press: Press) -> None:
        """Raise when ``press`` cannot score these rows with the latest queries (it can)."""

    def refuse_outside_context(self) -> None:
        """Raise when transformers' masks cannot describe these rows (they can)."""

    def map(self, fn) -> UniformRows:
        return self


class PaddedRows:
    """Left-padded rows, each counted and planned as it would be alone."""

    padded = True

    def __init__(self, tokens: torch.Tensor, slots: torch.Tensor, rescored: torch.Tensor):
        self.tokens = tokens  # (batch,) real tokens given per row: each row's reading position
        self.slots = slots  # (batch,) slots the row would hold alone
        self.rescored = rescored  # (batch,) reading position of each row's last stored re-scoring

    @classmethod
    def start(cls, batch: int, layer: PressedLayer, rescored_at: int) -> PaddedRows:
        """Rows of a layer that held only unpadded rows so far (each row then holds what the layer holds)."""
        tokens = torch.full((batch,), layer.tokens_given, dtype=torch.long, device=layer.device)
        return cls(tokens, torch.full_like(tokens, layer.n), torch.full_like(tokens, rescored_at))

    def admit(self, real: torch.Tensor | None, layer: PressedLayer) -> PaddedRows:
        return self

    def reading_position(self, layer: PressedLayer) -> torch.Tensor:
        return self.tokens.view(-1, 1, 1)

    def plan(self, layer: PressedLayer, q: int, batch: int, heads: int, device, real=None) -> Call:
        real = torch.ones(batch, q, dtype=torch.bool, device=device) if real is None else real.to(device)
        positions = (self.tokens[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, -1)
        new = real.long().sum(-1)
        reading = (self.tokens + new).view(batch, 1, 1)
        targets = layer._row_targets(reading, q == 1)
        planned = plan_call(q, layer.n, targets, not layer.policy.scoring.needs_queries, new, self.slots)
        positions = positions[:, None, :].expand(batch, heads, q)
        return Call(planned.plan, q, positions, reading, targets, None, planned.rows, new)

    def plan_only(self, layer: PressedLayer, q: int) -> Plan:
        return self.plan(layer, q, self.tokens.shape[0], 1, self.tokens.device).plan

    def advance(self, call: Call) -> None:
        self.tokens = call.reading_position.view(-1)

    def overwrite_slot(self, layer: PressedLayer, call: Call, empty: bool) -> torch.Tensor:
        return self._victims(layer, call)

    def _victims(self, layer: PressedLayer, call: Call, hide: bool = False) -> torch.Tensor:
        """A padded decoding step, row by row as each row alone would take it: a row that overwrites evicts its
        lowest-scored live slot when it holds its target of live tokens (else an empty one, as its dead slots
        would be), other rows take an empty slot (one is appended when a row has none).

        Returns the slot ``(batch, kv_heads)`` the new token goes to; with ``hide`` (the step prunes other
        rows), a ``(batch, kv_heads, n + 1)`` mask of the live slots evicted before attention instead."""
        reading = call.reading_position
        b = reading.shape[0]
        overwrite = call.row_plans == ROW_OVERWRITE
        targets = torch.tensor(call.targets, device=reading.device).view(b, 1, 1)
        live = layer.span.live(layer.positions, reading - 1)
        count = (live >= 0).sum(-1, keepdim=True)  # (batch, heads, 1)
        evict = overwrite.view(b, 1, 1) & (count >= targets)
        if not hide and bool((~evict & (count == layer.n)).any()):
            layer._append_empty_slot()
            live = layer.span.live(layer.positions, reading - 1)
        scores = self._eviction_scores(layer, live, reading, overwrite)
        scores = scores.masked_fill(evict & (live < 0), float("inf")).masked_fill(~evict & (live >= 0), float("inf"))
        slot = layer.press.victims(scores, live, reading)
        if not hide:
            return slot
        hidden = torch.zeros(*live.shape[:2], live.shape[-1] + 1, dtype=torch.bool, device=live.device)
        return hidden.scatter_(-1, slot[..., None], True) & evict

    def _eviction_scores(self, layer: PressedLayer, live, reading: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """As :meth:`UniformRows.eviction_scores`, the re-scoring clock kept per row; only ``rows`` (those that
        evict, as they would alone) may re-score."""
        every = layer.policy.rescore_every
        if every == 1:
            return fresh_scores(layer, live, reading, True)
        due = rows & (reading.view(-1) - self.rescored >= every)
        if bool(due.any()):
            fresh = fresh_scores(layer, live, reading, True)
            layer.scores.copy_(torch.where(due.view(-1, 1, 1), fresh, layer.scores))
            self.rescored = torch.where(due, reading.view(-1), self.rescored)
        return stored_scores(layer.scores, live, True)

    def hidden_before_prune(self, layer: PressedLayer, call: Call) -> torch.Tensor | None:
        """In a decoding step where some rows prune, the slots that rows which overwrite evict before attention,
        as each would alone."""
        return self._victims(layer, call, hide=True) if call.q == 1 else None

    def select(self, press: Press, scores, positions, reading, targets: list[int]) -> tuple[torch.Tensor, list[int]]:
        return select_rows(press, scores, positions, reading, targets)

    def pruned(self, press: Press, call: Call, widths: list[int], full_score, stale, score, live) -> torch.Tensor | None:
        pruned = call.row_plans == ROW_PRUNE
        b = pruned.shape[0]
        if stale is not None and press.scoring.rescores:  # rows that do not prune keep their stale scores
            stale = torch.cat([stale, score], dim=-1)
            full_score = torch.where(pruned.view(b, 1, 1), full_score, stale.masked_fill(live < 0, float("-inf")))
        self.rescored = torch.where(pruned, call.reading_position.view(b), self.rescored)
        kept = torch.minimum(torch.tensor(widths, device=pruned.device), self.slots + call.row_new)
        self.slots = torch.where(pruned, kept, self.slots + call.row_new)
        return full_score

    def kept(self, widths: list[int]) -> None:
        self.slots = torch.minimum(torch.tensor(widths, device=self.slots.device), self.slots)

    def after_call(self, call: Call) -> None:
        if call.plan is not Plan.PRUNE:
            self.slots = self.slots + torch.where(call.row_plans == ROW_APPEND, call.row_new, 0)

    def refuse_query_scores(self, press: Press) -> None:
        raise ValueError(
            f"{type(press).__name__} scores keys with the prompt's last queries, which differ per row in a "
            "padded batch; run padded prompts one at a time, or use a query-free press."
        )

    def refuse_outside_context(self) -> None:
        raise ValueError("a cache compressed from a padded batch can only be continued inside `with press(model, p):`.")

    def map(self, fn) -> PaddedRows:
        return PaddedRows(fn(self.tokens), fn(self.slots), fn(self.rescored))
