"""``kvpress-like ask``: compress a document's KV cache once, then answer every question on it.

    kvpress-like ask --context FILE --question "..." [--question ...] [--press NAME --ratio 0.75]

Prints each answer with its time, the context's prefill time and the KV bytes kept. ``--benchmark`` instead
times ten questions on one 4k-token context against ten separate prefills
(:func:`kvpress_like.evaluations.qa_bench.benchmark`, also ``kvpress-like bench qa``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..models import DEFAULT_MODEL


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (e.g. window=16), got {text!r}")
    return key, value


#: chosen on the offline RULER-style benchmark (dev seeds 0-1, confirmed on held-out seeds 2-9; evaluations/results/ruler.md)
DEFAULT_PRESS, DEFAULT_RATIO = "adakv:base=kvzip:normalization=none:scope=model", 0.75


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded name, local directory or hub id (default: %(default)s)")
    parser.add_argument("--context", type=Path, help="text file holding the document ('-' reads stdin)")
    parser.add_argument("--question", action="append", default=[], help="a question (repeat for several)")
    parser.add_argument("--press", default=DEFAULT_PRESS,
                        help="registered press name, with settings as name:key=value:..., or 'none' for a full cache "
                             "(default: %(default)s, KVzip with one budget across layers and heads: the press closest "
                             "to no press on the offline RULER-style benchmark)")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                        help="fraction of KV pairs removed, 0.5 = x2, 0.875 = x8 (default: %(default)s)")
    parser.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="another press setting, e.g. --set window=16 --set max_cache_tokens=512")
    parser.add_argument("--max-new-tokens", type=int, help="answer length cap (default: 50; --benchmark: 16)")
    parser.add_argument("--compress-questions", action="store_true", help="let the press evict question tokens too")
    parser.add_argument("--answer-prefix", default="", help="text each answer starts with (default: none)")
    parser.add_argument("--benchmark", action="store_true",
                        help="time ten questions on one 4k-token context vs ten separate prefills (ignores --context)")
    parser.add_argument("--context-tokens", type=int, default=4096, help="--benchmark: context length (default: %(default)s)")
    parser.add_argument("--separate-runs", type=int, help="--benchmark: questions re-prefilled one by one (default: all)")


def _fail(message: str) -> int:
    print(f"kvpress-like ask: {message}", file=sys.stderr)
    return 2


def _read_input(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(context, error)``: what can be checked before torch is imported (10-15 s), checked first."""
    from ..models import check_model_name

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return None, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"
    try:
        check_model_name(args.model)
    except ValueError as err:
        return None, str(err)
    if args.benchmark:
        return None, None
    if args.context is None or not args.question:
        return None, "give --context FILE and at least one --question (or --benchmark)"
    empty = [i + 1 for i, question in enumerate(args.question) if not question.strip()]
    if empty:
        return None, f"--question number {empty[0]} is empty; give the question's text"
    try:
        context = sys.stdin.read() if str(args.context) == "-" else args.context.read_text()
    except OSError as err:
        return None, f"cannot read --context: {err}"
    if not context.strip():
        return None, f"the context file {args.context} is empty"
    return context, None


def _value(text: str):
    """A ``--set`` value as Python reads it (``16``, ``0.5``, ``[0, 1]``, ``true``); a plain string otherwise."""
    import ast

    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(args: argparse.Namespace) -> int:
    context, error = _read_input(args)
    if error is not None:
        return _fail(error)

    import torch
    from transformers import pipeline

    from ..evaluations.qa_bench import benchmark
    from ..evaluations.support import benchmark_note
    from ..integrations import pipeline as qa
    from ..models import load_model
    from ..registry import resolve_press

    press = None if args.press.lower() == "none" else args.press
    settings = {} if press is None else {"ratio": args.ratio, **{key: _value(value) for key, value in args.settings}}
    try:  # unknown presses and settings fail here rather than inside generate()
        p = resolve_press(press, settings, parse=True)
    except (TypeError, ValueError) as err:
        return _fail(str(err))
    model, tokenizer = load_model(args.model)
    pipe = pipeline(qa.TASK, model=model, tokenizer=tokenizer, device=model.device)
    if p is not None:
        p.prepare(model)  # find or calibrate Q-Filters before anything is timed
    if args.benchmark:
        benchmark(pipe, p, context_tokens=args.context_tokens, max_new_tokens=args.max_new_tokens or 16,
                  separate_runs=args.separate_runs)
        return 0
    max_new_tokens = 50 if args.max_new_tokens is None else args.max_new_tokens
    with prefill_progress(model, desc=f"prefilling the context ({len(context):,} characters)"):
        out = pipe(context, questions=args.question, press=p, max_new_tokens=max_new_tokens, do_sample=False,
                   compress_questions=args.compress_questions, answer_prefix=args.answer_prefix)
    label = "no press" if p is None else f"{args.press} " + ", ".join(f"{k}={v}" for k, v in settings.items())
    done = "prefilled once (full cache, no press)" if p is None else "prefilled and compressed once"
    print(f"model {args.model} | {label} | torch threads {torch.get_num_threads()}")
    note = None if p is None else benchmark_note(args.model, args.press, settings.get("ratio", 0.0), out["context_tokens"])
    if note:
        print(note)
    print(f"context: {out['context_tokens']} tokens, {done} in {out['prefill_seconds']:.2f} s, "
          f"KV cache kept {out['kv_bytes'] / 2**20:.2f} MiB (peak {out['peak_kv_bytes'] / 2**20:.2f} MiB with the question copies)")
    for question, answer, seconds in zip(args.question, out["answers"], out["answer_seconds"], strict=True):
        print(f"Q: {question}\nA: {answer}  ({seconds:.2f} s)")
    return 0


@contextmanager
def prefill_progress(model, desc: str, min_tokens: int = 64) -> Iterator[None]:
    """A tqdm bar over the decoder layers of the first forward call of at least ``min_tokens`` tokens (a long
    prefill is one call of 30-40 s on CPU: without it the command looks stuck)."""
    from tqdm.auto import tqdm

    from ..integrations.transformers import attention_layers

    layers = attention_layers(model)
    bar = None

    def advance(module, args, kwargs) -> None:
        nonlocal bar
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or hidden.shape[1] < min_tokens or (bar is not None and bar.n >= len(layers)):
            return
        if bar is None:
            bar = tqdm(total=len(layers), desc=desc, unit="layer")
        bar.update(1)

    handles = [layer.module.register_forward_pre_hook(advance, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
