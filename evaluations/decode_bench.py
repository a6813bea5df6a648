"""``kvpress-like bench decode``: what evicting inside a capped cache costs per decoding step, and the KV
memory of chunked prefill.

Decode. Three caches of the same mean physical size decode the same tokens in the same run, in rotating
order, repeated: a capped :class:`PressedCache` (full at ``budget`` tokens; every step scores the new key,
picks the lowest unprotected slot and overwrites it in place), the same cache without a budget (appends;
live size from ``budget - steps/2`` to ``budget + steps/2``), and transformers' ``DynamicCache`` of that
same size. The eviction overhead is capped vs. uncapped ms/token. The cache update alone (one layer,
model shapes) is also timed, so the overhead can be read without the noise of a whole forward.

Memory. A long prompt goes through ``generate()`` with ``prefill_chunk_size`` under a budget; every cache
update is recorded: the KV bytes stored in all layers, and the largest key/value tensors any attention call
received. Without a press the prompt's full cache would be ``layers x prompt`` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress_like.cache import PressedCache, PressedLayer, cache_nbytes
from kvpress_like.integrations.context import press as press_context
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, environment, markdown_footer,
    query_free_presses, set_threads, write_result,
)
from .roofline import kv_bytes_per_token
from kvpress_like.models import head_dim as head_dim_of


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--method", default="qfilters", help="registered query-free press to cap the cache with")
    parser.add_argument("--budget", type=int, default=512, help="KV tokens per layer and KV head")
    parser.add_argument("--window", type=int, default=64, help="recent tokens never evicted")
    parser.add_argument("--n-sink", type=int, default=4, help="first tokens never evicted")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cache (medians are reported)")
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="prompt length for the memory check")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prefill_chunk_size for the memory check")
    add_threads_argument(parser)
    add_out_argument(parser)


def _press(method: str, model, **settings):
    """The registered press, prepared for ``model`` (bare caches are used here, without ``press()``)."""
    if method not in query_free_presses():
        raise ValueError(f"--method must be a registered query-free press: {', '.join(query_free_presses())}")
    p = build_press(method, **settings)
    p.prepare(model)
    return p


@torch.inference_mode()
def _decode_ms(model, ids: torch.Tensor, make_cache, prefill: int, steps: int) -> float:
    """ms per token of ``steps`` teacher-forced decoding steps after an (untimed) prefill."""
    cache = make_cache()
    model(ids[:, :prefill], **cache_kwargs(cache))
    start = time.perf_counter()
    for i in range(prefill, prefill + steps):
        model(ids[:, i : i + 1], **cache_kwargs(cache))
    return (time.perf_counter() - start) * 1000 / steps


def _update_us(layer, k: torch.Tensor, v: torch.Tensor, fill: int, iters: int = 200) -> float:
    """µs per single-token ``update`` of one cache layer already holding ``fill`` tokens."""
    b, h, _, d = k.shape
    layer.update(torch.randn(b, h, fill, d), torch.randn(b, h, fill, d))
    for _ in range(10):
        layer.update(k, v)
    start = time.perf_counter()
    for _ in range(iters):
        layer.update(k, v)
    return (time.perf_counter() - start) * 1e6 / iters


def decode_benchmark(model, ids: torch.Tensor, args) -> dict:
    budget, steps = args.budget, args.steps
    protect = dict(window=args.window, n_sink=args.n_sink)
    capped = _press(args.method, model, max_cache_tokens=budget, **protect)
    unbudgeted = _press(args.method, model, **protect)
    configs = {
        "capped (PressedCache, budget)": (lambda: PressedCache(capped, config=model.config), budget + steps),
        "uncapped (PressedCache, no budget)": (lambda: PressedCache(unbudgeted, config=model.config), budget - steps // 2),
        "uncapped (DynamicCache)": (lambda: DynamicCache(config=model.config), budget - steps // 2),
    }
    _decode_ms(model, ids, configs["uncapped (DynamicCache)"][0], 32, 4)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            make, prefill = configs[name]
            times[name].append(_decode_ms(model, ids, make, prefill, steps))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n}: {t[-1]:.2f}" for n, t in times.items()), file=sys.stderr)
    medians = {name: statistics.median(t) for name, t in times.items()}

    cfg = model.config.get_text_config()
    head_dim = head_dim_of(cfg)
    k = torch.randn(1, cfg.num_key_value_heads, 1, head_dim)
    v = torch.randn_like(k)
    per_layer = {
        "capped overwrite (score + argmin + in-place write)": _update_us(PressedLayer(capped, 0), k, v, budget + 8),
        "PressedLayer append": _update_us(PressedLayer(unbudgeted, 0), k, v, budget),
        "DynamicLayer append (torch.cat)": _update_us(DynamicLayer(), k, v, budget),
    }
    step_ms = medians["capped (PressedCache, budget)"]
    layers = cfg.num_hidden_layers
    return dict(
        ms_per_token=medians,
        all_runs_ms=times,
        overhead_vs_pressed_uncapped=medians["capped (PressedCache, budget)"] / medians["uncapped (PressedCache, no budget)"] - 1,
        overhead_vs_dynamic=medians["capped (PressedCache, budget)"] / medians["uncapped (DynamicCache)"] - 1,
        cache_update_us_per_layer=per_layer,
        eviction_share_of_step=(
            (per_layer["capped overwrite (score + argmin + in-place write)"] - per_layer["DynamicLayer append (torch.cat)"])
            * layers / 1000 / step_ms
        ),
    )


@torch.inference_mode()
def memory_check(model, ids: torch.Tensor, args) -> dict:
    """KV bytes during a chunked prefill under a budget, recorded at every cache update."""
    tokens, chunk, budget = args.prefill_tokens, args.prefill_chunk, args.budget
    p = _press(args.method, model, max_cache_tokens=budget, window=args.window, n_sink=args.n_sink,
               prefill_chunk_size=chunk)
    token_bytes = kv_bytes_per_token(model, layers=1)  # K + V of one layer
    cache = DynamicCache(config=model.config)
    stored_peak, attention_peak, calls = 0, 0, 0
    live_before: dict[int, int] = {}

    def record(layer: PressedLayer, plan: str, n_new: int) -> None:
        """Observer called after every update: the cache's stored bytes, and the keys this call attended to
        (a prune attends to the previous live slots plus the new tokens, then stores fewer)."""
        nonlocal stored_peak, attention_peak, calls
        before = live_before.get(layer.layer_idx, 0)
        attended = before if plan == "overwrite" else before + n_new
        live_before[layer.layer_idx] = layer.n
        calls += 1
        stored_peak = max(stored_peak, cache_nbytes(cache))
        attention_peak = max(attention_peak, attended * token_bytes)

    # the benchmark's layers are created here, so the observer sees every update press() makes
    for layer in attention_layers(model):
        if not layer.sliding and p.compresses_layer(layer.layer_idx):
            cache.layers[layer.layer_idx] = PressedLayer(p, layer.layer_idx)
            cache.layers[layer.layer_idx].observers.append(record)
    with press_context(model, p):
        start = time.perf_counter()
        model.generate(ids[:, :tokens], attention_mask=torch.ones_like(ids[:, :tokens]), **cache_kwargs(cache),
                       max_new_tokens=1, do_sample=False)
        seconds = time.perf_counter() - start
    layers = model.config.get_text_config().num_hidden_layers
    full = layers * tokens * token_bytes
    return dict(
        prompt_tokens=tokens,
        chunk=chunk,
        budget=budget,
        seconds=round(seconds, 1),
        cache_updates=calls,
        kv_bytes_per_token_per_layer=token_bytes,
        peak_stored_kv_bytes=stored_peak,
        stored_bound_bytes=layers * budget * token_bytes,
        largest_attention_kv_bytes=attention_peak,
        attention_bound_bytes=(budget + chunk) * token_bytes,
        no_press_full_cache_bytes=full,
        peak_bound_bytes=layers * budget * token_bytes + (budget + chunk) * token_bytes,
    )


def main(args: argparse.Namespace) -> int:
    from kvpress_like.data import corpus_ids
    from kvpress_like.models import load_model

    set_threads(args.threads)
    env = environment()
    model, tokenizer = load_model(args.model)
    ids = corpus_ids(tokenizer, "prose")[None]
    needed = max(args.budget + 2 * args.steps, args.prefill_tokens)
    if ids.shape[1] < needed:
        raise SystemExit(f"the offline corpus has {ids.shape[1]} tokens; this run needs {needed}")
    report = dict(
        model=args.model,
        method=args.method,
        budget=args.budget,
        window=args.window,
        n_sink=args.n_sink,
        steps=args.steps,
        repeats=args.repeats,
        environment=env,
    )
    report["decode"] = decode_benchmark(model, ids, args)
    report["chunked_prefill_memory"] = memory_check(model, ids, args)
    text = render_markdown(report)
    write_result(args.out, "decode_bench", report, text)
    print(text)
    return 0



def render_markdown(report: dict) -> str:
    d, m = report["decode"], report["chunked_prefill_memory"]
    mib = 1 / 2**20
    lines = [
        "## Decoding with a capped KV cache: per-step eviction overhead and chunked-prefill memory",
        "",
        f"Model {report['model']} on CPU, {report['method']} eviction, budget {report['budget']} tokens per layer and KV "
        f"head (window {report['window']}, {report['n_sink']} sinks), {report['steps']} teacher-forced decoding steps per run, "
        f"median of {report['repeats']} runs in rotating order. Uncapped caches start at budget - steps/2 tokens, so "
        "all three hold the same number of tokens on average.",
        "",
        "| cache | ms/token (median) | min | max |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {ms:.2f} | {min(d['all_runs_ms'][name]):.2f} | {max(d['all_runs_ms'][name]):.2f} |"
        for name, ms in d["ms_per_token"].items()
    ]
    lines += [
        "",
        "When min and max of a cache differ by more than the gap between caches, the machine was too noisy for "
        "the end-to-end overhead; read the cache-update timings below instead.",
    ]
    lines += [
        "",
        f"Eviction overhead: **{100 * d['overhead_vs_pressed_uncapped']:+.1f}%** vs. the same cache without a budget, "
        f"{100 * d['overhead_vs_dynamic']:+.1f}% vs. DynamicCache (target: under 10% of a decode step).",
        "",
        "Cache update alone, one layer, one token (µs):",
        "",
        "| update | µs |",
        "|---|---|",
    ]
    lines += [f"| {name} | {us:.1f} |" for name, us in d["cache_update_us_per_layer"].items()]
    lines += [
        "",
        f"Over all layers, scoring + choosing + overwriting costs {100 * d['eviction_share_of_step']:.1f}% of a decode "
        "step more than DynamicCache's append.",
        "",
        f"Chunked prefill: a {m['prompt_tokens']}-token prompt through `generate()` with `prefill_chunk_size={m['chunk']}` "
        f"and a {m['budget']}-token budget ({m['cache_updates']} cache updates, {m['seconds']} s):",
        "",
        "| KV memory | MiB |",
        "|---|---|",
        f"| peak stored in the cache (all layers) | {m['peak_stored_kv_bytes'] * mib:.2f} |",
        f"| bound: layers x budget | {m['stored_bound_bytes'] * mib:.2f} |",
        f"| largest K+V any attention call received | {m['largest_attention_kv_bytes'] * mib:.3f} |",
        f"| bound: budget + chunk tokens, one layer | {m['attention_bound_bytes'] * mib:.3f} |",
        f"| without a press: full prompt cache (computed) | {m['no_press_full_cache_bytes'] * mib:.2f} |",
        "",
        "Only one layer at a time holds the budget + chunk working set (its kept tokens concatenated with the "
        "chunk, plus the gathered survivors before they are copied into the layer's fixed buffer).",
    ] + markdown_footer(report)
    return "\n".join(lines)
