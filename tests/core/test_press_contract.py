"""The press contract: one scoring mode, one ``score()``, settings declared once, the engine policy.

Presses written against the older contract (README and ARCHITECTURE before the scoring mode: class flags
``query_free = False`` / ``position_dependent = True``, a ``key_scores`` method) are written here exactly as
those documents showed them, and must behave as the same press written with ``scoring``.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import pressed_and_reference
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.methods.adaptive import AdaptivePress
from tiny import tiny_model
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import PressedCache, ScorerPress, Scoring, press
from kvpress_like.base import EnginePolicy, Press, PressSettings
from kvpress_like.registry import press_settings


# -- presses written as the older README / ARCHITECTURE documented them ---------------------------------
@dataclass
class LegacyRecencyBand(ScorerPress):
    """README: "A press whose scores depend on the reading position sets `position_dependent = True`"."""

    name = "test_legacy_recency_band"
    position_dependent = True

    def score(self, layer_idx, keys, values, positions, reading_position):
        return -((reading_position - positions) % 5).float() + 1e-3 * values.float().norm(dim=-1)


@dataclass
class RecencyBand(ScorerPress):
    """The same press, written with the scoring mode."""

    name = "test_recency_band_mode"
    scoring = Scoring.READING_POSITION

    def score(self, layer_idx, keys, values, positions, reading_position):
        return -((reading_position - positions) % 5).float() + 1e-3 * values.float().norm(dim=-1)


@dataclass
class LegacyQueryPress(ScorerPress):
    """README: "Presses whose scores need queries set `query_free = False` and implement `query_scores(module,
    queries, keys, positions, seen)`"; keeps odd positions, and records the queries it was given."""

    name = "test_legacy_query"
    query_free = False

    def query_scores(self, module, queries, keys, positions, seen):
        self.calls.append((tuple(queries.shape), seen))
        return (positions % 2).float()

    def __post_init__(self):
        super().__post_init__()
        self.calls = []


@dataclass
class LegacyKeyScores(ScorerPress):
    """ARCHITECTURE: "implementing `score()` (or the older `key_scores()`)", with the reading-position flag."""

    name = "test_legacy_key_scores"
    position_dependent = True

    def key_scores(self, layer_idx, keys, positions):
        return (positions % 2).float()


def _prompt(n=20, batch=1, seed=0):
    return torch.randint(3, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_legacy_flags_become_the_scoring_mode():
    @dataclass
    class Annotated(ScorerPress):  # the built-ins' own older spelling
        position_dependent: ClassVar[bool] = True

    assert Annotated.scoring is Scoring.READING_POSITION and "position_dependent" not in {f.name for f in dataclasses.fields(Annotated)}
    assert LegacyRecencyBand.scoring is Scoring.READING_POSITION
    assert LegacyQueryPress.scoring is Scoring.QUERY
    assert LegacyKeyScores.scoring is Scoring.READING_POSITION
    assert ScorerPress.scoring is Scoring.ENTRY_TIME
    # The flags read back from the mode (for code that reads them), on classes and instances alike.
    assert LegacyQueryPress.query_free is False and LegacyQueryPress().position_dependent is False
    assert LegacyRecencyBand.position_dependent is True and kp.SnapKVPress.query_free is False
    assert kp.KeyDiffPress().position_dependent is True and kp.KnormPress.position_dependent is False
    assert AdaptivePress(kp.KeyDiffPress(ratio=0.5)).position_dependent is True


def test_legacy_position_dependent_press_matches_the_mode_and_masking():
    """Re-scored at the reading position exactly as the press written with ``scoring``, and pruning equals
    masking (decoding into a budget, then a multi-token call)."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(3, 100, (2, 30), generator=g)] + [torch.randint(3, 100, (2, 1), generator=g) for _ in range(8)]
    calls.append(torch.randint(3, 100, (2, 5), generator=g))
    runs = {}
    for cls in (LegacyRecencyBand, RecencyBand):
        got, expected, cache = pressed_and_reference(model, tiny_model("llama"), cls(max_cache_tokens=9, n_sink=1), calls)
        for g_logits, e_logits in zip(got, expected):
            torch.testing.assert_close(g_logits, e_logits, atol=2e-5, rtol=1e-4)
        runs[cls] = [layer.positions.clone() for layer in cache.layers], got
    for a, b in zip(runs[LegacyRecencyBand][0], runs[RecencyBand][0]):
        assert torch.equal(a, b)
    for a, b in zip(runs[LegacyRecencyBand][1], runs[RecencyBand][1]):
        assert torch.equal(a, b)


def test_legacy_query_free_false_press_is_scored_with_queries_after_attention():
    model = tiny_model("llama")
    p = LegacyQueryPress(ratio=0.5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(_prompt(), **cache_kwargs(cache))
    n_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert p.calls == [((1, heads, 20, model.config.head_dim), 20)] * n_layers
    for layer in cache.layers:
        assert layer.positions.tolist() == [[list(range(1, 20, 2))] * model.config.num_key_value_heads]
    with pytest.raises(ValueError, match="scores keys with queries"):
        PressedCache(LegacyQueryPress(ratio=0.5))


def test_legacy_key_scores_press_works_through_the_adapter():
    """``key_scores`` becomes ``score``; with the reading-position flag the live slots are re-scored (by the same
    rule here), so a decoding budget keeps odd positions plus the token just fed (written before attention)."""
    p = LegacyKeyScores(max_cache_tokens=10)
    keys = torch.randn(1, 2, 6, 16)
    positions = torch.arange(6).expand(1, 2, 6)
    assert torch.equal(p.score(0, keys, keys, positions, torch.tensor([[[6]]])), (positions % 2).float())
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model.generate(_prompt(), **cache_kwargs(cache), max_new_tokens=6, do_sample=False)
    for layer in cache.layers:  # prompt 0..19 keeps the odd ones; each fed token 20..24 evicts the lowest score
        assert layer.positions.sort(-1).values.tolist() == [[list(range(3, 20, 2)) + [24]] * 2]


def test_flags_that_mean_nothing_together_are_refused_at_class_definition():
    with pytest.raises(TypeError, match="query_free = False and position_dependent = True.*Scoring.QUERY"):
        @dataclass
        class Both(ScorerPress):
            query_free = False
            position_dependent = True

    with pytest.raises(TypeError, match="query_free = False and position_dependent = True"):
        @dataclass
        class RescoredSnapKV(kp.SnapKVPress):  # the query mode is inherited
            position_dependent = True

    with pytest.raises(TypeError, match="sets both scoring and query_free; set scoring only"):
        @dataclass
        class Mixed(ScorerPress):
            scoring = Scoring.QUERY
            query_free = False


def test_a_subclass_of_a_legacy_press_can_change_the_mode():
    @dataclass
    class EntryTime(LegacyRecencyBand):
        position_dependent = False

    @dataclass
    class Modern(LegacyQueryPress):
        scoring = Scoring.ENTRY_TIME

    assert EntryTime.scoring is Scoring.ENTRY_TIME and LegacyRecencyBand.scoring is Scoring.READING_POSITION
    assert Modern.scoring is Scoring.ENTRY_TIME and Modern.query_free is True


def test_rescore_every_is_refused_unless_scored_at_the_reading_position():
    assert LegacyRecencyBand(rescore_every=3).policy.rescore_every == 3
    with pytest.raises(ValueError, match="do not depend on the reading position"):
        LegacyQueryPress(rescore_every=2)


def test_settings_are_declared_once_and_keep_their_constructor_api():
    declared = [f.name for f in dataclasses.fields(PressSettings)]
    assert declared == ["skip_layers", "max_cache_tokens", "decoding", "prefill_chunk_size", "rescore_every"]
    for cls in (ScorerPress, kp.QFilterPress, kp.KnormPress, kp.SnapKVPress):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert all(fields[name].kw_only for name in declared)
        assert set(declared) <= press_settings(cls)
    p = kp.QFilterPress(0.5, max_cache_tokens=64, prefill_chunk_size=16, skip_layers=[0], n_sink=2)
    assert (p.ratio, p.max_cache_tokens, p.prefill_chunk_size, p.skip_layers, p.n_sink) == (0.5, 64, 16, (0,), 2)
    q = dataclasses.replace(p, max_cache_tokens=32)
    assert q.max_cache_tokens == 32 and q.ratio == 0.5 and q.prefill_chunk_size == 16
    with pytest.raises(ValueError, match="max_cache_tokens=0 must be an integer larger than n_sink"):
        dataclasses.replace(p, max_cache_tokens=0)
    assert press_settings(AdaptivePress) == {"base", "floor", "normalization", "temperature", "pyramid", "memory_slack",
                                             "layer_weights", "scope"}


def test_a_plain_press_subclass_keeps_its_class_settings():
    """A press that is not a dataclass (``Press`` directly) sets settings as class attributes; nothing shadows them."""

    class Fixed(Press):
        max_cache_tokens = 12
        prefill_chunk_size = 4

        def target_size(self, seen, decoding):
            return self.max_cache_tokens

        def score(self, layer_idx, keys, values, positions, reading_position):
            return positions.float()

        def select(self, scores, positions, seen, n_keep):
            return scores.topk(n_keep, dim=-1).indices.sort(-1).values

        def victims(self, scores, positions, seen):
            return scores.argmin(-1)

    assert Fixed().policy == EnginePolicy(Scoring.ENTRY_TIME, 12, 4, 1, False)


@pytest.mark.parametrize(
    "p,stores",
    [
        (kp.KnormPress(ratio=0.5), True),
        (RecencyBand(max_cache_tokens=9), False),
        (RecencyBand(max_cache_tokens=9, rescore_every=3), True),
        (LegacyQueryPress(ratio=0.5), False),
    ],
)
def test_the_engine_reads_its_policy_from_the_press(p, stores):
    model = tiny_model("llama")
    assert p.policy.stores_scores is stores
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(_prompt(), **cache_kwargs(cache))
    for layer in cache.layers:
        assert layer.policy == p.policy and (layer.scores is not None) is stores


def test_prefill_chunking_comes_from_the_policy():
    model = tiny_model("llama")
    p = kp.KnormPress(max_cache_tokens=12, prefill_chunk_size=8)
    assert p.policy.prefill_chunk == 8 and p.policy.capacity == 12 and p.policy.prunes_while_decoding
    before = model.generation_config.prefill_chunk_size
    with press(model, p):
        assert model.generation_config.prefill_chunk_size == 8
    assert model.generation_config.prefill_chunk_size == before
