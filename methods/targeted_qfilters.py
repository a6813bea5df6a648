"""Position-targeted Q-Filters: the queries' pre-RoPE dominant direction, rotated to the reading position.

Q-Filters projects keys on the dominant direction of *post-RoPE* calibration queries, which mixes the
rotations of every calibration position and so fits contexts as long as the calibration windows. Here
the direction ``u`` is computed on pre-RoPE queries (per query head, signed so queries project
positively, averaged over each GQA group) and the score of a key read at position ``p`` is
``<R(p) u, k> = <u, R(p)^T k>``: keys aligned with the queries that will read them are kept (the same
sign as Q-Filters' ``-<k, f>`` with ``f = -u``). Scores depend on the reading position, so the cache
re-scores live slots when it evicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrated import CalibratedPress

__all__ = ["TargetedQFilterPress"]


@dataclass
class TargetedQFilterPress(CalibratedPress):
    """Keep the keys with the largest ``<R(p) u, k>``, ``u`` the pre-RoPE queries' direction of the KV head."""

    name = "qfilters_targeted"

    def build(self, layer: dict[str, torch.Tensor], num_kv_heads: int, scaling: float) -> tuple[torch.Tensor, ...]:
        direction = layer["direction"]  # (hq, d)
        return (direction.view(num_kv_heads, -1, direction.shape[-1]).mean(dim=1),)

    def score(self, layer_idx, keys, values, positions, reading_position) -> torch.Tensor:
        (u,) = self.layer_tensors(layer_idx, reading_position)  # (b, kv_heads, d), at the reader
        return torch.einsum("bhnd,bhd->bhn", keys.float(), u)
