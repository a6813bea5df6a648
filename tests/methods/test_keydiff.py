"""KeyDiff: minus the cosine to the mean normalized key of the live slots; pruning equals masking everywhere."""

import pytest
import torch
from helpers import pressed_and_reference
from transformers import DynamicCache

from kvpress_like import KeyDiffPress, PressedLayer, get_press, press
from kvpress_like.integrations.transformers import cache_kwargs
from tiny import tiny_model


def _ids(batch, length, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_score_is_minus_the_cosine_to_the_anchor_of_the_live_keys():
    keys = torch.randn(2, 3, 10, 8)
    positions = torch.arange(10).expand(2, 3, 10).clone()
    positions[1, :, 7:] = -1  # empty slots: no part of "the others"
    got = KeyDiffPress().score(0, keys, keys, positions, torch.tensor(10).view(1, 1, 1))
    for b, n in ((0, 10), (1, 7)):
        for h in range(3):
            k = keys[b, h, :n]
            anchor = (k / k.norm(dim=-1, keepdim=True)).mean(0)
            want = -torch.nn.functional.cosine_similarity(k, anchor[None], dim=-1)
            torch.testing.assert_close(got[b, h, :n], want, rtol=1e-5, atol=1e-6)
    assert isinstance(get_press("keydiff", ratio=0.5), KeyDiffPress)


def test_prefill_keeps_the_keys_least_like_the_others():
    model = tiny_model("llama")
    ids = _ids(2, 32)
    cache, full = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model, KeyDiffPress(ratio=0.75)):
            model(ids, **cache_kwargs(cache))
        model(ids, **cache_kwargs(full))
    for layer, plain in zip(cache.layers, full.layers):
        unit = torch.nn.functional.normalize(plain.keys, dim=-1)
        cos = (unit * torch.nn.functional.normalize(unit.mean(2, keepdim=True), dim=-1)).sum(-1)
        expected = cos.topk(8, dim=-1, largest=False).indices.sort(-1).values
        assert torch.equal(layer.positions.sort(-1).values, expected)


def _calls(batch=2, prompt=30, steps=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    calls = [torch.randint(3, 100, (batch, prompt), generator=g)]
    calls += [torch.randint(3, 100, (batch, 1), generator=g) for _ in range(steps)]
    return calls + [torch.randint(3, 100, (batch, 5), generator=g), torch.randint(3, 100, (batch, 1), generator=g)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    "settings, chunked",
    [
        (dict(ratio=0.5), False),  # prefill pruning, then appends
        (dict(ratio=0.5), True),  # the prompt in chunks of 8: each chunk prunes old kept + new together
        (dict(max_cache_tokens=12, n_sink=1, window=2), False),  # decoding budget: live slots re-scored per eviction
        (dict(ratio=0.5, decoding=True, window=2), False),
        (dict(max_cache_tokens=12, rescore_every=3), False),
    ],
    ids=["prefill", "chunked-prefill", "budget", "ratio-decoding", "rescore-every-3"],
)
def test_pruning_equals_masking(arch, settings, chunked):
    model, reference = tiny_model(arch, seed=1), tiny_model(arch, seed=1)
    calls = _calls()
    if chunked:
        calls = [calls[0][:, i : i + 8] for i in range(0, 30, 8)] + calls[1:]
    pressed, expected, cache = pressed_and_reference(model, reference, KeyDiffPress(**settings), calls)
    for i, (a, b) in enumerate(zip(pressed, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
    sizes = {layer.n for layer in cache.layers if isinstance(layer, PressedLayer) and layer.sliding_window is None}
    if "max_cache_tokens" in settings:
        assert sizes == {12}
    elif not settings.get("decoding"):
        assert max(sizes) < 30 + 14 + 6  # the prompt was pruned


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("settings", [dict(ratio=0.5), dict(max_cache_tokens=7, n_sink=1)], ids=["ratio", "budget"])
def test_left_padded_batch_equals_each_row_alone(impl, settings):
    model = tiny_model("llama", attn_implementation=impl)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in (20, 13, 7)]
    ids = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, 20 - len(prompt):], mask[r, 20 - len(prompt):] = prompt, 1
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), press(model, KeyDiffPress(**settings)):
        batched = model.generate(ids, attention_mask=mask, **gen)
        for r, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **gen)
            for step, (b_logits, a_logits) in enumerate(zip(batched.logits, alone.logits)):
                torch.testing.assert_close(b_logits[r], a_logits[0], atol=2e-5, rtol=1e-4, msg=f"row {r} step {step}")


def test_static_cache_equals_dynamic():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(2, 20)
    gen = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with press(model, KeyDiffPress(max_cache_tokens=9, n_sink=1)):
            dynamic = model.generate(ids, **gen)
        with press(model, KeyDiffPress(max_cache_tokens=9, n_sink=1), static=True, compile=False):
            static = model.generate(ids, **gen)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
