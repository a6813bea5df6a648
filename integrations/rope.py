"""The model's own rotary position embedding, as a rotation ``R(p)`` that can be applied at any position.

Position-aware query-free presses need two things transformers does inside attention: un-rotating the
post-RoPE queries seen at calibration (pre-RoPE statistics), and rotating a calibrated direction to the
position of the queries that will read the cache (or, equivalently and cheaper, un-rotating the keys by
that position). Both use the model's rotary module (``model.model.rotary_emb(x, position_ids)``), so rope
scaling (Llama-3, YaRN, dynamic NTK), Gemma's per-layer-type rotary and partial rotary (only the first
``cos.shape[-1]`` dims rotate, GPT-NeoX/Phi) come from the model itself, and the modeling module's own
``rotate_half`` fixes the pair layout (halves or interleaved). The rotation is normalized (rope
``attention_scaling`` removed) so that it is orthogonal: ``unrotate(rotate(x, p), p) == x``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Rotary", "rotary"]


def _half_split(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """``R(p)`` for one attention layer: the rotary module's cos/sin at positions ``p``, normalized."""

    def __init__(self, module: nn.Module, head_dim: int, layer_type: str | None, rotate_half: Callable):
        self.module = module
        self.head_dim = head_dim
        self.layer_type = layer_type
        self.rotate_half = rotate_half
        self.rotary_dim = int(self.cos_sin(torch.zeros(1, 1, dtype=torch.long))[0].shape[-1])

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (rotary_dim,)``, float32, on ``positions``' device."""
        flat = positions.reshape(1, -1).long()
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        extra = () if self.layer_type is None else (self.layer_type,)
        cos, sin = self.module(probe, flat, *extra)
        cos, sin = cos.float(), sin.float()
        norm = (cos.square() + sin.square()).sqrt().clamp_min(1e-12)  # rope attention_scaling, per element
        shape = (*positions.shape, cos.shape[-1])
        return (cos / norm).reshape(shape), (sin / norm).reshape(shape)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``R(p) x`` on the rotary dims (``cos``/``sin`` broadcast against ``x[..., :rotary_dim]``)."""
        return self._apply(x, cos, sin)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``R(p)^T x``: the pre-RoPE vector of a post-RoPE one at position ``p``."""
        return self._apply(x, cos, -sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        rot = x[..., :r] * cos + self.rotate_half(x[..., :r]) * sin
        return rot if r == x.shape[-1] else torch.cat((rot, x[..., r:]), dim=-1)


def rotary(model: nn.Module, layer_idx: int, head_dim: int) -> Rotary | None:
    """The rotation layer ``layer_idx`` applies to queries and keys; ``None`` for a model without RoPE.

    The rotary module is the decoder's ``rotary_emb`` (``model.base_model``); Gemma-style modules taking a
    ``layer_type`` get the layer's type from the config's ``layer_types``.
    """
    base = getattr(model, "base_model", model)
    module = getattr(base, "rotary_emb", None)
    if module is None:
        return None
    layer_type = None
    if "layer_type" in inspect.signature(module.forward).parameters:
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        layer_type = layer_types[layer_idx] if layer_types else "full_attention"
    modeling = sys.modules.get(type(module).__module__)
    rotate_half = getattr(modeling, "rotate_half", None) or _half_split
    return Rotary(module, head_dim, layer_type, rotate_half)
