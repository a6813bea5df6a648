"""What a pressed layer's queries may attend to: everything before them, or a sliding window.

A pressed layer holds one of these (the way transformers has ``DynamicSlidingWindowLayer`` beside
``DynamicLayer``): it caps the layer's targets, marks the tokens that left the window as empty, builds the
mask from true positions and says what transformers' own masks cannot describe.
"""

from __future__ import annotations

import torch

from .masks import positions_mask

__all__ = ["FullAttention", "SlidingWindow", "attention_span"]


class FullAttention:
    """Every earlier token stays visible: nothing to cap, nothing leaves."""

    window: int | None = None

    def cap(self, target: int | None, decoding: bool) -> int | None:
        """The most tokens the layer may keep given the press's ``target`` (``None``: no limit)."""
        return target

    def live(self, positions: torch.Tensor, reading) -> torch.Tensor:
        """``positions`` with the tokens the query at ``reading`` can no longer see marked empty (``-1``)."""
        return positions

    def mask(self, kpos: torch.Tensor, qpos: torch.Tensor, query: torch.Tensor, impl: str) -> torch.Tensor:
        """The mask of keys at ``kpos`` ``(batch, kv_heads, kv)`` for queries at ``qpos`` ``(batch, q)``: one for
        every head, since all heads keep the same positions."""
        return positions_mask(kpos[:, :1], qpos, None, query, impl)

    def check_outside_context(self, layer_idx: int, kpos: torch.Tensor, q: int, first: int) -> None:
        """Raise when transformers' mask cannot describe the last call's keys (nothing to check here)."""

    def __repr__(self) -> str:
        return ""


class SlidingWindow(FullAttention):
    """A query sees itself and the ``window - 1`` tokens before it; older tokens are evicted first."""

    def __init__(self, window: int):
        self.window = window

    def cap(self, target: int | None, decoding: bool) -> int | None:
        cap = self.window if decoding else self.window - 1  # a decoding query sees itself and the window before it
        return cap if target is None else min(target, cap)

    def live(self, positions: torch.Tensor, reading) -> torch.Tensor:
        return positions.masked_fill(positions <= reading - self.window, -1)

    def mask(self, kpos: torch.Tensor, qpos: torch.Tensor, query: torch.Tensor, impl: str) -> torch.Tensor:
        per_head = kpos.shape[-1] > qpos.shape[-1]  # heads that hold old tokens keep different ones
        return positions_mask(kpos if per_head else kpos[:, :1], qpos, self.window, query, impl)

    def check_outside_context(self, layer_idx: int, kpos: torch.Tensor, q: int, first: int) -> None:
        if kpos.shape[-1] > q and (q > 1 or bool(((kpos < 0) | (kpos <= first - self.window)).any())):
            raise ValueError(
                f"layer {layer_idx} is a compressed sliding-window layer whose kept tokens are not all inside the "
                "window of the new tokens, which transformers' masks cannot express. Run it inside "
                "`with press(model, p):` (masks from true positions), or give the press a budget below the window."
            )

    def __repr__(self) -> str:
        return f", window={self.window}"


_FULL = FullAttention()


def attention_span(window: int | None) -> FullAttention:
    """The span of a layer with this sliding ``window`` (``None``: full attention)."""
    return _FULL if window is None else SlidingWindow(window)
