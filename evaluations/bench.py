"""``kvpress-like bench speed``: prefill overhead, peak prefill memory, KV bytes and decode speed per method.

Every method is measured against no press in the same run, at several prompt lengths, with repeats
interleaved across methods (so load changes on a shared machine hit all methods alike) and medians
reported:

* prefill time of one ``model(prompt)`` call under ``press(model, p)`` (logits for the last token only);
* peak memory during that prefill: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
  before; on CPU the peak resident set size (RSS) above the RSS before the call, from the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) or, where that is unavailable, an RSS
  sampler thread; tracemalloc cannot see torch's allocations;
* KV bytes after prefill (``cache_nbytes``) against the ratio's promise: ``n - floor(ratio * n)`` tokens per
  compressed layer and KV head;
* decode ms/token: greedy steps with the compressed cache.

``--device cuda --model llama-8b-random`` builds a random-weight Llama-3.1-8B-shaped model in bf16 (the shape
kvpress benchmarks with) for 8k-32k prompts; ``--model tiny`` builds a small random Llama to exercise the
same code path anywhere. Result files are named after the device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import DynamicCache

from kvpress_like import cache_nbytes, press
from kvpress_like.cache import PressedLayer

from kvpress_like.integrations.transformers import cache_kwargs
from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, command_line, environment,
    environment_markdown, set_threads, write_result,
)
from .memory import PeakMemory
from .roofline import kv_bytes_per_token, sync
from kvpress_like.models import head_dim as head_dim_of

METHODS = ("no_press", "qfilters", "knorm", "snapkv", "streaming_llm")
#: Llama-3.1-8B's shape (kvpress's speed benchmark uses it with random weights)
LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


#: Shape of the random ``--model tiny`` (benchmark smoke runs).
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=65536)


def build_model(name: str, device: str, dtype: torch.dtype):
    """``(model, filters)``: an embedded/local model with its Q-Filters, or a random-weight one.

    Random-weight models get Q-Filters calibrated on random token ids (their queries still have a dominant
    direction; the filters only need the right shape and realistic cost here).
    """
    import transformers as tf

    from kvpress_like import calibrate
    from kvpress_like.filters import filters_for
    from kvpress_like.models import load_model

    if name in ("llama-8b-random", "tiny"):
        if name == "tiny":  # a random 4-layer Llama: smoke runs of the benchmark code, not numbers
            torch.manual_seed(0)
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA))
            model.config._attn_implementation = "sdpa"
        else:
            config = tf.LlamaConfig(**LLAMA_8B)
            torch.manual_seed(0)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    model = tf.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
            finally:
                torch.set_default_dtype(previous)
        model = model.to(device=device, dtype=dtype).eval()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(0))
        filters = calibrate(model, texts=ids.to(device), num_sequences=4, seq_len=256, samples_per_head=1024, progress=False)
        return model, filters
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return model, filters_for(model, tokenizer)


def make_press(method: str, ratio: float, filters):
    """A registered press by name (None for ``no_press``); Q-Filters get the filters built with the model."""
    extra = dict(filters=filters) if method == "qfilters" else {}
    return build_press(method, ratio=ratio, **extra)


def promised_kv_bytes(model, n: int, p) -> int:
    """What the ratio promises: ``n - floor(ratio * n)`` tokens per compressed layer and KV head, else ``n``."""
    from kvpress_like.integrations.transformers import attention_layers

    per_token = kv_bytes_per_token(model, layers=1)
    total = 0
    for layer in attention_layers(model):
        keep = n
        if p is not None and not layer.sliding and p.compresses_layer(layer.layer_idx):
            keep = p.target_size(n, decoding=False) or n
        total += keep * per_token
    return total


@torch.no_grad()
def prefill_once(model, ids: torch.Tensor, p) -> tuple[float, int, str, DynamicCache, torch.Tensor]:
    """One measured prefill: (seconds, peak bytes, how memory was measured, cache, last logits)."""
    device = ids.device
    cache = DynamicCache(config=model.config)
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        if p is None:
            logits = model(ids, **cache_kwargs(cache), logits_to_keep=1).logits
        else:
            with press(model, p):
                logits = model(ids, **cache_kwargs(cache), logits_to_keep=1).logits
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak, mem.how, cache, logits[:, -1]


@torch.no_grad()
def decode_ms(model, cache, logits: torch.Tensor, p, steps: int) -> float:
    """Median milliseconds per greedy decoding step on the prefilled cache."""
    device = logits.device
    token = logits.argmax(-1, keepdim=True)
    times = []
    with press(model, p) if p is not None else contextlib.nullcontext():
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            logits = model(token, **cache_kwargs(cache)).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_bench(model, filters, lengths, methods=METHODS, ratio: float = 0.5, repeats: int = 3,
              decode_steps: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """Measure every method at every length; returns ``{"rows": [...], "settings": {...}}``."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    presses = {m: make_press(m, ratio, filters) for m in methods}
    if "no_press" not in presses:
        presses = {"no_press": None, **presses}
    rows = []
    bar = tqdm(total=len(lengths) * repeats * len(presses), desc="bench", disable=not progress)
    for n in lengths:
        ids = torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)
        prefill_once(model, ids[:, : min(n, 256)], None)  # warm-up (allocator, kernels)
        times: dict[str, list[float]] = {m: [] for m in presses}
        peaks: dict[str, list[int]] = {m: [] for m in presses}
        how = ""
        cfg = model.config.get_text_config()
        head_dim = head_dim_of(cfg)
        token_bytes = 2 * head_dim * next(model.parameters()).element_size()  # one token of one KV head
        measured = {}
        for r in range(repeats):
            order = list(presses) if r % 2 == 0 else list(presses)[::-1]
            for m in order:
                p = presses[m]
                seconds, peak, how, cache, logits = prefill_once(model, ids, p)
                times[m].append(seconds)
                peaks[m].append(peak)
                if r == repeats - 1:  # the last repeat's cache gives KV bytes and decode speed
                    kv = cache_nbytes(cache)
                    n_heads = sum(cfg.num_key_value_heads for layer in cache.layers if isinstance(layer, PressedLayer))
                    promise = promised_kv_bytes(model, n, p)
                    measured[m] = dict(
                        kv_bytes=kv, kv_promised_bytes=promise,
                        kv_within_one_token_per_head=abs(kv - promise) <= max(n_heads, 1) * token_bytes,
                        decode_ms_per_token=decode_ms(model, cache, logits, p, decode_steps),
                    )
                del cache
                bar.update()
        for m in presses:
            rows.append(dict(method=m, tokens=n, prefill_s=statistics.median(times[m]), prefill_all_s=times[m],
                             peak_prefill_bytes=int(statistics.median(peaks[m])), **measured[m]))
        base = next(r for r in rows if r["method"] == "no_press" and r["tokens"] == n)
        for r in rows:
            if r["tokens"] == n:
                r["prefill_overhead_pct"] = 100 * (r["prefill_s"] / base["prefill_s"] - 1)
                r["peak_vs_no_press"] = r["peak_prefill_bytes"] / base["peak_prefill_bytes"] if base["peak_prefill_bytes"] > 0 else None
                r["decode_vs_no_press"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
    bar.close()
    return dict(rows=rows, memory_measure=how,
                settings=dict(lengths=list(lengths), methods=list(presses), ratio=ratio, repeats=repeats,
                              decode_steps=decode_steps, seed=seed))


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def markdown(result: dict, env: dict, model_name: str, device_tag: str, dtype: str, command: str) -> str:
    s = result["settings"]
    md = [
        f"## Speed and memory ({device_tag})\n",
        environment_markdown(env),
        f"- Model: {model_name} ({dtype}); random prompt ids; ratio {s['ratio']} (x{1 / (1 - s['ratio']):g}); "
        f"median of {s['repeats']} interleaved prefills per method; {s['decode_steps']} decode steps",
        f"- Peak memory: {result['memory_measure']}",
        f"- Command: `{command}`\n",
        "| tokens | method | prefill s | overhead % | peak prefill MiB | KV MiB | promised KV MiB | KV = promise | "
        "decode ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        md.append(
            f"| {r['tokens']} | {r['method']} | {r['prefill_s']:.3f} | {r['prefill_overhead_pct']:+.1f} | "
            f"{_mib(r['peak_prefill_bytes'])} | {_mib(r['kv_bytes'])} | {_mib(r['kv_promised_bytes'])} | "
            f"{'yes' if r['kv_within_one_token_per_head'] else 'NO'} | {r['decode_ms_per_token']:.1f} |"
        )
    md.append("")
    longest = max(s["lengths"])
    q = next((r for r in result["rows"] if r["method"] == "qfilters" and r["tokens"] == longest), None)
    if q is not None:
        target = 3.0 if device_tag == "cpu" else 1.0
        spread = [r for r in result["rows"] if r["method"] == "no_press" and r["tokens"] == longest][0]["prefill_all_s"]
        noise = 100 * (max(spread) - min(spread)) / statistics.median(spread) if len(spread) > 1 else None
        # a press adds work to the same prefill, so a clearly negative overhead can only be measurement noise
        fastest = min(r["prefill_overhead_pct"] for r in result["rows"] if r["tokens"] == longest)
        if noise is None or noise >= target or fastest < -target:
            why = ("one prefill per method, noise not estimated" if noise is None
                   else f"no-press repeats spread {noise:.1f}% of their median")
            verdict = (f"INCONCLUSIVE: {why}; the lowest overhead measured is {fastest:+.1f}%, which only noise can "
                       "produce. Rerun with more --repeats on an idle machine")
        else:
            verdict = ("met" if q["prefill_overhead_pct"] < target else "NOT met") + (
                f" (no-press repeats spread {noise:.1f}% of their median)")
        md.append(
            f"Target: Q-Filters prefill overhead under {target:g}% at the longest length ({longest} tokens): measured "
            f"{q['prefill_overhead_pct']:+.1f}% -> {verdict}."
        )
    md.append("KV bytes after prefill equal the promise within one token per KV head: "
              + ("yes for every method and length." if all(r["kv_within_one_token_per_head"] for r in result["rows"])
                 else "NO for " + ", ".join(f"{r['method']}@{r['tokens']}" for r in result["rows"]
                                             if not r["kv_within_one_token_per_head"]) + "."))
    return "\n".join(md) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded name, local path, 'llama-8b-random' or 'tiny'")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--lengths", default=None, help="prompt lengths (default 1024,2048,4096 on CPU; 8192,16384,32768 on CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of KV pairs removed")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved prefills per method (median reported)")
    parser.add_argument("--decode-steps", type=int, default=16, help="decoding steps timed after each prefill")
    add_threads_argument(parser)
    add_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked but torch sees no CUDA device; run on a GPU machine or use --device cpu.")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    default_lengths = "8192,16384,32768" if device.type == "cuda" else "1024,2048,4096"
    lengths = [int(x) for x in (args.lengths or default_lengths).split(",") if x]
    model, filters = build_model(args.model, str(device), dtype)
    env = environment(device)
    start = time.time()
    device_tag = "cpu" if device.type == "cpu" else f"cuda ({env['device']})"
    name = "bench.cpu" if device.type == "cpu" else "bench.cuda"
    if args.model == "tiny":
        name += ".tiny"
    result: dict = {}
    for n in lengths:  # results are written after each length, so a cut-short run still reports what it measured
        part = run_bench(model, filters, [n], tuple(m for m in args.methods.split(",") if m), args.ratio,
                         args.repeats, args.decode_steps)
        if result:
            result["rows"] += part["rows"]
            result["settings"]["lengths"].append(n)
        else:
            result = part
        result.update(model=args.model, device=env["device"], dtype=str(dtype), environment=env, command=command_line(),
                      elapsed_s=time.time() - start)
        md = markdown(result, env, args.model, device_tag, str(dtype).replace("torch.", ""), command_line())
        write_result(args.out, name, result, md)
    print(md)
    print(f"wrote {args.out / (name + '.json')} in {time.time() - start:.0f} s")
    return 0
