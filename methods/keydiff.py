"""KeyDiff (Park et al., 2025, arXiv 2504.15364): keep the keys least like the others.

A key's score is minus its cosine similarity to the *anchor* of its (batch row, KV head): the mean of the
unit-normalized keys. Keys pointing where most keys point carry little that the others do not, so they go
first. No queries, no calibration.

"The others" are the keys a layer holds when it evicts: the live slots plus the call's new tokens (empty,
padding and out-of-window slots excluded). As the cache changes, so does the anchor, so the press scores
at the reading position (``Scoring.READING_POSITION``): the cache re-scores its live slots at each eviction
instead of reusing entry-time scores. That is the paper's rule (the anchor of the current cache and incoming block) and costs one
normalization and one dot product per live key and layer, about ``3 x slots x head_dim`` flops per step,
a fraction of the step's own attention; ``rescore_every=K`` divides it further.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_like.base import ScorerPress, Scoring

__all__ = ["KeyDiffPress"]


@dataclass
class KeyDiffPress(ScorerPress):
    """Keep the keys with the lowest cosine similarity to the mean normalized key of their head."""

    name = "keydiff"
    scoring = Scoring.READING_POSITION

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        anchor = torch.einsum("bhn,bhnd->bhd", (positions >= 0).to(unit.dtype), unit)  # the mean, up to its length
        return -torch.einsum("bhnd,bhd->bhn", unit, torch.nn.functional.normalize(anchor, dim=-1))
