"""``kvpress-like bench throughput`` on a tiny model: the byte bound, the report's schema, and the static
compiled decode path giving the same greedy tokens as the dynamic one."""

import argparse

import pytest
import torch
from transformers import CompileConfig

from kvpress_like import QFilterPress, StreamingLLMPress
from kvpress_like.evaluations import throughput as tp
from tiny import tiny_model


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tp.configure(parser)
    return parser.parse_args(list(argv))


def test_bound_on_known_byte_counts():
    assert tp.bound_step_seconds(1000, 3000, bandwidth=2000) == pytest.approx(2.0)
    # x8 on a cache 4x the weights: (1 + 4) / (1 + 0.5)
    assert tp.bound_speedup(100, kv_full=400, kv_press=50) == pytest.approx(5 / 1.5)
    with pytest.raises(ValueError, match="bandwidth"):
        tp.bound_step_seconds(1, 1, 0)

    model = tiny_model("llama", seed=0)  # 4 layers, 2 KV heads, head_dim 16, fp32, untied embeddings
    assert tp.kv_bytes_per_token(model) == 2 * 4 * 2 * 16 * 4
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    assert tp.weight_bytes_read(model) == every - embed.numel() * 4  # the input embedding only gathers rows
    tied = tiny_model("llama", seed=0, tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert tp.weight_bytes_read(tied) == sum(p.numel() * 4 for p in tied.parameters())  # read once, by lm_head

    p = QFilterPress(ratio=0.875, filters=torch.zeros(4, 2, 16))
    assert tp.live_tokens("full", None, 800, 7) == 804  # 800 + mean of 1..7 decoded tokens
    assert tp.live_tokens("dynamic", p, 800, 7) == 104  # 100 kept + the mean growth
    assert tp.live_tokens("static", p, 800, 7, budget=100) == 100  # fixed slots, one eviction per step
    assert tp.live_tokens("dynamic", QFilterPress(ratio=0.875, filters=p.filters, max_cache_tokens=64), 800, 7) == 64


def test_report_schema_and_markdown(tmp_path):
    args = _args("--model", "tiny", "--batches", "1", "2", "--contexts", "32", "48", "--new-tokens", "4",
                 "--repeats", "2", "--presses", "qfilters", "streaming_llm", "--factors", "4", "--prompts", "1",
                 "--compiled-cells", "--nocopy-baseline", "--no-figure", "--out", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        report = tp.run(args, log=lambda _msg: None)
        assert report["settings"]["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert report["copy_bandwidth_gb_s"] > 0 and report["kv_bytes_per_token"] == 1024
    assert set(report["load_average"]) == {"start", "max_during", "cores"}
    rows = report["rows"]
    names = ["full cache", tp.NOCOPY, "qfilters x4 dynamic", "qfilters x4 static", "streaming_llm x4 dynamic",
             "streaming_llm x4 static"]
    assert [(r["batch"], r["context"], r["path"]) for r in rows] == [
        (b, c, n) for b in (1, 2) for c in (32, 48) for n in names]
    for r in rows:
        assert len(r["step_ms_runs"]) == 2 and r["step_ms"] > 0 and r["spread"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["step_ms"])
        assert r["bound_tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
        assert r["ratio_of_allowed"] == pytest.approx(r["speedup"] / r["speedup_allowed"])
        assert r["update_share"] is not None and 0 < r["update_share"] < 1
        assert r["speedup_vs_nocopy"] > 0
        if r["kind"].startswith("full"):
            assert r["speedup_allowed"] == 1 and r["live_kv_tokens"] == r["context"] + 2.5
            assert r["speedup"] == 1 if r["path"] == "full cache" else r["speedup_vs_nocopy"] == 1
        else:  # x4 of 48 tokens keeps 12; the static cache holds exactly that
            assert r["speedup_allowed"] > 1
            assert r["live_kv_tokens"] == (r["context"] // 4 if r["kind"] == "static" else r["context"] // 4 + 2.5)
    assert report["headline"]["cells_at_80pct_of_allowed"].endswith("/16")
    text = tp.markdown(report, None)
    assert "| batch | context | path |" in text and "Copy bandwidth measured in this run" in text
    assert text.count("| 2 | 48 |") == 6 and "Command: `" in text


def test_bad_options_say_what_to_do():
    with pytest.raises(ValueError, match="--new-tokens must be >= 3"):
        tp._check(_args("--new-tokens", "2"))
    with pytest.raises(ValueError, match="BATCHxCONTEXT"):
        tp._check(_args("--compiled-cells", "8-4096"))
    with pytest.raises(ValueError, match="query-free"):
        tp.make_press("snapkv", 4, None)
    with pytest.raises(ValueError, match="factors must be >= 2"):
        tp.make_press("knorm", 1, None)


def test_static_compiled_decode_gives_the_dynamic_tokens():
    """The benchmark's own cache building and timed generate(): a budgeted press evicts one slot per step in
    both caches, so the compiled static path must decode exactly the dynamic path's greedy tokens."""
    model = tiny_model("llama", seed=0, attn_implementation="sdpa")
    batch, context, new = 2, 40, 6
    ids = torch.randint(3, 128, (batch, context), generator=torch.Generator().manual_seed(1))
    keys, values, first, _ = tp.prefill_rows(model, ids, [context])
    prompt = torch.cat([ids, first[context]], dim=1)
    tokens = {}
    for kind, p in (("dynamic", StreamingLLMPress(ratio=0.75, max_cache_tokens=10)),
                    ("static+compile", StreamingLLMPress(ratio=0.75, max_cache_tokens=10))):
        path = tp.DecodePath(kind, kind, "streaming_llm", 4, p)
        cache, _ = tp.build_cache(path, model, keys, values, context, new)
        torch._dynamo.reset()
        run = tp.decode_run(model, path, cache, prompt, new, CompileConfig(backend="aot_eager", fullgraph=True),
                            torch.device("cpu"), instrument=kind == "dynamic")
        tokens[kind] = run["tokens"]
        assert run["steps"] == new - 2
    assert tokens["static+compile"] == tokens["dynamic"]
    assert len(tokens["dynamic"][0]) == new
