"""Issue 2 acceptance on tiny random models: equivalence, sizes, errors and exact restoration."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS
from helpers import pressed_and_reference
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import PressedLayer, cache_nbytes, press
from kvpress_like.models import kv_heads
from tiny import tiny_model
from kvpress_like.integrations.transformers import cache_kwargs

METHODS = {
    "knorm": lambda: kp.KnormPress(ratio=0.5),
    "streaming_llm": lambda: kp.StreamingLLMPress(ratio=0.5, n_sink=2),
    "snapkv": lambda: kp.SnapKVPress(ratio=0.6, window_size=4),
    "qfilters": lambda: kp.QFilterPress(ratio=0.5, filters=None),
    "knorm+window+skip": lambda: kp.KnormPress(ratio=0.5, n_sink=1, window=3, skip_layers=(1,)),
}


def _qfilters_for(model):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return torch.randn(cfg.num_hidden_layers, kv_heads(cfg), head_dim, generator=torch.Generator().manual_seed(3))


def _make(method, model):
    p = METHODS[method]()
    if isinstance(p, kp.QFilterPress):
        p = kp.QFilterPress(ratio=0.5, filters=_qfilters_for(model))
    return p


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_is_bit_identical(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    ids = torch.randint(3, 100, (2, 24))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with press(model, kp.KnormPress(ratio=0.0)):
            out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        assert torch.equal(a, b)


MASKING_CASES = [("llama", impl, method) for impl in ("eager", "sdpa") for method in METHODS] + [
    (arch, impl, method)
    for arch in ARCHS[1:]
    for impl in ("eager", "sdpa")
    for method in (("qfilters", "snapkv") if impl == "sdpa" else ("knorm+window+skip", "streaming_llm"))
]


@pytest.mark.parametrize("arch,impl,method", MASKING_CASES)
def test_pruning_equals_masking(arch, impl, method):
    """Prefill, decoding steps, and a chat's next turn of several tokens all match the masked reference."""
    model = tiny_model(arch, attn_implementation=impl)
    reference = tiny_model(arch, attn_implementation="eager")
    p = _make(method, model)
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(3, 100, (2, 40), generator=g)]
    calls += [torch.randint(3, 100, (2, 1), generator=g) for _ in range(3)]
    calls += [torch.randint(3, 100, (2, 6), generator=g), torch.randint(3, 100, (2, 1), generator=g)]
    got, expected, cache = pressed_and_reference(model, reference, p, calls)
    for g_logits, e_logits in zip(got, expected):
        torch.testing.assert_close(g_logits, e_logits, atol=2e-5, rtol=1e-4)
    # the check is sensitive: without the press the logits differ
    with torch.no_grad():
        full = model(torch.cat(calls, dim=1)).logits[:, -1]
    assert (full - got[-1][:, -1]).abs().max() > 1e-3
    assert any(isinstance(layer, PressedLayer) for layer in cache.layers)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_sizes_sorted_and_untouched_layers(arch):
    model = tiny_model(arch, num_hidden_layers=4)
    n, ratio = 37, 0.7
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, kp.KnormPress(ratio=ratio, skip_layers=(3,))):
        model(torch.randint(3, 100, (1, n)), **cache_kwargs(cache))
    keep = n - math.floor(n * ratio)
    for idx, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            assert not isinstance(layer, PressedLayer)
        elif idx == 3:
            assert not isinstance(layer, PressedLayer) and layer.keys.shape[-2] == n
        else:
            assert isinstance(layer, PressedLayer)
            assert layer.keys.shape[-2] == keep and layer._k.shape[-2] == keep  # allocated == kept
            pos = layer.positions
            assert torch.equal(pos, pos.sort(dim=-1).values)
            assert layer.get_seq_length() == n
    assert cache.get_seq_length() == n


def test_kv_bytes_really_shrink():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 64))
    sizes = {}
    for ratio in (0.0, 0.75):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model, kp.KnormPress(ratio=ratio)):
            model(ids, **cache_kwargs(cache))
        sizes[ratio] = cache_nbytes(cache)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(plain))
    assert sizes[0.0] == cache_nbytes(plain)
    assert sizes[0.75] == cache_nbytes(plain) // 4


def test_generate_continues_with_true_positions():
    """After pruning, new tokens get positions counted from all tokens seen, not from the cache length."""
    model = tiny_model("llama")
    seen_positions = []
    rotary = model.model.rotary_emb
    handle = rotary.register_forward_pre_hook(
        lambda m, args, kwargs: seen_positions.append(kwargs.get("position_ids", args[-1]).clone()), with_kwargs=True
    )
    try:
        with torch.no_grad(), press(model, kp.KnormPress(ratio=0.75)):
            model.generate(torch.randint(3, 100, (1, 20)), max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert [p[0, -1].item() for p in seen_positions] == [19, 20, 21]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, True, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        kp.KnormPress(ratio=ratio)


def test_unknown_press_name_lists_valid_ones():
    with pytest.raises(KeyError, match="qfilters"):
        kp.get_press("nope")
    model = tiny_model("llama")
    with pytest.raises(KeyError, match="knorm"):
        with press(model, "nope"):
            pass


def test_wrong_shape_filters():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\(3, 2, 16\).*\[4, 2, 16\]"):
        with press(model, kp.QFilterPress(ratio=0.5, filters=torch.randn(3, 2, 16))):
            pass


def test_model_without_attention_layers():
    with pytest.raises(ValueError, match="no full-attention layers"):
        with press(torch.nn.Sequential(torch.nn.Linear(4, 4)), kp.KnormPress(ratio=0.5)):
            pass


def test_right_padded_batch_rejected():
    """Left padding is compressed row by row (tests/core/test_cache_engine.py); right padding is refused."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="left-padded batches only"):
        with press(model, kp.KnormPress(ratio=0.5)):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_static_cache_rejected():
    from transformers import StaticCache

    model = tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(TypeError, match="DynamicCache"):
        with press(model, kp.KnormPress(ratio=0.5)):
            model(torch.randint(3, 100, (1, 8)), **cache_kwargs(cache))


def _snapshot(model):
    return {
        name: (type(m), dict(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks))
        for name, m in model.named_modules()
    }


def test_exception_inside_context_restores_model_exactly():
    model = tiny_model("qwen3", attn_implementation="sdpa")
    ids = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    snap = _snapshot(model)
    chunk = model.generation_config.prefill_chunk_size
    with pytest.raises(RuntimeError, match="boom"):
        with press(model, kp.KnormPress(ratio=0.5, prefill_chunk_size=8)):
            assert model.generation_config.prefill_chunk_size == 8
            model(ids)
            raise RuntimeError("boom")
    after_snap = _snapshot(model)
    assert after_snap.keys() == snap.keys()
    for name in snap:
        assert after_snap[name][0] is snap[name][0]
        assert after_snap[name][1].keys() == snap[name][1].keys(), name
        assert all(after_snap[name][1][k] is v for k, v in snap[name][1].items()), name
        assert after_snap[name][2] == snap[name][2] and after_snap[name][3] == snap[name][3]
    assert model.generation_config.prefill_chunk_size == chunk
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_nested_contexts_rejected():
    model = tiny_model("llama")
    with press(model, kp.KnormPress(ratio=0.5)):
        with pytest.raises(RuntimeError, match="nested"):
            with press(model, kp.StreamingLLMPress(ratio=0.5)):
                pass
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 4)))  # still usable afterwards


def test_question_after_compressed_context_is_not_compressed():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, kp.KnormPress(ratio=0.5)):
        model(torch.randint(3, 100, (1, 40)), **cache_kwargs(cache))
        with kp.uncompressed(cache):
            model(torch.randint(3, 100, (1, 7)), **cache_kwargs(cache))
    assert all(layer.n == 20 + 7 and layer.seen == 47 for layer in cache.layers)


def test_layout_installs_no_bare_top_level_packages(tmp_path):
    """The installed package maps methods/ etc. under kvpress_like; nothing bare lands on sys.path."""
    code = (
        "import importlib.util as u, kvpress_like.methods, kvpress_like.integrations, kvpress_like.evaluations;"
        "print([u.find_spec(n) is None for n in ('methods', 'integrations', 'evaluations')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[True, True, True]"
