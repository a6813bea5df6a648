"""KVzip: reconstruction scores computed by hand, pruning equals masking, and a pass that leaves no trace."""

import pytest
import torch
from helpers import pressed_and_reference
from transformers import DynamicCache

from kvpress_like import KVzipPress, PressedCache, PressedLayer, get_press, press
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.methods import AdaptivePress
from kvpress_like.methods import kvzip
from kvpress_like.methods.kvzip import reconstruction_scores
from tiny import tiny_model

PROMPT = (5, 6, 7)


def _ids(batch, length, seed=0):
    return torch.randint(8, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _by_hand(model, ids, chunk, prompt=lambda lo: torch.tensor([PROMPT])):
    """Max attention weight per (layer, KV head, context token), from plain eager forwards of
    ``context + prompt(lo) + chunk`` (no press, no cache), over the chunk's rows, the group's heads and the chunks."""
    n, hkv = ids.shape[1], model.config.num_key_value_heads
    best = {}
    for lo in range(0, n, chunk):
        part, head = ids[:, lo : lo + chunk], prompt(lo).expand(ids.shape[0], -1)
        seq = torch.cat([ids, head, part], dim=1)
        with torch.no_grad():
            attentions = model(seq, output_attentions=True, use_cache=False).attentions
        for layer, att in enumerate(attentions):  # (batch, query heads, tokens, tokens)
            rows = att[:, :, n + head.shape[1] :, :n]
            got = rows.reshape(ids.shape[0], hkv, -1, n).amax(2)
            best[layer] = got if layer not in best else torch.maximum(best[layer], got)
    return best


@pytest.mark.parametrize("block", [128, 2], ids=["query-rows-at-once", "query-blocks-of-2"])
@pytest.mark.parametrize("chunk", [64, 24, 7], ids=["one-chunk", "exact-chunk", "chunks-of-7"])
def test_scores_are_the_largest_reconstruction_attention_computed_by_hand(chunk, block, monkeypatch):
    """Chunks re-read independently (the paper's chunked scoring): each sees the cache and itself only, so
    chunks of 7 give the maximum over three separate forwards, and a chunk as long as the context the
    unchunked scores. Query rows computed in blocks (the first holding only the instruction's) change nothing."""
    monkeypatch.setattr(kvzip, "QUERY_BLOCK", block)
    model = tiny_model("llama", attn_implementation="eager")
    ids = _ids(2, 24)
    p = KVzipPress(prompt_ids=PROMPT, chunk_size=chunk)  # ratio 0: the prefill keeps everything
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **cache_kwargs(cache))
        got = reconstruction_scores(model, cache, ids, p)
    want = _by_hand(model, ids, chunk)
    assert set(got) == set(want)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-6)


def test_chat_framing_rereads_the_context_as_the_assistants_reply(tiny_model_dir):
    """chat=True: the instruction ends the user's turn in the chat template and opens the assistant's; a later
    chunk's instruction quotes the previous chunk's last 8 tokens. Scores equal plain forwards of those texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = KVzipPress(chat=True, chunk_size=12)
    p.prepare(model)
    encode = lambda text: tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    end = "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(p._ids) == "\n\nRepeat the previous context exactly." + end
    ids = _ids(1, 30)

    def framed(lo):
        if lo == 0:
            return encode("\n\nRepeat the previous context exactly." + end)
        return torch.cat([encode(KVzipPress.continuation), ids[:, lo - 8 : lo], encode(end)], dim=1)

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **cache_kwargs(cache))
        got = reconstruction_scores(model, cache, ids, p)
    want = _by_hand(model, ids, 12, framed)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-6)
    plain = KVzipPress(chunk_size=12)
    plain.prepare(model)
    assert plain.framing() != p.framing() and tok.decode(plain._ids) == plain.prompt


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    "settings, chunked",
    [
        (dict(ratio=0.5), False),
        (dict(ratio=0.5, chunk_size=8), False),  # reconstruction in chunks
        (dict(ratio=0.5), True),  # prefill in chunks: each chunk is re-read and pruned with the kept tokens
        (dict(max_cache_tokens=12, n_sink=1, window=2), False),  # decoding budget after compression
        (dict(ratio=0.5, decoding=True, window=2), False),
        (dict(ratio=0.75, skip_layers=(0,)), False),
    ],
    ids=["prefill", "reconstruction-chunks", "prefill-chunks", "budget", "ratio-decoding", "skip-layer"],
)
def test_pruning_equals_masking(arch, settings, chunked):
    model, reference = tiny_model(arch, seed=1), tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(8, 100, (2, 30), generator=g)]
    calls += [torch.randint(8, 100, (2, 1), generator=g) for _ in range(10)]
    calls += [torch.randint(8, 100, (2, 5), generator=g), torch.randint(8, 100, (2, 1), generator=g)]
    if chunked:
        calls = [calls[0][:, i : i + 8] for i in range(0, 30, 8)] + calls[1:]
    p = KVzipPress(prompt_ids=PROMPT, **settings)
    pressed, expected, cache = pressed_and_reference(model, reference, p, calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
    full = [layer for layer in cache.layers if isinstance(layer, PressedLayer) and layer.sliding_window is None]
    assert full and all(layer.n < 30 for layer in full), "the context was not compressed"
    if "max_cache_tokens" in settings:
        assert {layer.n for layer in full} == {12}


def test_keeping_everything_is_identical_to_no_press():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(2, 20)
    gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(ids, **gen)
        with press(model, KVzipPress(prompt_ids=PROMPT)):
            pressed = model.generate(ids, **gen)
    assert torch.equal(plain.sequences, pressed.sequences)
    for a, b in zip(plain.logits, pressed.logits):
        assert torch.equal(a, b)


def _state(model):
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    configs = [type(m.__dict__.get("config")).__name__ for m in model.modules()]
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(), hooks, configs


def _layer_state(layer):
    if isinstance(layer, PressedLayer):
        return [t.clone() for t in (layer.keys, layer.values, layer.positions, layer.scores)] + [layer.n, layer.seen]
    return [layer.keys.clone(), layer.values.clone(), layer.get_seq_length()]


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch, settings", [("llama", dict(ratio=0.5, skip_layers=(1,))), ("gemma3", dict(ratio=0.5))])
def test_reconstruction_leaves_model_and_cache_untouched(arch, settings):
    model = tiny_model(arch)
    ids = _ids(1, 24)
    p = KVzipPress(prompt_ids=PROMPT, chunk_size=10, **settings)
    params, config, hooks, configs = _state(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **cache_kwargs(cache))
        inside = _state(model)
        before = [_layer_state(layer) for layer in cache.layers]
        reconstruction_scores(model, cache, ids[:, -10:], p)
        after = [_layer_state(layer) for layer in cache.layers]
        assert all(_same(a, b) for a, b in zip(before, after)), "the reconstruction wrote into the user's cache"
        again = _state(model)
        assert _same(inside[0].values(), again[0].values()) and inside[1:] == again[1:]
    final = _state(model)
    assert _same(params.values(), final[0].values()) and (config, hooks, configs) == final[1:]
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "PressedLayer" in kinds and (arch == "gemma3") == ("DynamicSlidingWindowLayer" in kinds)


@pytest.mark.parametrize(
    "arch, make",
    [
        ("llama", lambda: KVzipPress(ratio=0.5, prompt_ids=PROMPT, chunk_size=6)),
        ("llama", lambda: KVzipPress(max_cache_tokens=7, n_sink=1, prompt_ids=PROMPT)),  # decoding budget
        ("llama", lambda: KVzipPress(ratio=0.5, decoding=True, window=2, skip_layers=(1,), prompt_ids=PROMPT)),
        ("gemma3", lambda: KVzipPress(ratio=0.75, prompt_ids=PROMPT)),  # sliding layers beside full ones
        ("llama", lambda: AdaptivePress(KVzipPress(ratio=0.75, prompt_ids=PROMPT), normalization="none", scope="model")),
    ],
    ids=["ratio-chunks", "budget", "ratio-decoding-skip", "gemma3-sliding", "model-wide"],
)
def test_left_padded_batch_equals_each_row_alone(arch, make):
    """Each row of a left-padded batch is re-read alone at its own positions: same logits at every step as
    that prompt generated alone (which obeys pruning == masking, above)."""
    model = tiny_model(arch, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 100, (n,), generator=g) for n in (20, 13, 9)]
    ids, mask = torch.zeros(3, 20, dtype=torch.long), torch.zeros(3, 20, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, 20 - len(prompt) :], mask[r, 20 - len(prompt) :] = prompt, 1
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), press(model, make()):
        batched = model.generate(ids, attention_mask=mask, **gen)
        for r, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **gen)
            for step, (b_logits, a_logits) in enumerate(zip(batched.logits, alone.logits)):
                torch.testing.assert_close(b_logits[r], a_logits[0], atol=2e-5, rtol=1e-4, msg=f"row {r} step {step}")


def test_refusals_are_clear():
    model = tiny_model("llama")
    ids = _ids(2, 12)
    with torch.no_grad(), press(model, KVzipPress(ratio=0.5, prompt_ids=PROMPT)):
        with pytest.raises(ValueError, match="over the cached and new tokens"):
            short = torch.ones(2, 10, dtype=torch.long)
            short[1, :3] = 0
            model(ids, attention_mask=short, **cache_kwargs(DynamicCache(config=model.config)))
        with pytest.raises(ValueError, match="input_ids, not inputs_embeds"):
            model(inputs_embeds=model.get_input_embeddings()(ids), **cache_kwargs(DynamicCache(config=model.config)))
    with pytest.raises(ValueError, match="static=False"):
        with torch.no_grad(), press(model, KVzipPress(max_cache_tokens=8, prompt_ids=PROMPT), static=True, compile=False):
            model.generate(ids[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="not in a bare PressedCache"):
        with torch.no_grad():
            model(ids, **cache_kwargs(PressedCache(KVzipPress(ratio=0.5, prompt_ids=PROMPT))))
    with pytest.raises(ValueError, match="found no tokenizer"):
        with press(model, KVzipPress(ratio=0.5)):
            pass
    with pytest.raises(ValueError, match="chunk_size"):
        KVzipPress(chunk_size=0)
    assert isinstance(get_press("kvzip", ratio=0.5), KVzipPress)


def test_pipeline_and_generate_by_name(tiny_model_dir):
    """The kvpress-qa pipeline finds KVzip by name and answers as press() + generate() by hand do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import kvpress_like.integrations.pipeline  # noqa: F401  (registers the task)
    from kvpress_like import uncompressed
    from kvpress_like.data import offline_corpus

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pipe = pipeline("kvpress-qa", model=model, tokenizer=tokenizer, device="cpu")
    context, question, gen = offline_corpus()[:800], "What is this text about?", dict(max_new_tokens=6, do_sample=False)
    out = pipe(context, question=question, press="kvzip", ratio=0.75, **gen)
    context_ids, (question_ids,) = pipe.encode(context, [question])
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, "kvzip", ratio=0.75):
        model(context_ids, **cache_kwargs(cache))
        kept = cache.layers[0].n
        ids = torch.cat([context_ids, question_ids], dim=1)
        with uncompressed(cache):
            by_hand = model.generate(ids, **cache_kwargs(cache), **gen)
    assert out["answer"] == tokenizer.decode(by_hand[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert kept == context_ids.shape[1] - int(0.75 * context_ids.shape[1])
