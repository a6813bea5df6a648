"""The contract between kvpress_like's attention function and the cache layers it serves.

The attention function (``integrations/transformers.py``) runs after a layer's ``update()`` in every call
of a patched attention module. It asks that call's layer four things, declared by :class:`ServedLayer`:
which mask to use (transformers' or the layer's own, built from true positions), the layer's own mask, the
layer's own attention kernel (``None``: the model's), and what to do with the post-RoPE queries afterwards.
Every layer the function can meet implements it: pressed layers (:mod:`~kvpress_like.cache`,
:mod:`~kvpress_like.headwise`, :mod:`~kvpress_like.static`, through :class:`ServedLayerDefaults`) and an
adapter for transformers' own layers in the integration. A second engine integration serves the same
layers through the same four methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ServedLayer", "ServedLayerDefaults"]

#: what an attention kernel returns: the output ``(batch, q, heads, head_dim)`` and attention weights (or None)
AttentionOutput = tuple[torch.Tensor, torch.Tensor | None]


@runtime_checkable
class ServedLayer(Protocol):
    """A cache layer as the attention function sees it, for the call whose ``update()`` just ran."""

    def wants_own_mask(self, attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
        """Whether transformers' mask (``attention_mask``, built for another layer's length) cannot describe
        what this call's keys may see, so :meth:`attention_mask` must be used."""

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        """This call's mask from true positions, for ``impl`` (``"eager"``: additive, else boolean)."""

    def own_attention(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ) -> AttentionOutput | None:
        """This call's attention computed by the layer, or ``None`` to let the model's kernel run."""

    def after_attention(self, module: nn.Module, query: torch.Tensor) -> None:
        """Receive the call's post-RoPE queries (presses that prune with them, e.g. SnapKV)."""


class ServedLayerDefaults:
    """:class:`ServedLayer` for a layer transformers' masks describe: their mask, the model's kernel, nothing
    done with the queries. Layers whose kernel covers decoding steps only override :meth:`decode_attention`."""

    def wants_own_mask(self, attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
        return False

    def attention_mask(self, query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} uses transformers' masks (wants_own_mask is False).")

    def own_attention(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ) -> AttentionOutput | None:
        return self.decode_attention(module, query, key, value, **kwargs) if query.shape[-2] == 1 else None

    def decode_attention(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ) -> AttentionOutput | None:
        """Single-query attention computed by the layer, or ``None`` (the default) for the model's kernel."""
        return None

    def after_attention(self, module: nn.Module, query: torch.Tensor) -> None:
        return None
