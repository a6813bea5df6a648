"""``kvpress-like bench headwise``: memory and decode speed of head-wise (AdaKV) budgets
against the same press with uniform budgets, at equal kept pairs.

One real prefill of a ``--context``-token prompt fills a full cache; copies of it are compressed by the cache
engine itself (as a pressed prefill would, :func:`~kvpress_like.cache.PressedLayer.from_dynamic`), once by the
base press (uniform heads, ``max_cache_tokens = budget``) and once by ``AdaptivePress`` around it (ragged
heads, the same ``budget x kv_heads`` pairs per layer). Both then decode the same tokens with a full budget
(every step evicts in place), in alternating order, ``--repeats`` times; the ratio of medians is reported.

Memory: ``cache_nbytes`` (key/value bytes) against the promised ``kept pairs x 2 x head_dim x dtype bytes``,
and the head-wise bookkeeping (positions, scores, lengths, offsets) against the same. The allocation's cost
is the compression time (scoring + selection + storing) against the prefill forward it follows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvpress_like import press
from kvpress_like.cache import PressedLayer, cache_nbytes
from kvpress_like.headwise import HeadwisePressedLayer
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs
from kvpress_like.methods.adaptive import AdaptivePress
from kvpress_like.models import head_dim as head_dim_of

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, environment, markdown_footer,
    set_threads, write_result,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="knorm", help="registered query-free base press")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--budget", type=int, default=1024, help="kept pairs per layer and KV head (on average)")
    parser.add_argument("--floor", type=float, default=0.2, help="AdaptivePress floor")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cache, alternating")
    add_threads_argument(parser, default=1)
    add_out_argument(parser)


def _prompt(tokenizer, n: int) -> torch.Tensor:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"the offline text has only {ids.shape[1]} tokens; lower --context")
    return ids


def _compress(model, full: DynamicCache, p) -> tuple[DynamicCache, float]:
    """A copy of ``full`` compressed by ``p`` as a pressed prefill would be; seconds spent compressing."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with press(model, p):
        for layer in attention_layers(model):
            idx = layer.layer_idx
            cls = HeadwisePressedLayer if isinstance(p, AdaptivePress) and not layer.sliding else PressedLayer
            while len(cache.layers) <= idx:
                cache.layers.append(cache.layer_class_to_replicate())
            cache.layers[idx] = cls.from_dynamic(full.layers[idx], p, idx)
    return cache, time.perf_counter() - start


@torch.inference_mode()
def _decode_ms(model, p, cache, tokens: torch.Tensor) -> float:
    with press(model, p):
        start = time.perf_counter()
        for i in range(tokens.shape[1]):
            model(tokens[:, i : i + 1], **cache_kwargs(cache))
        return (time.perf_counter() - start) * 1e3 / tokens.shape[1]


def _memory(cache, head_dim: int, itemsize: int) -> dict:
    pairs = bookkeeping = 0
    for layer in cache.layers:
        if isinstance(layer, HeadwisePressedLayer):
            pairs += layer.kept_pairs
            bookkeeping += layer.bookkeeping_nbytes()
        else:
            pairs += int((layer.positions >= 0).sum())
            bookkeeping += sum(t.numel() * t.element_size() for t in (layer._pos, layer._score) if t is not None)
    promised = pairs * 2 * head_dim * itemsize
    measured = cache_nbytes(cache)
    return dict(kept_pairs=pairs, promised_bytes=promised, kv_bytes=measured, bookkeeping_bytes=bookkeeping,
                measured_over_promised=(measured + bookkeeping) / promised)


@torch.inference_mode()
def main(args: argparse.Namespace) -> dict:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    cfg = model.config.get_text_config()
    head_dim, itemsize = head_dim_of(cfg), next(model.parameters()).element_size()
    ids = _prompt(tokenizer, args.context)
    start = time.perf_counter()
    full = DynamicCache(config=model.config)
    out = model(ids, **cache_kwargs(full))
    prefill_s = time.perf_counter() - start
    base = build_press(args.method, max_cache_tokens=args.budget, n_sink=4, window=64)
    adaptive = AdaptivePress(base, floor=args.floor)
    uniform, uniform_s = _compress(model, full, base)
    ragged, ragged_s = _compress(model, full, adaptive)
    tokens = out.logits[:, -1:].argmax(-1).repeat(1, args.steps)  # the same tokens for both caches
    lengths = torch.stack([layer.lengths[0].float() for layer in ragged.layers if isinstance(layer, HeadwisePressedLayer)])
    times = {"uniform": [], "ragged": []}
    for r in range(args.repeats):
        order = [("uniform", base, uniform), ("ragged", adaptive, ragged)]
        for name, p, cache in order if r % 2 == 0 else order[::-1]:
            times[name].append(_decode_ms(model, p, cache, tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    report = dict(
        environment=environment(), model=args.model, method=args.method, context=args.context, budget=args.budget,
        floor=args.floor, steps=args.steps, repeats=args.repeats,
        decode_ms={k: v for k, v in times.items()}, decode_median_ms=med, ragged_over_uniform=med["ragged"] / med["uniform"],
        prefill_s=prefill_s, compress_s={"uniform": uniform_s, "ragged": ragged_s},
        allocation_overhead_of_prefill=(ragged_s - uniform_s) / prefill_s,
        head_lengths=dict(mean=float(lengths.mean()), max=float(lengths.max()), min=float(lengths.min()),
                          longest_over_mean=float((lengths.max(-1).values / lengths.mean(-1)).mean())),
        memory={"uniform": _memory(uniform, head_dim, itemsize), "ragged": _memory(ragged, head_dim, itemsize)},
    )
    m = report["memory"]
    md = [
        f"## Head-wise budgets (AdaptivePress) vs uniform: {args.model}, {args.method}, {args.context} tokens, "
        f"budget {args.budget} per KV head, floor {args.floor}",
        "",
        "| | uniform | head-wise |",
        "|---|---|---|",
        f"| kept pairs | {m['uniform']['kept_pairs']} | {m['ragged']['kept_pairs']} |",
        f"| K/V bytes (cache_nbytes) | {m['uniform']['kv_bytes']} | {m['ragged']['kv_bytes']} |",
        f"| promised (pairs x 2 x head_dim x dtype) | {m['uniform']['promised_bytes']} | {m['ragged']['promised_bytes']} |",
        f"| bookkeeping bytes | {m['uniform']['bookkeeping_bytes']} | {m['ragged']['bookkeeping_bytes']} |",
        f"| (K/V + bookkeeping) / promised | {m['uniform']['measured_over_promised']:.4f} | {m['ragged']['measured_over_promised']:.4f} |",
        f"| decode ms/step (median of {args.repeats} x {args.steps}) | {med['uniform']:.2f} | {med['ragged']:.2f} |",
        f"| compression after prefill (s) | {uniform_s:.3f} | {ragged_s:.3f} |",
        "",
        f"- Decode step, ragged / uniform: **{report['ragged_over_uniform']:.3f}** (runs: uniform "
        f"{[round(t, 2) for t in times['uniform']]}, ragged {[round(t, 2) for t in times['ragged']]} ms)",
        f"- Allocation overhead: {report['allocation_overhead_of_prefill'] * 100:.2f}% of the {prefill_s:.1f} s prefill",
        f"- Head lengths over layers and KV heads: mean {lengths.mean():.0f}, min {lengths.min():.0f}, max "
        f"{lengths.max():.0f}; longest head / mean, per layer: {report['head_lengths']['longest_over_mean']:.2f} "
        "(the padded view attention reads is that much wider than the kept pairs)",
    ]
    md += markdown_footer(report)
    write_result(args.out, "headwise_bench", report, "\n".join(md))
    print("\n".join(md))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    main(parser.parse_args())
