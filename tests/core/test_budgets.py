"""Pruning during decoding: bounded caches under generate(), chunked prefill, QFiltersCache, streaming perplexity."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import pressed_and_reference
from kvpress_like import (
    KnormPress,
    PressedLayer,
    QFilterPress,
    QFiltersCache,
    StreamingLLMPress,
    cache_nbytes,
    press,
)
from tiny import tiny_model
from kvpress_like.integrations.transformers import cache_kwargs

VOCAB = 128


def random_filters(model, seed: int = 0) -> torch.Tensor:
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, generator=gen)


def make_press(kind: str, model, **settings):
    if kind == "qfilters":
        return QFilterPress(filters=random_filters(model), **settings)
    return {"knorm": KnormPress, "streaming_llm": StreamingLLMPress}[kind](**settings)


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class StepRecorder:
    """After every forward call of ``model``: a snapshot of each pressed layer of the cache it used."""

    def __init__(self, model):
        self.steps: list[list[dict]] = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output) -> None:
        cache = output.past_key_values
        self.steps.append(
            [
                dict(
                    n=layer.n,
                    seen=layer.seen,
                    positions=layer.positions.clone(),
                    scores=None if layer.scores is None else layer.scores.clone(),
                    ptrs=tuple(t.data_ptr() for t in (layer._k, layer._v, layer._pos, layer._score)),
                )
                for layer in cache.layers
                if isinstance(layer, PressedLayer)
            ]
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate(model, ids, p=None, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    settings = dict(
        max_new_tokens=12,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),  # random ids may contain the pad id; nothing here is padding
        output_scores=True,
        return_dict_in_generate=True,
    )
    settings.update(kwargs)
    with torch.no_grad():
        if p is None:
            return model.generate(ids, **settings)
        with press(model, p):
            return model.generate(ids, **settings)


# -- a budget larger than the text changes nothing ---------------------------------------------------------
@pytest.mark.parametrize("kind, do_sample", [("qfilters", False), ("knorm", True), ("streaming_llm", True)])
def test_budget_above_total_length_is_identical_to_no_press(kind, do_sample):
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = ids_for(2, 20)
    p = make_press(kind, model, max_cache_tokens=20 + 12, window=4, n_sink=2)
    base = generate(model, ids, do_sample=do_sample)
    with StepRecorder(model) as rec:
        pressed = generate(model, ids, p, do_sample=do_sample)
    assert torch.equal(pressed.sequences, base.sequences)
    for a, b in zip(pressed.scores, base.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Nothing was evicted: every layer holds every position it saw.
    for layers in rec.steps:
        for layer in layers:
            assert layer["n"] == layer["seen"]


# -- the budget holds at every step, with sinks and window kept ---------------------------------------------
@pytest.mark.parametrize(
    "attn, batch, do_sample, kind",
    [
        ("eager", 1, False, "qfilters"),
        ("eager", 2, True, "knorm"),
        ("eager", 2, False, "streaming_llm"),
        ("sdpa", 1, True, "streaming_llm"),
        ("sdpa", 2, False, "qfilters"),
        ("sdpa", 2, True, "qfilters"),
        ("sdpa", 1, False, "knorm"),
    ],
)
def test_budget_window_and_sinks_hold_at_every_generation_step(attn, batch, do_sample, kind):
    budget, window, n_sink, prompt, new = 12, 4, 2, 16, 14
    model = tiny_model("llama", attn_implementation=attn)
    p = make_press(kind, model, max_cache_tokens=budget, window=window, n_sink=n_sink)
    with StepRecorder(model) as rec:
        out = generate(model, ids_for(batch, prompt), p, do_sample=do_sample, max_new_tokens=new)
    assert out.sequences.shape == (batch, prompt + new)
    assert len(rec.steps) == new
    layers_seen = {len(layers) for layers in rec.steps}
    assert layers_seen == {model.config.num_hidden_layers}
    for step in rec.steps:
        for layer in step:
            seen, pos = layer["seen"], layer["positions"]
            assert layer["n"] == min(seen, budget)
            assert pos.shape == (batch, model.config.num_key_value_heads, min(seen, budget))
            expected_protected = set(range(n_sink)) | set(range(seen - window, seen))
            for row in pos.reshape(-1, pos.shape[-1]).tolist():
                assert len(set(row)) == len(row), "a position is stored twice"
                assert expected_protected <= set(row), "a sink or window token was evicted"
                assert max(row) == seen - 1 and min(row) >= 0
                if kind == "streaming_llm":
                    assert set(row) == set(range(n_sink)) | set(range(seen - (budget - n_sink), seen))


@pytest.mark.parametrize("kind", ["qfilters", "knorm"])
def test_decode_step_evicts_the_lowest_scored_unprotected_key(kind):
    budget, window, n_sink = 10, 3, 1
    model = tiny_model("llama", attn_implementation="sdpa")
    p = make_press(kind, model, max_cache_tokens=budget, window=window, n_sink=n_sink)
    with StepRecorder(model) as rec:
        generate(model, ids_for(2, 14, seed=3), p, max_new_tokens=10)
    checked = 0
    for before_step, after_step in zip(rec.steps, rec.steps[1:]):
        for before, after in zip(before_step, after_step):
            seen = after["seen"]
            for b in range(before["positions"].shape[0]):
                for h in range(before["positions"].shape[1]):
                    old = dict(zip(before["positions"][b, h].tolist(), before["scores"][b, h].tolist()))
                    new = set(after["positions"][b, h].tolist())
                    removed = set(old) - new
                    assert new - set(old) == {seen - 1}
                    candidates = {q: s for q, s in old.items() if n_sink <= q < seen - window}
                    assert removed == {min(candidates, key=candidates.get)}
                    checked += 1
    assert checked > 0


# -- pruning equals masking, at every decoding step ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(max_cache_tokens=14, window=3, n_sink=2),  # prefill prune, then in-place overwrites
        dict(ratio=0.5, decoding=True, window=2, n_sink=1),  # ratio mode: append or overwrite per step
    ],
    ids=["budget", "ratio-decoding"],
)
def test_pruning_equals_masking_while_decoding(arch, settings):
    model = tiny_model(arch, seed=1)
    reference = tiny_model(arch, seed=1)
    ids = ids_for(2, 32, seed=5)
    calls = [ids[:, :20]] + [ids[:, i : i + 1] for i in range(20, 32)]
    p = make_press("knorm", model, **settings)
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
    sizes = {layer.n for layer in cache.layers if isinstance(layer, PressedLayer)}
    want = 14 if "max_cache_tokens" in settings else 32 - 32 // 2
    assert sizes == {want}


# -- chunked prefill: bounded peak, same result as the masked reference ---------------------------------------
def test_chunked_prefill_generate_is_bounded_and_equals_masking(monkeypatch):
    budget, chunk, prompt, new = 12, 5, 33, 6
    model = tiny_model("llama", seed=2, attn_implementation="sdpa")
    reference = tiny_model("llama", seed=2)
    p = KnormPress(max_cache_tokens=budget, window=3, n_sink=1, prefill_chunk_size=chunk)
    ids = ids_for(2, prompt, seed=7)

    seen_by_attention = []
    original = PressedLayer.update

    def recording_update(self, key_states, value_states, *args, **kwargs):
        keys, values = original(self, key_states, value_states, *args, **kwargs)
        seen_by_attention.append((key_states.shape[-2], keys.shape[-2], self.n))
        return keys, values

    monkeypatch.setattr(PressedLayer, "update", recording_update)
    out = generate(model, ids, p, max_new_tokens=new)
    monkeypatch.setattr(PressedLayer, "update", original)

    chunk_calls = [c for c in seen_by_attention if c[0] > 1]
    assert {c[0] for c in chunk_calls} <= {chunk, prompt % chunk}, "generate() did not prefill in chunks"
    assert max(keys for _, keys, _ in seen_by_attention) <= budget + chunk
    assert max(stored for _, _, stored in seen_by_attention) <= budget

    # The same calls, by hand, through the pruning == masking reference.
    seq = out.sequences
    calls = [seq[:, i : min(i + chunk, prompt)] for i in range(0, prompt, chunk)]
    calls += [seq[:, i : i + 1] for i in range(prompt, prompt + new - 1)]
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls)
    last = [e[:, -1] for e in expected[len(calls) - new :]]
    for got, want in zip(out.scores, last):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kv_bytes_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 16 * 4 * 2
    assert cache_nbytes(cache) == budget * kv_bytes_per_token


# -- impossible settings fail at construction ------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KnormPress(max_cache_tokens=8, window=6, n_sink=2), "larger than n_sink \\+ window"),
        (lambda: KnormPress(max_cache_tokens=0), "larger than n_sink"),
        (lambda: StreamingLLMPress(max_cache_tokens=4), "larger than n_sink"),  # its 4 default sinks
        (lambda: KnormPress(window=-1), "window must be a non-negative"),
        (lambda: QFilterPress(n_sink=-2, filters=torch.zeros(1, 1, 4)), "n_sink must be a non-negative"),
        (lambda: KnormPress(max_cache_tokens=16, prefill_chunk_size=0), "prefill_chunk_size must be a positive"),
        (lambda: KnormPress(max_cache_tokens=-5), "larger than n_sink"),
        (lambda: QFiltersCache(window_length=128, max_length=128, filters=torch.zeros(1, 1, 4)), "larger than"),
        (lambda: QFiltersCache(window_length=4, max_length=16), "needs Q-Filters"),
        (lambda: QFiltersCache(model_name="no/such-model"), "does not"),
    ],
)
def test_impossible_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- efficiency: each key scored once, buffers never reallocated -----------------------------------------------
@pytest.mark.parametrize("kind", ["qfilters", "knorm"])
def test_keys_scored_once_and_buffers_reused_while_decoding(kind):
    budget, prompt, new = 10, 16, 12
    model = tiny_model("llama", attn_implementation="sdpa")
    p = make_press(kind, model, max_cache_tokens=budget, window=2, n_sink=1)
    scored: dict[int, int] = {}
    original = p.score

    def counting(layer_idx, keys, values, positions, reading_position):
        scored[layer_idx] = scored.get(layer_idx, 0) + keys.shape[-2]
        return original(layer_idx, keys, values, positions, reading_position)

    object.__setattr__(p, "score", counting)
    with StepRecorder(model) as rec:
        generate(model, ids_for(2, prompt), p, max_new_tokens=new)
    # prompt + every fed-back token (the last generated token is never fed), once per layer
    assert scored == {i: prompt + new - 1 for i in range(model.config.num_hidden_layers)}
    for layer_steps in zip(*rec.steps):
        assert len({s["ptrs"] for s in layer_steps}) == 1, "buffers were reallocated during decoding"
    # The stored scores are those of the keys now in each slot (in-place overwrites kept them paired).
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        ids = ids_for(1, prompt + 6, seed=9)
        model(ids[:, :prompt], **cache_kwargs(cache))
        for i in range(prompt, prompt + 6):
            model(ids[:, i : i + 1], **cache_kwargs(cache))
    for layer in cache.layers:
        reading = torch.full((1, 1, 1), layer.seen, dtype=torch.long)
        torch.testing.assert_close(
            layer.scores, original(layer.layer_idx, layer.keys, layer.values, layer.positions, reading)
        )


# -- QFiltersCache: the original repository's entry point ------------------------------------------------------
def test_qfilters_cache_matches_the_press_and_loads_filters_from_a_path(tmp_path):
    from kvpress_like.methods.qfilters import save_filters

    model = tiny_model("qwen3", attn_implementation="sdpa")
    filters = random_filters(model, seed=4)
    save_filters(filters, tmp_path / "tiny_qfilt")
    ids = ids_for(1, 18, seed=2)
    via_press = generate(model, ids, QFilterPress(max_cache_tokens=12, window=4, filters=filters), max_new_tokens=10)
    for source in (filters, tmp_path / "tiny_qfilt", str(tmp_path / "tiny_qfilt" / "model.safetensors")):
        cache = QFiltersCache(window_length=4, max_length=12, filters=source, model=model)
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=10, pad_token_id=0, do_sample=False)
        assert torch.equal(out, via_press.sequences)
        assert {layer.n for layer in cache.layers} == {12}
    with pytest.raises(ValueError, match="do not fit"):
        QFiltersCache(window_length=4, max_length=12, filters=torch.zeros(2, 2, 16), model=model)


# -- streaming perplexity ---------------------------------------------------------------------------------------
def test_streaming_nll_matches_one_forward_and_respects_the_budget():
    from kvpress_like.evaluations.perplexity import stored_budget, stream_nll

    model = tiny_model("llama", seed=3, attn_implementation="sdpa")
    ids = ids_for(1, 60, seed=11)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    full = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(stream_nll(model, ids, None, chunk=7, progress=False), full, rtol=1e-4, atol=1e-4)
    # A budget above the length is the full cache; a real one changes the tail only.
    big = KnormPress(max_cache_tokens=80, window=4, n_sink=2)
    torch.testing.assert_close(stream_nll(model, ids, big, chunk=7, progress=False), full, rtol=1e-4, atol=1e-4)
    budget, chunk = 24, 4
    p = KnormPress(max_cache_tokens=stored_budget(budget, chunk), window=4, n_sink=2)
    with StepRecorder(model) as rec:
        capped = stream_nll(model, ids, p, chunk=chunk, progress=False)
    first = stored_budget(budget, chunk)
    torch.testing.assert_close(capped[: first], full[: first], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(capped[first:], full[first:], atol=1e-3)
    assert max(layer["n"] for step in rec.steps for layer in step) <= first


# -- the original README example on the embedded model ---------------------------------------------------------
@pytest.mark.slow
def test_qfilters_cache_readme_example_on_smollm2():
    from kvpress_like.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    question = "What is the probability of two integers selected at random having a greatest common divisor of 1?"
    messages = [{"role": "user", "content": question + " Think step by step."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    prompt, max_length, new = ids.shape[1], 128, 200
    cache = QFiltersCache(window_length=64, max_length=max_length, model=model)
    with StepRecorder(model) as rec, torch.no_grad():
        capped = model.generate(ids, **cache_kwargs(cache), max_new_tokens=new, do_sample=False, min_new_tokens=new)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    assert capped.shape[1] == prompt + new
    assert max(layer["n"] for step in rec.steps for layer in step) == max_length
    assert rec.steps[-1][0]["seen"] == prompt + new - 1
    # Token t is predicted after prompt + t tokens entered the cache; nothing is evicted before that
    # exceeds max_length, so the capped run must agree with the uncapped one up to there.
    fill = max_length - prompt
    assert torch.equal(capped[0, : prompt + fill + 1], full[0, : prompt + fill + 1])
    # After the cache fills, the text keeps going: no collapse into a single repeated token.
    tail = capped[0, -64:].tolist()
    assert len(set(tail)) >= 8, tokenizer.decode(tail)
