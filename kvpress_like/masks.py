"""Attention masks from true positions: what a compressed cache needs instead of transformers' own masks.

Under a press, layers hold different numbers of keys, slots out of position order, empty slots and padding,
so the mask transformers builds for one layer type may not describe another layer's keys. These functions
make the right mask from what the cache knows: the true position of every key.
"""

from __future__ import annotations

import torch

__all__ = ["align_mask", "positions_mask"]


def align_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor | None:
    """Fit a causal mask built for another layer's cache length to this layer's keys.

    Under a press, layers hold different numbers of keys, but transformers builds one mask per layer type.
    Without padding (which press() rejects), every cached key precedes the new queries and the new tokens'
    keys come last, so the right mask is: all cached keys visible, and the original mask's last ``q``
    columns for the new keys. sdpa's ``is_causal`` aligns top-left, so a causal mask is materialized
    whenever there are more keys than queries.
    """
    q, kv = query.shape[-2], key.shape[-2]
    if impl.startswith("flash") or (mask is None and (q == 1 or q == kv)):
        return mask
    if mask is not None and mask.shape[-1] == kv:
        return mask
    boolean = impl == "sdpa" if mask is None else mask.dtype == torch.bool
    if mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
        if not boolean:
            new = torch.zeros(new.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~new, torch.finfo(query.dtype).min
            )
    else:
        new = mask[..., -q:]
    visible = torch.ones if boolean else torch.zeros
    old = visible(*new.shape[:-1], kv - q, dtype=new.dtype, device=new.device)
    return torch.cat([old, new], dim=-1)


def positions_mask(kpos: torch.Tensor, qpos: torch.Tensor, window: int | None, query: torch.Tensor, impl: str):
    """Attention mask from true positions: ``kpos`` ``(batch, 1 or kv_heads, kv)``, ``qpos`` ``(batch, q)``.

    A key is visible iff it is real (position >= 0), not after the query and, with a window, inside it.
    Padding queries see every key (their outputs are never used; a fully masked row would give NaN).
    Returns sdpa's boolean mask or eager's additive one, expanded to the query heads where it is per head.
    """
    kp, qp = kpos[:, :, None, :], qpos[:, None, :, None]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= kp > qp - window
    visible |= ~visible.any(-1, keepdim=True)
    if visible.shape[1] > 1:
        visible = visible.repeat_interleave(query.shape[1] // visible.shape[1], dim=1)
    if impl == "eager":
        return torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~visible, torch.finfo(query.dtype).min
        )
    return visible
