"""StreamingLLM (Xiao et al., 2023): attention sinks plus the most recent tokens."""

from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens and the most recent ones; the score of a key is its position."""

    name = "streaming_llm"
    n_sink: int = 4

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        return positions.float()
