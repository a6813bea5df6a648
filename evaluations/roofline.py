"""The byte bound of a decode step, written once for every benchmark that publishes one (``bench throughput``,
``bench gpu-decode``): a decode step cannot be faster than streaming the weights it reads and the live KV
cache once at the measured copy bandwidth.

Weights are counted once each (a tied input/output embedding once, read whole by the output projection);
an untied input embedding is not counted (a step gathers a few of its rows).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from kvpress_like.models import head_dim

__all__ = ["sync", "copy_bandwidth", "weight_bytes_read", "kv_bytes_per_token", "bound_step_seconds", "bound_speedup"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA need it; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes per second moved by a large tensor copy (read + write counted), median of ``reps``."""
    device = torch.device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rates = []
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        rates.append(2 * nbytes / (time.perf_counter() - start))
    return statistics.median(rates[1:])  # the first copy also faults the pages in


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an input embedding that only
    gathers a few rows (counted when it is tied to the output projection, which reads all of it)."""
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen or (param is embed and not tied):
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(model_or_config, dtype: torch.dtype | None = None, layers: int | None = None) -> int:
    """Key + value bytes one token adds to a full cache, over ``layers`` layers (default: all) and every KV head.

    Given a model, its text config and its parameters' element size; given a config, ``dtype`` says the size.
    """
    if isinstance(model_or_config, nn.Module):
        cfg = model_or_config.config.get_text_config()
        itemsize = next(model_or_config.parameters()).element_size()
    else:
        if dtype is None:
            raise ValueError("kv_bytes_per_token(config) needs the cache's dtype")
        cfg, itemsize = model_or_config, torch.finfo(dtype).bits // 8
    layers = cfg.num_hidden_layers if layers is None else layers
    return 2 * layers * cfg.num_key_value_heads * head_dim(cfg) * itemsize


def bound_step_seconds(weight_bytes: int, kv_bytes: float, bandwidth: float) -> float:
    """Fastest possible decode step when it only has to stream the weights and the live KV once."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth}")
    return (weight_bytes + kv_bytes) / bandwidth


def bound_speedup(weight_bytes: int, kv_full: float, kv_press: float) -> float:
    """Speedup over the full cache that the bytes allow: (W + KV_full) / (W + KV_press)."""
    return (weight_bytes + kv_full) / (weight_bytes + kv_press)
