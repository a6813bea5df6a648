"""StreamingLLM: attention sinks plus the most recent tokens, exactly."""

import math

import torch
from tiny import tiny_model
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like import press
from kvpress_like.integrations.transformers import cache_kwargs


def test_streaming_llm_keeps_exactly_sinks_and_recent():
    model = tiny_model("llama")
    n, sinks = 30, 3
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, kp.StreamingLLMPress(ratio=0.5, n_sink=sinks)):
        model(torch.randint(3, 100, (2, n)), **cache_kwargs(cache))
    keep = n - math.floor(n * 0.5)
    expected = list(range(sinks)) + list(range(n - (keep - sinks), n))
    for layer in cache.layers:
        assert layer.positions.shape[-1] == keep
        assert (layer.positions == torch.tensor(expected)).all()
