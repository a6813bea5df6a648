"""Needle-in-a-haystack evaluation: shared-prefill shortcut, output schema, and the real model's baseline."""

import json

import pytest
import torch
from transformers import DynamicCache

from kvpress_like import KnormPress, PressedLayer, QFilterPress, SnapKVPress, press
from kvpress_like.evaluations import niah
from tiny import ByteTokenizer, tiny_byte_model
from kvpress_like.integrations.transformers import cache_kwargs




FILTERS = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "p",
    [QFilterPress(ratio=0.75, filters=FILTERS), KnormPress(ratio=0.5, skip_layers=(0,), n_sink=2, window=8),
     SnapKVPress(ratio=0.6, window_size=16), niah.NeedleOraclePress(ratio=0.8, filters=FILTERS, needle_span=(50, 60))],
    ids=lambda p: type(p).__name__,
)
def test_shared_prefill_equals_pressed_prefill(p):
    """The grid's shortcut (prefill once, compress copies) keeps the same tokens as a real pressed prefill."""
    model = tiny_byte_model()
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    question = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    real = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(ids, **cache_kwargs(real))
        real_logits = model(question, **cache_kwargs(real)).logits
    cache, queries, _ = niah.prefill(model, ids, window=64)
    with torch.no_grad(), press(model, p):
        copy = niah.compress_prefilled(model, cache, p, queries)
        copy_logits = model(question, **cache_kwargs(copy)).logits
    assert cache.layers[0].keys.shape[-2] == 200  # the shared prefill itself is left untouched
    for a, b in zip(real.layers, copy.layers):
        assert type(a) is type(b)
        if isinstance(a, PressedLayer):
            assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(copy_logits, real_logits, rtol=1e-4, atol=1e-4)


def test_oracle_keeps_needle():
    model = tiny_byte_model()
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    p = niah.NeedleOraclePress(ratio=0.9, filters=FILTERS, needle_span=(40, 48))
    cache, queries, _ = niah.prefill(model, ids, window=64)
    with press(model, p):
        pressed = niah.compress_prefilled(model, cache, p, queries)
    for layer in pressed.layers:
        kept = set(layer.positions[0, 0].tolist())
        assert set(range(40, 48)) <= kept and len(kept) == 120 - int(0.9 * 120)


def test_grid_schema_and_outputs(tmp_path):
    model, tok = tiny_byte_model(), ByteTokenizer()
    grid = niah.Grid(lengths=(300,), depths=(0.5,), factors=(2, 4), seeds=(0,), methods=("no_press", "qfilters", "snapkv"),
                     variants=("oracle",), min_baseline=0.0)
    result = niah.run_grid(model, tok, grid, filters=FILTERS, progress=False)
    rows = result["rows"]
    assert len(rows) == 2 * (1 + 3 * 2)  # haystacks x (no press + methods x factors)
    assert {"haystack", "length", "depth", "seed", "method", "factor", "exact", "partial", "kv_tokens"} <= set(rows[0])
    for r in rows:
        assert 0 <= r["partial"] <= 1 and r["exact"] in (0.0, 1.0)
        assert r["kv_tokens"] == (300 if r["method"] == "no_press" else 300 - int((1 - 1 / r["factor"]) * 300))
    assert set(result["summary"]) == {"repetitive", "prose"}
    # the same settings give the same rows (deterministic seeds)
    again = niah.run_grid(model, tok, grid, filters=FILTERS, progress=False)
    assert [r["output"] for r in again["rows"]] == [r["output"] for r in rows]
    images = niah.heatmaps(result, tmp_path)
    assert all(p.stat().st_size > 0 for p in images)
    niah.write_csv(rows, tmp_path / "niah.csv")
    assert (tmp_path / "niah.csv").read_text().count("\n") == len(rows) + 1
    json.dumps(result)


def test_min_baseline_drops_failing_lengths():
    """A random model fails the needle: with a threshold of 1.0 the lengths are dropped, and no press runs."""
    model, tok = tiny_byte_model(), ByteTokenizer()
    grid = niah.Grid(lengths=(300,), depths=(0.5,), factors=(2,), seeds=(0,), haystacks=("repetitive",),
                     methods=("no_press", "knorm"), variants=(), min_baseline=1.0)
    result = niah.run_grid(model, tok, grid, progress=False)
    assert result["dropped"] == [dict(haystack="repetitive", length=300, no_press_accuracy=0.0)]
    assert [r["method"] for r in result["rows"]] == ["no_press"]


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        niah.make_press("h2o", 2)
    with pytest.raises(ValueError, match="factors must be >= 1"):
        niah.factor_to_ratio(0.5)


@pytest.mark.slow
def test_real_model_no_press_passkey(smollm):
    """The uncompressed SmolLM2 finds an easy pass key at 512 tokens, at every depth."""
    model, tok = smollm
    grid = niah.Grid(lengths=(512,), depths=(0.1, 0.5, 0.9), seeds=(0,), haystacks=("repetitive",),
                     methods=("no_press",), variants=(), factors=(2,))
    result = niah.run_grid(model, tok, grid, progress=False)
    assert [r["exact"] for r in result["rows"]] == [1.0, 1.0, 1.0]


def test_results_stitching_orders_sections_and_fixes_links(tmp_path):
    from kvpress_like.evaluations import results

    sections = tmp_path / "results"
    sections.mkdir()
    (sections / "bench.cpu.md").write_text("## Speed\n")
    (sections / "zzz.md").write_text("## Other\n")
    (sections / "niah.md").write_text("## Needle\n![map](niah_prose.png) [web](https://example.org)\n")
    (sections / "passkey.md").write_text("## Pass key, filler\n")
    (sections / "passkey.haystacks.md").write_text("## Pass key, filler and prose\n")
    out = results.stitch(sections, tmp_path / "RESULTS.md")
    text = out.read_text()
    assert text.index("## Pass key, filler and prose") < text.index("## Pass key, filler\n") < text.index("## Needle")
    assert text.index("## Needle") < text.index("## Speed") < text.index("## Other")
    assert "](results/niah_prose.png)" in text and "](https://example.org)" in text
    assert "transformers" in text and "Machine:" in text
    with pytest.raises(FileNotFoundError, match="run an evaluation first"):
        results.stitch(tmp_path / "empty", tmp_path / "R.md")
