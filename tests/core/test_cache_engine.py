"""The cache engine: sliding windows, left-padded batches, the reading position and re-scoring presses.

Every equivalence here is the golden rule: what the pressed cache computes equals a reference that keeps
every token and masks the evicted ones (tests/helpers.py), or, for padded batches, each row run alone.
"""

from dataclasses import dataclass

import pytest
import torch
from helpers import pressed_and_reference
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import PressedCache, PressedLayer, ScorerPress, press
from kvpress_like.base import Scoring
from kvpress_like.integrations.transformers import cache_kwargs
from tiny import tiny_model


@dataclass
class RecencyBandPress(ScorerPress):
    """A reading-position scorer: keys are worth more the closer ``(reading - position) % 5`` is to zero.

    Entry-time scores and scores at a later reading position rank keys differently, so a cache that
    forgot to re-score would evict other keys than the masked reference (which is told what was kept).
    """

    name = "test_recency_band"
    scoring = Scoring.READING_POSITION

    def score(self, layer_idx, keys, values, positions, reading_position):
        self.readings.append(reading_position.flatten().tolist())
        return -((reading_position - positions) % 5).float() + 1e-3 * values.float().norm(dim=-1)

    def __post_init__(self):
        super().__post_init__()
        self.readings = []


def _filters(model):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, generator=torch.Generator().manual_seed(3))


PRESSES = {
    "knorm": lambda m: kp.KnormPress(ratio=0.75),
    "streaming_llm": lambda m: kp.StreamingLLMPress(ratio=0.75, n_sink=2),
    "qfilters": lambda m: kp.QFilterPress(ratio=0.75, filters=_filters(m)),
    "knorm budget": lambda m: kp.KnormPress(max_cache_tokens=8, n_sink=1, window=2),
    "rescoring budget": lambda m: RecencyBandPress(max_cache_tokens=9, n_sink=1),
    "rescoring every 3 steps": lambda m: RecencyBandPress(max_cache_tokens=9, n_sink=1, rescore_every=3),
}


def _calls(seed=1, batch=2, prompt=40, steps=20):
    g = torch.Generator().manual_seed(seed)
    calls = [torch.randint(3, 100, (batch, prompt), generator=g)]
    calls += [torch.randint(3, 100, (batch, 1), generator=g) for _ in range(steps)]
    return calls + [torch.randint(3, 100, (batch, 6), generator=g), torch.randint(3, 100, (batch, 1), generator=g)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(PRESSES))
def test_sliding_window_pruning_equals_windowed_masking(impl, method):
    """Mistral with a 16-token window and 40+ tokens: compressed, never attending past the window."""
    model = tiny_model("mistral", attn_implementation=impl, sliding_window=16)
    reference = tiny_model("mistral", attn_implementation="eager", sliding_window=16)
    got, expected, cache = pressed_and_reference(model, reference, PRESSES[method](model), _calls())
    for g_logits, e_logits in zip(got, expected):
        torch.testing.assert_close(g_logits, e_logits, atol=2e-5, rtol=1e-4)
    assert all(isinstance(layer, PressedLayer) and layer.sliding_window == 16 for layer in cache.layers)
    assert all(layer.n <= 16 for layer in cache.layers)
    # sensitive: a cache that ignored the window (attending to every kept token) computes other logits
    unwindowed = tiny_model("mistral", attn_implementation="eager", sliding_window=None)
    got_full, _, _ = pressed_and_reference(unwindowed, tiny_model("mistral"), PRESSES[method](unwindowed), _calls())
    assert (got_full[-1] - got[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["knorm budget", "qfilters budget"])
def test_sliding_window_bare_caches_match_press(impl, method):
    """PressedCache and QFiltersCache on a sliding model (budget below the window) equal press()."""
    model = tiny_model("mistral", attn_implementation=impl, sliding_window=16)
    filters = _filters(model)
    if method == "knorm budget":
        make_cache = lambda: PressedCache(kp.KnormPress(max_cache_tokens=8, window=2), config=model.config)  # noqa: E731
        make_press = lambda: kp.KnormPress(max_cache_tokens=8, window=2)  # noqa: E731
    else:
        make_cache = lambda: kp.QFiltersCache(window_length=2, max_length=8, filters=filters, model=model)  # noqa: E731
        make_press = lambda: kp.QFilterPress(max_cache_tokens=8, window=2, filters=filters)  # noqa: E731
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = model.generate(ids, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True,
                              **cache_kwargs(make_cache()))
        with press(model, make_press()):
            ctx = model.generate(ids, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for a, b in zip(bare.logits, ctx.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_bare_cache_refuses_what_transformers_masks_cannot_express():
    """A chat's next turn on a compressed sliding layer needs press()'s masks; a bare cache says so."""
    model = tiny_model("mistral", sliding_window=16)
    cache = PressedCache(kp.KnormPress(max_cache_tokens=8), config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 40)), **cache_kwargs(cache))
        with pytest.raises(ValueError, match="with press"):
            model(torch.randint(3, 100, (1, 5)), **cache_kwargs(cache))


def _left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = prompt
        mask[r, width - len(prompt):] = 1
    return prompts, ids, mask


PADDED_PRESSES = {
    "knorm": lambda m: kp.KnormPress(ratio=0.5),
    "streaming_llm": lambda m: kp.StreamingLLMPress(ratio=0.5, n_sink=2),
    "qfilters": lambda m: kp.QFilterPress(ratio=0.5, filters=_filters(m)),
    "snapkv": lambda m: kp.SnapKVPress(ratio=0.5, window_size=3),
    "knorm budget": lambda m: kp.KnormPress(max_cache_tokens=6, n_sink=1, window=2),
    "knorm decoding": lambda m: kp.KnormPress(ratio=0.5, decoding=True),
    "rescoring budget": lambda m: RecencyBandPress(max_cache_tokens=7, n_sink=1),
}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(PADDED_PRESSES))
def test_left_padded_batch_equals_each_row_alone(arch, impl, method):
    model = tiny_model(arch, attn_implementation=impl, **({"sliding_window": 8} if arch == "mistral" else {}))
    prompts, ids, mask = _left_padded([20, 13, 7])
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    p = PADDED_PRESSES[method](model)
    if method == "snapkv":  # SnapKV's last queries differ per row (and it never sees sliding layers): refused
        with pytest.raises(ValueError, match="one at a time" if arch == "llama" else "sliding-window"):
            with torch.no_grad(), press(model, p):
                model.generate(ids, attention_mask=mask, **settings)
        return
    with torch.no_grad(), press(model, p):
        cache = DynamicCache(config=model.config)
        batched = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **settings)
        for r, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **settings)
            for step, (b_logits, a_logits) in enumerate(zip(batched.logits, alone.logits)):
                torch.testing.assert_close(b_logits[r], a_logits[0], atol=2e-5, rtol=1e-4, msg=f"row {r} step {step}")
    pressed = [layer for layer in cache.layers if isinstance(layer, PressedLayer)]
    assert pressed
    # rows keep their own counts: padding is never kept, and the short row keeps fewer tokens
    live = (pressed[0].positions >= 0).sum(-1)[:, 0]
    if arch == "llama" and method in ("knorm", "streaming_llm", "qfilters"):  # mistral's window caps both
        assert live[0] > live[2]


def test_reading_position_for_prefill_chunks_decoding_and_next_turn():
    """score() is told the position of the next query: the end of each call, per row."""
    model = tiny_model("llama")
    p = RecencyBandPress(max_cache_tokens=10)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        p.readings.clear()
        model(torch.randint(3, 100, (1, 12)), **cache_kwargs(cache))  # one-shot prefill
        assert {r[0] for r in p.readings} == {12}
        p.readings.clear()
        model(torch.randint(3, 100, (1, 1)), **cache_kwargs(cache))  # decoding step
        assert {r[0] for r in p.readings} == {13}
        # one scoring per layer (its live slots): the new key is not scored on entry as well
        assert len(p.readings) == model.config.num_hidden_layers
        p.readings.clear()
        model(torch.randint(3, 100, (1, 5)), **cache_kwargs(cache))  # a chat's next turn
        assert {r[0] for r in p.readings} == {18}
    chunked = RecencyBandPress(max_cache_tokens=6, prefill_chunk_size=4)
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad(), press(model, chunked):
        chunked.readings.clear()
        model.generate(ids, max_new_tokens=1, do_sample=False)
    # the first chunk fits the budget: nothing to evict, so nothing is scored (no entry-time scores to keep)
    assert sorted({r[0] for r in chunked.readings}) == [8, 12]
    _, ids, mask = _left_padded([12, 7])
    padded = RecencyBandPress(max_cache_tokens=10)
    with torch.no_grad(), press(model, padded):
        padded.readings.clear()
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert padded.readings[0] == [12, 7] and padded.readings[-1] == [13, 8]


def test_rescoring_changes_what_is_evicted():
    """With re-scoring the kept set follows the reading position; with entry-time scores it would not."""
    model = tiny_model("llama")

    @dataclass
    class EntryTime(RecencyBandPress):
        name = "test_entry_time"
        scoring = Scoring.ENTRY_TIME

    kept = {}
    for cls in (RecencyBandPress, EntryTime):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, cls(max_cache_tokens=9)):
            model.generate(torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0)),
                           **cache_kwargs(cache), max_new_tokens=7, do_sample=False)
        kept[cls] = cache.layers[0].positions.sort(-1).values
    assert not torch.equal(kept[RecencyBandPress], kept[EntryTime])


def test_rescore_every_k_steps_rescores_then_and_still_equals_masking():
    """rescore_every=3: the live slots are re-scored at the 3rd, 6th... decoding step after the last scoring
    (the prefill's), evictions in between use the stored scores, and pruning still equals masking."""
    model = tiny_model("llama")
    p = RecencyBandPress(max_cache_tokens=10, rescore_every=3)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(torch.randint(3, 100, (1, 12)), **cache_kwargs(cache))  # prefill over the budget: scored at 12
        p.readings.clear()
        for _ in range(7):  # readings 13..19
            model(torch.randint(3, 100, (1, 1)), **cache_kwargs(cache))
    assert [r[0] for r in p.readings] == [15] * 4 + [18] * 4  # once per layer, every third step
    kept = {}
    for every in (1, 3):
        got, expected, out = pressed_and_reference(
            model, tiny_model("llama"), RecencyBandPress(max_cache_tokens=9, n_sink=1, rescore_every=every), _calls()
        )
        for g_logits, e_logits in zip(got, expected):
            torch.testing.assert_close(g_logits, e_logits, atol=2e-5, rtol=1e-4)
        kept[every] = out.layers[0].positions.sort(-1).values
    assert not torch.equal(kept[1], kept[3])  # the stale scores did choose other victims
    with pytest.raises(ValueError, match="rescore_every=1 or static=False"):
        with press(model, RecencyBandPress(max_cache_tokens=9, rescore_every=2), static=True, compile=False):
            pass


def test_old_style_key_scores_press_still_works():
    @dataclass
    class Legacy(ScorerPress):
        name = "test_legacy"

        def key_scores(self, layer_idx, keys, positions):
            return (positions % 2).float()

    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, Legacy(ratio=0.5)):
        model(torch.randint(3, 100, (1, 20)), **cache_kwargs(cache))
    assert bool((cache.layers[0].positions % 2 == 1).all())


@pytest.mark.parametrize(
    "settings,error,match",
    [
        (dict(skip_layers=5), TypeError, "list or tuple"),
        (dict(skip_layers=[0.7]), TypeError, "integer layer indices"),
        (dict(skip_layers=[-1]), ValueError, "does not exist"),
        (dict(decoding="no"), TypeError, "True or False"),
        (dict(prefill_chunk_size=True), ValueError, "positive integer"),
        (dict(max_cache_tokens=2.5), ValueError, "integer"),
        (dict(rescore_every=0), ValueError, "positive integer"),
        (dict(rescore_every=2), ValueError, "do not depend on the reading position"),
    ],
)
def test_bad_settings_refused_at_construction(settings, error, match):
    with pytest.raises(error, match=match):
        kp.KnormPress(ratio=0.5, **settings)


def test_skip_layer_out_of_range_refused_on_entry():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layer 99 does not exist \(layer indices are 0..3\)"):
        with press(model, kp.KnormPress(ratio=0.5, skip_layers=[99])):
            pass


def test_skip_layers_cache_continued_outside_context_is_refused():
    model = tiny_model("llama", attn_implementation="sdpa")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model, kp.KnormPress(ratio=0.5, skip_layers=[0])):
            model(torch.randint(3, 100, (1, 20)), **cache_kwargs(cache))
        with pytest.raises(ValueError, match="skip_layers"):
            model(torch.randint(3, 100, (1, 5)), **cache_kwargs(cache))


def test_observers_see_every_update():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    events = []
    with torch.no_grad(), press(model, kp.KnormPress(max_cache_tokens=8)):
        model(torch.randint(3, 100, (1, 6)), **cache_kwargs(cache))
        cache.layers[0].observers.append(lambda layer, plan, n: events.append((plan, n)))
        for _ in range(4):
            model(torch.randint(3, 100, (1, 1)), **cache_kwargs(cache))
        model(torch.randint(3, 100, (1, 5)), **cache_kwargs(cache))
    assert events == [("append", 1), ("append", 1), ("overwrite", 1), ("overwrite", 1), ("prune", 5)]


@pytest.mark.parametrize("make", [lambda: RecencyBandPress(max_cache_tokens=9, n_sink=1), lambda: kp.KnormPress(max_cache_tokens=9)])
def test_static_cache_rescoring_equals_dynamic(make):
    """The static slot cache (eager here; compiled in tests/core/test_static_cache.py) re-scores like the dynamic one."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with press(model, make()):
            dynamic = model.generate(ids, **settings)
        with press(model, make(), static=True, compile=False):
            static = model.generate(ids, **settings)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_generation_internals_checked_loudly():
    """The private generate() methods static=True wraps are checked first; a changed signature names the version."""
    import transformers

    from kvpress_like.integrations.generation import check_generation_internals

    model = tiny_model("llama")
    check_generation_internals(model)  # the installed transformers matches

    class Changed(type(model)):
        def _prefill(self, generation_config, input_ids, model_kwargs):  # reordered parameters
            raise AssertionError("never called")

    changed = Changed(model.config)
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}.*_prefill"):
        with press(changed, kp.KnormPress(max_cache_tokens=8), static=True):
            pass
