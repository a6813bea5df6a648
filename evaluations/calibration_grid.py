"""Calibration choices measured: window length (RoPE phase) and expected attention's shrinkage/rank/combination.

    kvpress-like calibrate --model smollm2-135m --seq-len 512 --num-sequences 8 --out /tmp/cal512 --no-store
    kvpress-like calibrate --model smollm2-135m --seq-len 2048 --num-sequences 2 --out /tmp/cal2048 --no-store
    kvpress-like eval calibration-grid --calibrations /tmp/cal512,/tmp/cal2048 --corpus code

One forward pass over ``--tokens`` tokens of an offline corpus records each full-attention layer's keys and
the attention the last ``--queries`` queries give them (:mod:`kvpress_like.evaluations.correlation`); every
calibration directory then gives Q-Filters, position-targeted Q-Filters and a grid of expected-attention
settings, scored for the reading position ``n`` (the position of the next query after the text, what the
cache uses at the end of a prefill). Prints the mean Spearman over heads with a 95% normal interval, and the
paired difference of each setting against the first one of the grid (heads of a layer are not independent:
read the intervals as indicative); writes ``calibration_grid.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from kvpress_like.filters import load_filters
from kvpress_like.integrations.transformers import attention_layers, patched_attention
from kvpress_like.methods import ExpectedAttentionPress, TargetedQFilterPress
from kvpress_like.models import load_model

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, environment, markdown_footer, set_threads, write_result,
)
from .correlation import received_attention, spearman, text_ids

__all__ = ["configure", "main"]


def _interval(values: torch.Tensor) -> str:
    return f"{values.mean():.3f} +- {1.96 * values.std() / len(values) ** 0.5:.3f}"


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded name or local directory")
    parser.add_argument("--calibrations", required=True, help="comma-separated directories from `kvpress-like calibrate`")
    parser.add_argument("--corpus", default="code", help="offline corpus of the text: prose or code (default: code, held out)")
    parser.add_argument("--tokens", type=int, default=2048, help="text length (default: 2048)")
    parser.add_argument("--queries", type=int, default=64, help="last queries whose attention is measured (default: 64)")
    parser.add_argument("--offset", type=int, default=0, help="start of the text in the corpus (tokens)")
    parser.add_argument("--shrinkage", default="0.3,0,0.1,0.6,1", help="expected attention shrinkage values (first: reference)")
    parser.add_argument("--ranks", default="2,0,8,full", help="covariance ranks (`full`: all dims)")
    parser.add_argument("--combine", default="logsumexp,mean", help="GQA combinations")
    add_threads_argument(parser)
    add_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = text_ids(tokenizer, args.corpus, args.tokens, args.offset)
    n = ids.shape[1]
    observed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(module, query, key, value) -> None:
        observed[module.layer_idx] = (received_attention(module, query, key, args.queries), key.detach().float())

    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    with torch.no_grad(), patched_attention(model, layers, observe):
        model(ids.to(model.device), use_cache=False, logits_to_keep=1)
    reading = torch.full((1, 1, 1), n, dtype=torch.long)

    def correlation(score) -> torch.Tensor:
        rows = []
        for idx, (att, keys) in sorted(observed.items()):
            m = att.shape[-1]
            positions = torch.arange(keys.shape[2]).expand(*keys.shape[:3])
            rows.append(spearman(score(idx, keys, positions)[0, :, :m].float(), att))
        return torch.cat(rows)

    results = {"knorm": correlation(lambda i, k, pos: -k.norm(dim=-1))}
    ranks = [None if r == "full" else int(r) for r in args.ranks.split(",")]
    grid = list(itertools.product([float(s) for s in args.shrinkage.split(",")], ranks, args.combine.split(",")))
    for directory in args.calibrations.split(","):
        filters = load_filters(directory)
        results[f"qfilters [{directory}]"] = correlation(lambda i, k, pos: -torch.einsum("bhnd,hd->bhn", k, filters[i]))
        presses = {"qfilters_targeted": TargetedQFilterPress(stats=directory)}
        for shrinkage, rank, combine in grid:
            label = f"expected_attention shrinkage={shrinkage} rank={'full' if rank is None else rank} {combine}"
            presses[label] = ExpectedAttentionPress(stats=directory, shrinkage=shrinkage, rank=rank, combine=combine)
        for label, p in presses.items():
            p.prepare(model)
            results[f"{label} [{directory}]"] = correlation(lambda i, k, pos: p.score(i, k, k, pos, reading))
    lines = [f"{args.model}, {args.corpus} text of {n} tokens, last {args.queries} queries, reading position {n}"]
    rows, reference = {}, None
    for label, values in results.items():
        rows[label] = {"spearman": _interval(values), "heads": len(values)}
        line = f"  {label:80s} {_interval(values)} (heads {len(values)})"
        if label.startswith("expected_attention"):
            reference = values if reference is None else reference
            rows[label]["paired_vs_first_setting"] = _interval(values - reference)
            line += f" | paired vs first setting {_interval(values - reference)}"
        lines.append(line)
    print("\n".join(lines))
    report = {"model": args.model, "corpus": args.corpus, "tokens": n, "queries": args.queries, "rows": rows,
              "environment": environment(model.device)}
    text = "\n".join(["## Calibration grid: Spearman with received attention", "", "```", *lines, "```"] + markdown_footer(report))
    write_result(args.out, "calibration_grid", report, text)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    raise SystemExit(main(parser.parse_args()))
