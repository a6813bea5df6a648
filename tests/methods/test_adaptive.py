"""AdaptivePress (AdaKV head-wise budgets) stored head-wise: pruning == masking per head, floors, bytes, plugins."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from helpers import pressed_and_reference
from kvpress_like import KnormPress, KVzipPress, QFilterPress, PressedCache, PressedLayer, ScorerPress, SnapKVPress, cache_nbytes, get_press, press
from kvpress_like.headwise import HeadwisePressedLayer, layout
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.methods.adaptive import AdaptivePress
from tiny import tiny_model

ARCHS = ["llama", "qwen3", "gemma3", "gpt_neox"]


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def headwise_layers(cache) -> list[HeadwisePressedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, HeadwisePressedLayer)]


def run(model, p, calls, cache=None):
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad(), press(model, p):
        logits = [model(ids, **cache_kwargs(cache)).logits for ids in calls]
    return logits, cache


# -- pruning == masking with per-head kept sets ----------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "settings",
    [
        dict(max_cache_tokens=10, window=2, n_sink=1),  # prefill, chunk re-allocation, in-place decoding evictions
        dict(ratio=0.5, decoding=True, window=2, n_sink=1),  # decoding appends to every head or evicts per head
    ],
    ids=["budget", "ratio-decoding"],
)
def test_pruning_equals_masking_per_head(arch, attn, settings):
    model = tiny_model(arch, seed=1, attn_implementation=attn)
    reference = tiny_model(arch, seed=1)
    ids = ids_for(2, 32, seed=5)
    calls = [ids[:, :12], ids[:, 12:20]] + [ids[:, i : i + 1] for i in range(20, 32)]
    p = AdaptivePress(KnormPress(**settings), floor=0.2)
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
    layers = headwise_layers(cache)
    assert layers, "no layer was stored head-wise"
    heads = layers[0].lengths.shape[1]
    target = 10 if "max_cache_tokens" in settings else 32 - 32 // 2
    for layer in layers:
        # each row keeps exactly its layer budget, shared unevenly
        assert layer.lengths.sum(-1).tolist() == [target * heads] * 2
    assert any(len(set(layer.lengths.flatten().tolist())) > 1 for layer in layers), "heads were not ragged"


def test_decoding_enters_every_head_and_keeps_the_allocation():
    model = tiny_model("llama", seed=2, attn_implementation="sdpa")
    p = AdaptivePress(KnormPress(max_cache_tokens=8, n_sink=1, window=2))
    ids = ids_for(1, 30, seed=3)
    _, cache = run(model, p, [ids[:, :20]])
    allocated = [layer.lengths.clone() for layer in headwise_layers(cache)]
    _, cache = run(model, p, [ids[:, i : i + 1] for i in range(20, 30)], cache)
    for layer, lengths in zip(headwise_layers(cache), allocated):
        assert torch.equal(layer.lengths, lengths)
        pos = layer.positions
        assert bool((pos.max(-1).values == 29).all()), "the last token did not enter every head"
        assert bool(((pos == 0).any(-1)).all()), "a sink was evicted"


# -- padded batches: allocated row by row ------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(max_cache_tokens=9, window=2, n_sink=1), dict(ratio=0.5, decoding=True)])
def test_left_padded_batch_equals_rows_run_alone(settings):
    model = tiny_model("llama", seed=3, attn_implementation="sdpa")
    # Q-Filters with random filters: K-norm scores tie exactly on repeated tokens (RoPE keeps norms), and rows
    # alone vs batched may break a tie differently
    filters = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))
    p = AdaptivePress(QFilterPress(filters=filters, **settings))
    prompts = [ids_for(1, n, seed=n)[0] for n in (24, 17, 11)]
    ids = torch.zeros(3, 24, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, 24 - len(prompt):], mask[r, 24 - len(prompt):] = prompt, 1
    generation = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), press(model, p):
        cache = DynamicCache(config=model.config)
        batched = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **generation)
        for r, prompt in enumerate(prompts):
            alone_cache = DynamicCache(config=model.config)
            alone = model.generate(prompt[None], **cache_kwargs(alone_cache), **generation)
            for step, (b, a) in enumerate(zip(batched.logits, alone.logits)):
                torch.testing.assert_close(b[r], a[0], atol=2e-5, rtol=1e-4, msg=f"row {r} step {step}")
            for padded_layer, layer in zip(headwise_layers(cache), headwise_layers(alone_cache)):
                assert torch.equal(padded_layer.lengths[r], layer.lengths[0])


# -- floors, uniform limit, bytes --------------------------------------------------------------------------------
@pytest.mark.parametrize("floor", [0.0, 0.5, 0.9])
def test_per_head_floor_is_honoured(floor):
    model = tiny_model("gpt_neox", seed=4)  # 4 KV heads
    target = 20
    p = AdaptivePress(KnormPress(max_cache_tokens=target), floor=floor)
    _, cache = run(model, p, [ids_for(2, 48, seed=6)])
    lengths = torch.stack([layer.lengths for layer in headwise_layers(cache)])
    assert int(lengths.min()) >= max(1, int(floor * target))
    assert bool((lengths.sum(-1) == target * lengths.shape[-1]).all())
    if floor == 0.0:
        assert int(lengths.max()) > target, "nothing was reallocated without a floor"


def test_floor_one_is_the_uniform_press():
    model = tiny_model("llama", seed=5)
    base = KnormPress(ratio=0.6, n_sink=1, window=2)
    ids = ids_for(2, 30, seed=7)
    _, uniform = run(model, base, [ids])
    _, adaptive = run(model, AdaptivePress(base, floor=1.0), [ids])
    for u, a in zip(uniform.layers, adaptive.layers):
        assert isinstance(a, HeadwisePressedLayer) and type(u) is PressedLayer
        torch.testing.assert_close(a.positions, u.positions, rtol=0, atol=0)
        torch.testing.assert_close(a.keys, u.keys, rtol=0, atol=0)


@pytest.mark.parametrize("slack", [0.0, 0.05])
def test_cache_nbytes_counts_the_kept_pairs_within_the_slack(slack):
    model = tiny_model("gemma3", seed=6)  # sliding layers stay uniform PressedLayers, full layers head-wise
    p = AdaptivePress(KnormPress(max_cache_tokens=6), memory_slack=slack)
    _, cache = run(model, p, [ids_for(2, 40, seed=8)] + [ids_for(2, 1, seed=i) for i in range(3)])
    head_dim, itemsize = 16, 4
    expected = 0
    for layer in cache.layers:
        if isinstance(layer, HeadwisePressedLayer):
            kept = int(layer.lengths.sum())
            assert layer.kept_pairs == kept == 2 * 2 * 6  # rows x kv heads x budget
            slots = layer._k.shape[0]
            assert kept <= slots <= kept + int(slack * kept)
            assert layer.bookkeeping_nbytes() == slots * (8 + 4) + 2 * 2 * 8 * 3  # per slot; lengths, starts, caps
            if slack == 0:
                assert slots == kept
        else:
            slots = layer.keys.shape[0] * layer.keys.shape[1] * layer._k.shape[2]  # allocated slots
        expected += slots * 2 * head_dim * itemsize
    assert cache_nbytes(cache) == expected
    assert any(isinstance(layer, HeadwisePressedLayer) for layer in cache.layers)
    assert any(type(layer) is PressedLayer for layer in cache.layers)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slack", [0.0, 0.05, 0.3])
def test_layout_places_segments_disjoint_inside_their_windows(seed, slack):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, 60, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).tolist()
    starts, stride, width, slots = layout(caps, slack)
    total = sum(caps)
    assert total <= slots <= total + int(slack * total)
    owner = [-1] * slots
    for s, (start, cap) in enumerate(zip(starts, caps)):
        assert s * stride <= start and start + cap <= s * stride + width, "a segment leaves its window"
        for i in range(start, start + cap):
            assert owner[i] == -1, "two segments share a slot"
            owner[i] = s
    assert (len(caps) - 1) * stride + width <= slots  # every window is inside the buffer
    assert width >= max(caps)
    if slack >= 0.3 and max(caps) * len(caps) <= total * 1.3:
        assert width == max(caps)  # the padded layout fits the slack: windows as narrow as the longest head


def test_budgeted_decoding_writes_in_place():
    model = tiny_model("llama", seed=2, attn_implementation="sdpa")
    p = AdaptivePress(KnormPress(max_cache_tokens=8, n_sink=1, window=2))
    ids = ids_for(1, 30, seed=3)
    _, cache = run(model, p, [ids[:, :20]])
    buffers = [(layer._k.data_ptr(), layer._v.data_ptr(), layer.width) for layer in headwise_layers(cache)]
    _, cache = run(model, p, [ids[:, i : i + 1] for i in range(20, 30)], cache)
    assert [(layer._k.data_ptr(), layer._v.data_ptr(), layer.width) for layer in headwise_layers(cache)] == buffers


@pytest.mark.parametrize("settings", [dict(ratio=0.5), dict(max_cache_tokens=12, n_sink=1, window=2)], ids=["ratio", "budget"])
def test_kvzip_scores_allocate_across_heads(settings):
    """KVzip scores after the call (a reconstruction pass): wrapped, its scores re-allocate each layer across
    heads, and pruning still equals masking through decoding and a second prompt."""
    model, reference = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(8, 100, (2, 30), generator=g)] + [torch.randint(8, 100, (2, 1), generator=g) for _ in range(6)]
    calls += [torch.randint(8, 100, (2, 5), generator=g), torch.randint(8, 100, (2, 1), generator=g)]
    p = AdaptivePress(KVzipPress(prompt_ids=(5, 6, 7), **settings), normalization="none")
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls[:1])
    for layer in headwise_layers(cache):
        assert int(layer.lengths.sum()) == 2 * layer.lengths.shape[1] * (15 if "ratio" in settings else 12)
        kept = layer.scores[layer.positions >= 0]
        assert bool(((kept >= 0) & (kept <= 1)).all()), "not ranked by reconstruction attention weights"
    assert any(len(set(layer.lengths.flatten().tolist())) > 1 for layer in headwise_layers(cache)), "heads were not ragged"
    pressed, expected, _ = pressed_and_reference(model, reference, p, calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("settings", [dict(ratio=0.5), dict(max_cache_tokens=12, n_sink=1, window=2)], ids=["ratio", "budget"])
def test_model_scope_shares_the_budget_across_layers(arch, settings):
    """scope="model": KVzip's scores of every layer compete for the model's budget, so layers keep different
    totals summing to the uniform one, the kept pairs are the best across layers, each layer keeps its share
    through decoding and a second prompt, and pruning still equals masking (sliding layers stay uniform)."""
    model, reference = tiny_model(arch, seed=1), tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(8, 100, (2, 30), generator=g)] + [torch.randint(8, 100, (2, 1), generator=g) for _ in range(6)]
    calls += [torch.randint(8, 100, (2, 5), generator=g), torch.randint(8, 100, (2, 1), generator=g)]
    p = AdaptivePress(KVzipPress(prompt_ids=(5, 6, 7), **settings), normalization="none", floor=0.0, scope="model")
    target = 15 if "ratio" in settings else 12
    _, _, cache = pressed_and_reference(model, reference, p, calls[:1])
    layers = headwise_layers(cache)
    heads = layers[0].lengths.shape[1]
    totals = [[int(layer.lengths[r].sum()) for layer in layers] for r in range(2)]
    assert any(len(set(row)) > 1 for row in totals), f"every layer kept the uniform total: {totals}"
    for r in range(2):
        assert sum(totals[r]) == len(layers) * heads * target, totals
        protected = [p.protected(layer.positions[r : r + 1], 30)[0] for layer in layers]
        kept = torch.cat([layer.scores[r][(layer.positions[r] >= 0) & ~m] for layer, m in zip(layers, protected)])
        shares = [layer.shares[r] for layer in layers]
        assert abs(sum(shares) / len(shares) - 1) < 1e-6
        assert float(kept.min()) >= 0, "not ranked by reconstruction attention weights"
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
    if "max_cache_tokens" in settings:  # at its budget each layer keeps its share, not the uniform one
        for layer in headwise_layers(cache):
            assert layer.lengths.sum(-1).tolist() == [round(target * heads * s) for s in layer.shares]


def test_model_scope_keeps_the_best_pairs_of_all_layers(monkeypatch):
    """With no floor, sinks or window, the pairs kept over all layers are exactly the best-scored ones."""
    from kvpress_like.methods import kvzip

    seen = {}

    def recorded(*args):
        seen.update(original(*args))
        return seen

    original = kvzip.reconstruction_scores
    monkeypatch.setattr(kvzip, "reconstruction_scores", recorded)
    model = tiny_model("llama", seed=2)
    ids = torch.randint(8, 100, (1, 40), generator=torch.Generator().manual_seed(3))
    p = AdaptivePress(KVzipPress(prompt_ids=(5, 6, 7), ratio=0.75), normalization="none", floor=0.0, scope="model")
    _, cache = run(model, p, [ids])
    layers = headwise_layers(cache)
    kept = torch.cat([layer.scores[layer.positions >= 0] for layer in layers])
    assert kept.numel() == len(layers) * layers[0].lengths.shape[1] * 10
    best = torch.cat([seen[layer.layer_idx].flatten() for layer in layers]).topk(kept.numel()).values
    torch.testing.assert_close(kept.sort().values, best.sort().values)


# -- a third-party scorer gets head-wise budgets by wrapping ---------------------------------------------------
@dataclass
class PeakedFirstHead(ScorerPress):
    """A plugin-style scorer: KV head 0's scores are one spike, head 1's are flat ramps."""

    name = "test_peaked_first_head"

    def score(self, layer_idx, keys, values, positions, reading_position):
        scores = positions.float() / 100.0  # flat: one softmax share per token
        spike = torch.where(positions == 3, 1000.0, 0.0)  # one token takes all of head 0's mass
        return torch.cat([spike[:, :1], scores[:, 1:]], dim=1)


def test_a_plugin_scorer_gets_headwise_budgets_unchanged():
    model = tiny_model("llama", seed=7)  # 2 KV heads
    target, floor = 10, 0.2
    plugin = PeakedFirstHead(max_cache_tokens=target)
    ids = ids_for(1, 30, seed=1)
    p = AdaptivePress(plugin, floor=floor)
    _, cache = run(model, p, [ids])
    for layer in headwise_layers(cache):
        assert layer.lengths.tolist() == [[int(floor * target), 2 * target - int(floor * target)]]
        assert 3 in layer.positions[0, 0].tolist()
    pressed, expected, _ = pressed_and_reference(model, tiny_model("llama", seed=7), p, [ids, ids_for(1, 1, seed=2)])
    for a, b in zip(pressed, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_registered_by_name_with_base_settings():
    p = get_press("adakv", base="knorm", ratio=0.5, floor=0.3)
    assert isinstance(p, AdaptivePress) and isinstance(p.base, KnormPress)
    assert p.base.ratio == 0.5 and p.floor == 0.3 and p.target_size(10, False) == 5


def test_pyramid_layer_budgets_decrease_and_keep_the_total():
    model = tiny_model("gpt_neox", seed=8)  # 4 full-attention layers
    p = AdaptivePress(KnormPress(max_cache_tokens=12), pyramid=0.5)
    _, cache = run(model, p, [ids_for(1, 40, seed=3)])
    totals = [int(layer.lengths.sum()) for layer in headwise_layers(cache)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert abs(sum(totals) - 4 * 12 * 4) <= 4 * 4  # the same total as uniform layers, up to rounding per layer


@pytest.mark.parametrize("skip", [(), (0,)], ids=["all-layers", "skip-layer-0"])
def test_layer_weights_set_layer_budgets_with_the_uniform_total(skip):
    model = tiny_model("gpt_neox", seed=8)  # 4 full-attention layers, 4 KV heads
    weights = (3.0, 2.0, 1.0, 2.0)
    p = AdaptivePress(KnormPress(max_cache_tokens=12, skip_layers=skip), layer_weights=weights)
    ids = ids_for(1, 60, seed=3)
    _, cache = run(model, p, [ids])
    compressed = [i for i in range(4) if i not in skip]
    mean = sum(weights[i] for i in compressed) / len(compressed)
    totals = {layer.layer_idx: int(layer.lengths.sum()) for layer in headwise_layers(cache)}
    assert totals == {i: round(12 * weights[i] / mean) * 4 for i in compressed}
    for i in skip:  # the degenerate case: an uncompressed layer keeps every token
        assert not isinstance(cache.layers[i], HeadwisePressedLayer) and cache.layers[i].get_seq_length() == 60
    pressed, expected, _ = pressed_and_reference(model, tiny_model("gpt_neox", seed=8), p, [ids, ids_for(1, 1, seed=4)])
    for a, b in zip(pressed, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_layer_weights_of_the_wrong_length_are_refused_at_entry():
    model = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="one weight per layer"), press(model, AdaptivePress(KnormPress(ratio=0.5), layer_weights=(1, 2))):
        pass


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: AdaptivePress(SnapKVPress(ratio=0.5)), ValueError, "query-free"),
        (lambda: AdaptivePress(KnormPress(), floor=1.5), ValueError, "floor"),
        (lambda: AdaptivePress(KnormPress(), normalization="zscore"), ValueError, "normalization"),
        (lambda: AdaptivePress(KnormPress(), ratio=0.5), TypeError, "base press"),
        (lambda: AdaptivePress(AdaptivePress()), ValueError, "another head-wise"),
        (lambda: AdaptivePress(KnormPress(), layer_weights=(1, 0)), ValueError, "positive"),
        (lambda: AdaptivePress(KnormPress(), layer_weights=(1, 2), pyramid=0.3), ValueError, "pyramid"),
        (lambda: AdaptivePress(KnormPress(), memory_slack=2), ValueError, "memory_slack"),
        (lambda: AdaptivePress(KnormPress(), scope="model"), ValueError, "scores each layer as its keys arrive"),
        (lambda: AdaptivePress(KnormPress(), scope="global"), ValueError, "scope must be one of"),
        (lambda: AdaptivePress(KVzipPress(), scope="model", pyramid=0.3), ValueError, "drop pyramid"),
        (lambda: PressedCache(AdaptivePress(KnormPress(ratio=0.5))), ValueError, "press\\(\\)"),
    ],
)
def test_bad_settings_are_refused_clearly(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_static_cache_and_beam_search_are_refused():
    model = tiny_model("llama")
    p = AdaptivePress(KnormPress(max_cache_tokens=8))
    with pytest.raises(ValueError, match="static=False"), press(model, p, static=True):
        pass
    ids = ids_for(1, 12)
    with torch.no_grad(), press(model, p), pytest.raises(NotImplementedError, match="num_beams=1"):
        model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, max_new_tokens=3, pad_token_id=0)
