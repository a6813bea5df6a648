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
        self._freq = None
        cos, sin = self._module_cos_sin(torch.ones(1, dtype=torch.long, device=self._device()))
        self.rotary_dim = int(cos.shape[-1])
        freq = self._static_frequencies(torch.atan2(sin, cos)[0])
        if freq is not None:  # pass-through dims: frequency 0, so cos = 1 and sin = 0
            self._freq = torch.cat((freq, freq.new_zeros(head_dim - self.rotary_dim)))

    def _device(self) -> torch.device:
        buffers = list(self.module.buffers())
        return buffers[0].device if buffers else torch.device("cpu")

    def _static_frequencies(self, probe: torch.Tensor) -> torch.Tensor | None:
        """Per-dim angular frequencies when the angle is ``position * frequency`` at every position (the rope
        types whose frequencies do not change with the sequence length); ``None`` otherwise.

        Found from the module's own output at position 1, snapped to its ``inv_freq`` buffer when it has one,
        and checked at a far position, so scoring needs no module call (a few tensor ops instead).
        """
        rope_type = getattr(self.module, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(self.layer_type, "default")
        if "dynamic" in str(rope_type) or "longrope" in str(rope_type):
            return None
        name = f"{self.layer_type}_inv_freq" if self.layer_type else "inv_freq"
        inv = getattr(self.module, name, None)
        freq = probe
        if isinstance(inv, torch.Tensor) and inv.numel():
            nearest = (inv.float()[None, :] - probe[:, None]).abs().argmin(dim=1)
            if (inv.float()[nearest] - probe).abs().max() < 1e-5:
                freq = inv.float()[nearest]
        far = torch.tensor([4099], device=probe.device)
        cos, sin = self._module_cos_sin(far)
        ok = torch.allclose(cos[0], torch.cos(far * freq), atol=1e-3) and torch.allclose(sin[0], torch.sin(far * freq), atol=1e-3)
        return freq if ok else None

    @property
    def frequencies(self) -> torch.Tensor | None:
        """Per-dim angular frequencies ``(head_dim,)`` when the angle is ``position * frequency`` (0 on
        pass-through dims); ``None`` for rope types whose angles depend on the sequence length."""
        return self._freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (head_dim,)``, float32, on ``positions``' device;
        pass-through dims (partial rotary) have cos 1 and sin 0."""
        if self._freq is not None:
            angles = positions[..., None].float() * self._freq.to(positions.device)
            return angles.cos(), angles.sin()
        cos, sin = self._module_cos_sin(positions)
        pad = self.head_dim - self.rotary_dim
        if pad:
            cos = torch.cat((cos, cos.new_ones(*cos.shape[:-1], pad)), dim=-1)
            sin = torch.cat((sin, sin.new_zeros(*sin.shape[:-1], pad)), dim=-1)
        return cos, sin

    def _module_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = positions.reshape(1, -1).long()
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        extra = () if self.layer_type is None else (self.layer_type,)
        cos, sin = self.module(probe, flat, *extra)
        cos, sin = cos.float(), sin.float()
        norm = (cos.square() + sin.square()).sqrt().clamp_min(1e-12)  # rope attention_scaling, per element
        shape = (*positions.shape, cos.shape[-1])
        return (cos / norm).reshape(shape), (sin / norm).reshape(shape)

    def quarter_turn(self, x: torch.Tensor) -> torch.Tensor:
        """``J x``, the rotation's generator: ``R(p) x = cos * x + sin * J x`` (zero on pass-through dims)."""
        r = self.rotary_dim
        turned = self.rotate_half(x[..., :r])
        return turned if r == x.shape[-1] else torch.cat((turned, torch.zeros_like(x[..., r:])), dim=-1)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``R(p) x`` (``cos``/``sin`` from :meth:`cos_sin`, broadcast against ``x``)."""
        return x * cos + self.quarter_turn(x) * sin

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``R(p)^T x``: the pre-RoPE vector of a post-RoPE one at position ``p``."""
        return x * cos - self.quarter_turn(x) * sin


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
