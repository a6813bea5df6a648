"""K-norm: keys with a small L2 norm tend to receive more attention (Devoto et al., 2024)."""

from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Keep the keys with the lowest L2 norm."""

    name = "knorm"

    def key_scores(self, layer_idx: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
