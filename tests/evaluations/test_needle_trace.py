"""eval needle-trace: the needle is located token for token, and each head's kept share of it is what the
compressed cache holds."""

from __future__ import annotations

import pytest
import torch

from kvpress_like.evaluations import needle_trace
from kvpress_like.evaluations.ruler_tasks import ruler_sample
from test_ruler import _tiny, tok  # noqa: F401  (fixture)


def test_needle_and_its_sentence_are_found_token_for_token(tok):  # noqa: F811
    s = ruler_sample(tok, "niah_single_prose", 1024, 0)
    needle = needle_trace.needle_positions(tok, s.context_ids, s.answers)
    assert tok.decode([s.context_ids[i] for i in needle]).strip() == s.answers[0]
    sentence = needle_trace.needle_sentence(tok, s.context_ids, needle)
    text = tok.decode([s.context_ids[i] for i in sentence])
    assert "special magic numbers" in text and text.strip().endswith(f"{s.answers[0]}.")
    with pytest.raises(ValueError, match="not spelled"):
        needle_trace.needle_positions(tok, s.context_ids, ["zzqx-not-there"])


def test_kept_share_per_layer_and_head_follows_what_the_press_keeps(tok):  # noqa: F811
    """StreamingLLM at x2 keeps its 4 sinks and the second half: a needle in the first half is lost in every
    head, one in the second half kept in every head; the oracle holds it in a cache of the same size."""
    model = _tiny()
    seeds = (0, 4, 7)  # the needle at token 177, 854 and 824 of about 970
    result = needle_trace.run(model, tok, "niah_single_prose", 1024, list(seeds), ["streaming_llm"], [2.0])
    whole = []  # per seed: every needle token kept (then in every head)
    for seed in seeds:
        s = ruler_sample(tok, "niah_single_prose", 1024, seed)
        needle = needle_trace.needle_positions(tok, s.context_ids, s.answers)
        expected = sum(p >= len(s.context_ids) - len(s.context_ids) // 2 or p < 4 for p in needle) / len(needle)
        whole.append(expected == 1)
        (row,) = [r for r in result["rows"] if r["seed"] == seed and r["method"] == "streaming_llm"]
        kept = torch.tensor(row["kept"])
        assert kept.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
        torch.testing.assert_close(kept, torch.full_like(kept, expected), atol=1 / len(needle), rtol=0)
    summary = needle_trace.summarize(result["rows"])
    assert {(c["method"], c["factor"]) for c in summary} == {("no_press", 1.0), ("streaming_llm", 2.0), ("oracle", 2.0)}
    (cell,) = [c for c in summary if c["method"] == "streaming_llm"]
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert sum(whole) == 2 and cell["heads"] == heads and cell["whole_heads"] == pytest.approx(heads * 2 / 3)


def test_answers_are_the_benchmarks_at_every_ratio(tok):  # noqa: F811
    """KVzip at two ratios of one prompt (one reconstruction pass shared): each answer is the one ``eval ruler``
    gives on the same prompt (question fed uncompressed after the compressed context), and each kept share is
    that of the cache the benchmark answers from."""
    from kvpress_like.evaluations import ruler

    model = _tiny()
    model.config._name_or_path = "smollm2-135m"  # KVzip reads its repeat prompt with this model's tokenizer (``tok``)
    methods, factors = ["kvzip", "adakv:base=kvzip:normalization=none:scope=model"], [2.0, 4.0]
    result = needle_trace.run(model, tok, "niah_single_prose", 768, [1], methods, factors)
    grid = ruler.Grid(lengths=(768,), factors=tuple(factors), samples=1, first_seed=1, tasks=("niah_single_prose",),
                      methods=tuple(methods))
    bench = {(r["method"], r["factor"]): r["output"] for r in ruler.run_grid(model, tok, grid, progress=False)["rows"]}
    traced = {(r["method"], r["factor"]): r["output"] for r in result["rows"] if r["method"] != "oracle"}
    assert traced == bench and len(traced) == 1 + len(methods) * len(factors)
    kept = {(r["method"], r["factor"]): torch.tensor(r["kept"]) for r in result["rows"] if r["kept"] is not None}
    assert all(((k >= 0) & (k <= 1)).all() for k in kept.values())
    assert kept["kvzip", 4.0].mean() <= kept["kvzip", 2.0].mean()  # x4 keeps a subset of x2's pairs (same scores)
