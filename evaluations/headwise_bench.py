"""``kvpress-like bench headwise``: memory and decode speed of head-wise (AdaKV) budgets
against the same press with uniform budgets, at equal kept pairs.

One real prefill of a ``--context``-token prompt fills a full cache; for each ``--batches`` size its rows are
that cache repeated (a prefill of 8 x 4k tokens would take half an hour on a shared CPU; every row then gets
the same allocation, so the batch costs what its heads' lengths cost, not a mix). Copies are compressed by the
cache engine itself (as a pressed prefill would, :func:`~kvpress_like.cache.PressedLayer.from_dynamic`), once
by the base press (uniform heads, ``max_cache_tokens = budget``) and once by ``AdaptivePress`` around it
(ragged heads, the same ``budget x kv_heads`` pairs per layer). Both then decode the same tokens with a full
budget (every step evicts in place), alternating which goes first, ``--repeats`` times; the ratio of medians
is reported, both measured in the same run.

Memory: ``cache_nbytes`` (key/value bytes, every allocated slot) against the promised ``kept pairs x 2 x
head_dim x dtype bytes``, and the bookkeeping (positions, scores, and for head-wise layers lengths, starts,
caps) against the same. Attention width: the slots each KV head's window spans (``W``) over the mean kept
pairs per head. The allocation's cost is the compression time (scoring + selection + storing) against the
prefill forward it follows.
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
    parser.add_argument("--batches", default="1,8", help="batch sizes (rows repeat the prompt's cache)")
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


def _repeat(model, full: DynamicCache, batch: int) -> DynamicCache:
    """``full`` with its single row repeated ``batch`` times."""
    out = DynamicCache(config=model.config)
    for idx, layer in enumerate(full.layers):
        out.update(layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), idx)
    return out


def _widths(cache) -> dict:
    """Per head-wise layer: window width W over mean kept pairs per head, and slots over kept pairs."""
    layers = [layer for layer in cache.layers if isinstance(layer, HeadwisePressedLayer)]
    width = [layer.width / float(layer.lengths.float().mean()) for layer in layers]
    slots = [layer._k.shape[0] / layer.kept_pairs for layer in layers]
    longest = [float(layer.lengths.max()) / float(layer.lengths.float().mean()) for layer in layers]
    return dict(window_over_mean=statistics.fmean(width), max_window_over_mean=max(width),
                longest_over_mean=statistics.fmean(longest), slots_over_kept=statistics.fmean(slots),
                max_slots_over_kept=max(slots))


def _load() -> str:
    import os

    return " ".join(f"{x:.1f}" for x in os.getloadavg())


@torch.inference_mode()
def main(args: argparse.Namespace) -> dict:
    from kvpress_like.models import load_model

    from .common import parse_list

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    cfg = model.config.get_text_config()
    head_dim, itemsize = head_dim_of(cfg), next(model.parameters()).element_size()
    ids = _prompt(tokenizer, args.context)
    load_start = _load()
    start = time.perf_counter()
    full = DynamicCache(config=model.config)
    out = model(ids, **cache_kwargs(full))
    prefill_s = time.perf_counter() - start
    base = build_press(args.method, max_cache_tokens=args.budget, n_sink=4, window=64)
    adaptive = AdaptivePress(base, floor=args.floor)
    token = out.logits[:, -1:].argmax(-1)
    runs = []
    for batch in parse_list(args.batches, int):
        rows = full if batch == 1 else _repeat(model, full, batch)
        uniform, uniform_s = _compress(model, rows, base)
        ragged, ragged_s = _compress(model, rows, adaptive)
        del rows
        tokens = token.repeat(batch, args.steps)  # the same tokens for both caches
        times = {"uniform": [], "ragged": []}
        load_before = _load()
        for r in range(args.repeats):
            order = [("uniform", base, uniform), ("ragged", adaptive, ragged)]
            for name, p, cache in order if r % 2 == 0 else order[::-1]:
                times[name].append(_decode_ms(model, p, cache, tokens))
        med = {k: statistics.median(v) for k, v in times.items()}
        lengths = torch.stack([layer.lengths[0].float() for layer in ragged.layers if isinstance(layer, HeadwisePressedLayer)])
        runs.append(dict(
            batch=batch, decode_ms=times, decode_median_ms=med, ragged_over_uniform=med["ragged"] / med["uniform"],
            paired_ratios=[g / u for g, u in zip(times["ragged"], times["uniform"])],
            compress_s={"uniform": uniform_s, "ragged": ragged_s}, load=[load_before, _load()],
            head_lengths=dict(mean=float(lengths.mean()), max=float(lengths.max()), min=float(lengths.min())),
            widths=_widths(ragged),
            memory={"uniform": _memory(uniform, head_dim, itemsize), "ragged": _memory(ragged, head_dim, itemsize)},
        ))
        del uniform, ragged
    first = runs[0]
    report = dict(
        environment=environment(), model=args.model, method=args.method, context=args.context, budget=args.budget,
        floor=args.floor, steps=args.steps, repeats=args.repeats, prefill_s=prefill_s, load_at_start=load_start,
        allocation_overhead_of_prefill=(first["compress_s"]["ragged"] - first["compress_s"]["uniform"]) / prefill_s
        if first["batch"] == 1 else None,
        runs=runs,
    )
    md = [
        f"## Head-wise budgets (AdaptivePress) vs uniform: {args.model}, {args.method}, {args.context} tokens, "
        f"budget {args.budget} per KV head, floor {args.floor}, memory_slack {adaptive.memory_slack}",
        "",
        "| batch | | uniform | head-wise |",
        "|---|---|---|---|",
    ]
    for run in runs:
        m, med, b = run["memory"], run["decode_median_ms"], run["batch"]
        md += [
            f"| {b} | kept pairs | {m['uniform']['kept_pairs']} | {m['ragged']['kept_pairs']} |",
            f"| {b} | K/V bytes (cache_nbytes) | {m['uniform']['kv_bytes']} | {m['ragged']['kv_bytes']} |",
            f"| {b} | promised (pairs x 2 x head_dim x dtype) | {m['uniform']['promised_bytes']} | {m['ragged']['promised_bytes']} |",
            f"| {b} | bookkeeping bytes | {m['uniform']['bookkeeping_bytes']} | {m['ragged']['bookkeeping_bytes']} |",
            f"| {b} | (K/V + bookkeeping) / promised | {m['uniform']['measured_over_promised']:.4f} | {m['ragged']['measured_over_promised']:.4f} |",
            f"| {b} | decode ms/step (median of {args.repeats} x {args.steps}) | {med['uniform']:.2f} | {med['ragged']:.2f} |",
            f"| {b} | compression after prefill (s) | {run['compress_s']['uniform']:.3f} | {run['compress_s']['ragged']:.3f} |",
        ]
    md.append("")
    for run in runs:
        w = run["widths"]
        md += [
            f"- Batch {run['batch']}: decode step ragged / uniform **{run['ragged_over_uniform']:.3f}** (ratio of medians; "
            f"per alternating pair {[round(x, 3) for x in run['paired_ratios']]}; runs uniform "
            f"{[round(t, 1) for t in run['decode_ms']['uniform']]}, ragged {[round(t, 1) for t in run['decode_ms']['ragged']]} ms; "
            f"load average {run['load'][0]} before, {run['load'][1]} after)",
            f"  head lengths mean {run['head_lengths']['mean']:.0f}, min {run['head_lengths']['min']:.0f}, max "
            f"{run['head_lengths']['max']:.0f}; per layer: longest head / mean {w['longest_over_mean']:.3f}, attention window "
            f"W / mean {w['window_over_mean']:.3f} (max {w['max_window_over_mean']:.3f}), slots / kept pairs "
            f"{w['slots_over_kept']:.4f} (max {w['max_slots_over_kept']:.4f})",
        ]
    if report["allocation_overhead_of_prefill"] is not None:
        md.append(f"- Allocation overhead: {report['allocation_overhead_of_prefill'] * 100:.2f}% of the {prefill_s:.1f} s prefill "
                  "(batch 1: head-wise compression time minus uniform)")
    md.append(f"- Load average at start: {load_start}")
    md += markdown_footer(report)
    write_result(args.out, "headwise_bench", report, "\n".join(md))
    print("\n".join(md))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    main(parser.parse_args())
