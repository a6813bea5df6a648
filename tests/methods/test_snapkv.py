"""SnapKV keeps exactly the tokens the published method keeps; bad window sizes are refused when built."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvpress_like import SnapKVPress, press
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs, patched_attention
from tiny import tiny_model


def reference_kept(query, key, window: int, kernel: int, n_keep: int, scaling: float) -> list[set[int]]:
    """SnapKV as published, written out plainly for one layer of a fresh prefill (batch 1).

    query (q_heads, n, d), key (kv_heads, n, d). The window's queries attend causally to all keys; their
    softmax is averaged over the window, restricted to the keys before the window, average-pooled with
    zero padding counted (count_include_pad=True), averaged over each GQA group; the top keys of the
    prefix are kept together with the whole window.
    """
    hq, n, _ = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    keys = key.repeat_interleave(group, dim=0)
    logits = (query[:, n - window :] @ keys.transpose(1, 2)) * scaling  # (hq, window, n)
    for i in range(window):
        logits[:, i, n - window + i + 1 :] = float("-inf")  # query i sits at position n - window + i
    attention = logits.softmax(dim=-1)[:, :, : n - window].mean(dim=1)  # (hq, prefix)
    padded = F.pad(attention, (kernel // 2, kernel // 2))  # zeros on both sides of the prefix
    pooled = torch.stack([padded[:, j : j + kernel].sum(dim=-1) / kernel for j in range(n - window)], dim=-1)
    scores = pooled.view(hkv, group, n - window).mean(dim=1)
    window_positions = set(range(n - window, n))
    return [set(scores[h].topk(n_keep - window).indices.tolist()) | window_positions for h in range(hkv)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window, kernel", [(8, 5), (4, 7), (1, 3)])
def test_kept_tokens_equal_the_published_method(attn, window, kernel):
    model = tiny_model("llama", attn_implementation=attn)
    n, ratio = 48, 0.5
    ids = torch.randint(3, 120, (1, n))
    seen = {}

    def record(module, query, key, value):
        seen[module.layer_idx] = (query[0].clone(), key[0].clone(), module.scaling)

    with torch.no_grad(), patched_attention(model, attention_layers(model), record):
        model(ids, use_cache=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, SnapKVPress(ratio=ratio, window_size=window, kernel_size=kernel)):
        model(ids, **cache_kwargs(cache))
    n_keep = n - int(ratio * n)
    for idx, layer in enumerate(cache.layers):
        query, key, scaling = seen[idx]
        expected = reference_kept(query, key, window, kernel, n_keep, scaling)
        got = [set(layer.positions[0, h].tolist()) for h in range(layer.positions.shape[1])]
        assert got == expected, f"layer {idx}: kept sets differ from the published SnapKV"


@pytest.mark.parametrize("value", [2.5, "8", True, None])
def test_window_size_must_be_an_int(value):
    with pytest.raises(TypeError, match=r"SnapKVPress\(window_size=\.\.\.\) must be an int"):
        SnapKVPress(ratio=0.5, window_size=value)


def test_window_and_kernel_ranges_are_checked():
    with pytest.raises(ValueError, match="window_size=...\\) must be >= 1"):
        SnapKVPress(window_size=0)
    with pytest.raises(ValueError, match="positive odd number, got 4"):
        SnapKVPress(kernel_size=4)
    with pytest.raises(TypeError, match="kernel_size"):
        SnapKVPress(kernel_size=5.0)
