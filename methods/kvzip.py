"""KVzip (Kim et al., 2025, arXiv 2505.23416): keep what the model needs to reconstruct its context.

Query-agnostic scores, made for compress once, ask many. After a multi-token call (a prefill, a prefill
chunk, a chat's next turn) has gone into the cache *uncompressed*, the model re-reads that call's tokens,
teacher-forced, after a repeat prompt: ``prompt + tokens`` at the positions following the context. A
cached pair's score is the largest attention weight it receives from any re-read token's query of any
query head of its KV-head group, the softmax running over the cached keys and the reconstruction's own
causal keys (as in the paper). Each layer then keeps its ``target`` best pairs per KV head (sinks and
window protected, as every :class:`~kvpress_like.base.ScorerPress`).

With ``chat=True`` (the paper's framing, as in its code and kvpress) the repeat instruction closes the user's
turn and opens the assistant's in the tokenizer's chat template, so an instruct model re-reads the context as
its own answer, and a chunk after the first asks to continue "starting with" the previous chunk's last
8 tokens. ``chat=False`` re-reads every chunk after the bare ``prompt``.

The reconstruction runs in chunks of ``chunk_size`` tokens, each ``prompt + chunk`` attending to the whole
cache and to itself (never to another chunk's tokens, which are not cached), so its peak memory is the
chunk's attention weights, ``query heads x (prompt + chunk) x (cached + prompt + chunk)`` floats per layer,
and only a per-key running maximum is kept. Its tokens never enter the user's cache: each layer is read
through a view (:class:`_ScoringView`) that returns the cached keys plus the chunk's and stores nothing.
Its cost is one more forward pass over the call's tokens with explicit attention weights, which
``evaluations/kvzip_cost.py`` measures against a plain prefill.

Rules beyond the paper (which scores one context and does not evict while decoding):

* tokens that entered the cache in an earlier call keep the scores their own call's reconstruction gave;
* tokens decoded one at a time (and question tokens added under :func:`kvpress_like.uncompressed`) are
  not reconstructed: they score ``2 + position``, above any attention weight, so a decoding budget evicts
  the least-needed context first and then the oldest decoded tokens (StreamingLLM among them);
* sliding-window layers keep what their window keeps (their window bounds them already).

Left-padded batches are re-read row by row, each row's real tokens at its own positions over its own cached
pairs (the pads hidden), so a row keeps what it would keep alone. It needs :func:`kvpress_like.press` (the
reconstruction is a model call) and the tokens' ids (not ``inputs_embeds``); the static cache is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from transformers.cache_utils import Cache

from kvpress_like.base import ScorerPress
from kvpress_like.cache import PressedLayer
from kvpress_like.cache_api import cache_argument, cache_kwargs
from kvpress_like.models import chat_frame
from kvpress_like.static import StaticPressedCache

from .adaptive import AdaptivePress

__all__ = ["KVzipPress", "reconstruction_scores"]

#: Score of a token no reconstruction has scored (decoded tokens): above every attention weight, older lower.
UNSCORED_OFFSET = 2.0
#: Re-read tokens whose attention weights are computed at once (bounds the weights' memory per layer).
QUERY_BLOCK = 128


@dataclass
class KVzipPress(ScorerPress):
    """Keep the pairs that receive the most attention when the model repeats its context.

    Args:
        prompt: the repeat instruction the re-read tokens follow (tokenized with the model's tokenizer).
        prompt_ids: its token ids, for a model whose tokenizer cannot be found from its ``name_or_path``
            (used as given for every chunk: no chat framing).
        chunk_size: re-read tokens per reconstruction chunk (bounds the pass's memory).
        chat: frame the instruction in the chat template and start later chunks from the previous one's
            last tokens (see the module docstring); ignored for a tokenizer without a chat template.
    """

    name = "kvzip"
    scores_after_call: ClassVar[bool] = True
    prompt: str = "\n\nRepeat the previous context exactly.\n"
    prompt_ids: tuple[int, ...] | None = None
    chunk_size: int = 512
    chat: bool = False
    continuation: ClassVar[str] = "\n\nRepeat the part of the previous context exactly, starting with"
    overlap: ClassVar[int] = 8  # previous-chunk tokens a later chunk's instruction quotes

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"KVzipPress(chunk_size=...) must be a positive integer, got {self.chunk_size!r}.")
        if self.prompt_ids is not None:
            if isinstance(self.prompt_ids, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.prompt_ids
            ):
                raise ValueError(f"KVzipPress(prompt_ids=...) must be a sequence of token ids, got {self.prompt_ids!r}.")
            self.prompt_ids = tuple(self.prompt_ids)
        self._ids: tuple[int, ...] | None = self.prompt_ids
        self._next: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # later chunks: (instruction, turn end)
        self._attached = 0
        self._deferring = False  # a multi-token call is going in uncompressed; it is scored after the call
        self._replaying = False  # the reconstruction pass is running
        self._pending: tuple[torch.Tensor, Cache, torch.Tensor | None] | None = None

    # -- the press contract ------------------------------------------------------------------------------
    def prepare(self, model) -> None:
        if self._ids is not None:
            return
        from transformers import AutoTokenizer

        from kvpress_like.models import EMBEDDED_MODELS, _materialize

        name = str(getattr(model.config, "_name_or_path", "") or "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(_materialize(name)) if name in EMBEDDED_MODELS else name)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"KVzipPress needs its repeat prompt's token ids and found no tokenizer for {name or 'this model'!r} "
                f"({type(err).__name__}); pass KVzipPress(prompt_ids=tokenizer(prompt, add_special_tokens=False)"
                ".input_ids)."
            ) from None
        encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        frame = chat_frame(tokenizer) if self.chat else None
        if frame is None:
            self._ids = encode(self.prompt)
            return
        turn_end = encode(frame[1])
        self._ids = encode(self.prompt.rstrip("\n")) + turn_end
        self._next = (encode(self.continuation), turn_end)

    def framing(self) -> tuple:
        """Everything besides the cache and the tokens that the reconstruction's scores depend on."""
        return self._ids, self._next, self.chunk_size

    def target_size(self, seen: int, decoding: bool) -> int | None:
        return None if self._deferring else super().target_size(seen, decoding)

    def score(self, layer_idx, keys, values, positions, reading_position) -> torch.Tensor:
        """Entry scores, for tokens no reconstruction scores (decoded tokens); a call's reconstruction
        replaces them for the tokens it re-read."""
        if not self._attached:
            raise ValueError(
                "KVzipPress scores with a reconstruction pass of the model: use it as `with press(model, "
                "KVzipPress(...))`, not in a bare PressedCache."
            )
        return UNSCORED_OFFSET + positions.float()

    @contextmanager
    def attach(self, model) -> Iterator[None]:
        handles = [
            model.register_forward_pre_hook(self._before_call, with_kwargs=True),
            model.register_forward_hook(self._after_call, with_kwargs=True),
        ]
        self._attached += 1
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._attached -= 1
            self._deferring, self._pending = False, None

    # -- around each model call ----------------------------------------------------------------------------
    def _before_call(self, model, args: tuple, kwargs: dict) -> None:
        if self._replaying:
            return
        self._deferring, self._pending = False, None
        cache = cache_argument(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        given = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        tokens = given.shape[1] if isinstance(given, torch.Tensor) else 0
        if cache is None or tokens < 2 or (self.ratio == 0 and self.max_cache_tokens is None):
            return
        if any(isinstance(layer, PressedLayer) and not layer.compressing for layer in cache.layers):
            return  # inside uncompressed(cache): nothing is evicted, nothing to score
        if isinstance(cache, StaticPressedCache):
            raise ValueError("KVzipPress scores after each prefill with a reconstruction pass, which the static cache "
                             "does not run; use press(model, KVzipPress(...)) with static=False.")
        if not isinstance(ids, torch.Tensor):
            raise ValueError("KVzipPress re-reads the context's token ids; call the model with input_ids, not inputs_embeds.")
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
            mask = None
        elif mask.shape[1] != cache.get_seq_length() + tokens:
            raise ValueError("KVzipPress re-reads a padded batch row by row and needs its attention mask over the "
                             f"cached and new tokens ({cache.get_seq_length() + tokens} columns, got {mask.shape[1]}).")
        self._deferring, self._pending = True, (ids, cache, mask)

    def _after_call(self, model, args: tuple, kwargs: dict, output) -> None:
        if self._replaying or self._pending is None:
            return
        (ids, cache, mask), self._pending, self._deferring = self._pending, None, False
        self.compress(model, cache, ids, mask)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Pressed layers filled or taken over (:meth:`PressedLayer.from_dynamic`) inside this block keep every
        token; :meth:`compress` then scores and prunes them (an evaluation's shared full prefill)."""
        before, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = before

    def compress(self, model, cache: Cache, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Score the last ``ids.shape[1]`` tokens of ``cache`` (whose ids are ``ids``) by reconstruction and
        prune every pressed layer to its target; inside ``press(model, self)``. Earlier tokens keep their scores.
        ``mask``: a left-padded batch's 2-D attention mask over the cached tokens (re-read row by row)."""
        layers = [layer for layer in cache.layers if isinstance(layer, PressedLayer)]
        if not layers:
            return
        q = ids.shape[1]
        if mask is None:
            scores, new = reconstruction_scores(model, cache, ids, self), q
        else:
            real = mask[:, -q:].bool()
            rows = [reconstruction_scores(model, cache, ids[r : r + 1, real[r]], self, row=r, mask=mask[r : r + 1])
                    for r in range(ids.shape[0])]
            # a row with no real token in this call (all pads) re-reads nothing and keeps its scores
            scores = {layer.layer_idx: torch.cat([row.get(layer.layer_idx, layer.scores[r : r + 1])
                                                  for r, row in enumerate(rows)]) for layer in layers}
            new = real.sum(-1).view(-1, 1, 1)
        merged = {}
        for layer in layers:
            called = layer.positions >= layer.rows.reading_position(layer) - new  # this call's tokens
            merged[layer] = torch.where(called, scores[layer.layer_idx], layer.scores)
        owner = layers[0].press
        if isinstance(owner, AdaptivePress):  # head-wise (and maybe model-wide) budgets: the wrapper decides
            owner.prune_layers(layers, merged)
        else:
            for layer in layers:
                layer.prune_by(merged[layer])


def reconstruction_scores(model, cache: Cache, ids: torch.Tensor, p: KVzipPress, row: int | None = None,
                          mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per pressed layer of ``cache``: ``(batch, kv_heads, slots)`` maximum attention each cached pair gets
    while the model re-reads ``ids`` (the last real tokens of the cache) after ``p``'s prompt, in chunks of
    ``p.chunk_size`` (see the module docstring). ``cache`` is read, never written.

    ``row``: re-read one row of a padded batch (``ids`` its real tokens, ``mask`` its ``(1, cached)`` attention
    mask), which continues at its own position, the count of its real tokens."""
    if p._ids is None:
        raise ValueError("KVzipPress has no prompt ids yet: call prepare(model) (press() does) first.")
    best: dict[int, torch.Tensor] = {}
    batch = ids.shape[0]
    start = cache.get_seq_length() if mask is None else int(mask.sum())
    as_ids = lambda seq: torch.tensor(seq, dtype=ids.dtype, device=ids.device).expand(batch, -1)  # noqa: E731
    first = as_ids(p._ids)
    replaying, p._replaying = p._replaying, True
    try:
        with torch.no_grad():
            for lo in range(0, ids.shape[1], p.chunk_size):
                prompt = first
                if lo and p._next is not None:
                    prompt = torch.cat([as_ids(p._next[0]), ids[:, max(0, lo - p.overlap) : lo], as_ids(p._next[1])], dim=1)
                chunk = torch.cat([prompt, ids[:, lo : lo + p.chunk_size]], dim=1)
                positions = torch.arange(start, start + chunk.shape[1], device=ids.device).expand(batch, -1)
                replay = _ReplayCache(cache, prompt.shape[1], best, row, start)
                padded = {} if mask is None else dict(attention_mask=torch.cat([mask, torch.ones_like(chunk)], dim=1))
                model(chunk, position_ids=positions, use_cache=True, logits_to_keep=1, **padded, **cache_kwargs(replay))
    finally:
        p._replaying = replaying
    return best


class _ScoringView(PressedLayer):
    """A pressed layer (or one row of it) read for the reconstruction: its keys plus the chunk's, nothing
    stored; computes the chunk's attention itself (``own_attention``) to record each cached key's largest
    weight. ``start``: the true position of the chunk's first token."""

    def __init__(self, source: PressedLayer, n_prompt: int, best: dict[int, torch.Tensor], rows: slice, start: int):
        super().__init__(source.press, source.layer_idx, source.sliding_window)
        self.source, self.n_prompt, self.best, self.start = source, n_prompt, best, start
        self.old_keys, self.old_values = source.keys[rows], source.values[rows]
        self.old_positions = source.positions[rows]
        self.is_initialized = True

    def begin_call(self, valid) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.source.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.n + query_length, self.source.seen - self.source.n

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.old_keys, key_states], dim=-2), torch.cat([self.old_values, value_states], dim=-2)

    def own_attention(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        b, hq, q, d = query.shape
        hkv, total = key.shape[1], key.shape[2]
        n, g = total - q, hq // hkv
        scale = scaling if scaling is not None else getattr(module, "scaling", d**-0.5)
        scaled = query.float() * scale  # scaling the queries is cheaper than scaling q x total logits
        keys_t, values = key.float().transpose(-1, -2), value.float()
        kpos = self.old_positions[:, :, None, None, :]  # (b, hkv, 1, 1, n)
        out = torch.empty(b, hq, q, d, device=query.device)
        got = None
        # Query rows go in blocks: each row's softmax is its own, and blocks keep the weights small enough to
        # stay in the allocator's pools and the caches (1.3x faster than the whole chunk at once on CPU).
        for lo in range(0, q, QUERY_BLOCK):
            hi = min(q, lo + QUERY_BLOCK)
            rows = hi - lo
            logits = (scaled[:, :, lo:hi].reshape(b, hkv, g * rows, d) @ keys_t).view(b, hkv, g, rows, total)
            softcap = kwargs.get("softcap")
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            # Masks are applied in place and only where needed: the chunk's own causal block always, cached
            # slots only when some are empty (padding, evicted) or outside a sliding window.
            qpos = torch.arange(lo, hi, device=query.device)
            own = torch.arange(q, device=query.device)
            hidden_own = own[None, :] > qpos[:, None]  # (rows, q) the chunk's later tokens
            hidden_old = kpos < 0
            window = self.sliding_window
            if window is not None:
                hidden_old = hidden_old | (kpos <= self.start + qpos[:, None] - window)
                hidden_own = hidden_own | (own[None, :] <= qpos[:, None] - window)
            logits[..., n:].masked_fill_(hidden_own, float("-inf"))
            if bool(hidden_old.any()):
                logits[..., :n].masked_fill_(hidden_old, float("-inf"))
            weights = logits.softmax(dim=-1)
            out[:, :, lo:hi] = (weights.view(b, hkv, g * rows, total) @ values).view(b, hq, rows, d)
            first = max(self.n_prompt - lo, 0)  # the instruction's own queries do not score
            if first < rows:
                # one reduction at a time over a contiguous last dimension: 20x faster than amax(dim=(2, 3))
                block = weights[:, :, :, first:, :n].amax(dim=3).amax(dim=2)
                got = block if got is None else torch.maximum(got, block)
        idx = self.layer_idx
        if got is not None:
            self.best[idx] = got if idx not in self.best else torch.maximum(self.best[idx], got)
        return out.transpose(1, 2).to(query.dtype).contiguous(), None


class _ReplayCache(Cache):
    """The user's cache (or one ``row`` of it) as the reconstruction sees it: pressed layers through
    :class:`_ScoringView`, plain ones (skipped, or sliding layers bounded by their window) as shallow copies
    whose updates rebind new tensors, leaving the originals as they were."""

    def __init__(self, source: Cache, n_prompt: int, best: dict[int, torch.Tensor], row: int | None, start: int):
        rows = slice(None) if row is None else slice(row, row + 1)
        layers = [
            _ScoringView(layer, n_prompt, best, rows, start) if isinstance(layer, PressedLayer) else _row_copy(layer, rows)
            for layer in source.layers
        ]
        super().__init__(layers=layers)


def _row_copy(layer, rows: slice):
    out = copy(layer)
    if getattr(layer, "keys", None) is not None and layer.keys.numel():
        out.keys, out.values = layer.keys[rows], layer.values[rows]
    return out
