"""K-norm: keys with a small L2 norm tend to receive more attention (Devoto et al., 2024)."""

from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Keep the keys with the lowest L2 norm."""

    name = "knorm"

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
