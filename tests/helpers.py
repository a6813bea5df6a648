"""Test helpers: the pruning-equals-masking reference.

The reference runs the *uncompressed* model with a full cache and an eager attention that masks, per
layer, batch row and KV head, exactly the keys a pressed run had evicted before that call. Positions are
the true ones (the full cache never loses a token), so agreement checks both eviction and RoPE.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_utils import AttentionInterface

from kvpress_like import PressedLayer, press
from kvpress_like.integrations.transformers import cache_kwargs

REFERENCE = "kvpress_like_test_reference"


class MaskedReference:
    """Eager attention over a full cache, hiding the keys listed as evicted for the current call."""

    def __init__(self):
        self.kept: dict[int, torch.Tensor] | None = None  # layer -> kept positions (b, h_kv, n) before the call
        AttentionInterface.register(REFERENCE, self.attention)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hq, q, d = query.shape
        hkv, total = key.shape[1], key.shape[2]
        qpos = torch.arange(total - q, total)
        kpos = torch.arange(total)
        allowed = (kpos[None, :] <= qpos[:, None])[None, None].expand(b, hkv, q, total).clone()
        window = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
        if window is not None:
            allowed &= kpos[None, None, None, :] > qpos[None, None, :, None] - window
        kept = None if self.kept is None else self.kept.get(module.layer_idx)
        if kept is not None:
            old = total - q
            present = torch.zeros(b, hkv, total + 1, dtype=torch.bool)  # last column: empty slots (-1)
            present[..., old:] = True
            present.scatter_(-1, kept.masked_fill(kept < 0, total), True)
            allowed &= present[:, :, None, :total]
        groups = hq // hkv
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        logits = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
        softcap = getattr(module, "attn_logit_softcapping", None) or kwargs.get("softcap")
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~allowed.repeat_interleave(groups, dim=1), float("-inf"))
        out = logits.softmax(-1) @ v
        return out.transpose(1, 2).contiguous(), None


def kept_positions(cache) -> dict[int, torch.Tensor]:
    return {i: layer.positions.clone() for i, layer in enumerate(cache.layers) if isinstance(layer, PressedLayer)}


def pressed_and_reference(model, reference_model, p, calls):
    """Run ``calls`` (a list of input-id tensors) through both models; return per-call last logits.

    ``model`` runs under ``press(model, p)``; ``reference_model`` (same weights) runs with the masked
    reference attention, told before each call which positions the pressed cache held.
    """
    ref = MaskedReference()
    reference_model.config._attn_implementation = REFERENCE
    pressed, expected = [], []
    # The reference keeps every token (no sliding-window layers): it masks windows itself, by true position.
    cache, ref_cache = DynamicCache(config=model.config), DynamicCache()
    with torch.no_grad(), press(model, p):
        for ids in calls:
            before = kept_positions(cache) if cache.get_seq_length() else {}
            pressed.append(model(ids, **cache_kwargs(cache)).logits[:, -ids.shape[1] :])
            after = kept_positions(cache)
            # A decoding step into a full budget evicts *before* attention (the slot is overwritten):
            # then attention saw what is kept after the call; otherwise what was kept before it.
            ref.kept = {
                i: after[i] if ids.shape[1] == 1 and i in before and after[i].shape == before[i].shape else before.get(i)
                for i in after
            }
            expected.append(reference_model(ids, **cache_kwargs(ref_cache)).logits[:, -ids.shape[1] :])
    return pressed, expected, cache
