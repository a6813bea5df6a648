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
from enum import Enum
from typing import ClassVar

import torch
from torch import nn

__all__ = ["EnginePolicy", "Press", "PressSettings", "ScorerPress", "Scoring"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Scoring(Enum):
    """When a press scores keys, which decides where and how often the cache engine asks it (one per press)."""

    #: :meth:`Press.score` once, when keys enter the cache; the engine stores the score and evicts by it.
    ENTRY_TIME = "entry_time"
    #: :meth:`Press.score` again at the reading position (where the next query reads) before each eviction, at
    #: most every ``rescore_every`` decoding steps; nothing is scored on entry.
    READING_POSITION = "reading_position"
    #: :meth:`Press.query_scores` right after a multi-token attention call, with its queries (SnapKV): pruning
    #: then happens after attention, never inside the cache.
    QUERY = "query"

    def __init__(self, value: str) -> None:
        #: Scored with queries, after attention (``QUERY``): nothing is evicted inside the cache.
        self.needs_queries = value == "query"
        #: Re-scored at the reading position before evicting (``READING_POSITION``).
        self.rescores = value == "reading_position"


@dataclass(frozen=True)
class EnginePolicy:
    """What the cache engine and ``generate()`` read of a press: :attr:`Press.policy`, taken once where a cache
    layer or a ``press()`` context is made (settings were validated there), instead of press fields read
    everywhere."""

    scoring: Scoring
    #: Hard budget per layer and KV head (``max_cache_tokens``); ``None``: no budget.
    capacity: int | None
    #: ``generate()`` / front-ends prefill in chunks of this many tokens (``prefill_chunk_size``); ``None``: one call.
    prefill_chunk: int | None
    #: Reading-position presses: re-score live slots at most every this many decoding steps.
    rescore_every: int
    #: Whether the ratio's target also applies while decoding.
    decoding: bool
    #: Whether slots keep a score: the one they got on entry, or (re-scoring every K > 1 steps) the last
    #: re-scoring's. Presses re-scored at every eviction would waste a scoring call on entry. Derived, and
    #: stored because a decoding step reads it per layer.
    stores_scores: bool = field(init=False)

    def __post_init__(self) -> None:
        mode = self.scoring
        stores = mode is Scoring.ENTRY_TIME or (mode is Scoring.READING_POSITION and self.rescore_every > 1)
        object.__setattr__(self, "stores_scores", stores)

    @property
    def prunes_while_decoding(self) -> bool:
        """Whether one-token calls can evict (a budget, or ``decoding=True``)."""
        return self.capacity is not None or self.decoding


def _score_with_key_scores(self, layer_idx, keys, values, positions, reading_position):
    """:meth:`Press.score` of a press that implements the older ``key_scores(layer_idx, keys, positions)``."""
    return self.key_scores(layer_idx, keys, positions)


class _LegacyFlag:
    """Read-only ``query_free`` / ``position_dependent`` for code written against the two booleans that
    :class:`Scoring` replaced (the project reads ``scoring``)."""

    def __init__(self, test):
        self.test = test

    def __get__(self, obj, owner) -> bool:
        return self.test((owner if obj is None else obj).scoring)


@dataclass(kw_only=True, eq=False, repr=False, init=False)
class PressSettings:
    """The settings the engine reads of every press, declared once: class defaults for presses that are not
    dataclasses, keyword-only constructor fields of dataclass presses (:class:`ScorerPress` and its
    subclasses: ``QFilterPress(ratio=0.5, max_cache_tokens=512)``). The engine reads them through
    :attr:`Press.policy`; :meth:`Press.validate` checks them."""

    #: Full-attention layers left uncompressed (the Q-Filters paper leaves the first two alone in its needle test).
    skip_layers: tuple[int, ...] = ()
    #: Hard budget per layer and KV head, enforced after every forward call (``None``: no budget).
    max_cache_tokens: int | None = None
    #: Whether :meth:`Press.target_size` also applies while decoding one token at a time (a ratio then keeps the
    #: cache near ``(1 - ratio) x tokens seen``).
    decoding: bool = False
    #: Under :func:`kvpress_like.press`, ``generate()`` prefills long prompts in chunks of this many tokens
    #: (``None``: in one call), so peak KV memory stays near ``max_cache_tokens + prefill_chunk_size``.
    prefill_chunk_size: int | None = None
    #: Reading-position presses: re-score the live slots at most every this many decoding steps (1: at every
    #: eviction, exact). In between, evictions use the last re-scoring's scores and keys that entered since are
    #: kept; this divides the re-scoring cost of decoding by up to ``rescore_every``. Dynamic cache only.
    rescore_every: int = 1


class Press(PressSettings, ABC):
    """Abstract compression policy shared by every method.

    The core reads exactly what is declared here, nothing else: the scoring mode :attr:`scoring`, the
    settings of :class:`PressSettings` (as :attr:`policy`) and the methods. :meth:`validate` is the one place
    that checks them; the core calls it on entry.

    Presses written for the older contract keep working through :meth:`__init_subclass__`, the one adapter:
    class attributes ``query_free = False`` / ``position_dependent = True`` become :attr:`scoring`, and a
    ``key_scores(layer_idx, keys, positions)`` method becomes :meth:`score`.
    """

    #: Registry name (set by subclasses; used by :func:`kvpress_like.get_press`).
    name: ClassVar[str] = ""
    #: When keys are scored (see :class:`Scoring`); set it as a class attribute, e.g. ``scoring = Scoring.QUERY``.
    scoring: ClassVar[Scoring] = Scoring.ENTRY_TIME
    #: Whether the press scores a whole multi-token call after it, every layer at once (KVzip's reconstruction),
    #: rather than each layer as its keys arrive: what a budget shared across layers needs.
    scores_after_call: ClassVar[bool] = False

    query_free = _LegacyFlag(lambda scoring: not scoring.needs_queries)
    position_dependent = _LegacyFlag(lambda scoring: scoring.rescores)

    def __init_subclass__(cls, **kwargs) -> None:
        """The one adapter for the older contract (see the class docstring): legacy flags become :attr:`scoring`,
        ``key_scores`` serves as :meth:`score`; flags that mean nothing together are refused."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        flags = {flag: own[flag] for flag in ("query_free", "position_dependent") if flag in own}
        if flags:
            if "scoring" in own:
                raise TypeError(f"{cls.__name__} sets both scoring and {' and '.join(flags)}; set scoring only.")
            query_free = bool(flags.get("query_free", not cls.scoring.needs_queries))
            position_dependent = bool(flags.get("position_dependent", cls.scoring.rescores))
            if not query_free and position_dependent:
                raise TypeError(
                    f"{cls.__name__} sets query_free = False and position_dependent = True, which mean nothing together: "
                    "a press that needs queries is scored with them after attention, never re-scored at a reading "
                    "position. Set scoring = Scoring.QUERY, or Scoring.READING_POSITION for a query-free press."
                )
            cls.scoring = (Scoring.QUERY if not query_free
                           else Scoring.READING_POSITION if position_dependent else Scoring.ENTRY_TIME)
            for flag in flags:  # read back from ``scoring`` from now on, so the two can never disagree
                delattr(cls, flag)
        if "key_scores" in own and "score" not in own:
            cls.score = _score_with_key_scores

    @property
    def policy(self) -> EnginePolicy:
        """The engine policy these settings give (see :class:`EnginePolicy`)."""
        return EnginePolicy(self.scoring, self.max_cache_tokens, self.prefill_chunk_size, self.rescore_every,
                            self.decoding)

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
        if every > 1 and not self.scoring.rescores:
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
        """Scores ``(batch, kv_heads, n)`` of cached entries; higher is kept (``ENTRY_TIME`` and
        ``READING_POSITION`` presses).

        ``keys``/``values`` are ``(batch, kv_heads, n, head_dim)`` as stored (post-RoPE), ``positions`` their
        true positions (``-1`` marks an empty or padding slot, whose score is ignored) and
        ``reading_position`` a ``(batch, 1, 1)`` long tensor: the position of the next query that will
        read these keys.
        """
        raise NotImplementedError(f"{type(self).__name__} implements no score() (nor the older key_scores())")

    def query_scores(
        self,
        module: nn.Module,
        queries: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        seen: int,
    ) -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of cached keys given the latest queries (``Scoring.QUERY`` presses)."""
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
        **settings: the keyword-only engine settings of :class:`PressSettings` (``skip_layers``,
            ``max_cache_tokens``, ``decoding``, ``prefill_chunk_size``, ``rescore_every``).
    """

    ratio: float = 0.0
    n_sink: int = 0
    window: int = 0

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
