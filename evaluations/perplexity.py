"""``kvpress-like eval perplexity``: streaming perplexity with a capped KV cache (Q-Filters paper, Fig. 5).

A long text is fed through the model in small chunks; the cache keeps at most a fixed number of tokens per
layer and KV head, and each method decides which. Every token's negative log-likelihood is recorded, so
perplexity can be read over the whole text, after the cache filled, or in a running window (the plot).

Budget semantics. With ``chunk == 1`` a decoding step evicts before attention, so each prediction sees
exactly ``budget`` keys. With larger chunks the cache stores ``budget - chunk`` tokens between calls and
each chunk's tokens see between ``budget - chunk + 1`` and ``budget`` keys: no prediction ever attends to
more than ``budget`` keys, for every method alike.

All scorers share the same protected tokens (``--n-sink`` first tokens, ``--window`` most recent ones),
chosen before looking at results; StreamingLLM's position score makes its window irrelevant. Methods are
every registered query-free press by default (plugins included), so new presses join automatically.

Paired comparison: every method reads the same text, so the per-token NLL difference against StreamingLLM
(tokens predicted after the cache filled) is the paired quantity; neighbouring tokens are correlated, so its
95% interval comes from a moving-block bootstrap (``--block`` tokens per block). A method "beats"
StreamingLLM only when that interval lies below zero.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_like.base import Press
from kvpress_like.cache import PressedCache
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.registry import press_class

from . import stats
from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, command_line, environment,
    markdown_footer, parse_list, query_free_presses, rescore_setting, set_threads, write_result,
)

REFERENCE = "streaming_llm"


def default_methods() -> list[str]:
    """The full cache, StreamingLLM (the reference), then every other registered query-free press
    (position-dependent ones first: they are the newest)."""
    others = [m for m in query_free_presses() if m != REFERENCE]
    return ["full", REFERENCE] + sorted(others, key=lambda m: not press_class(m).scoring.rescores)


def stored_budget(budget: int, chunk: int) -> int:
    """Tokens kept between calls so that no prediction attends to more than ``budget`` keys."""
    stored = budget if chunk == 1 else budget - chunk
    if stored < 1:
        raise ValueError(f"chunk={chunk} leaves no room in a budget of {budget}; use a chunk well below the budget.")
    return stored


@torch.no_grad()
def stream_nll(
    model, ids: torch.Tensor, p: Press | None, chunk: int = 16, progress: bool = True, desc: str = ""
) -> torch.Tensor:
    """Negative log-likelihood ``(T - 1,)`` of ``ids[0, 1:]`` with the text fed through a (capped) cache.

    The first call holds as many tokens as the cache may keep (nothing is evicted before then, so this
    equals feeding them in chunks); the rest go in ``chunk``-token calls. ``p=None`` is the full cache.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"stream_nll takes one sequence of token ids (1, T), got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    total = ids.shape[1]
    budget = None if p is None else p.policy.capacity
    cache = DynamicCache(config=model.config) if p is None else PressedCache(p, config=model.config)
    first = min(total, budget if budget is not None else chunk)
    bounds = [(0, first)] + [(s, min(s + chunk, total)) for s in range(first, total, chunk)]
    nll = []
    for start, end in tqdm(bounds, desc=desc or "stream", disable=not progress, leave=False):
        logits = model(ids[:, start:end], **cache_kwargs(cache)).logits[0].float()
        targets = ids[0, start + 1 : end + 1]
        nll.append(torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="none"))
    return torch.cat(nll).cpu()


def press_settings(method: str, budget: int, chunk: int, n_sink: int, window: int, rescore_every: int = 1) -> dict:
    """Settings of every method: the budget, shared sinks/window; ``rescore_every`` for position-dependent ones."""
    return dict(max_cache_tokens=stored_budget(budget, chunk), n_sink=n_sink, window=window,
                **rescore_setting(method, rescore_every))


def budget_press(method: str, model, budget: int, chunk: int, n_sink: int, window: int, rescore_every: int = 1) -> Press | None:
    """The registered press ``method`` capped at the budget with the shared sinks/window (None: full cache).

    The press is prepared for ``model`` here (filters, calibration statistics), since a bare
    :class:`PressedCache` is used without :func:`kvpress_like.press`.
    """
    p = build_press(method, **press_settings(method, budget, chunk, n_sink, window, rescore_every))
    if p is not None:
        if p.scoring.needs_queries:
            raise ValueError(f"{method} needs queries to score keys; streaming perplexity takes query-free presses")
        p.prepare(model)
    return p


def load_text_ids(tokenizer, tokens: int, dataset: str | None, dataset_config: str | None, split: str) -> torch.Tensor:
    """``tokens`` token ids of the offline corpus, or of a Hugging Face dataset's ``text`` column (online)."""
    if dataset is None:
        from kvpress_like.data import corpus_ids

        ids = corpus_ids(tokenizer, "prose")
    else:
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise SystemExit("--dataset needs the `datasets` package: pip install datasets") from err
        rows = load_dataset(dataset, dataset_config, split=split, streaming=True)
        text, count = [], 0
        for row in rows:
            text.append(row["text"])
            count += len(row["text"]) // 3  # rough token estimate, only to stop reading early
            if count > 2 * tokens:
                break
        ids = torch.tensor(tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"])
    if len(ids) < tokens:
        raise SystemExit(f"the text has only {len(ids)} tokens; ask for --tokens {len(ids)} or fewer")
    return ids[:tokens][None]


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


def running_perplexity(nll: torch.Tensor, window: int) -> torch.Tensor:
    """Perplexity over the ``window`` tokens ending at each position (shorter at the start)."""
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), nll.double().cumsum(0)])
    ends = torch.arange(1, len(nll) + 1)
    starts = (ends - window).clamp(min=0)
    return ((csum[ends] - csum[starts]) / (ends - starts)).exp()


def gap_reduction(full: float, streaming: float, method: float) -> float | None:
    """Fraction of StreamingLLM's perplexity gap to the full cache that ``method`` closes (1 = all of it)."""
    gap = streaming - full
    return None if gap <= 0 else (streaming - method) / gap


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--methods", default=None,
                        help="comma-separated: full and registered query-free presses (default: all of them)")
    parser.add_argument("--budgets", default="512", help="comma-separated KV budgets per layer and KV head")
    parser.add_argument("--tokens", type=int, default=4096, help="length of the text")
    parser.add_argument("--chunk", type=int, default=1, help="tokens per forward call after the cache fills")
    parser.add_argument("--block", type=int, default=64, help="tokens per block of the paired block bootstrap")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine perplexity.json files of runs with the same settings and different --methods "
                             "(e.g. one process per method) into one result in --out")
    parser.add_argument("--n-sink", type=int, default=4, help="first tokens never evicted (all methods)")
    parser.add_argument("--window", type=int, default=64, help="recent tokens never evicted (all methods)")
    parser.add_argument("--rescore-every", type=int, default=1,
                        help="position-dependent presses re-score their live slots every this many steps (default: 1, exact)")
    parser.add_argument("--plot-window", type=int, default=256, help="tokens per point of the running perplexity")
    parser.add_argument("--dataset", default=None, help="Hugging Face dataset with a `text` column (online only)")
    parser.add_argument("--dataset-config", default=None, help="configuration of --dataset, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="split of --dataset (default: test)")
    add_threads_argument(parser)
    add_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    methods = parse_list(args.methods) if args.methods else default_methods()
    budgets = parse_list(args.budgets, int)
    if args.merge:
        return merge(args, methods, budgets)
    for method in methods:
        # a bad name or setting fails before the model loads
        build_press(method, **press_settings(method, budgets[0], args.chunk, args.n_sink, args.window, args.rescore_every))
    env = environment()
    model, tokenizer = load_model(args.model)
    ids = load_text_ids(tokenizer, args.tokens, args.dataset, args.dataset_config, args.split)

    runs = []
    for budget in budgets:
        for method in methods:
            if method == "full" and any(r["method"] == "full" for r in runs):
                continue
            p = budget_press(method, model, budget, args.chunk, args.n_sink, args.window, args.rescore_every)
            start = time.perf_counter()
            # the full cache evicts nothing: feeding it in budget-sized chunks gives the same NLL, faster
            nll = stream_nll(model, ids, p, args.chunk if p is not None else budget, desc=f"{method} @ {budget}")
            runs.append(
                dict(
                    method=method,
                    budget=None if method == "full" else budget,
                    nll=nll,
                    seconds=time.perf_counter() - start,
                )
            )
            print(f"{method:>14} budget={budget}: ppl {perplexity(nll):.3f}", file=sys.stderr)
            # rewritten after every method, so a run stopped early still reports what it measured
            report = summarize(runs, budgets, args, env)
            report["methods_planned"] = methods
            write_outputs(report, runs, args)
    print(render_markdown(report))
    return 0


def merge(args: argparse.Namespace, methods: list[str], budgets: list[int]) -> int:
    """One report from runs that measured different methods on the same text and settings."""
    parts = [json.loads(Path(path).read_text()) for path in args.merge]
    same = ("model", "text", "tokens", "chunk", "n_sink", "window", "budgets")
    for part in parts[1:]:
        differ = [k for k in same if part[k] != parts[0][k]]
        if differ:
            raise ValueError(f"runs differ in {differ}: only runs of the same settings can be merged")
    runs = []
    for part in parts:
        seconds = {(row["method"], row["budget"]): row["seconds"] for row in part["rows"]}
        for key, values in part["nll"].items():
            method, budget = key.rsplit("@", 1)
            budget = None if budget == "None" else int(budget)
            runs.append(dict(method=method, budget=budget, nll=torch.tensor(values), seconds=seconds[(method, budget)]))
    for key in ("model", "tokens", "chunk", "n_sink", "window"):
        setattr(args, key, parts[0][key])
    report = summarize(runs, parts[0]["budgets"], args, parts[0]["environment"])
    commands = [part["environment"]["command"] for part in parts] + [command_line()]
    report.update(text=parts[0]["text"], methods_planned=methods, merged_from=[str(p) for p in args.merge],
                  command=" && ".join(commands))
    write_outputs(report, runs, args)
    print(render_markdown(report))
    return 0


def paired_vs_reference(runs: list[dict], budgets: list[int], block: int) -> list[dict]:
    """Per budget and method: mean per-token NLL difference vs StreamingLLM after the cache filled, with its
    block-bootstrap 95% interval, and the perplexity ratio it implies."""
    out = []
    for budget in budgets:
        by = {r["method"]: r for r in runs if r["budget"] in (budget, None)}  # None: the full cache
        if REFERENCE not in by:
            continue
        ref = by[REFERENCE]["nll"][budget:]
        for method, r in by.items():
            if method == REFERENCE:
                continue
            d = stats.block_bootstrap(r["nll"][budget:] - ref, block=block)
            out.append(dict(method=method, budget=budget, tokens=d["n"], block=d["block"], nll_diff=d["mean"],
                            lo=d["lo"], hi=d["hi"], ppl_ratio=math.exp(d["mean"]),
                            verdict=stats.verdict(d["lo"], d["hi"], better_when="negative")))
    return out


def summarize(runs: list[dict], budgets: list[int], args, env: dict) -> dict:
    full = next((r for r in runs if r["method"] == "full"), None)
    rows = []
    for r in runs:
        after = r["nll"][(r["budget"] or min(budgets)) :]
        rows.append(
            dict(
                method=r["method"],
                budget=r["budget"],
                ppl=perplexity(r["nll"]),
                ppl_after_fill=perplexity(after),
                seconds=round(r["seconds"], 1),
            )
        )
    gaps = []
    if full is not None:
        ref = {row["method"]: row for row in rows if row["method"] == "full"}["full"]
        for budget in budgets:
            by = {row["method"]: row for row in rows if row["budget"] == budget}
            if "streaming_llm" not in by:
                continue
            for method in by:
                if method != REFERENCE:
                    gaps.append(
                        dict(
                            method=method,
                            budget=budget,
                            gap_closed=gap_reduction(ref["ppl"], by["streaming_llm"]["ppl"], by[method]["ppl"]),
                            gap_closed_after_fill=gap_reduction(
                                perplexity(full["nll"][budget:]),
                                by["streaming_llm"]["ppl_after_fill"],
                                by[method]["ppl_after_fill"],
                            ),
                        )
                    )
    return dict(
        model=args.model,
        text="pydoc_data.topics (offline)" if args.dataset is None else f"{args.dataset}:{args.split}",
        tokens=args.tokens,
        chunk=args.chunk,
        n_sink=args.n_sink,
        window=args.window,
        budgets=budgets,
        rows=rows,
        gap_reduction_vs_streaming_llm=gaps,
        paired_vs_streaming_llm=paired_vs_reference(runs, budgets, args.block),
        environment=env,
    )



def write_outputs(report: dict, runs: list[dict], args) -> None:
    """perplexity.json (with every per-token NLL), perplexity.md and the running-perplexity plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        curve = running_perplexity(r["nll"], args.plot_window)
        label = "full cache" if r["method"] == "full" else f"{r['method']} ({r['budget']})"
        ax.plot(range(1, len(curve) + 1), curve.numpy(), label=label, lw=1.2, ls="--" if r["method"] == "full" else "-")
    for budget in report["budgets"]:
        ax.axvline(budget, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity (running, {args.plot_window} tokens)")
    ax.set_yscale("log")
    ax.set_title(f"Streaming perplexity, {report['model']}, KV budget {', '.join(map(str, report['budgets']))}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    payload = dict(report, nll={f"{r['method']}@{r['budget']}": [round(x, 4) for x in r["nll"].tolist()] for r in runs})
    write_result(args.out, "perplexity", payload, render_markdown(report), figures={"perplexity.png": fig})
    plt.close(fig)


def render_markdown(report: dict) -> str:
    lines = [
        "## Streaming perplexity with a capped KV cache",
        "",
        *([f"**PARTIAL run**: measured {', '.join(r['method'] for r in report['rows'])} of the planned "
           f"{', '.join(report['methods_planned'])}.", ""]
          if len(report["rows"]) < len(report.get("methods_planned", report["rows"])) else []),
        f"Model {report['model']}, text {report['text']}, first {report['tokens']} tokens, fed in chunks of "
        f"{report['chunk']} tokens once the cache is full (no prediction attends to more than the budget). "
        f"Every method keeps the same {report['n_sink']} sink tokens and {report['window']}-token recent window. "
        "`ppl` is over all predicted tokens; `after fill` only over tokens predicted after the budget was reached. "
        "The full cache is computed in budget-sized chunks (it evicts nothing, so the NLL is the same).",
        "",
        "| method | budget | ppl | ppl after fill | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        budget = "-" if row["budget"] is None else row["budget"]
        lines.append(
            f"| {row['method']} | {budget} | {row['ppl']:.3f} | {row['ppl_after_fill']:.3f} | {row['seconds']} |"
        )
    if report["paired_vs_streaming_llm"]:
        lines += ["", "Paired against StreamingLLM on the same tokens (after fill): mean per-token NLL difference "
                  "(method - StreamingLLM; negative is better) with its moving-block bootstrap 95% interval; "
                  "**beats** only when the interval is below zero.", "",
                  "| method | budget | tokens | NLL diff [95% CI] | ppl ratio | verdict |", "|---|---|---|---|---|---|"]
        for d in report["paired_vs_streaming_llm"]:
            lines.append(f"| {d['method']} | {d['budget']} | {d['tokens']} | {d['nll_diff']:+.4f} [{d['lo']:+.4f}, "
                         f"{d['hi']:+.4f}] | {d['ppl_ratio']:.3f} | {d['verdict']} |")
    if report["gap_reduction_vs_streaming_llm"]:
        lines += ["", "Share of StreamingLLM's perplexity gap to the full cache that each method closes:", ""]
        lines += ["| method | budget | gap closed (all tokens) | gap closed (after fill) |", "|---|---|---|---|"]
        for gap in report["gap_reduction_vs_streaming_llm"]:
            def fmt(x):
                return "n/a (no gap)" if x is None else f"{100 * x:.1f}%"

            lines.append(f"| {gap['method']} | {gap['budget']} | {fmt(gap['gap_closed'])} | {fmt(gap['gap_closed_after_fill'])} |")
    lines += [
        "",
        "![streaming perplexity](perplexity.png)",
    ] + markdown_footer(report)
    return "\n".join(lines)
