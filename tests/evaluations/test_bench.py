"""Speed/memory benchmark: schema, KV bytes against the ratio's promise, and the CUDA path's shape on CPU."""

import argparse

import pytest
import torch

from kvpress_like.evaluations import bench


def _check_rows(rows, model, dtype, lengths, methods):
    assert [(r["tokens"], r["method"]) for r in rows] == [(n, m) for n in lengths for m in methods]
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * torch.finfo(dtype).bits // 8
    for r in rows:
        assert r["kv_within_one_token_per_head"], r
        keep = r["tokens"] if r["method"] == "no_press" else r["tokens"] - int(0.5 * r["tokens"])
        assert r["kv_bytes"] == r["kv_promised_bytes"] == cfg.num_hidden_layers * keep * per_token
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_prefill_bytes"] >= 0
    assert all(r["prefill_overhead_pct"] == 0 for r in rows if r["method"] == "no_press")


def test_bench_rows_and_kv_promise():
    model, filters = bench.build_model("tiny", "cpu", torch.float32)
    # lengths where half the tokens still exceed SnapKV's protected 64-token query window
    result = bench.run_bench(model, filters, lengths=[201], ratio=0.5, repeats=1, decode_steps=2, progress=False)
    _check_rows(result["rows"], model, torch.float32, (201,), bench.METHODS)  # odd: floor rounding
    assert "RSS" in result["memory_measure"]


def test_bench_bf16_random_model_path():
    """The CUDA configuration's code path (random weights, calibrated filters, bf16) on a tiny model."""
    model, filters = bench.build_model("tiny", "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and filters.shape == (4, 2, 16)
    result = bench.run_bench(model, filters, lengths=[160], methods=("qfilters",), ratio=0.5, repeats=1,
                             decode_steps=1, progress=False)
    _check_rows(result["rows"], model, torch.bfloat16, (160,), ("no_press", "qfilters"))


def test_cli_writes_device_named_files(tmp_path):
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--model", "tiny", "--lengths", "64", "--repeats", "1", "--decode-steps", "1",
                              "--methods", "qfilters", "--out", str(tmp_path)])
    assert bench.main(args) == 0
    md = (tmp_path / "bench.cpu.tiny.md").read_text()
    assert "CPU" in md and "| 64 | qfilters |" in md and "| 64 | no_press |" in md


def test_cuda_request_without_gpu_is_explained(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(parser.parse_args(["--device", "cuda", "--model", "tiny", "--out", str(tmp_path)]))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        bench.make_press("h2o", 0.5, None)


def test_kvpress_compare_without_kvpress(tmp_path):
    """The side-by-side module imports without kvpress, explains how to get it, and scores agreement right."""
    from kvpress_like.evaluations import kvpress_compare as kc

    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install kvpress"):
            kc.run_theirs(tmp_path)
    full = torch.randn(2, 10, 4)
    kept_idx = torch.tensor([[0, 3, 7], [1, 2, 9]])
    kept = full.gather(1, kept_idx[..., None].expand(-1, -1, 4))
    assert torch.equal(kc.match_positions(kept, full), kept_idx)
    assert kc.jaccard(torch.tensor([0, 3, 7]), torch.tensor([0, 3, 7])) == 1.0
    assert kc.jaccard(torch.tensor([0, 3, 7]), torch.tensor([1, 3, 8])) == 0.2
    rows = kc.compare(
        {"knorm": dict(prefill_s=1.0, peak_rss=10, kept=[[[0, 1], [2, 3]]])},
        {"knorm": dict(prefill_s=2.0, peak_rss=20, kept=[[[0, 1], [2, 4]]])},
    )
    assert rows["knorm"] == dict(time_ratio=0.5, memory_ratio=0.5, jaccard_mean=(1 + 1 / 3) / 2, jaccard_min=1 / 3)


def test_qa_benchmark_through_the_cli_compresses_the_context_once(tiny_model_dir, tmp_path):
    """``kvpress-like bench qa`` (moved out of the pipeline module): both ways run, the compressed context
    holds about half the full context's bytes, and the result files are written."""
    import json

    from kvpress_like.cli import main

    kv = {}
    for name in ("no_press", "streaming_llm"):
        out = tmp_path / name
        argv = ["bench", "qa", "--model", str(tiny_model_dir), "--press", name, "--context-tokens", "64",
                "--separate-runs", "1", "--max-new-tokens", "2", "--out", str(out)]
        assert main(argv) == 0
        result = json.loads((out / "qa_bench.json").read_text())
        assert result["questions"] == 10 and result["separate_measured_runs"] == 1
        assert result["once_context_kv_bytes"] <= result["once_peak_kv_bytes"]
        assert "compress once, ask many" in (out / "qa_bench.md").read_text()
        kv[name] = result["once_context_kv_bytes"]
    assert kv["streaming_llm"] < 0.6 * kv["no_press"]  # ratio 0.5 keeps n - floor(n / 2) tokens


def test_lm_eval_batch_speed_through_the_cli(tiny_model_dir, tmp_path):
    """``kvpress-like bench lm-eval`` (formerly lm_eval.batch_speed behind a sys.path insert): left-padded
    batches of two answer exactly as one request at a time."""
    import json

    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install kvpress_like[eval])")
    from kvpress_like.cli import main

    argv = ["bench", "lm-eval", "--model", str(tiny_model_dir), "--model-args", "press=knorm,ratio=0.5",
            "--context-tokens", "256", "--samples-per-depth", "1", "--batch-sizes", "1", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "lm_eval_speed.json").read_text())
    assert result["requests"] == 5 and result["press"] == {"press": "knorm", "ratio": 0.5}
    assert result["agreeing"] == {"1": 5, "2": 5} and all(rate > 0 for rate in result["requests_per_s"].values())


def test_kvpress_accuracy_exchange_and_scoring_without_kvpress(tiny_model_dir, tmp_path):
    """``bench kvpress --accuracy``, main side: the prompts both sides answer, our rows (resumable, cache bytes
    shrinking with the factor), then, once kvpress's rows are there, one table scored with RULER's match."""
    import json

    from kvpress_like.cli import main
    from kvpress_like.evaluations import kvpress_compare as kc
    from kvpress_like.evaluations.ruler_tasks import score

    out, res = tmp_path / "x", tmp_path / "res"
    argv = ["bench", "kvpress", "--accuracy", "--model", str(tiny_model_dir), "--out", str(out), "--length", "400",
            "--tasks", "niah_single_noise,qa", "--methods", "knorm,streaming_llm", "--factors", "2,4", "--results", str(res)]
    assert main(argv) == 0
    prompts = json.loads((out / "prompts.json").read_text())
    assert [(p["seed"], p["task"]) for p in prompts["prompts"]] == [(0, "niah_single_noise"), (0, "qa")]
    assert all(len(p["context_ids"]) + len(p["question_ids"]) <= 400 and p["answers"] for p in prompts["prompts"])
    ours = json.loads((out / "ours_accuracy.json").read_text())["rows"]
    assert len(ours) == 2 * (1 + 2 * 2)  # no press, then each pair at each factor, per prompt
    nbytes = {(r["method"], r["factor"]): r["cache_bytes"] for r in ours if r["task"] == "qa"}
    assert nbytes[("knorm", 4.0)] < nbytes[("knorm", 2.0)] < nbytes[("no_press", 1.0)]
    assert not (res / "kvpress_accuracy.md").exists()  # kvpress's side has not run yet

    # kvpress's side, faked: the same answers, except that its knorm x4 misses on qa and masks in a full cache
    theirs = [dict(r, prefill_s=0.1) for r in ours]
    qa = next(p for p in prompts["prompts"] if p["task"] == "qa")
    for r in theirs:
        if (r["method"], r["factor"], r["task"]) == ("knorm", 4.0, "qa"):
            r.update(output="nothing useful", cache_bytes=nbytes[("no_press", 1.0)])
    env = dict(kvpress="0.5.5", transformers="5.2.0", torch="2", threads=1, load_average_1min=1.0, elapsed_s=6.0)
    (out / "theirs_accuracy.json").write_text(json.dumps(dict(env, rows=theirs)))
    assert main(argv) == 0
    assert len(json.loads((out / "ours_accuracy.json").read_text())["rows"]) == len(ours)  # nothing answered twice
    cells = {(c["method"], c["factor"]): c for c in json.loads((res / "kvpress_accuracy.json").read_text())["cells"]}
    assert list(cells) == [("no_press", 1.0), ("streaming_llm", 2.0), ("knorm", 2.0), ("streaming_llm", 4.0), ("knorm", 4.0)]  # PAIRS order
    mine = next(r for r in ours if (r["method"], r["factor"], r["task"]) == ("knorm", 4.0, "qa"))
    gap = score(mine["output"], qa["answers"]) - score("nothing useful", qa["answers"])
    k4 = cells[("knorm", 4.0)]
    assert k4["n"] == 2 and k4["identical"] == 0.5 and k4["diff"] == pytest.approx(gap / 2)
    niah4 = next(r["cache_bytes"] for r in ours if (r["method"], r["factor"], r["task"]) == ("knorm", 4.0, "niah_single_noise"))
    assert k4["ours_bytes"] == (niah4 + nbytes[("knorm", 4.0)]) / 2
    assert k4["theirs_bytes"] == (niah4 + nbytes[("no_press", 1.0)]) / 2 and k4["bytes_ratio"] < 1
    assert cells[("streaming_llm", 2.0)]["diff"] == 0 and cells[("streaming_llm", 2.0)]["identical"] == 1.0
    md = (res / "kvpress_accuracy.md").read_text()
    assert "| knorm | x4 |" in md and "n = 2 prompts per row" in md and "PARTIAL" not in md
    (out / "theirs_accuracy.json").write_text(json.dumps(dict(env, rows=theirs[:-1])))  # kvpress stopped early
    assert main(argv) == 0
    assert "(PARTIAL: 9 of 10 planned rows on both sides)" in (res / "kvpress_accuracy.md").read_text()

    with pytest.raises(SystemExit, match="other prompts"):  # answers on disk belong to these prompts
        kc.write_prompts(out, dict(prompts, length=512))
    with pytest.raises(SystemExit, match="other prompts"):  # fewer seeds or tasks would orphan answered rows
        kc.write_prompts(out, dict(prompts, prompts=prompts["prompts"][:1]))
    changed = dict(prompts["prompts"][0], answers=["another"])
    with pytest.raises(SystemExit, match="a prompt changed"):
        kc.write_prompts(out, dict(prompts, prompts=[changed, *prompts["prompts"][1:]]))
    more = dict(prompts, prompts=[*prompts["prompts"], dict(prompts["prompts"][0], seed=99)])
    kc.write_prompts(out, more)  # another seed extends the run
    assert json.loads((out / "prompts.json").read_text())["prompts"] == more["prompts"]
    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install kvpress"):
            kc.run_theirs_accuracy(out)
