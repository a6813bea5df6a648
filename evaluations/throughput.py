"""``kvpress-like bench throughput``: ``generate()`` decode tokens/s, full cache vs compressed, against the byte bound.

A decode step reads every weight once plus every live key and value. Compression can only speed up the part
of a step spent on KV, so each measured speedup is shown beside the one the bytes allow:

    bound step time = (weight bytes + live KV bytes) / copy bandwidth      (bandwidth measured in this run)
    speedup allowed = (weights + full-cache KV) / (weights + compressed KV)

For every cell of a batch x context grid and every path (full cache; each query-free press at each
compression factor, dynamic ``PressedLayer`` and static slot cache, and static compiled where asked), the
benchmark times greedy ``generate()`` steps with a fixed number of new tokens. Prefill is measured apart
from decode: each batch row's longest prompt is prefilled once without a press, and every cell's cache is
built from that prefill's keys and values through the target cache's own ``update()`` (a prefix of a
causal prefill is the prefill of the prefix; for a query-free press a single-call prefill under ``press()``
stores exactly what ``update()`` stores, since attention inside that call sees every key). ``generate()`` is
then given the prompt plus its first greedy token, so its one-token "prefill" and every step after it are
decode steps; a logits processor timestamps each step and the first step (graph capture for compiled
paths) is dropped. Repeats are interleaved across paths (rotating order), and medians and the spread over
repeats are reported, with the peak RSS of each run and the share of each step spent in ``cache.update``
(scoring + eviction + writes).

Threads: torch's intra-op threads fight other processes on a shared machine, so the benchmark sets its
thread count (default 1), records the load average before and during the run, and warns when the machine
is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, command_line, environment, markdown_footer,
    query_free_presses, set_threads, write_result,
)
from .memory import hwm, peak_gib, reset_hwm, rss
from .roofline import bound_speedup, bound_step_seconds, copy_bandwidth, kv_bytes_per_token, sync, weight_bytes_read

NAME = "throughput"
#: ``--quick``: a small grid that still contains the headline cell (batch 8 x 4k) and Q-Filters only
QUICK = dict(batches=[1, 8], contexts=[2048, 4096], new_tokens=8, repeats=2, presses=["qfilters"], factors=[8])
NOCOPY = "full cache, in-place appends"
HEADLINE = dict(batch=8, context=4096, press="qfilters", factor=8)
#: paths measured for each press and factor
MODES = ("dynamic", "static", "static+compile")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded name, local path, 'tiny' or 'llama-8b-random'")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="batch sizes")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed run (>= 3)")
    parser.add_argument("--presses", nargs="+", default=None,
                        help="registered query-free presses (default: every registered query-free press)")
    parser.add_argument("--factors", type=int, nargs="+", default=[4, 8], help="compression factors (x4: ratio 0.75)")
    parser.add_argument("--modes", nargs="+", default=["dynamic", "static"], choices=MODES,
                        help="cache paths per press (static+compile also runs on --compiled-cells)")
    parser.add_argument("--compiled-cells", nargs="*", default=["8x4096"], metavar="BxC",
                        help="cells where the static compiled path runs (Q-Filters, or the first press, at the largest factor)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the static+compile path")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and cell (interleaved)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="distinct prompts prefilled, tiled over the batch rows (default: one per row); decode "
                             "cost does not depend on the content, prefill cost does")
    add_threads_argument(parser, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="batches 1 8, contexts 2k 4k, 8 new tokens, 2 repeats, Q-Filters x8 only")
    parser.add_argument("--nocopy-baseline", action="store_true",
                        help="also time a full cache that appends in place (PressedLayer, nothing evicted): "
                             "transformers' DynamicCache re-copies the whole cache at every step (torch.cat)")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    add_out_argument(parser)


# -- the bound's live tokens ------------------------------------------------------------------------------
def live_tokens(kind: str, press, context: int, new_tokens: int, budget: int | None = None) -> float:
    """Mean live KV tokens per layer and KV head over the timed steps (steps 2..new_tokens)."""
    mid = (new_tokens + 1) / 2  # steps 1..new_tokens after the prompt; mean growth of a growing cache
    if kind in ("full", "full-nocopy"):
        return context + mid
    if kind.startswith("static"):
        return float(budget)
    target = press.target_size(context, decoding=False)
    cap = press.policy.capacity
    grown = target + mid if not press.policy.decoding else press.target_size(int(context + mid), decoding=True)
    return float(min(grown, cap) if cap is not None else grown)


# -- timing ------------------------------------------------------------------------------------------------
class StepClock:
    """A logits processor that timestamps every generation step (``generate()`` calls it once per token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def steps(self) -> list[float]:
        """Seconds of each decode step after the first two calls (the first forward and the warm-up step)."""
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


class UpdateClock:
    """Accumulates the wall time of every ``update()`` of a cache's layers (eager paths only)."""

    def __init__(self, cache, device: torch.device):
        self.total = 0.0
        self.calls = 0
        for layer in cache.layers:
            layer.update = self._wrap(layer.update, device)

    def _wrap(self, update: Callable, device: torch.device) -> Callable:
        def timed(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = update(*args, **kwargs)
            sync(device)
            self.total += time.perf_counter() - start
            self.calls += 1
            return out

        return timed


# -- paths -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodePath:
    """One way of decoding: the full cache, or a press at a factor with a cache kind."""

    name: str
    kind: str  # "full" | "dynamic" | "static" | "static+compile"
    press_name: str | None = None
    factor: int | None = None
    press: object = None


def make_press(name: str, factor: int, filters):
    """A registered press at compression ``factor`` (ratio 1 - 1/factor), with Q-Filters' filters if it takes them."""
    from kvpress_like.registry import press_class, press_settings, resolve_press

    if factor < 2:
        raise ValueError(f"compression factors must be >= 2 (x2 removes half), got {factor}")
    cls = press_class(name)
    if cls.scoring.needs_queries:
        raise ValueError(f"{name} scores keys with queries; the throughput benchmark compares query-free presses "
                         f"({', '.join(query_free_presses())}).")
    settings = dict(ratio=1 - 1 / factor)
    if "filters" in press_settings(cls):
        settings["filters"] = filters
    return resolve_press(name, settings)


def build_paths(args, model, filters) -> list[DecodePath]:
    paths = [DecodePath("full cache", "full")]
    if args.nocopy_baseline:
        from kvpress_like.methods import StreamingLLMPress

        paths.append(DecodePath(NOCOPY, "full-nocopy", press=StreamingLLMPress(ratio=0.0, n_sink=0)))
    for name in args.presses:
        for factor in args.factors:
            for kind in args.modes:
                if kind == "static+compile":
                    continue  # added below, for the cells that ask for it
                p = make_press(name, factor, filters)
                p.prepare(model)
                paths.append(DecodePath(f"{name} x{factor} {kind}", kind, name, factor, p))
    if args.compiled_cells or "static+compile" in args.modes:
        name = "qfilters" if "qfilters" in args.presses else args.presses[0]
        factor = max(args.factors)
        p = make_press(name, factor, filters)
        p.prepare(model)
        paths.append(DecodePath(f"{name} x{factor} static+compile", "static+compile", name, factor, p))
    return paths


def build_cache(path: DecodePath, model, keys: list[torch.Tensor], values: list[torch.Tensor], context: int,
                new_tokens: int):
    """The cache a prefill of ``context`` tokens would leave for this path, from a full prefill's K/V."""
    from transformers import DynamicCache

    from kvpress_like.cache import PressedCache
    from kvpress_like.static import StaticPressedCache, static_budget

    budget = None
    if path.kind == "full":
        cache = DynamicCache(config=model.config)
    elif path.kind in ("dynamic", "full-nocopy"):
        cache = PressedCache(path.press, config=model.config)
    else:
        budget = static_budget(path.press, context, context + new_tokens + 1)
        cache = StaticPressedCache(path.press, model.config, budget)
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[:, :, :context], v[:, :, :context], i)
    return cache, budget


def prefill_rows(model, ids: torch.Tensor, contexts: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], dict, float]:
    """Per-layer keys/values of a full-cache prefill of ``ids`` (one row at a time) and the greedy next
    token after each context length; returns also the prefill seconds."""
    from transformers import DynamicCache

    from kvpress_like.integrations.transformers import cache_kwargs

    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    first: dict[int, list[torch.Tensor]] = {c: [] for c in contexts}
    head = model.get_output_embeddings()
    start = time.perf_counter()
    with torch.no_grad():
        for row in ids:
            cache = DynamicCache(config=model.config)
            hidden = model.base_model(input_ids=row[None], use_cache=True, **cache_kwargs(cache)).last_hidden_state
            for c in contexts:
                first[c].append(head(hidden[:, c - 1]).argmax(-1))
            keys.append([layer.keys for layer in cache.layers])
            values.append([layer.values for layer in cache.layers])
            del hidden, cache
    seconds = time.perf_counter() - start
    n_layers = len(keys[0])
    k = [torch.cat([r[i] for r in keys]) for i in range(n_layers)]
    v = [torch.cat([r[i] for r in values]) for i in range(n_layers)]
    return k, v, {c: torch.cat(t)[:, None] for c, t in first.items()}, seconds


def decode_run(model, path: DecodePath, cache, prompt: torch.Tensor, new_tokens: int, compile_config, device,
               instrument: bool) -> dict:
    """One timed ``generate()`` from a built cache: per-step seconds, update share, peak RSS, tokens."""
    from transformers import LogitsProcessorList

    from kvpress_like import press
    from kvpress_like.integrations.transformers import cache_kwargs

    clock = StepClock(device)
    updates = UpdateClock(cache, device) if instrument else None
    if path.kind == "full":
        ctx = nullcontext()
    else:
        static = path.kind.startswith("static")
        compile_ = (compile_config if path.kind == "static+compile" else False) if static else None
        ctx = press(model, path.press, static=static, compile=compile_)
    hwm_ok = device.type == "cpu" and reset_hwm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = rss() if device.type == "cpu" else 0
    start = time.perf_counter()
    with ctx, torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0, **cache_kwargs(cache),
        )
    wall = time.perf_counter() - start
    steps = clock.steps()
    step_total = sum(steps)
    result = dict(
        step_s=statistics.median(steps), steps=len(steps), wall_s=wall,
        first_step_s=clock.stamps[1] - clock.stamps[0] if len(clock.stamps) > 1 else None,
        tokens=out[:, prompt.shape[1]:].tolist(),
        peak_rss_gib=(hwm() if hwm_ok else rss()) / 2**30 if device.type == "cpu" else peak_gib(device),
        rss_before_gib=rss0 / 2**30,
    )
    if updates is not None and updates.calls:
        # update() calls of the timed steps only: the same share of every step (one call per layer per step)
        per_call = updates.total / updates.calls
        n_layers = len(cache.layers)
        result["update_share"] = per_call * n_layers / result["step_s"] if step_total else None
    return result


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _apply_quick(args) -> None:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)


def _check(args) -> None:
    if args.new_tokens < 3:
        raise ValueError(f"--new-tokens must be >= 3 (the first two steps are untimed), got {args.new_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    for cell in args.compiled_cells or []:
        b, _, c = cell.partition("x")
        if not (b.isdigit() and c.isdigit()):
            raise ValueError(f"--compiled-cells takes BATCHxCONTEXT cells such as 8x4096, got {cell!r}")


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    from .bench import build_model

    _apply_quick(args)
    _check(args)
    set_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    load_start = _load_average()
    cores = os.cpu_count() or 1
    notes: list[str] = []
    if load_start is not None and device.type == "cpu" and load_start > cores - torch.get_num_threads():
        notes.append(f"machine loaded at start: load average {load_start} on {cores} cores with "
                     f"{torch.get_num_threads()} torch thread(s) of ours; other jobs compete for the cores.")
    env = environment(device)
    model, filters = build_model(args.model, str(device), dtype)
    if args.presses is None:
        args.presses = query_free_presses()
    paths = build_paths(args, model, filters)
    compiled_cells = {tuple(int(x) for x in cell.split("x")) for cell in (args.compiled_cells or [])}
    if "static+compile" in args.modes:
        compiled_cells |= {(b, c) for b in args.batches for c in args.contexts}
    from transformers import CompileConfig

    compile_config = CompileConfig(backend=args.compile_backend, fullgraph=True, dynamic=False,
                                   mode="reduce-overhead" if device.type == "cuda" else "default")
    bandwidth = copy_bandwidth(device=device, nbytes=(256 << 20) if device.type == "cpu" else (1 << 30))
    weights = weight_bytes_read(model)
    per_token = kv_bytes_per_token(model)
    log(f"[{time.perf_counter() - t0:6.1f}s] {args.model}: weights read/step {weights / 2**20:.0f} MiB, KV "
        f"{per_token / 1024:.1f} KiB/token; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"{torch.get_num_threads()} thread(s); load {load_start}")

    vocab = model.config.get_text_config().vocab_size
    max_b, max_c = max(args.batches), max(args.contexts)
    distinct = min(args.prompts or max_b, max_b)
    ids = torch.randint(100, vocab, (distinct, max_c), generator=torch.Generator().manual_seed(0)).to(device)
    keys, values, first, prefill_s = prefill_rows(model, ids, sorted(args.contexts))
    log(f"[{time.perf_counter() - t0:6.1f}s] prefilled {distinct} prompt(s) x {max_c} tokens (full cache) in "
        f"{prefill_s:.1f} s")
    if distinct < max_b:  # rows r and r + distinct hold the same prompt
        tile = torch.arange(max_b, device=device) % distinct
        ids, keys, values = ids[tile], [t[tile] for t in keys], [t[tile] for t in values]
        first = {c: t[tile] for c, t in first.items()}

    rows: list[dict] = []
    loads: list[float] = []
    compile_first_call: dict[str, float] = {}
    for batch in args.batches:
        for context in args.contexts:
            cell_paths = [p for p in paths if p.kind != "static+compile" or (batch, context) in compiled_cells]
            prompt = torch.cat([ids[:batch, :context], first[context][:batch]], dim=1)
            k = [t[:batch] for t in keys]
            v = [t[:batch] for t in values]
            runs: dict[str, list[dict]] = {p.name: [] for p in cell_paths}
            budgets: dict[str, int | None] = {}
            for p in [p for p in cell_paths if p.kind == "static+compile"]:  # compilation run, untimed
                cache, budget = build_cache(p, model, k, v, context, args.new_tokens)
                start = time.perf_counter()
                try:
                    decode_run(model, p, cache, prompt, args.new_tokens, compile_config, device, False)
                except Exception as err:  # reported, not fatal: the eager paths still run
                    failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    notes.append(f"static+compile failed at batch {batch} x {context}: {failed}")
                    cell_paths.remove(p)
                    continue
                finally:
                    del cache
                seconds = time.perf_counter() - start
                compile_first_call[f"b={batch} ctx={context}"] = seconds
                log(f"[{time.perf_counter() - t0:6.1f}s] b={batch} ctx={context}: first compiled generate() took "
                    f"{seconds:.1f} s")
            runs = {p.name: [] for p in cell_paths}
            for r in range(args.repeats):
                order = cell_paths[r % len(cell_paths):] + cell_paths[: r % len(cell_paths)]
                for p in order:
                    cache, budget = build_cache(p, model, k, v, context, args.new_tokens)
                    budgets[p.name] = budget
                    res = decode_run(model, p, cache, prompt, args.new_tokens, compile_config, device,
                                     instrument=p.kind != "static+compile")
                    del cache
                    runs[p.name].append(res)
                loads.append(_load_average() or 0.0)
            full_step = statistics.median(x["step_s"] for x in runs["full cache"])
            nocopy_step = statistics.median(x["step_s"] for x in runs[NOCOPY]) if NOCOPY in runs else None
            kv_full = batch * live_tokens("full", None, context, args.new_tokens) * per_token
            for p in cell_paths:
                steps = [x["step_s"] for x in runs[p.name]]
                step = statistics.median(steps)
                live = live_tokens(p.kind, p.press, context, args.new_tokens, budgets.get(p.name))
                kv = batch * live * per_token
                allowed = bound_speedup(weights, kv_full, kv)
                measured = full_step / step
                shares = [x["update_share"] for x in runs[p.name] if x.get("update_share") is not None]
                row = dict(
                    batch=batch, context=context, path=p.name, kind=p.kind, press=p.press_name, factor=p.factor,
                    live_kv_tokens=live, kv_gib=kv / 2**30, step_ms=1000 * step,
                    step_ms_runs=[1000 * s for s in steps], spread=(max(steps) - min(steps)) / step,
                    tokens_per_s=batch / step, bound_tokens_per_s=batch / bound_step_seconds(weights, kv, bandwidth),
                    speedup=measured, speedup_allowed=allowed,
                    speedup_vs_nocopy=None if nocopy_step is None else nocopy_step / step,
                    ratio_of_allowed=measured / allowed,
                    update_share=statistics.median(shares) if shares else None,
                    peak_rss_gib=max(x["peak_rss_gib"] for x in runs[p.name]),
                )
                rows.append(row)
            _compare_tokens(rows, runs, cell_paths, batch, context)
            log(f"[{time.perf_counter() - t0:6.1f}s] b={batch} ctx={context}: " + ", ".join(
                f"{r['path']} {r['tokens_per_s']:.1f} tok/s (x{r['speedup']:.2f}/{r['speedup_allowed']:.2f})"
                for r in rows if r["batch"] == batch and r["context"] == context))
    load_max = max(loads) if loads else None
    if load_max is not None and device.type == "cpu" and load_max > cores:
        notes.append(f"machine loaded during the run: load average up to {load_max} on {cores} cores "
                     "(more runnable threads than cores); ratios measured in the same run stay comparable, "
                     "absolute tokens/s are pessimistic.")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return dict(
        model=args.model, device=env["device"], dtype=str(dtype).replace("torch.", ""),
        settings=dict(batches=args.batches, contexts=args.contexts, new_tokens=args.new_tokens, repeats=args.repeats,
                      presses=args.presses, factors=args.factors, modes=args.modes,
                      compiled_cells=sorted(f"{b}x{c}" for b, c in compiled_cells),
                      compile_config=dict(backend=compile_config.backend, mode=compile_config.mode,
                                          fullgraph=compile_config.fullgraph, dynamic=compile_config.dynamic),
                      threads=torch.get_num_threads(), timed_steps_per_run=args.new_tokens - 2),
        copy_bandwidth_gb_s=bandwidth / 1e9, weight_bytes_read=weights, kv_bytes_per_token=per_token,
        prefill_s=prefill_s, compile_first_call_s=compile_first_call,
        distinct_prompts=distinct, load_average=dict(start=load_start, max_during=load_max, cores=cores), warnings=notes,
        rows=rows, headline=headline(rows), environment=env, command=command_line(),
        wall_s=time.perf_counter() - t0,
    )


def _compare_tokens(rows: list[dict], runs: dict, cell_paths: list[DecodePath], batch: int, context: int) -> None:
    """Static (compiled or not) must decode the same greedy tokens as its dynamic twin when both exist."""
    by_name = {p.name: p for p in cell_paths}
    for row in rows:
        if row["batch"] != batch or row["context"] != context or not row["kind"].startswith("static"):
            continue
        p = by_name[row["path"]]
        twin = f"{p.press_name} x{p.factor} static"
        if row["kind"] == "static+compile" and twin in runs:
            row["same_tokens_as_static_eager"] = runs[twin][0]["tokens"] == runs[row["path"]][0]["tokens"]


def headline(rows: list[dict]) -> dict:
    """The issue's checks: the headline cell, the worst cell against its byte bound, update shares."""
    out: dict = {}
    cell = [r for r in rows if r["batch"] == HEADLINE["batch"] and r["context"] == HEADLINE["context"]
            and r["press"] == HEADLINE["press"] and r["factor"] == HEADLINE["factor"]]
    if cell:
        best = max(cell, key=lambda r: r["tokens_per_s"])
        out["cell"] = f"batch {HEADLINE['batch']} x {HEADLINE['context']} tokens, {HEADLINE['press']} x{HEADLINE['factor']}"
        out["best_path"] = best["path"]
        out["speedup"] = best["speedup"]
        out["speedup_allowed"] = best["speedup_allowed"]
        out["speedup_vs_nocopy"] = best["speedup_vs_nocopy"]
        out["by_path"] = {r["path"]: dict(speedup=r["speedup"], tokens_per_s=r["tokens_per_s"]) for r in cell}
    pressed = [r for r in rows if not r["kind"].startswith("full")]
    if pressed:
        worst = min(pressed, key=lambda r: r["ratio_of_allowed"])
        out["worst_ratio_of_allowed"] = dict(path=worst["path"], batch=worst["batch"], context=worst["context"],
                                             ratio=worst["ratio_of_allowed"])
        out["cells_at_80pct_of_allowed"] = f"{sum(r['ratio_of_allowed'] >= 0.8 for r in pressed)}/{len(pressed)}"
        shares = [r["update_share"] for r in pressed if r["update_share"] is not None]
        if shares:
            out["max_update_share"] = max(shares)
    return out


# -- reporting ---------------------------------------------------------------------------------------------
def markdown(report: dict, figure: str | None) -> str:
    s = report["settings"]
    lines = [
        "## Decode throughput vs the memory-bandwidth bound",
        "",
        f"Model {report['model']} ({report['dtype']}) on {report['device']}; greedy `generate()`, "
        f"{s['new_tokens']} new tokens per run ({s['timed_steps_per_run']} timed steps; the first forward and "
        f"the first decode step are untimed), {s['repeats']} interleaved repeats per path, medians; spread = "
        "(max - min) / median over repeats. Prompts: random token ids, equal length, "
        f"{report['distinct_prompts']} distinct prompt(s) tiled over the batch rows; prefill timed apart "
        f"({report['prefill_s']:.0f} s for the full-cache prefill of the distinct prompts) and excluded.",
        f"Copy bandwidth measured in this run: {report['copy_bandwidth_gb_s']:.1f} GB/s (read + write, "
        f"{s['threads']} thread(s)); weights read per step {report['weight_bytes_read'] / 2**20:.0f} MiB; "
        f"KV {report['kv_bytes_per_token'] / 1024:.1f} KiB per token. Bound tokens/s = batch x bandwidth / "
        "(weights + live KV bytes); speedup allowed = (W + KV_full) / (W + KV_press); `of allowed` = "
        "measured speedup / allowed speedup; `update` = share of a step spent in the cache's `update()` "
        "(scoring, eviction, writes; eager paths).",
        "",
    ]
    for note in report["warnings"]:
        lines.append(f"**Warning:** {note}")
    if report["warnings"]:
        lines.append("")
    h = report["headline"]
    if "cell" in h:
        lines += [f"**Headline ({h['cell']}):** {h['best_path']} decodes {h['speedup']:.2f}x the full cache's "
                  f"tokens/s; the bytes allow {h['speedup_allowed']:.2f}x (target >= 2x)"
                  + ("." if h["speedup_vs_nocopy"] is None else f"; against a full cache that appends in place "
                     f"(no per-step copy) it is {h['speedup_vs_nocopy']:.2f}x.")
                  + " A speedup above the allowed one means the baseline moves more bytes than it holds: "
                  "transformers' DynamicCache re-copies its whole cache with `torch.cat` at every step (its "
                  "`update` share below).", ""]
    if "worst_ratio_of_allowed" in h:
        w = h["worst_ratio_of_allowed"]
        lines += [f"Cells reaching 80% of the allowed speedup: {h['cells_at_80pct_of_allowed']}; worst "
                  f"{w['path']} at batch {w['batch']} x {w['context']}: {100 * w['ratio']:.0f}%."
                  + (f" Largest update share: {100 * h['max_update_share']:.1f}% of a step." if "max_update_share" in h
                     else ""), ""]
    if report["compile_first_call_s"]:
        lines += ["First compiled `generate()` (compilation included): " + ", ".join(
            f"{cell}: {sec:.0f} s" for cell, sec in report["compile_first_call_s"].items()) + ".", ""]
    lines += ["| batch | context | path | live KV/layer/head | ms/step | spread | tokens/s | bound tok/s | "
              "speedup | allowed | of allowed | vs in-place full | update | peak RSS GiB |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        upd = "-" if r["update_share"] is None else f"{100 * r['update_share']:.1f}%"
        nocopy = "-" if r["speedup_vs_nocopy"] is None else f"{r['speedup_vs_nocopy']:.2f}"
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['path']} | {r['live_kv_tokens']:.0f} | {r['step_ms']:.1f} | "
            f"{100 * r['spread']:.0f}% | {r['tokens_per_s']:.2f} | {r['bound_tokens_per_s']:.2f} | "
            f"{r['speedup']:.2f} | {r['speedup_allowed']:.2f} | {100 * r['ratio_of_allowed']:.0f}% | {nocopy} | {upd} | "
            f"{r['peak_rss_gib']:.2f} |")
    same = [r for r in report["rows"] if "same_tokens_as_static_eager" in r]
    if same:
        lines += ["", "Static compiled vs static eager, same greedy tokens: " + ", ".join(
            f"b={r['batch']} ctx={r['context']}: {r['same_tokens_as_static_eager']}" for r in same) + "."]
    if figure:
        lines += ["", f"![tokens/s vs context]({figure})"]
    lines += markdown_footer(report)
    return "\n".join(lines)


def figure(report: dict, path: Path) -> Path | None:
    """tokens/s vs context, one panel per batch, one line per path, each path's bound dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batches = sorted({r["batch"] for r in report["rows"]})
    names = list(dict.fromkeys(r["path"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches) + 3, 4.2), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, batch in zip(axes[0], batches):
        for i, name in enumerate(names):
            pts = sorted((r["context"], r["tokens_per_s"], r["bound_tokens_per_s"]) for r in report["rows"]
                         if r["batch"] == batch and r["path"] == name)
            if not pts:
                continue
            color = colors[i % len(colors)]
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], "o-", color=color, label=name)
            ax.plot(xs, [p[2] for p in pts], "--", color=color, alpha=0.6)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context tokens")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("decode tokens/s (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="solid: measured\ndashed: bound")
    fig.suptitle(f"{report['model']} decode throughput, {report['settings']['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    report = run(args, log=lambda msg: print(msg, file=sys.stderr))
    args.out.mkdir(parents=True, exist_ok=True)
    fig = None if args.no_figure else figure(report, args.out / f"{NAME}.png")
    text = markdown(report, None if fig is None else fig.name)
    write_result(args.out, NAME, report, text)
    print(text)
    return 0
