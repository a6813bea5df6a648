"""The plan of one forward call through a pressed layer: a pure function of sizes and targets.

* :attr:`Plan.APPEND`: the new tokens fit under every row's target; they are written after the live slots.
* :attr:`Plan.OVERWRITE`: one decoding step into a full cache; each (row, KV head) evicts its lowest-scoring
  unprotected slot (an empty slot first) and the new token is written into it *before* attention, so the
  cache never exceeds its budget and nothing is reallocated.
* :attr:`Plan.PRUNE`: anything else that overflows (prefill, a prefill chunk, a chat's next turn, rows of a
  padded batch with different targets); attention sees the old kept tokens plus all new ones, then the best
  ``target`` of them are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = ["ROW_APPEND", "ROW_OVERWRITE", "ROW_PRUNE", "Call", "CallPlan", "Plan", "plan_call"]


class Plan(str, Enum):
    """What a call does to a layer's slots (a ``str``: observers may compare it with ``"append"`` etc.)."""

    APPEND = "append"
    OVERWRITE = "overwrite"
    PRUNE = "prune"

    def __str__(self) -> str:
        return self.value


#: A padded call's per-row plans, as codes in a ``(batch,)`` tensor (:attr:`CallPlan.rows`).
ROW_APPEND, ROW_OVERWRITE, ROW_PRUNE = 0, 1, 2


@dataclass(frozen=True)
class CallPlan:
    """The call's plan and, for a padded batch, what each row alone would do (``ROW_*`` codes)."""

    plan: Plan
    rows: torch.Tensor | None = None


def plan_call(
    new_tokens: int,
    slots: int,
    targets: Sequence[int] | None,
    evicts: bool,
    row_new: torch.Tensor | None = None,
    row_slots: torch.Tensor | None = None,
) -> CallPlan:
    """Plan a call of ``new_tokens`` tokens into a layer holding ``slots`` slots.

    ``targets``: per row, how many tokens it may keep after the call (``None``: no limit); ``evicts``: whether
    the cache evicts at all (query-free presses; others prune after attention). Padded batches also give each
    row's real new tokens ``row_new`` and the slots it would hold alone ``row_slots`` (``(batch,)`` tensors):
    each row is then planned as it would be alone (a row with no real new token appends nothing), and the batch
    prunes when some row prunes, else overwrites for a decoding step into a non-empty layer (rows that append
    fill an empty slot), else appends.
    """
    if row_new is None:
        if not evicts or targets is None:
            return CallPlan(Plan.APPEND)
        if new_tokens == 1 and slots > 0 and all(t == slots for t in targets):
            return CallPlan(Plan.OVERWRITE)
        if all(slots + new_tokens <= t for t in targets):
            return CallPlan(Plan.APPEND)
        return CallPlan(Plan.PRUNE)
    if not evicts or targets is None:
        rows = torch.full_like(row_new, ROW_APPEND)
    else:
        t = torch.tensor(list(targets), device=row_new.device)
        overwrite = (row_new == 1) & (row_slots > 0) & (row_slots == t)
        append = (row_slots + row_new <= t) | (row_new == 0)
        rows = torch.where(overwrite, ROW_OVERWRITE, torch.where(append, ROW_APPEND, ROW_PRUNE))
    if bool((rows == ROW_PRUNE).any()):
        return CallPlan(Plan.PRUNE, rows)
    if new_tokens == 1 and slots > 0 and targets is not None and evicts:
        return CallPlan(Plan.OVERWRITE, rows)
    return CallPlan(Plan.APPEND, rows)


@dataclass
class Call:
    """One forward call through a pressed layer: its plan and what it needs, made before anything is written."""

    plan: Plan
    q: int  # new tokens (pad tokens included)
    positions: torch.Tensor  # (batch, kv_heads, q) true positions of the new tokens, -1 for padding
    reading_position: torch.Tensor  # (batch, 1, 1) where the next query sits after this call
    targets: list[int] | None  # per row; None: no limit
    reading_position_int: int | None  # the same as an int when every row agrees (no padding): cheaper to compare
    #: Padded batches: per row, what the row run alone would do (``ROW_*`` codes) and how many of the new tokens
    #: are real; ``None`` without padding.
    row_plans: torch.Tensor | None = None
    row_new: torch.Tensor | None = None
