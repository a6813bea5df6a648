"""``kvpress-like demo``: one pass-key question, answered with a full cache and with Q-Filters.

Prints both answers, the KV-cache bytes after the context and the wall time of each run, whatever they
are: the point is an honest first look, not a showcase.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from transformers import DynamicCache

from ..cache import PressedLayer, cache_nbytes, layer_windows, uncompressed
from ..integrations.context import press
from ..integrations.transformers import cache_kwargs
from ..data import passkey_sample
from ..methods import QFilterPress
from ..filters import filters_for
from ..models import DEFAULT_MODEL, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local directory or hub id (default: %(default)s)")
    parser.add_argument("--context-tokens", type=int, default=2048, help="length of the haystack context in tokens (default: 2048)")
    parser.add_argument("--compression", type=float, default=4.0,
                        help="x-fold compression, ratio = 1 - 1/x (default: 4); a value below 1 is read as the ratio itself")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed that draws the pass key (default: 0)")


def compression_ratio(compression: float) -> tuple[float, float]:
    """``(ratio, x-fold)`` from ``--compression``: ``4`` means x4 (ratio 0.75); ``0.75`` is read as the ratio."""
    if compression >= 1:
        return 1 - 1 / compression, compression
    if compression > 0:
        return compression, 1 / (1 - compression)
    raise ValueError(f"--compression must be an x-fold factor >= 1 (4 = keep one token in four) or a ratio in [0, 1), got {compression:g}")


def answer(model, tokenizer, sample, p=None) -> tuple[str, int, float, list]:
    """(answer text, KV bytes after the context, seconds, cache layers) for one run, compressed when ``p`` is given."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad(), press(model, p) if p is not None else contextlib.nullcontext():
        model(sample.context_ids.to(model.device), **cache_kwargs(cache))
        kv_bytes = cache_nbytes(cache)
        ids = torch.cat([sample.context_ids, sample.question_ids], dim=1).to(model.device)
        with uncompressed(cache):
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return text, kv_bytes, time.perf_counter() - start, list(cache.layers)


def uncompressed_note(layers: list, windows: list) -> str | None:
    """Why the KV cache shrank less than the ratio says, when some layers were left uncompressed."""
    plain = [i for i, layer in enumerate(layers) if not isinstance(layer, PressedLayer)]
    if not plain:
        return None
    sliding = [i for i in plain if i < len(windows) and windows[i] is not None]
    why = (f"{len(sliding)} are sliding-window layers (window {windows[sliding[0]]}) that already hold fewer tokens "
           "than the press would keep" if sliding else "they are left uncompressed")
    return f"{len(layers) - len(plain)} of {len(layers)} layers compressed; {why}, so KV bytes shrink less than x-fold"


def main(args: argparse.Namespace) -> int:
    try:
        ratio, fold = compression_ratio(args.compression)
    except ValueError as err:
        print(f"kvpress-like demo: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    sample = passkey_sample(tokenizer, args.context_tokens, args.depth, args.seed)
    print(f"model {args.model}: {args.context_tokens}-token context, needle at depth {args.depth}, pass key {sample.answer}")
    if args.compression < 1:
        print(f"--compression {args.compression:g} read as ratio {ratio:g} (x{fold:g})")
    filters = filters_for(model, tokenizer)  # from the local store; calibrated once, before any timing
    for label, p in (("no press", None), (f"Q-Filters x{fold:g}", QFilterPress(ratio=ratio, filters=filters))):
        text, kv_bytes, seconds, layers = answer(model, tokenizer, sample, p)
        verdict = "correct" if sample.answer in text else "wrong"
        print(f"{label:>14}: {text!r} ({verdict}) | KV cache {kv_bytes / 2**20:.1f} MiB | {seconds:.1f} s")
        note = None if p is None else uncompressed_note(layers, layer_windows(model.config))
        if note:
            print(f"{'':>14}  ({note})")
    return 0
