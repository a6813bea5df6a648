"""Issue 12 §3: position-targeted Q-Filters (scores against an independent rotation, store lookup, errors)."""

import sys

import pytest
import torch

from kvpress_like import Scoring, get_press, press
from kvpress_like.integrations import calibration
from kvpress_like.filters import save_query_stats, store_path
from kvpress_like.methods import TargetedQFilterPress
from tiny import tiny_model


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_LIKE_FILTERS", str(tmp_path / "filters"))
    return tmp_path / "filters"


def calibrated(model, tmp_path, seed=0):
    ids = torch.randint(2, 128, (3, 48), generator=torch.Generator().manual_seed(seed))
    result = calibration.run_calibration(model, texts=ids, progress=False)
    save_query_stats(result.stats, tmp_path, **result.stats_info)
    return result


def rotate_like_transformers(model, x, p, layer_idx=0):
    """``R(p) x`` with the modeling module's own apply_rotary_pos_emb and rotary module (x: (h, d))."""
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    types = getattr(model.config, "layer_types", None) if "gemma" in model.config.model_type else None
    extra = () if types is None else (types[layer_idx],)  # Gemma: one rotary per layer type
    cos, sin = model.model.rotary_emb(x, torch.tensor([[p]]), *extra)
    out, _ = modeling.apply_rotary_pos_emb(x[None, :, None], x[None, :, None], cos, sin)
    return out[0, :, 0]


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("phi3", dict(partial_rotary_factor=0.5)), ("gemma3", {})])
def test_score_is_the_projection_on_the_direction_rotated_to_the_reading_position(tmp_path, arch, overrides):
    """Against transformers' own rotation, layer after layer and position after position, so the statistics
    rotated once per reading position for all layers (on CPU) are the right layer's, at the right position."""
    model = tiny_model(arch, **overrides)
    result = calibrated(model, tmp_path)
    p = TargetedQFilterPress(ratio=0.5, stats=tmp_path)
    p.prepare(model)
    keys = torch.randn(2, 2, 30, 16)
    positions = torch.arange(30).expand(2, 2, 30)
    calibrated_layers = [int(i) for i in (result.stats["count"] > 0).nonzero()]  # Gemma: full layers only
    for reading_rows in [(30, 400), (30, 400), (401, 30)]:
        reading = torch.tensor(reading_rows).view(2, 1, 1)
        for layer in calibrated_layers[:2]:
            scores = p.score(layer, keys, keys, positions, reading)
            u = result.stats["direction"][layer].view(2, 2, 16).mean(1)  # GQA group mean, (kv_heads, d)
            for row, pos in enumerate(reading_rows):
                target = rotate_like_transformers(model, u, pos, layer)
                want = torch.einsum("hnd,hd->hn", keys[row], target)
                torch.testing.assert_close(scores[row], want, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(scores[0], scores[1], atol=1e-3)  # the reading position matters


def test_registry_store_lookup_and_clear_errors(tmp_path, store):
    model = tiny_model("qwen3")
    assert isinstance(get_press("qfilters_targeted", ratio=0.5), TargetedQFilterPress)
    assert TargetedQFilterPress.scoring is Scoring.READING_POSITION
    with pytest.raises(ValueError, match="no query statistics found.*kvpress-like calibrate"), press(model, TargetedQFilterPress(ratio=0.5)):
        pass
    with pytest.raises(ValueError, match="no query statistics for layer 1"):
        TargetedQFilterPress().score(1, torch.zeros(1, 2, 3, 16), None, None, torch.tensor([[[3]]]))
    calibrated(model, store_path(model))
    other = tiny_model("qwen3", seed=1)
    calibrated(other, store_path(other), seed=1)
    p = TargetedQFilterPress(ratio=0.5)
    keys = torch.randn(1, 2, 12, 16)
    args = (keys, keys, torch.arange(12).expand(1, 2, 12), torch.tensor([[[12]]]))
    with press(model, p):
        first = p.score(1, *args)
    with press(other, p):  # reused on another model: that model's statistics
        second = p.score(1, *args)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="made for another model"), press(tiny_model("qwen3", num_hidden_layers=2), TargetedQFilterPress(stats=store_path(model))):
        pass


@pytest.mark.parametrize("name", ["qfilters_targeted", "expected_attention_calibrated"])
def test_prefill_under_press_keeps_the_top_scores_for_the_reading_position(tmp_path, name):
    """One-shot prefill of n tokens: each layer keeps the top half of score(..., reading_position=n)."""
    from transformers import DynamicCache

    from kvpress_like.integrations.transformers import attention_layers, cache_kwargs, patched_attention

    model = tiny_model("llama")
    calibrated(model, tmp_path)
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    keys = {}

    def grab(module, query, key, value):
        keys[module.layer_idx] = key.detach()

    with torch.no_grad(), patched_attention(model, attention_layers(model), grab):
        model(ids)
    p = get_press(name, ratio=0.5, stats=tmp_path)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **cache_kwargs(cache))
    for idx, layer in enumerate(cache.layers):
        scores = p.score(idx, keys[idx], keys[idx], torch.arange(40).expand(1, 2, 40), torch.tensor([[[40]]]))
        want = scores.topk(20, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(layer.positions.sort(dim=-1).values, want), idx


@pytest.mark.parametrize("name", ["qfilters_targeted", "expected_attention_calibrated"])
def test_rescoring_with_a_budget_equals_masking_and_static_equals_dynamic(tmp_path, name):
    """Prefill, chunk, then decoding into a full budget (re-scored for each reading position): logits equal the
    full-cache reference that masks the evicted positions; the static slot cache generates the same."""
    from helpers import pressed_and_reference

    model = tiny_model("llama", attn_implementation="sdpa")
    reference = tiny_model("llama")
    calibrated(model, tmp_path)
    gen = torch.Generator().manual_seed(1)
    calls = [torch.randint(3, 100, (1, 20), generator=gen), torch.randint(3, 100, (1, 4), generator=gen)]
    calls += [torch.randint(3, 100, (1, 1), generator=gen) for _ in range(6)]
    got, expected, cache = pressed_and_reference(model, reference, get_press(name, max_cache_tokens=12, stats=tmp_path), calls)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert all(layer.positions.shape[-1] == 12 for layer in cache.layers)

    ids = torch.randint(3, 100, (1, 20), generator=gen)
    settings = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with press(model, get_press(name, max_cache_tokens=12, stats=tmp_path)):
            dynamic = model.generate(ids, **settings)
        with press(model, get_press(name, max_cache_tokens=12, stats=tmp_path), static=True, compile=False):
            static = model.generate(ids, **settings)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qfilters_targeted", "expected_attention_calibrated"])
def test_model_without_rope_gets_plain_statistics_and_position_free_scores(tmp_path, name):
    """GPT-2 (learned positions, no RoPE): calibration records the queries as they are, scores do not move
    with the reading position, and pruning with re-scoring still equals masking."""
    from helpers import pressed_and_reference

    model = tiny_model("gpt2", attn_implementation="sdpa")
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    sample = calibration.sample_queries(model, ids, samples_per_head=17, progress=False)
    assert set(sample.rotary_dims.values()) == {0}
    for idx in sample.pre_rope:
        assert torch.equal(sample.pre_rope[idx], sample.post_rope[idx])
    calibrated(model, tmp_path)
    p = get_press(name, ratio=0.5, stats=tmp_path)
    p.prepare(model)
    keys = torch.randn(1, 4, 30, 16)
    at = [p.score(1, keys, keys, torch.arange(30).expand(1, 4, 30), torch.tensor([[[r]]])) for r in (30, 400)]
    torch.testing.assert_close(at[0], at[1])
    gen = torch.Generator().manual_seed(1)
    calls = [torch.randint(3, 100, (1, 20), generator=gen)] + [torch.randint(3, 100, (1, 1), generator=gen) for _ in range(6)]
    got, expected, cache = pressed_and_reference(
        model, tiny_model("gpt2"), get_press(name, max_cache_tokens=12, stats=tmp_path), calls
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert all(layer.positions.shape[-1] == 12 for layer in cache.layers)


def test_embedded_model_gets_statistics_calibrated_once_offline(tmp_path, monkeypatch, tiny_model_dir):
    """An embedded model without stored statistics calibrates on first use (offline corpus), stores filters and
    statistics, and never again; an existing filters file is left as it was."""
    from transformers import AutoTokenizer

    from kvpress_like.filters import FILTER_FILE, STATS_FILE, load_filters, save_filters
    from kvpress_like.models import EMBEDDED_MODELS, load_model

    monkeypatch.setenv("KVPRESS_LIKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVPRESS_LIKE_FILTERS", str(tmp_path / "filters"))
    name = "tiny-embedded"
    monkeypatch.setitem(EMBEDDED_MODELS, name, "a tiny stand-in for an embedded model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "cache" / "models" / name)
    model, _ = load_model(str(tiny_model_dir))
    model.config._name_or_path = name
    mine = torch.randn(4, 2, 16)
    save_filters(mine, store_path(model))  # the user's filters: must survive
    calls = []
    real = calibration.run_calibration
    monkeypatch.setattr(calibration, "run_calibration", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        with press(model, TargetedQFilterPress(ratio=0.5)):
            pass
    assert len(calls) == 1 and (store_path(model) / STATS_FILE).exists()
    assert torch.equal(load_filters(store_path(model) / FILTER_FILE), mine)
