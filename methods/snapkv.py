"""SnapKV (Li et al., 2024): keys that the last prompt queries attend to are the ones worth keeping."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvpress_like.base import ScorerPress, Scoring


@dataclass
class SnapKVPress(ScorerPress):
    """Score keys by the attention of the last ``window_size`` queries, pooled over neighbours.

    As published (SnapKV's code and kvpress): each head's causal softmax over all keys, averaged over the
    window's queries, then average-pooled (``kernel_size``, stride 1) over the keys *before* the window
    only, zero padding counted in each average; query heads are then averaged per KV head. The window's
    own keys are always kept. Only the window's attention is computed here (``window_size x tokens`` per
    head), so the model can keep running sdpa or flash attention, which never materialize attention
    weights. Scores need queries, so pruning happens right after a multi-token attention call; SnapKV has
    no query window while decoding one token at a time, so it offers no decoding budget.
    """

    name = "snapkv"
    scoring = Scoring.QUERY
    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoding or self.max_cache_tokens is not None:
            raise ValueError(
                "SnapKVPress scores keys with a window of prompt queries and cannot prune while decoding "
                "(decoding=True / max_cache_tokens). Use QFilterPress, KnormPress or StreamingLLMPress for a "
                "decoding budget."
            )
        for field in ("window_size", "kernel_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SnapKVPress({field}=...) must be an int, got {value!r} ({type(value).__name__}).")
        if self.window_size < 1:
            raise ValueError(f"SnapKVPress(window_size=...) must be >= 1 (queries in the window), got {self.window_size}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SnapKVPress(kernel_size=...) must be a positive odd number, got {self.kernel_size}.")

    def protected(self, positions: torch.Tensor, seen: int) -> torch.Tensor:
        return super().protected(positions, seen) | (positions >= seen - self.window_size)

    def n_protected(self, seen: int) -> int:
        sinks = min(self.n_sink, seen)
        return sinks + min(max(self.window, self.window_size), seen - sinks)

    def query_scores(
        self, module: nn.Module, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, seen: int
    ) -> torch.Tensor:
        b, hq, q, d = queries.shape
        hkv, n = keys.shape[1], keys.shape[2]
        w = min(self.window_size, q)
        win = queries[:, :, -w:].float().view(b, hkv, hq // hkv, w, d)
        scaling = getattr(module, "scaling", d**-0.5)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", win, keys.float()) * scaling
        query_pos = torch.arange(seen - w, seen, device=keys.device)
        future = positions[:, :, None, None, :] > query_pos[None, None, None, :, None]
        weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1).mean(dim=3)  # (b, hkv, g, n)
        # Pool over the prefix only: the window's keys (stored last) count as the zero padding that
        # pooling the prefix alone would add at its end; the divisor is always kernel_size.
        in_window = (positions >= seen - w)[:, :, None, :]
        pooled = F.avg_pool1d(
            weights.masked_fill(in_window, 0.0).reshape(-1, 1, n), self.kernel_size, stride=1,
            padding=self.kernel_size // 2, count_include_pad=True,
        )
        return pooled.view(b, hkv, -1, n).mean(dim=2)  # window keys' scores do not matter: they are protected
