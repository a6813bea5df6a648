"""Smoke tests of the streaming-perplexity evaluation and the decode benchmark, end to end through the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpress_like.cli import main
from kvpress_like import calibrate
from kvpress_like.filters import save_filters, store_path


@pytest.fixture
def tiny_model_dir_with_filters(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model, with Q-Filters in a private filter store (so evaluations find them by model)."""
    monkeypatch.setenv("KVPRESS_LIKE_CACHE", str(tmp_path / "store"))
    monkeypatch.delenv("KVPRESS_LIKE_FILTERS")  # conftest's session store: here the store is <cache>/filters
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    save_filters(calibrate(model, texts=ids, samples_per_head=64, progress=False), store_path(model))
    return tiny_model_dir


def test_perplexity_cli_schema_and_budget(tiny_model_dir_with_filters, tmp_path):
    rc = main(["eval", "perplexity", "--model", str(tiny_model_dir_with_filters), "--tokens", "160", "--budgets", "48",
               "--chunk", "8", "--window", "8", "--n-sink", "2", "--plot-window", "32", "--out", str(tmp_path),
               "--methods", "full,streaming_llm,knorm,qfilters", "--block", "16"])
    assert rc == 0
    report = json.loads((tmp_path / "perplexity.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"full", "streaming_llm", "knorm", "qfilters"}
    assert all(row["ppl"] > 1 for row in rows.values())
    # a capped cache loses information: on random weights perplexities differ from the full cache's
    assert any(abs(rows[m]["ppl"] - rows["full"]["ppl"]) > 1e-3 for m in ("streaming_llm", "knorm", "qfilters"))
    paired = {d["method"]: d for d in report["paired_vs_streaming_llm"]}
    assert set(paired) == {"full", "knorm", "qfilters"}
    for d in paired.values():  # 159 predictions of 160 tokens, the first 48 before the cache filled
        assert d["tokens"] == 111 and d["lo"] <= d["nll_diff"] <= d["hi"]
        assert d["verdict"] == ("beats" if d["hi"] < 0 else "worse" if d["lo"] > 0 else "no difference shown")
    assert (tmp_path / "perplexity.png").stat().st_size > 0 and "Command:" in (tmp_path / "perplexity.md").read_text()


def test_perplexity_runs_per_method_merge_into_one_paired_report(tiny_model_dir_with_filters, tmp_path):
    common = ["eval", "perplexity", "--model", str(tiny_model_dir_with_filters), "--tokens", "96", "--budgets", "32",
              "--chunk", "1", "--window", "4", "--n-sink", "2", "--block", "8"]
    for methods in ("streaming_llm", "knorm,qfilters"):
        assert main(common + ["--methods", methods, "--out", str(tmp_path / methods)]) == 0
    single = json.loads((tmp_path / "knorm,qfilters" / "perplexity.json").read_text())
    assert single["paired_vs_streaming_llm"] == []  # no reference in that run
    assert main(common + ["--methods", "streaming_llm,knorm,qfilters", "--out", str(tmp_path / "merged"), "--merge",
                          str(tmp_path / "streaming_llm" / "perplexity.json"),
                          str(tmp_path / "knorm,qfilters" / "perplexity.json")]) == 0
    merged = json.loads((tmp_path / "merged" / "perplexity.json").read_text())
    assert {d["method"] for d in merged["paired_vs_streaming_llm"]} == {"knorm", "qfilters"}
    assert merged["nll"]["knorm@32"] == single["nll"]["knorm@32"]
    ref = torch.tensor(merged["nll"]["streaming_llm@32"][32:])
    knorm = next(d for d in merged["paired_vs_streaming_llm"] if d["method"] == "knorm")
    assert knorm["nll_diff"] == pytest.approx(float((torch.tensor(single["nll"]["knorm@32"][32:]) - ref).mean()), abs=1e-4)
    assert "PARTIAL" not in (tmp_path / "merged" / "perplexity.md").read_text()


def test_decode_bench_cli_reports_overhead_and_bounded_memory(tiny_model_dir_with_filters, tmp_path):
    rc = main(["bench", "decode", "--model", str(tiny_model_dir_with_filters), "--budget", "32", "--window", "4", "--n-sink", "2",
               "--steps", "6", "--repeats", "1", "--prefill-tokens", "96", "--prefill-chunk", "16", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "decode_bench.json").read_text())
    memory = report["chunked_prefill_memory"]
    assert memory["peak_stored_kv_bytes"] <= memory["stored_bound_bytes"]
    assert memory["largest_attention_kv_bytes"] <= memory["attention_bound_bytes"]
