"""The static compressed cache (kvpress_like.static): same tokens kept and same logits as the dynamic
PressedLayer, one compiled graph across evictions, and the press(static=True) + generate() path."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache

from kvpress_like import PressedLayer, QFilterPress, SnapKVPress, press
from tiny import tiny_model
from kvpress_like.static import StaticPressedCache, StaticPressedLayer, static_budget


def _setup(num_layers: int = 4, **press_kwargs):
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=num_layers)
    cfg = model.config
    filters = torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                          generator=torch.Generator().manual_seed(3))
    settings = dict(n_sink=2, window=4, max_cache_tokens=24)
    settings.update(press_kwargs)
    return model, QFilterPress(filters=filters, **settings)


def _ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, p, cache, prompt, tokens, chunk=None, step=None):
    """Prefill ``prompt`` (optionally in chunks), then feed ``tokens`` one by one; return last logits per call."""
    step = step or model
    logits = []
    with torch.no_grad(), press(model, p):
        for part in (prompt.split(chunk, dim=1) if chunk else [prompt]):
            out = model(part, cache=cache)
        logits.append(out.logits[:, -1])
        for i in range(tokens.shape[1]):
            logits.append(step(tokens[:, i : i + 1], cache=cache).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize(
    "prompt_len, chunk",
    [(40, None), (40, 15), (10, None)],
    ids=["full-after-prefill", "chunked-prefill", "prompt-shorter-than-budget"],
)
def test_static_matches_dynamic_over_50_steps(prompt_len, chunk):
    model, p = _setup()
    prompt, tokens = _ids(2, prompt_len, 1), _ids(2, 50, 2)
    dynamic = DynamicCache(config=model.config)
    static = StaticPressedCache(p, model.config)
    expected = _decode(model, p, dynamic, prompt, tokens, chunk)
    got = _decode(model, p, static, prompt, tokens, chunk)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    seen = prompt_len + 50
    for ref, layer in zip(dynamic.layers, static.layers):
        assert isinstance(ref, PressedLayer) and isinstance(layer, StaticPressedLayer)
        # Same tokens in the same slots, for each batch row and head: evictions happened (seen > budget).
        assert ref.n == int(layer.filled) == 24 and layer.keys.shape[2] == 24
        assert torch.equal(layer.positions, ref.positions)
        torch.testing.assert_close(layer.keys, ref.keys)
        assert int(layer.cumulative_length) == seen == static.get_seq_length()
        assert layer.positions.max() == seen - 1
    # Rows of the batch evict independently.
    assert not torch.equal(static.layers[1].positions[0], static.layers[1].positions[1])


def test_compiled_decode_no_recompilation_across_evictions():
    model, p = _setup(num_layers=2)
    prompt, tokens = _ids(2, 40, 1), _ids(2, 16, 2)
    eager_cache, compiled_cache = StaticPressedCache(p, model.config), StaticPressedCache(p, model.config)
    expected = _decode(model, p, eager_cache, prompt, tokens)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    calls = iter(range(10**6))

    def step(ids, cache):
        if next(calls) == 2:  # warm-up done: any recompilation from now on raises
            torch._dynamo.config.error_on_recompile = True
        return compiled(ids, cache=cache)

    try:
        got = _decode(model, p, compiled_cache, prompt, tokens, step=step)
    finally:
        torch._dynamo.config.error_on_recompile = False
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # The compiled steps really evicted in place: the buffers match the eager run slot for slot.
    for a, b in zip(eager_cache.layers, compiled_cache.layers):
        assert torch.equal(a.positions, b.positions) and int(b.cumulative_length) == 56


def test_generate_with_press_static_compiles_decode_and_matches_dynamic():
    model, p = _setup(num_layers=2, prefill_chunk_size=16)
    prompt = _ids(2, 40, 1)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), press(model, p):
        expected = model.generate(prompt, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), press(model, p, static=True, compile=CompileConfig(backend="eager", fullgraph=True)):
        got = model.generate(prompt, **kwargs)
        again = model.generate(_ids(2, 40, 5), **kwargs)  # a new cache: no new graph
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-5, rtol=1e-5)
    cache = got.cache
    assert isinstance(cache, StaticPressedCache) and cache.budget == 24 and again.cache is not cache
    assert int(cache.layers[0].cumulative_length) == 40 + 12 - 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # press() put the model back.
    assert "_prefill" not in model.__dict__ and "_prepare_cache_for_generation" not in model.__dict__
    assert model.generation_config.compile_config is None and model.generation_config.prefill_chunk_size is None


def test_static_budget_and_bad_settings():
    assert static_budget(QFilterPress(ratio=0.875), prompt_tokens=800) == 100  # the prompt's kept size
    assert static_budget(QFilterPress(ratio=0.875, max_cache_tokens=64), 800, max_tokens=40) == 40
    model, p = _setup(num_layers=2)
    with pytest.raises(ValueError, match="query-free"), press(model, SnapKVPress(ratio=0.5), static=True):
        pass
    with pytest.raises(ValueError, match="max_cache_tokens"), press(model, QFilterPress(
            filters=p.filters, ratio=0.5, decoding=True), static=True):
        pass
    with pytest.raises(ValueError, match="static=True"), press(model, p, compile=True):
        pass
    with pytest.raises(ValueError, match="full attention"):
        StaticPressedCache(p, tiny_model("gemma3", num_hidden_layers=2).config)
    with pytest.raises(ValueError, match="needs a budget"):
        static_budget(QFilterPress(), 100)


def test_gpu_decode_benchmark_tiny_cpu_run(tmp_path):
    """The GPU benchmark's code path, on the CPU with a tiny model: every path measured, one decode graph per
    path for all prompt lengths, and the compiled static step agrees with the eager pressed cache."""
    import argparse

    from kvpress_like.evaluations import gpu_decode

    parser = argparse.ArgumentParser()
    gpu_decode.configure(parser)
    args = parser.parse_args(["--tiny", "--prompts", "48", "96", "--batches", "2", "--steps", "2", "--warmup", "2",
                              "--backend", "eager", "--out", str(tmp_path)])
    assert gpu_decode.main(args) == 0
    import json

    report = json.loads((tmp_path / "gpu_decode.json").read_text())
    measured = {(r["path"], r["prompt"]) for r in report["rows"] if r["ms_per_token"] > 0}
    assert measured == {(path, p) for path in gpu_decode.PATHS for p in (48, 96)}
    assert {path: c["recompiles"] for path, c in report["compilation"].items()} == {
        "qfilters x8 static+compile": 0, "full static+compile": 0}
    assert all(v["max_abs_logit_diff"] < 1e-4 and v["same_argmax"]
               for v in report["qfilters_static_vs_eager_first_step"].values())
    assert {r["kv_tokens"] for r in report["rows"] if r["path"].startswith("qfilters")} == {6, 12}
    assert "No CUDA GPU was available" in (tmp_path / "gpu_decode.md").read_text()
