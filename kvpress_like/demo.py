"""``kvpress-like demo``: one pass-key question, answered with a full cache and with Q-Filters.

Prints both answers, the KV-cache bytes after the context and the wall time of each run, whatever they
are: the point is an honest first look, not a showcase.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import DynamicCache

from .cache import cache_nbytes, uncompressed
from .context import press
from .integrations.transformers import cache_kwargs
from .data import passkey_sample
from .methods import QFilterPress
from .filters import filters_for
from .models import DEFAULT_MODEL, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local directory or hub id")
    parser.add_argument("--context-tokens", type=int, default=2048, help="length of the haystack context in tokens (default: 2048)")
    parser.add_argument("--compression", type=float, default=4.0, help="x-fold compression, ratio = 1 - 1/x (default: 4)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed that draws the pass key (default: 0)")


def answer(model, tokenizer, sample, p=None) -> tuple[str, int, float]:
    """(answer text, KV bytes after the context, seconds) for one run, compressed when ``p`` is given."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad(), press(model, p) if p is not None else contextlib.nullcontext():
        model(sample.context_ids.to(model.device), **cache_kwargs(cache))
        kv_bytes = cache_nbytes(cache)
        ids = torch.cat([sample.context_ids, sample.question_ids], dim=1).to(model.device)
        with uncompressed(cache):
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return text, kv_bytes, time.perf_counter() - start


def main(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model)
    sample = passkey_sample(tokenizer, args.context_tokens, args.depth, args.seed)
    ratio = 1 - 1 / args.compression
    print(f"model {args.model}: {args.context_tokens}-token context, needle at depth {args.depth}, pass key {sample.answer}")
    filters = filters_for(model, tokenizer)  # from the local store; calibrated once, before any timing
    for label, p in (("no press", None), (f"Q-Filters x{args.compression:g}", QFilterPress(ratio=ratio, filters=filters))):
        text, kv_bytes, seconds = answer(model, tokenizer, sample, p)
        verdict = "correct" if sample.answer in text else "wrong"
        print(f"{label:>14}: {text!r} ({verdict}) | KV cache {kv_bytes / 2**20:.1f} MiB | {seconds:.1f} s")
    return 0
