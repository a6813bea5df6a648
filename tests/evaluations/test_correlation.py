"""Attention-correlation analysis: Spearman helper, received attention, schema, and the real model's sign."""

import pytest
import torch

from kvpress_like import KnormPress, QFilterPress, StreamingLLMPress
from kvpress_like.evaluations import correlation
from tiny import tiny_model


def test_spearman_matches_definition():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 4.0]])
    b = torch.tensor([10.0, 20.0, 30.0, 45.0]).expand(3, 4)
    rho = correlation.spearman(a, b)
    torch.testing.assert_close(rho, torch.tensor([1.0, -1.0, 0.8], dtype=torch.float64))


def test_received_attention_is_a_distribution_over_earlier_keys():
    model = tiny_model("llama", seed=0)
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 40, 16)
    k = torch.randn(1, 2, 40, 16)
    att = correlation.received_attention(module, q, k, n_queries=8)
    assert att.shape == (2, 32)
    # the 8 observed queries also attend to each other; what earlier keys receive is at most 1 on average
    assert bool((att >= 0).all()) and float(att.sum(-1).max()) <= 1 + 1e-5


def _presses(filters):
    return {"qfilters": QFilterPress(filters=filters), "knorm": KnormPress(), "streaming_llm": StreamingLLMPress()}


def test_filters_aligned_with_keys_correlate_and_schema():
    """On a tiny model, a filter built to favour the keys that receive attention correlates positively."""
    model = tiny_model("llama", seed=0, attn_implementation="sdpa", max_position_embeddings=1024)
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(0))
    result = correlation.correlations(model, ids, _presses(torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(1))), n_queries=32)
    assert result["layers"] == [0, 1, 2, 3] and result["reading_position"] == 128
    assert set(result["correlations"]) == {"qfilters", "knorm", "streaming_llm"}
    assert len(result["correlations"]["qfilters"]) == 4 and len(result["correlations"]["qfilters"][0]) == 2
    s = result["summary"]
    assert s["knorm"]["heads"] == 8 and "vs_qfilters" not in s["qfilters"]
    vs = s["knorm"]["vs_qfilters"]
    assert vs["lo"] <= vs["diff"] <= vs["hi"] and 0 <= vs["higher_share"] <= 1
    assert vs["diff"] == pytest.approx(s["knorm"]["mean"] - s["qfilters"]["mean"])
    # -<k, f> with f = -(mean query direction) scores keys by their alignment with the queries
    queries = {}
    from kvpress_like.integrations.transformers import attention_layers, patched_attention

    def grab(module, query, key, value):
        queries[module.layer_idx] = query[0, :, -32:].mean(1)  # (hq, d)

    with torch.no_grad(), patched_attention(model, attention_layers(model), grab):
        model(ids)
    aligned = torch.stack([-queries[i].view(2, 2, 16).mean(1) for i in range(4)])
    good = correlation.correlations(model, ids, _presses(aligned), n_queries=32)["summary"]
    bad = correlation.correlations(model, ids, _presses(-aligned), n_queries=32)["summary"]
    assert good["qfilters"]["mean"] > 0.2 > bad["qfilters"]["mean"]


def test_too_short_text_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="longer than n_queries"):
        correlation.correlations(model, torch.zeros(1, 50, dtype=torch.long), _presses(torch.zeros(4, 2, 16)), n_queries=64)


@pytest.mark.slow
def test_real_model_qfilters_correlate_with_attention(smollm):
    """On SmolLM2, Q-Filters scores correlate positively with received attention (mean over heads)."""
    from kvpress_like.methods.qfilters import filters_for

    model, tok = smollm
    ids = correlation.text_ids(tok, "code", 768, offset=5000)
    result = correlation.correlations(model, ids, {"qfilters": QFilterPress(filters=filters_for(model, tok))}, n_queries=64)
    assert result["summary"]["qfilters"]["heads"] == 90
    assert result["summary"]["qfilters"]["mean"] > 0
