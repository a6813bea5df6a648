"""K-norm: the keys with the lowest L2 norm are kept, per layer and KV head."""

import torch
from tiny import tiny_model
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import press
from kvpress_like.integrations.transformers import cache_kwargs


def test_keeps_the_lowest_norm_keys_of_each_head():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, kp.KnormPress(ratio=0.75)):
        model(torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0)), **cache_kwargs(cache))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0)), **cache_kwargs(reference))
    for layer, full in zip(cache.layers, reference.layers):
        norms = full.keys.norm(dim=-1)  # (batch, kv_heads, 32): same keys, no press
        expected = norms.topk(8, dim=-1, largest=False).indices.sort(-1).values
        assert torch.equal(layer.positions.sort(-1).values, expected)
