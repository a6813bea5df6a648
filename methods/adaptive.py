"""AdaKV-style head-wise budgets (Feng et al., 2024, arXiv 2407.11550) over any query-free scorer press.

Heads differ: some attend to a few distant tokens, others to a recent window, so giving every KV head of a
layer the same number of slots wastes budget. :class:`AdaptivePress` wraps a *base* press and, per layer and
batch row, gives the layer's whole budget (``target x kv_heads`` pairs, the base press's ``target_size``)
to the highest-scoring (head, token) pairs across heads, with a per-head floor. Only the base press's
``score()`` is used, so a third-party scorer plugin gets head-wise budgets unchanged.

Comparable scores. Raw scores of different heads live on different scales (a key norm, a projection on a
head's own filter), so they cannot compete directly. With ``normalization="softmax"`` (the default) each
(row, head)'s scores over its live candidates become ``softmax(scores / temperature)``: a distribution per
head, like the attention weights AdaKV allocates by. A head whose scores are peaked gives a few tokens most
of its mass and cedes the rest of its share to flatter heads, which is AdaKV's rule; a flat head spreads its
mass and keeps more tokens. Q-Filters and K-norm scores are attention-logit-like (a dot product or norm of a
post-RoPE key), so the default temperature is ``sqrt(head_dim)``, the scale attention itself divides logits
by. ``normalization="none"`` compares raw scores, for presses whose scores are already comparable
probabilities.

Memory: under :func:`kvpress_like.press` the full-attention layers become
:class:`~kvpress_like.headwise.HeadwisePressedLayer` s that store the kept pairs, at most ``memory_slack``
(2.5%) more slots, with no per-step copy at decoding (see that module).
Sliding-window layers stay uniform (the base press's rule, as without the wrapper).

Layer budgets (PyramidKV, Cai et al., 2024): ``pyramid=s`` scales layer ``l`` of ``n`` by
``1 + s (1 - 2 l / (n - 1))``, budgets decreasing linearly from the first layer to the last with the same
total as uniform layers (``s=0``: uniform; ``s=0.5``: from 1.5x down to 0.5x). ``layer_weights`` gives any other
profile, e.g. from calibration statistics (each layer's attention spread): layer ``l``'s budget is the base
target times ``w_l`` over the mean weight of the compressed layers, so the total stays the uniform one; layers
in ``skip_layers`` are the degenerate case (uncompressed, left out of the mean).

Model-wide budgets (``scope="model"``, KVzip's own allocation): the whole model's budget (the sum of every
compressed full-attention layer's ``target x kv_heads``) goes to the best (layer, head, token) triples, so a
layer whose heads the context needs keeps more than one that attends to little. It needs scores that are
comparable across layers and available for every layer at once, which only presses scoring a whole call after
it provide (``scores_after_call``: KVzip's reconstruction, whose scores are attention probabilities; use
``normalization="none"`` there). Each layer keeps its share of the uniform budget afterwards: a decoding
budget or a later prune holds each layer at ``share x target`` pairs. Sliding-window layers stay uniform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from kvpress_like.base import Press
from kvpress_like.headwise import HeadwisePressedLayer

NORMALIZATIONS = ("softmax", "none")
SCOPES = ("layer", "model")


class AdaptivePress(Press):
    """Share each layer's budget across its KV heads by score (AdaKV), around any query-free ``base`` press.

    Args:
        base: the scorer press (an instance, or a registered name built with ``settings``). Its ``ratio`` /
            ``max_cache_tokens`` set each layer's budget (``target x kv_heads`` pairs); its ``n_sink`` /
            ``window`` tokens are kept in every head; ``skip_layers``, ``decoding`` and
            ``prefill_chunk_size`` are read from it.
        floor: each head keeps at least this fraction of the uniform share (``floor x target`` pairs, and at
            least one), as AdaKV's safeguard (kvpress uses 0.2). ``1.0`` is the uniform budget.
        normalization: ``"softmax"`` (per-head distributions, see module docstring) or ``"none"``.
        temperature: softmax temperature (``None``: ``sqrt(head_dim)``).
        pyramid: PyramidKV slope of per-layer budgets in ``[0, 1)`` (0: the same budget in every layer).
        layer_weights: relative budget of every decoder layer (positive, one per layer; ``None``: equal, or
            ``pyramid``), normalised to mean 1 over the compressed layers.
        memory_slack: how many more key/value slots than kept pairs a layer may hold (a fraction) so that
            attention reads narrower windows (:func:`kvpress_like.headwise.layout`); 0 stores exactly the kept
            pairs.
        scope: ``"layer"`` (each layer's budget shared across its heads) or ``"model"`` (the model's budget
            shared across layers and heads; bases with ``scores_after_call`` only, see module docstring).
        **settings: settings of ``base`` when it is given by name, e.g. ``AdaptivePress("qfilters", ratio=0.75)``.
    """

    name = "adakv"
    #: press() stores full-attention layers of this press head-wise (:mod:`kvpress_like.headwise`).
    headwise: ClassVar[bool] = True

    def __init__(
        self,
        base: Press | str = "knorm",
        floor: float = 0.2,
        normalization: str = "softmax",
        temperature: float | None = None,
        pyramid: float = 0.0,
        memory_slack: float = 0.025,
        layer_weights: Sequence[float] | None = None,
        scope: str = "layer",
        **settings,
    ):
        if isinstance(base, str):
            from kvpress_like.registry import resolve_press

            base = resolve_press(base, settings, parse=True)  # typed values pass through, text is converted
        elif settings:
            raise TypeError(f"settings {sorted(settings)} go to the base press; pass them to {type(base).__name__}(...).")
        if not isinstance(base, Press):
            raise TypeError(f"AdaptivePress needs a kvpress_like Press (or a registered name) as base, got {type(base).__name__}.")
        if getattr(base, "headwise", False):
            raise ValueError("AdaptivePress cannot wrap another head-wise press; wrap the scorer press itself.")
        if base.scoring.needs_queries:
            raise ValueError(
                f"AdaptivePress allocates budgets inside the cache from key scores; {type(base).__name__} scores keys "
                "with queries after attention. Wrap a query-free press (qfilters, knorm, expected_attention, ...)."
            )
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"floor must be a fraction of the uniform share in [0, 1], got {floor!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}.")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}.")
        if isinstance(pyramid, bool) or not isinstance(pyramid, (int, float)) or not 0 <= pyramid < 1:
            raise ValueError(f"pyramid must be a slope in [0, 1) (0: equal layer budgets), got {pyramid!r}.")
        if isinstance(memory_slack, bool) or not isinstance(memory_slack, (int, float)) or not 0 <= memory_slack <= 1:
            raise ValueError(f"memory_slack must be a fraction in [0, 1] (0.025: at most 2.5% more slots than kept pairs), got {memory_slack!r}.")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
        if scope == "model" and not base.scores_after_call:
            raise ValueError(
                f"scope='model' ranks every layer's scores together, which needs them all at once; "
                f"{type(base).__name__} scores each layer as its keys arrive. Use scope='layer', or a base that "
                "scores a call after it (kvzip)."
            )
        if scope == "model" and (pyramid or layer_weights is not None):
            raise ValueError("scope='model' decides each layer's budget from the scores; drop pyramid / layer_weights.")
        self.scope = scope
        if layer_weights is not None:
            layer_weights = tuple(layer_weights)
            if pyramid or not layer_weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                                                       for w in layer_weights):
                raise ValueError("layer_weights must be positive numbers, one per decoder layer, and cannot be combined "
                                 f"with pyramid; got {layer_weights!r} with pyramid={pyramid}.")
        self.layer_weights = layer_weights
        self._layer_scale: list[float] | None = None
        self.base, self.floor, self.normalization = base, float(floor), normalization
        self.memory_slack = float(memory_slack)
        self.temperature, self.pyramid = temperature, float(pyramid)
        self.scoring = base.scoring  # an instance's mode is its base press's
        self._num_layers: int | None = None
        self.validate()

    def __repr__(self) -> str:
        return (f"AdaptivePress(base={self.base!r}, floor={self.floor}, normalization={self.normalization!r}, "
                f"temperature={self.temperature}, pyramid={self.pyramid}, memory_slack={self.memory_slack}, "
                f"layer_weights={self.layer_weights}, scope={self.scope!r})")

    # -- the base press's settings, read through -------------------------------------------------------
    skip_layers = property(lambda self: self.base.skip_layers)
    max_cache_tokens = property(lambda self: self.base.max_cache_tokens)
    decoding = property(lambda self: self.base.decoding)
    prefill_chunk_size = property(lambda self: self.base.prefill_chunk_size)
    rescore_every = property(lambda self: self.base.rescore_every)

    def validate(self, num_layers: int | None = None) -> None:
        self.base.validate(num_layers)
        if self.base.rescore_every > 1:
            raise ValueError(
                f"AdaptivePress re-scores position-dependent presses at every eviction; give {type(self.base).__name__} "
                "rescore_every=1."
            )

    def prepare(self, model) -> None:
        self.base.prepare(model)
        self._num_layers = n = model.config.get_text_config(decoder=True).num_hidden_layers
        if self.layer_weights is not None:
            if len(self.layer_weights) != n:
                raise ValueError(f"layer_weights has {len(self.layer_weights)} entries but the model has {n} decoder layers; "
                                 "give one weight per layer.")
            compressed = [w for i, w in enumerate(self.layer_weights) if self.base.compresses_layer(i)] or [1.0]
            mean = sum(compressed) / len(compressed)
            self._layer_scale = [w / mean for w in self.layer_weights]

    def attach(self, model):
        """The base press's hooks around model calls (KVzip's reconstruction pass, whose scores then prune each
        head-wise layer through :meth:`~kvpress_like.headwise.HeadwisePressedLayer.prune_by`)."""
        return self.base.attach(model)

    def compresses_layer(self, layer_idx: int) -> bool:
        return self.base.compresses_layer(layer_idx)

    # -- uniform behaviour (sliding-window layers, which stay uniform) ---------------------------------
    def target_size(self, seen: int, decoding: bool) -> int | None:
        return self.base.target_size(seen, decoding)

    def score(self, layer_idx, keys, values, positions, reading_position) -> torch.Tensor:
        return self.base.score(layer_idx, keys, values, positions, reading_position)

    def select(self, scores, positions, seen, n_keep: int) -> torch.Tensor:
        return self.base.select(scores, positions, seen, n_keep)

    def victims(self, scores, positions, seen) -> torch.Tensor:
        return self.base.victims(scores, positions, seen)

    # -- head-wise budgets -------------------------------------------------------------------------------
    def layer_target(self, layer_idx: int, seen: int, decoding: bool) -> int | None:
        """Pairs per KV head on average that layer ``layer_idx`` may keep (the base target, PyramidKV-scaled)."""
        target = self.base.target_size(seen, decoding)
        if target is not None and self._layer_scale is not None:
            return max(1, min(round(target * self._layer_scale[layer_idx]), seen))
        n = self._num_layers
        if target is None or not self.pyramid or n is None or n < 2:
            return target
        scaled = round(target * (1 + self.pyramid * (1 - 2 * layer_idx / (n - 1))))
        return max(1, min(scaled, seen))

    def protected(self, positions: torch.Tensor, seen) -> torch.Tensor:
        """The base press's sinks and window (nothing for presses without them)."""
        rule = getattr(self.base, "protected", None)
        return torch.zeros_like(positions, dtype=torch.bool) if rule is None else rule(positions, seen)

    def comparable(self, scores: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Scores ``(batch, heads, n)`` (``-inf``: empty) made comparable across heads (module docstring)."""
        if self.normalization == "none":
            return scores
        temperature = self.temperature or math.sqrt(head_dim)
        probs = (scores / temperature).softmax(dim=-1)
        return probs.masked_fill(scores == float("-inf"), float("-inf"))

    def ranked(self, scores: torch.Tensor, positions: torch.Tensor, seen, target: int, head_dim: int) -> torch.Tensor:
        """One row's candidates ``(1, heads, n)`` as allocation values: comparable scores, ``inf`` for the
        protected tokens and each head's floor (its ``floor x target`` best), ``-inf`` for empty slots."""
        live = scores > float("-inf")
        value = self.comparable(scores.float(), head_dim)
        value = value.masked_fill(self.protected(positions, seen) & live, float("inf"))
        per_head = max(1, math.floor(self.floor * target + 1e-9))
        rank = value.argsort(dim=-1, descending=True).argsort(dim=-1)
        return value.masked_fill((rank < per_head) & live, float("inf"))

    def allocate(self, scores: torch.Tensor, positions: torch.Tensor, seen, target: int, head_dim: int,
                 total: int | None = None) -> torch.Tensor:
        """Which of one row's candidates ``(1, heads, n)`` to keep: a boolean mask of ``total`` pairs (default
        ``target x heads``; fewer when fewer are live), every head keeping its protected tokens and its floor's
        best ones."""
        value = self.ranked(scores, positions, seen, target, head_dim)
        n_keep = min(target * scores.shape[1] if total is None else total, int((scores > float("-inf")).sum()))
        heads = torch.arange(scores.shape[1], device=scores.device)[:, None].expand_as(positions[0])
        keep = torch.zeros(value.numel(), dtype=torch.bool, device=value.device)
        keep[best_pairs(value.flatten(), _tie_order(positions[0].flatten(), heads.flatten()), n_keep)] = True
        return keep.view_as(scores)

    def prune_layers(self, layers: list, scores: dict) -> None:
        """Prune every pressed layer of one cache by the scores a press gave after a call (``scores[layer]``,
        KVzip's reconstruction): each head-wise layer across its heads, or with ``scope="model"`` the best
        (layer, head, token) triples of all head-wise layers together (module docstring)."""
        headwise = [layer for layer in layers if isinstance(layer, HeadwisePressedLayer)]
        chosen = _model_keep(headwise, scores) if self.scope == "model" and headwise else {}
        for layer in layers:
            if layer in chosen:
                layer.prune_by(scores[layer], keep=chosen[layer])
            else:
                layer.prune_by(scores[layer])


def _model_keep(layers: list[HeadwisePressedLayer], scores: dict) -> dict:
    """Per head-wise layer, the kept mask ``(batch, kv_heads, W)`` when each row's budgets summed over ``layers``
    go to the best (layer, head, token) triples of all of them, ranked once (``{}`` when a layer is not
    compressing this call)."""
    ranked = [layer.ranked_rows(scores[layer]) for layer in layers]
    if any(targets is None for _, targets in ranked):
        return {}
    keeps = [torch.zeros_like(value, dtype=torch.bool) for value, _ in ranked]
    for r in range(keeps[0].shape[0]):
        flat = torch.cat([value[r].flatten() for value, _ in ranked])
        positions = torch.cat([layer.positions[r].flatten() for layer in layers])
        where = torch.cat([(torch.arange(value.shape[1], device=flat.device)[:, None] * len(layers) + i)
                           .expand_as(value[r]).flatten() for i, (value, _) in enumerate(ranked)])
        order = _tie_order(positions, where)
        budget = sum(targets[r] * value.shape[1] for value, targets in ranked)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[best_pairs(flat, order, min(budget, int((flat > float("-inf")).sum())))] = True
        for keep, piece in zip(keeps, chosen.split([k[r].numel() for k in keeps])):
            keep[r] = piece.view_as(keep[r])
    return dict(zip(layers, keeps))


def _tie_order(positions: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Tie-break key of each candidate: later positions first, then lower ``where`` (head, or head and layer)
    indices; it depends on what a pair is, not on the slot it sits in."""
    return positions.long() * (int(where.max()) + 1 if where.numel() else 1) - where.long()


def best_pairs(values: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` (1-D), equal values ranked by ``order`` (larger first): the same
    pairs whatever the layout of the slots (a padded row and the row alone hold them in different slots)."""
    by_order = order.argsort(descending=True)
    return by_order[values[by_order].argsort(descending=True, stable=True)[:k]]
