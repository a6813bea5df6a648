"""Every feature composes: one pruning-equals-masking matrix over the cache engine's dimensions.

Dimensions: press kind (position-free Q-Filters / re-scoring position-targeted Q-Filters with user-passed
statistics / query-based SnapKV / each of the first two wrapped in AdaKV head-wise budgets, stored ragged) x rows (one prompt / a left-padded batch of two) x cache (dynamic / static)
x size (ratio only / ``max_cache_tokens`` / ``decoding=True``) x ``rescore_every`` (1 / 3) x model (full
attention / Gemma-3 style alternating sliding-window and full layers) x attention (eager / sdpa).

Each accepted cell runs, for every row, the prompt alone: prefill, decoding steps, a question appended with
``uncompressed()``, more decoding steps, and checks every call's logits against the masked full-cache
reference (tests/helpers.py). A padded batch must then give each row exactly what the row alone gave, and
keep the same tokens. Refused cells must be refused with the clear error listed in :func:`refusal`.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from helpers import REFERENCE, MaskedReference
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import PressedLayer, press, uncompressed
from kvpress_like.filters import save_filters, save_query_stats
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.methods.adaptive import AdaptivePress
from kvpress_like.methods.targeted_qfilters import TargetedQFilterPress
from kvpress_like.static import StaticPressedCache, StaticPressedLayer, static_budget
from tiny import tiny_model

KINDS = ["position-free", "re-scoring", "query-based", "head-wise", "head-wise re-scoring", "model-wide kvzip"]
ROWS = ["single", "padded"]
CACHES = ["dynamic", "static"]
SIZES = ["ratio", "max_cache_tokens", "decoding"]
RESCORE = [1, 3]
MODELS = ["full", "sliding"]
IMPLS = ["eager", "sdpa"]

LENGTHS = {"single": [14], "padded": [14, 9]}
DECODE_STEPS, QUESTION, AFTER_STEPS = 4, 3, 3
BUDGET = 7


def refusal(kind, rows, cache, size, every, model) -> tuple[str, str] | None:
    """Which cells are refused, where, and the error they must give: ``(stage, message pattern)``.

    Stages: ``construction`` (the press), ``entry`` (``press()``), ``call`` (the first forward call).
    """
    if every > 1 and kind == "head-wise re-scoring":  # AdaKV re-scores a head at each of its evictions
        return "construction", "give TargetedQFilterPress rescore_every=1"
    if every > 1 and kind != "re-scoring":  # only scores that move with the reader are ever re-scored
        return "construction", "leave rescore_every=1"
    if kind == "query-based" and size != "ratio":  # SnapKV needs the prompt's last queries
        return "construction", "cannot prune while decoding"
    if cache == "static":
        if kind.startswith("head-wise") or kind == "model-wide kvzip":  # one fixed length for every head
            return "entry", "different number of tokens per KV head.*static=False"
        if kind == "query-based":
            return "entry", "needs a query-free press"
        if every > 1:
            return "entry", "rescore_every=1 or static=False"
        if size == "decoding":
            return "entry", "fixed number of slots"
        if model == "sliding":
            return "entry", "all use full attention"
        if rows == "padded":
            return "call", "padded batch"
    if kind == "query-based" and rows == "padded":  # the prompt's last queries differ per row
        return "call", "one at a time"
    return None


CELLS = list(itertools.product(KINDS, ROWS, CACHES, SIZES, RESCORE, MODELS, IMPLS))


def test_refusal_table_is_what_the_matrix_expects():
    """The table itself, summarized: which cells run and which are refused (a change here is a decision)."""
    accepted = [cell for cell in CELLS if refusal(*cell[:-1]) is None]
    assert len(CELLS) == 576 and len(accepted) == 156
    # head-wise: every dynamic cell re-scored at every step (12 per kind and model)
    assert sum(cell[0].startswith("head-wise") for cell in accepted) == 48
    static = [cell for cell in accepted if cell[2] == "static"]
    # static: one prompt, full attention, a fixed-size query-free press re-scored at every step
    assert {(c[0], c[1], c[3], c[4], c[5]) for c in static} == {
        (kind, "single", size, 1, "full") for kind in ("position-free", "re-scoring") for size in ("ratio", "max_cache_tokens")
    }


@functools.lru_cache(maxsize=None)
def _model(model: str, impl: str):
    if model == "full":
        return tiny_model("llama", attn_implementation=impl)
    return tiny_model("gemma3", attn_implementation=impl)  # sliding window 8 on layers 0 and 2


@functools.lru_cache(maxsize=None)
def _reference(model: str):
    """The same weights, for the masked reference attention (which it keeps)."""
    return tiny_model("llama" if model == "full" else "gemma3")


@pytest.fixture(scope="module")
def stats_dirs(tmp_path_factory):
    """User-passed statistics (``stats=``) and Q-Filters (``filters=``) for every layer, sliding ones included,
    of both tiny models: ``{model: statistics file}``, the filters in the same directory."""
    dirs = {}
    for model in MODELS:
        cfg = _model(model, "eager").config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, cfg.num_attention_heads, d)
        g = torch.Generator().manual_seed(5)
        stats = dict(
            mean=torch.randn(*shape, generator=g),
            direction=torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1),
            covariance=torch.eye(d).expand(*shape, d).clone(),
            count=torch.full((cfg.num_hidden_layers,), 64.0),
        )
        out = tmp_path_factory.mktemp(f"calibration-{model}")
        # Q-Filters (random: not K-norm, whose scores tie under Gemma-3's key norm) beside the statistics
        save_filters(torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, d, generator=g), out)
        dirs[model] = save_query_stats(stats, out)
    return dirs


def _press(kind, size, every, stats):
    settings = {"ratio": dict(ratio=0.5), "max_cache_tokens": dict(max_cache_tokens=BUDGET),
                "decoding": dict(ratio=0.5, decoding=True)}[size]
    if kind == "position-free":
        return kp.QFilterPress(n_sink=1, window=2, rescore_every=every, filters=stats.parent, **settings)
    if kind == "re-scoring":
        return TargetedQFilterPress(n_sink=1, window=2, rescore_every=every, stats=stats, **settings)
    if kind == "head-wise":
        return AdaptivePress(kp.QFilterPress(n_sink=1, window=2, rescore_every=every, filters=stats.parent, **settings))
    if kind == "head-wise re-scoring":
        return AdaptivePress(TargetedQFilterPress(n_sink=1, window=2, rescore_every=every, stats=stats, **settings))
    if kind == "model-wide kvzip":  # KVzip's reconstruction scores, one budget across layers and heads
        base = kp.KVzipPress(prompt_ids=(5, 6, 7), n_sink=1, window=2, rescore_every=every, **settings)
        return AdaptivePress(base, normalization="none", scope="model")
    return kp.SnapKVPress(window_size=3, kernel_size=3, rescore_every=every, **settings)


def _inputs(lengths):
    """Left-padded prompts, then the same decoding tokens, question and later tokens for every row."""
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):], mask[r, width - len(prompt):] = prompt, 1
    rest = [torch.randint(3, 100, (len(lengths), 1), generator=g) for _ in range(DECODE_STEPS)]
    rest.append(torch.randint(3, 100, (len(lengths), QUESTION), generator=g))
    rest += [torch.randint(3, 100, (len(lengths), 1), generator=g) for _ in range(AFTER_STEPS)]
    return prompts, ids, mask, rest


def _kept(cache) -> dict[int, torch.Tensor]:
    out = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, PressedLayer):
            out[i] = layer.positions.clone()
        elif isinstance(layer, StaticPressedLayer) and layer.is_initialized:
            out[i] = layer.positions[..., : int(layer.filled)].clone()
    return out


def _plans(cache, log):
    for layer in cache.layers:
        if isinstance(layer, PressedLayer) and not layer.observers:
            layer.observers.append(lambda layer, plan, n: log.__setitem__(layer.layer_idx, plan))


def _alone(model, reference, p, calls, static):
    """One prompt's calls under ``press()`` (question uncompressed), checked call by call against the masked
    full-cache reference; returns the logits of every call and the final cache."""
    ref = MaskedReference()
    reference.config._attn_implementation = REFERENCE
    cache = StaticPressedCache(p, model.config, static_budget(p, calls[0].shape[1])) if static else DynamicCache(config=model.config)
    ref_cache, logits, plans = DynamicCache(), [], {}
    with torch.no_grad(), press(model, p, static=static, **({"compile": False} if static else {})):
        for step, ids in enumerate(calls):
            before = _kept(cache)
            question = ids.shape[1] > 1 and step > 0
            if question and static:
                with pytest.raises(ValueError, match="needs a dynamic pressed cache"):
                    with uncompressed(cache):
                        pass
                break
            plans.clear()
            if question:
                with uncompressed(cache):
                    got = model(ids, **cache_kwargs(cache)).logits
            else:
                got = model(ids, **cache_kwargs(cache)).logits
            _plans(cache, plans)
            after = _kept(cache)
            # a decoding step that overwrites evicts *before* attention (then attention saw what is kept after)
            overwrote = lambda i: ids.shape[1] == 1 and (static or plans.get(i) == "overwrite")  # noqa: E731
            ref.kept = {i: after[i] if overwrote(i) and i in before else before.get(i) for i in after}
            expected = reference(ids, **cache_kwargs(ref_cache)).logits
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"call {step}: {m}")
            logits.append(got)
    return logits, cache


def _padded_call(model, cache, ids, mask):
    """A forward call of a left-padded batch with the true positions generate() gives its tokens."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
    return model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache)).logits


def _live_sets(layer, reading) -> list[list[list[int]]]:
    """Per row and head, the sorted positions a query at ``reading`` can still see."""
    pos = layer.positions
    if layer.sliding_window is not None:
        pos = pos.masked_fill(pos <= reading - 1 - layer.sliding_window, -1)
    return [[sorted(p for p in head.tolist() if p >= 0) for head in row] for row in pos]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_kind", MODELS)
@pytest.mark.parametrize("every", RESCORE)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", KINDS)
def test_combination(kind, rows, cache_kind, size, every, model_kind, impl, stats_dirs):
    refused = refusal(kind, rows, cache_kind, size, every, model_kind)
    model = _model(model_kind, impl)
    static = cache_kind == "static"
    prompts, ids, mask, rest = _inputs(LENGTHS[rows])
    make = functools.partial(_press, kind, size, every, stats_dirs[model_kind])
    if refused is not None and refused[0] == "construction":
        with pytest.raises(ValueError, match=refused[1]):
            make()
        return
    if refused is not None and refused[0] == "entry":
        with pytest.raises(ValueError, match=refused[1]):
            with press(model, make(), static=static):
                pass
        return
    if refused is not None:  # refused at the first call: generate(), as users run a batch
        with pytest.raises(ValueError, match=refused[1]):
            with torch.no_grad(), press(model, make(), static=static, **({"compile": False} if static else {})):
                model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        return

    reference = _reference(model_kind)
    alone = [_alone(model, reference, make(), [prompt[None]] + [c[r : r + 1] for c in rest], static)
             for r, prompt in enumerate(prompts)]
    if rows == "single":
        return
    p = make()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        got = [_padded_call(model, cache, ids, mask)[:, -1:]]
        for ids_ in rest:
            mask = torch.cat([mask, torch.ones_like(ids_)], dim=-1)
            if ids_.shape[1] > 1:
                with uncompressed(cache):
                    got.append(_padded_call(model, cache, ids_, mask))
            else:
                got.append(_padded_call(model, cache, ids_, mask))
    for r, (row_logits, row_cache) in enumerate(alone):
        for step, (b, a) in enumerate(zip(got, row_logits)):
            torch.testing.assert_close(b[r], a[0, -b.shape[1]:], atol=2e-5, rtol=1e-4, msg=lambda m: f"row {r} call {step}: {m}")
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, PressedLayer) and isinstance(row_cache.layers[i], PressedLayer):
                seen = row_cache.layers[i].seen
                assert _live_sets(layer, layer.rows.tokens[r].item())[r] == _live_sets(row_cache.layers[i], seen)[0], (r, i)


# -- combinations outside the matrix: refused with a clear error -------------------------------------------


def test_one_press_open_on_two_models_at_once_is_refused(tmp_path):
    """A press holds one model's filters: a second model inside the first one's context is refused, and the
    first model keeps scoring with its own filters."""
    from kvpress_like.filters import store_path

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    for model, seed in ((a, 1), (b, 2)):
        cfg = model.config
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
        save_filters(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), store_path(model))
    p = kp.QFilterPress(ratio=0.5)
    with press(a, p):
        own = p.active_filters.clone()
        with pytest.raises(ValueError, match="already open on another model"):
            with press(b, p):
                pass
        assert torch.equal(p.active_filters, own)
    with press(b, p):  # once closed, the press may move to another model
        assert not torch.equal(p.active_filters, own)


@pytest.mark.parametrize("bare", ["PressedCache", "QFiltersCache"])
def test_bare_caches_refuse_a_left_padded_batch(bare):
    """Without press() a cache never sees the mask: a left-padded generate() is refused, not silently wrong."""
    model = tiny_model("llama")
    cfg = model.config
    filters = torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    make = {"PressedCache": lambda: kp.PressedCache(kp.KnormPress(max_cache_tokens=6), config=cfg),
            "QFiltersCache": lambda: kp.QFiltersCache(window_length=2, max_length=6, filters=filters, model=model)}[bare]
    _, ids, mask, _ = _inputs([12, 7])
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="padded"):
            model.generate(ids, attention_mask=mask, **cache_kwargs(make()), **settings)
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(make()), **settings)  # unpadded: fine


def test_generate_without_a_cache_is_refused_under_press():
    model = tiny_model("llama")
    with torch.no_grad(), press(model, kp.KnormPress(ratio=0.5)):
        with pytest.raises(ValueError, match="use_cache=False: nothing would be compressed"):
            model.generate(torch.randint(3, 100, (1, 12)), max_new_tokens=2, use_cache=False, do_sample=False)
