"""Press interfaces: what a KV-cache compression method must decide, and the scorer-based selection.

A *press* decides, per attention layer and KV head, which key/value pairs stay in the cache. The cache
layer (:mod:`kvpress_like.cache`) owns the tensors and asks its press three questions: how many tokens to
keep (:meth:`Press.target_size`), how to score keys, and which ones to keep (:meth:`Press.select`).

Sizes and rounding (documented once, here):

* ``ratio`` is the fraction of KV pairs removed from each compressed layer and KV head. After a prefill of
  ``n`` tokens a layer keeps ``n - floor(ratio * n)`` tokens, so a press never removes more than asked and
  ``ratio=0`` keeps everything.
* ``max_cache_tokens`` is a hard budget per layer and KV head, enforced after every forward call (prefill
  chunks and decoding steps alike).
* ``n_sink`` first tokens and the ``window`` most recent tokens are never evicted. When a ratio's target
  is smaller than those protected tokens, the protected tokens are kept and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

__all__ = ["Press", "ScorerPress"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Press(ABC):
    """Abstract compression policy shared by every method.

    The core reads exactly what is declared here, nothing else: the class flags, the four settings
    below (plain attributes with their defaults; :class:`ScorerPress` makes them dataclass fields) and
    the methods. :meth:`validate` is the one place that checks them; the core calls it on entry.
    """

    #: Registry name (set by subclasses; used by :func:`kvpress_like.get_press`).
    name: ClassVar[str] = ""
    #: True when scores need only the cached keys/values and positions (no queries): eviction can then
    #: happen inside the cache, during prefill and decoding alike.
    query_free: ClassVar[bool] = True
    #: True when a key's score depends on the *reading position* (where the next query sits): the cache then
    #: re-scores its live slots whenever it must evict, instead of reusing the score a key got on entry.
    position_dependent: ClassVar[bool] = False

    #: Full-attention layers left uncompressed.
    skip_layers: tuple[int, ...] = ()
    #: Hard budget per layer and KV head, enforced after every forward call (``None``: no budget).
    max_cache_tokens: int | None = None
    #: Whether :meth:`target_size` also applies while decoding one token at a time.
    decoding: bool = False
    #: ``generate()`` prefills long prompts in chunks of this many tokens (``None``: in one call).
    prefill_chunk_size: int | None = None
    #: Position-dependent presses: re-score the live slots at most every this many decoding steps (1: at every
    #: eviction, exact). In between, evictions use the last re-scoring's scores and keys that entered since are
    #: kept; this divides the re-scoring cost of decoding by up to ``rescore_every``. Dynamic cache only.
    rescore_every: int = 1

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ``ValueError``/``TypeError`` for settings the core cannot honour (and for layer indices
        outside a ``num_layers``-layer model, once the model is known)."""
        skip = self.skip_layers
        if isinstance(skip, (int, str, bytes)) or not hasattr(skip, "__iter__"):
            raise TypeError(f"skip_layers must be a list or tuple of layer indices, got {skip!r}; e.g. skip_layers=(0, 1).")
        for idx in skip:
            if not _is_int(idx):
                raise TypeError(f"skip_layers must hold integer layer indices, got {idx!r} in {tuple(skip)!r}.")
            if idx < 0 or (num_layers is not None and idx >= num_layers):
                where = f"0..{num_layers - 1}" if num_layers is not None else "non-negative"
                raise ValueError(f"skip_layers={tuple(skip)!r}: layer {idx} does not exist (layer indices are {where}).")
        if not isinstance(self.decoding, bool):
            raise TypeError(f"decoding must be True or False, got {self.decoding!r}.")
        budget = self.max_cache_tokens
        if budget is not None and (not _is_int(budget) or budget < 1):
            raise ValueError(f"max_cache_tokens must be a positive integer or None, got {budget!r}.")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not _is_int(chunk) or chunk < 1):
            raise ValueError(f"prefill_chunk_size must be a positive integer or None, got {chunk!r}.")
        every = self.rescore_every
        if not _is_int(every) or every < 1:
            raise ValueError(f"rescore_every must be a positive integer, got {every!r}.")
        if every > 1 and not self.position_dependent:
            raise ValueError(
                f"rescore_every={every}: {type(self).__name__}'s scores do not depend on the reading position, so "
                "keys are scored once on entry and never re-scored; leave rescore_every=1."
            )

    def prepare(self, model) -> None:
        """Called by :func:`kvpress_like.press` on entry: check the model fits (raise ``ValueError``), load
        per-model data such as Q-Filters."""

    def attach(self, model) -> AbstractContextManager:
        """Entered by :func:`kvpress_like.press` after :meth:`prepare`, exited with it: for presses that act
        around whole model calls (KVzip's reconstruction pass after each prefill). The default does nothing."""
        return nullcontext()

    def compresses_layer(self, layer_idx: int) -> bool:
        """Whether the full-attention layer ``layer_idx`` is compressed at all."""
        return layer_idx not in self.skip_layers

    @abstractmethod
    def target_size(self, seen: int, decoding: bool) -> int | None:
        """How many tokens a layer that has seen ``seen`` tokens may keep; ``None`` for no limit."""

    def score(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        reading_position: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of cached entries; higher is kept (``query_free`` presses).

        ``keys``/``values`` are ``(batch, kv_heads, n, head_dim)`` as stored (post-RoPE), ``positions`` their
        true positions (``-1`` marks an empty or padding slot, whose score is ignored) and
        ``reading_position`` a ``(batch, 1, 1)`` long tensor: the position of the next query that will
        read these keys. The default calls :meth:`key_scores`, the original one-argument-less API.
        """
        return self.key_scores(layer_idx, keys, positions)

    def key_scores(self, layer_idx: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of new keys (the original scorer API; see :meth:`score`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor key_scores()")

    def query_scores(
        self,
        module: nn.Module,
        queries: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        seen: int,
    ) -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of cached keys given the latest queries (query-dependent presses)."""
        raise NotImplementedError

    @abstractmethod
    def select(self, scores: torch.Tensor, positions: torch.Tensor, seen, n_keep: int) -> torch.Tensor:
        """Indices ``(batch, kv_heads, n_keep)`` into the cached tokens to keep, in position order.

        ``seen`` is the reading position (an int, or a ``(batch, 1, 1)`` tensor when rows differ). Empty
        slots (``positions < 0``) come with ``-inf`` scores and must not be protected."""

    @abstractmethod
    def victims(self, scores: torch.Tensor, positions: torch.Tensor, seen) -> torch.Tensor:
        """Index ``(batch, kv_heads)`` of the slot to evict when one decoded token enters a full cache."""


@dataclass
class ScorerPress(Press):
    """A press that keeps the highest-scoring keys, with protected sinks and recent window.

    Args:
        ratio: fraction of KV pairs removed per layer and KV head, in ``[0, 1)``.
        n_sink: number of first tokens never evicted (attention sinks).
        window: number of most recent tokens never evicted.
        skip_layers: indices of full-attention layers left uncompressed (the Q-Filters paper leaves the
            first two layers alone in its needle test).
        max_cache_tokens: hard budget per layer and KV head, enforced during prefill and decoding.
        decoding: also apply ``ratio`` while decoding, keeping the cache near ``(1 - ratio) x tokens seen``.
        prefill_chunk_size: under :func:`kvpress_like.press`, ``generate()`` prefills long prompts in chunks of
            this many tokens, so peak KV memory stays near ``max_cache_tokens + prefill_chunk_size``.
        rescore_every: position-dependent presses re-score live slots at most every this many decoding steps
            (1: exact at every eviction; dynamic cache only).
    """

    ratio: float = 0.0
    n_sink: int = 0
    window: int = 0
    skip_layers: tuple[int, ...] = field(default_factory=tuple)
    max_cache_tokens: int | None = None
    decoding: bool = False
    prefill_chunk_size: int | None = None
    rescore_every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(
                f"ratio must be a number in [0, 1) (the fraction of KV pairs removed), got {self.ratio!r}; "
                "for example ratio=0.875 keeps one token in eight."
            )
        for name in ("n_sink", "window"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        budget = self.max_cache_tokens
        if budget is not None and (not _is_int(budget) or budget <= self.n_sink + self.window):
            raise ValueError(
                f"max_cache_tokens={budget!r} must be an integer larger than n_sink + window "
                f"= {self.n_sink} + {self.window}: the protected tokens alone would fill the cache. "
                "Raise the budget or shrink the window."
            )
        self.validate()
        self.skip_layers = tuple(self.skip_layers)

    # -- sizes ---------------------------------------------------------------------------------------
    def target_size(self, seen: int, decoding: bool) -> int | None:
        target = None
        if self.ratio > 0 and (not decoding or self.decoding):
            target = seen - math.floor(seen * self.ratio + 1e-9)
        if self.max_cache_tokens is not None:
            target = self.max_cache_tokens if target is None else min(target, self.max_cache_tokens)
        return target

    def n_protected(self, seen: int) -> int:
        """Number of tokens the sinks and the window protect once ``seen`` tokens went through a layer."""
        sinks = min(self.n_sink, seen)
        return sinks + min(self.window, seen - sinks)

    # -- selection -----------------------------------------------------------------------------------
    def protected(self, positions: torch.Tensor, seen) -> torch.Tensor:
        """Boolean mask of sink and recent-window tokens, by true position (empty slots are never protected)."""
        return ((positions < self.n_sink) | (positions >= seen - self.window)) & (positions >= 0)

    def select(self, scores: torch.Tensor, positions: torch.Tensor, seen, n_keep: int) -> torch.Tensor:
        n_protected = self.n_protected(seen if isinstance(seen, int) else int(seen.min()))
        if n_keep < n_protected:
            warnings.warn(
                f"{type(self).__name__}: the target of {n_keep} tokens is below the {n_protected} protected "
                f"sink/window tokens; keeping the protected tokens only.",
                stacklevel=3,
            )
            n_keep = n_protected
        n_keep = min(n_keep, scores.shape[-1])
        masked = scores.float().masked_fill(self.protected(positions, seen), float("inf"))
        kept = masked.topk(n_keep, dim=-1, sorted=False).indices
        kept_pos = positions.gather(-1, kept)
        order = kept_pos.masked_fill(kept_pos < 0, torch.iinfo(kept_pos.dtype).max).argsort(dim=-1)
        return kept.gather(-1, order)

    def victims(self, scores: torch.Tensor, positions: torch.Tensor, seen) -> torch.Tensor:
        scores = scores.float()
        if type(self).protected is ScorerPress.protected and not self.n_sink and not self.window:
            return scores.argmin(dim=-1)  # nothing protected: skip the mask (a decoding step's hot path)
        return scores.masked_fill(self.protected(positions, seen), float("inf")).argmin(dim=-1)
