"""``kvpress-like bench gpu-decode``: decode speed of the static compressed cache under torch.compile.

One run on a CUDA GPU measures, for 8k and 32k prompts at batch 1 and 16, the decode ms/token and tokens/s of
four paths on a random-weight Llama-3.1-8B-shaped model in bf16:

* ``full eager``: transformers' DynamicCache, no press, eager forward (what ``generate()`` does by default);
* ``full static+compile``: transformers' StaticCache + ``torch.compile(mode="reduce-overhead")``;
* ``qfilters x8 eager``: :class:`~kvpress_like.cache.PressedLayer` under ``press()`` (budget prompt/8, one
  eviction per step), eager;
* ``qfilters x8 static+compile``: :class:`~kvpress_like.static.StaticPressedCache` under ``press()``,
  compiled with CUDA graphs (maskless GQA attention over the slots).

Decode speed does not depend on what the cache holds, so caches are filled by their own ``update()`` with
random keys and values (the pressed caches select their tokens from those, chunk by chunk, exactly as in a
chunked prefill) instead of an expensive model prefill. A step is one forward of one token per sequence
plus the greedy pick, timed with the device synchronized. The lower bound per step is (weights read + live
KV bytes) / copy bandwidth, measured on the device. Batches whose full cache does not fit run the full paths
at the largest batch that does. Everything runs under a time budget (default 320 s); what does not fit in it
is reported as skipped. ``--tiny`` runs the same code on the CPU with a tiny model (a smoke test, not a
speed result).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext

import torch
from kvpress_like.models import head_dim as head_dim_of

from .common import add_out_argument, write_result
from .memory import peak_gib, reset_peak
from .roofline import copy_bandwidth, kv_bytes_per_token, sync, weight_bytes_read

COMMAND = "kvpress-like bench gpu-decode"
LLAMA_8B = dict(
    num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
)
TINY = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=128, max_position_embeddings=4096,
)
PATHS = ("full eager", "full static+compile", "qfilters x8 eager", "qfilters x8 static+compile")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model (no GPU needed)")
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (default 8192 32768; tiny: 64 256)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16; tiny: 1 3)")
    parser.add_argument("--steps", type=int, help="timed decode steps per path (default 20; tiny: 4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, graph capture)")
    parser.add_argument("--ratio", type=float, default=0.875, help="Q-Filters compression ratio (0.875 = x8)")
    parser.add_argument("--backend", help="torch.compile backend (default inductor; tiny: aot_eager)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for inductor (CUDA graphs)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention implementation of the model (results of non-sdpa runs get a suffix)")
    parser.add_argument("--memory-budget", type=int, default=4096,
                        help="chunked-prefill memory check: Q-Filters max_cache_tokens and prefill_chunk_size "
                             "(tiny: 64), prompt = the largest --prompts; 0 skips it")
    parser.add_argument("--time-budget", type=float, default=320.0, help="seconds; later measurements are skipped")
    add_out_argument(parser)


# -- measurements ----------------------------------------------------------------------------------------
def fill(cache, cfg, batch: int, prompt: int, dtype, device, seed: int, chunk: int = 8192) -> None:
    """Give every layer ``prompt`` random keys/values through the cache's own ``update`` (chunked)."""
    head_dim = head_dim_of(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in range(cfg.num_hidden_layers):
        for start in range(0, prompt, chunk):
            q = min(chunk, prompt - start)
            shape = (batch, cfg.num_key_value_heads, q, head_dim)
            k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            cache.update(k, v, layer)


def time_decode(step, cache, batch: int, warmup: int, steps: int, device, cudagraphs: bool):
    """Milliseconds per decode step and the first step's logits (for a cross-path sanity check)."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    first = None
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(tok, cache)
            if first is None:
                first = logits[:, -1].float().clone()
            tok = logits[:, -1:].argmax(-1)
        sync(device)
    return 1000 * (time.perf_counter() - start) / steps, first


def largest_batch(cfg, prompt: int, extra: int, dtype, device, want: int) -> int:
    """Largest batch (<= want) whose full KV cache fits next to the weights, with room for the step."""
    if device.type != "cuda":
        return want
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    per_seq = (prompt + extra) * kv_bytes_per_token(cfg, dtype)
    # Per sequence, one layer's transient copies too: torch.cat (eager) or K/V repeated for the query heads.
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    per_seq += per_seq * (1 + groups) // cfg.num_hidden_layers
    return max(0, min(want, int((free - 6 * 2**30) // per_seq)))  # 6 GiB for activations and graphs


# -- the run ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

    from kvpress_like import PressedCache, QFilterPress, press
    from kvpress_like.integrations.transformers import cache_kwargs
    from kvpress_like.static import StaticPressedCache

    t0 = time.perf_counter()
    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        raise SystemExit(f"{COMMAND} needs a CUDA GPU; use --tiny for a CPU smoke run.")
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    prompts = args.prompts or ([64, 256] if tiny else [8192, 32768])
    batches = args.batches or ([1, 3] if tiny else [1, 16])
    steps = args.steps or (4 if tiny else 20)
    backend = args.backend or ("aot_eager" if tiny else "inductor")
    compile_kwargs = dict(backend=backend, fullgraph=True, dynamic=True)
    if backend == "inductor":
        compile_kwargs["mode"] = args.mode
    # One graph for every prompt length and batch > 1 (batch 1 is its own: dynamo specializes sizes 0 and 1);
    # no duck sizing, which would tie unrelated equal sizes (e.g. a filter's storage offset and the budget).
    torch.fx.experimental._config.use_duck_shape = False
    cudagraphs = device.type == "cuda" and backend == "inductor" and "reduce-overhead" in args.mode

    cfg = LlamaConfig(**(TINY if tiny else LLAMA_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=args.attn).eval()
    head_dim = head_dim_of(cfg)
    filters = torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
    bandwidth = copy_bandwidth((2 << 30) if not tiny else (64 << 20), reps=10, device=device)
    weights = weight_bytes_read(model)
    per_token = kv_bytes_per_token(cfg, dtype)
    extra = args.warmup + steps + 8
    # Batch-major: each compiled path compiles its batch-1 graph, then its larger-batch graph; longest prompts
    # first, so a time budget cut drops the least important measurements.
    configs = [(p, b) for b in batches for p in sorted(prompts, reverse=True)]
    log = print
    log(f"[{time.perf_counter() - t0:6.1f}s] model ready on {_device_name(device)}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    def step_fn(fn):
        return lambda tok, cache: fn(input_ids=tok, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits

    rows: list[dict] = []
    first_logits: dict[tuple, torch.Tensor] = {}

    graphs_seen: set = set()  # (path, batch == 1): dynamo compiles one graph for each
    compile_s = [90.0]  # estimate for a first compilation + capture, updated by the first one measured

    def measure(path, prompt, batch, make_cache, step, context, compiled, kept):
        row = dict(path=path, prompt=prompt, batch=batch, kv_tokens=kept)
        elapsed = time.perf_counter() - t0
        new_graph = compiled and (path, batch == 1) not in graphs_seen
        need = compile_s[0] + 15 if new_graph else 20.0
        if not tiny and elapsed + need > args.time_budget:
            row["skipped"] = f"time budget ({args.time_budget:.0f} s) reached"
            rows.append(row)
            log(f"[{elapsed:6.1f}s] {path:28s} P={prompt} b={batch}: skipped (time budget)")
            return
        reset_peak(device)
        try:
            with context:
                cache = make_cache()
                ms, first = time_decode(step, cache, batch, args.warmup, steps, device, cudagraphs and compiled)
        except torch.cuda.OutOfMemoryError as err:  # reported, not fatal: the other paths still run
            row["skipped"] = f"out of memory: {str(err).splitlines()[0]}"
            rows.append(row)
            cache = None
            reset_peak(device)
            return
        if new_graph:
            graphs_seen.add((path, batch == 1))
            if len(graphs_seen) == 1:
                compile_s[0] = time.perf_counter() - t0 - elapsed
        bound_ms = 1000 * (weights + batch * kept * per_token) / bandwidth
        row.update(
            ms_per_token=ms, tokens_per_s=batch * 1000 / ms, peak_gib=peak_gib(device),
            kv_gib=batch * kept * per_token / 2**30, bound_ms=bound_ms, x_bound=ms / bound_ms,
        )
        first_logits[(path, prompt, batch)] = first.cpu()
        rows.append(row)
        del cache
        log(f"[{time.perf_counter() - t0:6.1f}s] {path:28s} P={prompt:6d} b={batch:3d}: {ms:8.2f} ms/token, "
            f"{row['tokens_per_s']:9.1f} tok/s, x{row['x_bound']:.2f} bound"
            + (f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""))

    # 1. Q-Filters x8, static + compiled: one press() context and one compiled callable for every shape.
    p_static = QFilterPress(ratio=args.ratio, filters=filters)
    torch._dynamo.reset()
    _compile_stats()
    compiled_static = torch.compile(model, **compile_kwargs)
    with press(model, p_static):
        for prompt, batch in configs:
            budget = p_static.target_size(prompt, decoding=False)
            measure(
                PATHS[3], prompt, batch,
                lambda: _filled(StaticPressedCache(p_static, cfg, budget), cfg, batch, prompt, dtype, device),
                step_fn(compiled_static), nullcontext(), True, budget,
            )
    graphs = {PATHS[3]: _compile_stats()}
    torch._dynamo.reset()  # frees the captured graphs and their memory pools before the full caches
    def full_cache_runs(path: str, make_cache, step, compiled: bool) -> None:
        """Full-cache runs, each at the largest batch whose cache fits (skipped where none does)."""
        for prompt, batch in configs:
            fit = largest_batch(cfg, prompt, extra, dtype, device, batch)
            if fit < 1:
                rows.append(dict(path=path, prompt=prompt, batch=batch, skipped="full cache does not fit"))
                continue
            measure(
                path, prompt, fit, lambda: _filled(make_cache(prompt), cfg, fit, prompt, dtype, device),
                step, nullcontext(), compiled, prompt,
            )

    # 2. Full cache, transformers StaticCache + compiled.
    compiled_full = torch.compile(model, **compile_kwargs)
    full_cache_runs(
        PATHS[1], lambda prompt: StaticCache(config=cfg, max_cache_len=prompt + extra), step_fn(compiled_full), True
    )
    graphs[PATHS[1]] = _compile_stats()
    torch._dynamo.reset()
    # 3. Full cache, eager (DynamicCache grows by torch.cat every step).
    full_cache_runs(PATHS[0], lambda prompt: DynamicCache(config=cfg), step_fn(model), False)
    # 4. Q-Filters x8, eager PressedLayer (same selection: budget = the prompt's kept size, one eviction per step).
    for prompt, batch in configs:
        budget = p_static.target_size(prompt, decoding=False)
        p_eager = QFilterPress(ratio=args.ratio, filters=filters, max_cache_tokens=budget)
        measure(
            PATHS[2], prompt, batch,
            lambda: _filled(PressedCache(p_eager, cfg), cfg, batch, prompt, dtype, device),
            step_fn(model), press(model, p_eager), False, budget,
        )

    prefill_memory = None
    if args.memory_budget:
        if tiny or time.perf_counter() - t0 + 40 < args.time_budget:
            prefill_memory = chunked_prefill_memory(model, filters, max(prompts), 64 if tiny else args.memory_budget,
                                                    device)
            log(f"[{time.perf_counter() - t0:6.1f}s] chunked prefill memory: {prefill_memory}")
        else:
            prefill_memory = dict(skipped=f"time budget ({args.time_budget:.0f} s) reached")

    # Same random K/V and the same selection: the compiled static step must agree with the eager pressed one.
    agreement = {}
    for prompt, batch in configs:
        a, b = first_logits.get((PATHS[2], prompt, batch)), first_logits.get((PATHS[3], prompt, batch))
        if a is not None and b is not None:
            agreement[f"P={prompt} b={batch}"] = dict(
                max_abs_logit_diff=float((a - b).abs().max()), same_argmax=bool((a.argmax(-1) == b.argmax(-1)).all())
            )
    return dict(
        device=_device_name(device), tiny=tiny, dtype=str(dtype).replace("torch.", ""),
        model=("tiny random Llama " if tiny else "random-weight Llama-3.1-8B shape ") + json.dumps(cfg_dict(cfg)),
        settings=dict(prompts=prompts, batches=batches, steps=steps, warmup=args.warmup, ratio=args.ratio,
                      compile=compile_kwargs, cudagraphs=cudagraphs),
        copy_bandwidth_tb_s=bandwidth / 1e12, weight_gib_read_per_step=weights / 2**30,
        kv_kib_per_token=per_token / 1024, rows=rows, qfilters_static_vs_eager_first_step=agreement,
        compilation=graphs, acceptance=acceptance(rows), chunked_prefill_memory=prefill_memory, attn=args.attn,
        wall_s=time.perf_counter() - t0,
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=_tf_version()),
    )


def chunked_prefill_memory(model, filters, prompt: int, budget: int, device: torch.device) -> dict:
    """Peak memory beyond what was allocated before (the weights) while ``generate()`` prefills a ``prompt``-token
    prompt in chunks of ``budget`` tokens under Q-Filters capped at ``budget`` tokens (issue 14: <= 1.05 GiB at 32k
    with a 4k budget and 4k chunks on Llama-3.1-8B)."""
    from kvpress_like import QFilterPress, press

    p = QFilterPress(ratio=0.0, filters=filters, max_cache_tokens=budget, prefill_chunk_size=budget)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(3))
    reset_peak(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    start = time.perf_counter()
    with torch.no_grad(), press(model, p):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    sync(device)
    out = dict(prompt=prompt, budget=budget, chunk=budget, seconds=time.perf_counter() - start)
    if before is not None:
        out["peak_beyond_start_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        out["weights_gib"] = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30
    return out


def _compile_stats() -> dict:
    """Dynamo graphs and recompilations since the last call. press()'s model-level hook is traced as a frame of
    its own; each frame recompiles once when the batch goes from 1 to more (dynamo specializes size 1)."""
    from torch._dynamo.utils import counters, guard_failures

    stats = dict(graphs=int(counters["stats"]["unique_graphs"]),
                 recompiles=sum(len(v) for v in guard_failures.values()))
    counters["stats"]["unique_graphs"] = 0
    guard_failures.clear()
    return stats


def _filled(cache, cfg, batch, prompt, dtype, device):
    fill(cache, cfg, batch, prompt, dtype, device, seed=prompt * 131 + batch)
    return cache


def cfg_dict(cfg) -> dict:
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    return {k: getattr(cfg, k) for k in keys}


def acceptance(rows: list[dict]) -> dict:
    """The issue's checks, computed from the rows (32k prompts, batch 1 and the largest batch)."""
    done = [r for r in rows if "ms_per_token" in r]
    if not done:
        return {}
    prompt = max(r["prompt"] for r in done)

    def best(paths, batch_pred):
        found = [r for r in done if r["prompt"] == prompt and r["path"] in paths and batch_pred(r["batch"])]
        return min(found, key=lambda r: r["ms_per_token"] / r["batch"], default=None)

    out = {}
    ours1 = best([PATHS[3]], lambda b: b == 1)
    full1 = best(PATHS[:2], lambda b: b == 1)
    if ours1:
        out["batch1_ms_per_token"] = ours1["ms_per_token"]
        out["batch1_x_bound"] = ours1["x_bound"]
        if full1:
            out["batch1_speedup_vs_best_full"] = full1["ms_per_token"] / ours1["ms_per_token"]
    big = max((r["batch"] for r in done if r["path"] == PATHS[3] and r["prompt"] == prompt), default=None)
    if big and big > 1:
        ours = best([PATHS[3]], lambda b: b == big)
        full = best(PATHS[:2], lambda b: b > 1)
        out["large_batch"] = big
        out["large_batch_tokens_per_s"] = ours["tokens_per_s"]
        if full:
            out["full_cache_batch"] = full["batch"]
            out["throughput_ratio_vs_best_full"] = ours["tokens_per_s"] / full["tokens_per_s"]
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def markdown(report: dict, command: str) -> str:
    lines = ["## GPU decode: static compressed cache + torch.compile", ""]
    if report["tiny"]:
        lines += [
            "**No CUDA GPU was available when this file was written**: the numbers below come from the CPU smoke "
            "mode (`--tiny`, a 2-layer random model) and only show that the benchmark runs end to end; they are "
            f"not speed results. On an H100/H200 run: `{COMMAND}` (about 5 minutes; it rewrites this file).", "",
        ]
    s = report["settings"]
    lines += [
        f"- Device: **{report['device']}**; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, Python {report['versions']['python']}",
        f"- Model: {report['model']}, {report['dtype']}, attention {report.get('attn', 'sdpa')}",
        f"- Settings: prompts {s['prompts']}, batches {s['batches']}, {s['warmup']} warm-up + {s['steps']} timed steps, "
        f"Q-Filters ratio {s['ratio']} (random filters), torch.compile {s['compile']}, CUDA graphs {s['cudagraphs']}",
        f"- Copy bandwidth {report['copy_bandwidth_tb_s']:.2f} TB/s; weights read per step "
        f"{report['weight_gib_read_per_step']:.2f} GiB; KV {report['kv_kib_per_token']:.0f} KiB/token",
        f"- Command: `{command}` (wall time {report['wall_s']:.0f} s)",
        "- A step = one token per sequence (forward + greedy pick); caches filled through their own `update()` "
        "with random K/V (decode speed does not depend on the content). Bound = (weights + live KV) / copy bandwidth.",
        "",
        "| prompt | batch | path | KV tokens | ms/token | tokens/s | x bound | peak GiB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "ms_per_token" in r:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            lines.append(f"| {r['prompt']} | {r['batch']} | {r['path']} | {r['kv_tokens']} | {r['ms_per_token']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['x_bound']:.2f} | {peak} |")
        else:
            lines.append(f"| {r['prompt']} | {r['batch']} | {r['path']} | - | - | - | - | {r['skipped']} |")
    acc = report["acceptance"]
    if acc:
        lines += ["", "Issue 7 / issue 14 checks (largest prompt):"]
        if "batch1_ms_per_token" in acc:
            lines.append(f"- batch 1, Q-Filters x8 static+compile: {acc['batch1_ms_per_token']:.2f} ms/token, "
                         f"x{acc['batch1_x_bound']:.2f} the bound (targets on H200: <= 1.3x the bound; <= 4.7 ms/token at 32k)"
                         + (f", {acc['batch1_speedup_vs_best_full']:.2f}x faster than the best full-cache path"
                            if "batch1_speedup_vs_best_full" in acc else ""))
        if "large_batch" in acc:
            lines.append(f"- batch {acc['large_batch']}: {acc['large_batch_tokens_per_s']:.0f} tokens/s"
                         + (f", {acc['throughput_ratio_vs_best_full']:.2f}x the best full cache "
                            f"(batch {acc['full_cache_batch']}; target at 32k >= 3x)" if "throughput_ratio_vs_best_full" in acc
                            else "; the full cache does not fit at any batch > 1"))
    comp = "; ".join(f"{path}: {c['graphs']} graphs, {c['recompiles']} recompilations"
                     for path, c in report["compilation"].items())
    lines += ["", f"torch.compile over all prompts, budgets and evictions: {comp} (expected: one recompilation per "
              "traced frame, the forward and press()'s model hook, when the batch goes from 1 to more; none else)."]
    mem = report.get("chunked_prefill_memory")
    if mem and "peak_beyond_start_gib" in mem:
        lines += ["", f"Chunked prefill, {mem['prompt']}-token prompt, Q-Filters budget {mem['budget']} and "
                  f"{mem['chunk']}-token chunks: peak memory beyond the weights {mem['peak_beyond_start_gib']:.2f} GiB "
                  f"(target <= 1.05 GiB at 32k), {mem['seconds']:.1f} s."]
    elif mem:
        lines += ["", f"Chunked prefill memory: {mem.get('skipped', 'measured on CPU: no allocator statistics')}."]
    agree = report["qfilters_static_vs_eager_first_step"]
    if agree:
        worst = max(v["max_abs_logit_diff"] for v in agree.values())
        lines += ["", f"Compiled static vs eager pressed cache, first step from identical caches: max |logit diff| "
                  f"{worst:.3g}, same greedy token: {all(v['same_argmax'] for v in agree.values())}."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    import sys

    report = run(args)
    command = " ".join(["kvpress-like", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else COMMAND + (
        " --tiny" if args.tiny else "")
    name = "gpu_decode" if args.attn == "sdpa" else f"gpu_decode.{args.attn}"
    text = markdown(report, command)
    write_result(args.out, name, report, text)
    print(text)
    return 0
