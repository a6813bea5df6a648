"""``kvpress-like bench qa``: the kvpress-qa pipeline's point, measured: one context compressed once and asked
ten questions, against one prefill per question (what a caller without the pipeline's cache reuse pays).

Prints the times, the KV peak of both ways and how many answers agree, and writes ``qa_bench.json`` /
``qa_bench.md``. ``kvpress-like ask --benchmark`` runs the same measurement.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from kvpress_like.base import Press

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, environment, markdown_footer, set_threads,
    write_result,
)

#: The benchmark's ten questions about the opening of the Python language reference (the offline corpus).
BENCHMARK_QUESTIONS = (
    "What is this text about?",
    "Summarize the first paragraph in one sentence.",
    "Which Python keywords does the text mention?",
    "What does the text say about the assert statement?",
    "Name one built-in function that appears in the text.",
    "What is an expression statement?",
    "Give one example of Python syntax shown in the text.",
    "Which exception can be raised, according to the text?",
    "What is the last topic of the text?",
    "Is the text written for beginners or for experts?",
)


def benchmark(
    pipe,
    p: Press | None,
    context_tokens: int = 4096,
    questions: tuple[str, ...] = BENCHMARK_QUESTIONS,
    max_new_tokens: int = 16,
    separate_runs: int | None = None,
) -> dict[str, Any]:
    """Time ``questions`` on one context (``pipe``: a ``kvpress-qa`` pipeline) compressed once vs. one prefill per question; print and return numbers.

    The context is the first ``context_tokens`` tokens of the offline corpus; answers are greedy. Both ways
    use the same press; the per-question runs are exactly what a caller without the pipeline's cache reuse
    pays. ``separate_runs`` (default: all) runs only the first questions that way, for slow machines: the
    total for all questions is then their mean times the number of questions, and the printout says so.
    Also reports peak KV bytes (compressed context + the copies of one batch of questions) and how many
    answers agree between the two ways (batched equal-length questions may differ by float rounding).
    """
    from kvpress_like.data import corpus_ids

    context = pipe.tokenizer.decode(corpus_ids(pipe.tokenizer)[:context_tokens])
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    many = pipe(context, questions=list(questions), press=p, **gen)
    many_seconds = time.perf_counter() - start
    print(f"compress once, ask many: {many_seconds:.1f} s", flush=True)
    separate, times = [], []
    for q in questions[: separate_runs or len(questions)]:
        start = time.perf_counter()
        separate.append(pipe(context, question=q, press=p, **gen))
        times.append(time.perf_counter() - start)
        print(f"one prefill per question, run {len(times)}: {times[-1]:.1f} s", flush=True)
    measured = len(times)
    separate_seconds = sum(times) / measured * len(questions)
    result = {
        "model": str(pipe.model.config._name_or_path),
        "press": repr(p),
        "context_tokens": many["context_tokens"],
        "questions": len(questions),
        "max_new_tokens": max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": (load_before, os.getloadavg()[0]),
        "once_seconds": many_seconds,
        "once_prefill_seconds": many["prefill_seconds"],
        "separate_seconds": separate_seconds,
        "separate_measured_runs": measured,
        "separate_run_seconds": times,
        "speedup": separate_seconds / many_seconds,
        "once_peak_kv_bytes": many["peak_kv_bytes"],
        "once_context_kv_bytes": many["kv_bytes"],
        "separate_peak_kv_bytes": max(s["peak_kv_bytes"] for s in separate),
        "agreeing_answers": sum(a == s["answer"] for a, s in zip(many["answers"], separate)),
        "answers": many["answers"],
    }
    mib = 2**20
    print(f"kvpress-qa benchmark: {result['model']}, {result['press']}, context {result['context_tokens']} tokens, "
          f"{len(questions)} questions, max_new_tokens {max_new_tokens}, greedy")
    print(f"torch threads {result['torch_threads']} of {result['cpus']} CPUs, load average (1 min) "
          f"{load_before:.1f} before, {result['load_average'][1]:.1f} after")
    print(f"compress once, ask many: {many_seconds:7.1f} s total (prefill {many['prefill_seconds']:.1f} s) | "
          f"KV peak {many['peak_kv_bytes'] / mib:.1f} MiB (compressed context {many['kv_bytes'] / mib:.1f} MiB)")
    basis = "" if measured == len(questions) else f" ({measured} runs measured, mean x {len(questions)})"
    print(f"one prefill per question: {separate_seconds:6.1f} s total{basis} | "
          f"KV peak {result['separate_peak_kv_bytes'] / mib:.1f} MiB")
    print(f"speed-up x{result['speedup']:.1f}; answers identical for {result['agreeing_answers']}/{measured} questions run both ways")
    return result


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--press", default="streaming_llm", help="registered press name, or 'no_press' (default: %(default)s)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of KV pairs removed (default: %(default)s)")
    parser.add_argument("--context-tokens", type=int, default=4096, help="context length (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default: %(default)s)")
    parser.add_argument("--separate-runs", type=int, help="questions re-prefilled one by one (default: all)")
    add_threads_argument(parser)
    add_out_argument(parser)


def markdown(result: dict) -> str:
    """The results section: both ways' time and KV peak, the speed-up and the agreement."""
    mib = 2**20
    basis = "" if result["separate_measured_runs"] == result["questions"] else (
        f" ({result['separate_measured_runs']} runs measured, mean x {result['questions']})")
    lines = [
        "## kvpress-qa: compress once, ask many", "",
        f"{result['model']}, {result['press']}, context {result['context_tokens']} tokens, {result['questions']} "
        f"questions, max_new_tokens {result['max_new_tokens']}, greedy.", "",
        "| way | seconds | KV peak (MiB) |", "|---|---|---|",
        f"| compress once, ask many | {result['once_seconds']:.1f} | {result['once_peak_kv_bytes'] / mib:.1f} |",
        f"| one prefill per question{basis} | {result['separate_seconds']:.1f} | {result['separate_peak_kv_bytes'] / mib:.1f} |",
        "", f"Speed-up x{result['speedup']:.1f}; answers identical for {result['agreeing_answers']}/"
        f"{result['separate_measured_runs']} questions run both ways.",
    ]
    return "\n".join(lines + markdown_footer(result))


def main(args: argparse.Namespace) -> int:
    from kvpress_like.integrations import pipeline as qa
    from transformers import pipeline

    from kvpress_like.models import load_model

    set_threads(args.threads)
    p = build_press(args.press, **({} if args.press in ("no_press", "full") else {"ratio": args.ratio}))
    model, tokenizer = load_model(args.model)
    pipe = pipeline(qa.TASK, model=model, tokenizer=tokenizer, device=model.device)
    if p is not None:
        p.prepare(model)  # find or calibrate Q-Filters before anything is timed
    result = benchmark(pipe, p, args.context_tokens, max_new_tokens=args.max_new_tokens, separate_runs=args.separate_runs)
    result["environment"] = environment(model.device)
    write_result(args.out, "qa_bench", result, markdown(result))
    return 0
