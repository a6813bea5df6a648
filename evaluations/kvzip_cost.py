"""Cost of KVzip's reconstruction pass next to a plain prefill, measured in the same run.

    kvpress-like bench kvzip --model smollm2-135m --tokens 2048 --threads 1

Per round (``--repeats`` rounds, alternating, medians reported):

* plain prefill: the model on ``tokens`` tokens with no press and a fresh cache;
* scoring pass: :func:`~kvpress_like.methods.kvzip.reconstruction_scores` on that full cache under
  ``press(model, KVzipPress(...))`` (the repeat prompt plus the context again, in ``--chunk-size`` chunks,
  with explicit attention weights);
* whole KVzip prefill: ``press(model, KVzipPress(ratio=...))`` prefill, reconstruction and pruning together.

The ratios (scoring pass / plain prefill, whole / plain) are the numbers to compare with the 2.2x target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from kvpress_like import KVzipPress, press
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.methods.kvzip import reconstruction_scores
from kvpress_like.models import load_model

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, environment, markdown_footer, set_threads, write_result,
)

__all__ = ["configure", "main", "kvzip_cost"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kvzip_cost(model, ids: torch.Tensor, ratio: float, chunk_size: int, repeats: int) -> dict:
    """Seconds per round of a plain prefill, KVzip's scoring pass and a whole KVzip prefill, and their ratios."""
    scoring_press = KVzipPress(chunk_size=chunk_size)  # ratio 0: the prefill keeps everything, scores nothing
    plain, scoring, whole = [], [], []
    with torch.no_grad():
        for _ in range(repeats):
            plain.append(_timed(lambda: model(ids, logits_to_keep=1, **cache_kwargs(DynamicCache(config=model.config)))))
            cache = DynamicCache(config=model.config)
            with press(model, scoring_press):
                model(ids, logits_to_keep=1, **cache_kwargs(cache))
                scoring.append(_timed(lambda: reconstruction_scores(model, cache, ids, scoring_press)))
            p = KVzipPress(ratio=ratio, chunk_size=chunk_size)
            p.prepare(model)
            with press(model, p):
                whole.append(_timed(lambda: model(ids, logits_to_keep=1, **cache_kwargs(DynamicCache(config=model.config)))))
    med = statistics.median
    return dict(
        tokens=ids.shape[1], repeats=repeats, chunk_size=chunk_size, ratio=ratio,
        plain_seconds=plain, scoring_seconds=scoring, whole_seconds=whole,
        scoring_over_prefill=med(scoring) / med(plain),
        scoring_over_prefill_paired=med([s / p for s, p in zip(scoring, plain)]),
        whole_over_prefill=med(whole) / med(plain),
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded name or local directory")
    parser.add_argument("--tokens", type=int, default=2048, help="context length (prose corpus)")
    parser.add_argument("--ratio", type=float, default=0.75, help="KVzip ratio of the whole-prefill timing")
    parser.add_argument("--chunk-size", type=int, default=KVzipPress.chunk_size, help="reconstruction chunk")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians reported)")
    add_threads_argument(parser, default=1)
    add_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    from kvpress_like.data import corpus_ids

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = corpus_ids(tokenizer, "prose")[: args.tokens][None]
    env = environment()
    r = kvzip_cost(model, ids, args.ratio, args.chunk_size, args.repeats)
    med = statistics.median
    lines = [
        "## KVzip scoring cost",
        "",
        f"{args.model}, {r['tokens']}-token prose context, {args.threads} thread(s), median of {args.repeats} alternating "
        f"rounds, reconstruction chunks of {args.chunk_size} tokens.",
        "",
        "| pass | seconds | x plain prefill |",
        "|---|---:|---:|",
        f"| plain prefill (no press) | {med(r['plain_seconds']):.2f} | 1.00 |",
        f"| KVzip scoring pass (repeat prompt + context, attention weights) | {med(r['scoring_seconds']):.2f} | "
        f"{r['scoring_over_prefill']:.2f} (paired {r['scoring_over_prefill_paired']:.2f}) |",
        f"| whole KVzip prefill, ratio {args.ratio} (prefill + scoring + pruning) | {med(r['whole_seconds']):.2f} | "
        f"{r['whole_over_prefill']:.2f} |",
    ]
    report = dict(settings=vars(args) | dict(out=str(args.out)), environment=env, **r)
    markdown = "\n".join(lines + markdown_footer(report))
    print(markdown)
    write_result(args.out, "kvzip_cost", report, markdown)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    sys.exit(main(parser.parse_args()))
