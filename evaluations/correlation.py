"""``kvpress-like eval correlation``: do a method's key scores predict the attention keys really receive?

The Q-Filters paper's Figure 4, for every registered query-free scorer (plugins included): for every
full-attention layer and KV head, the Spearman rank correlation between the press's scores
(:meth:`Press.score` on the cached post-RoPE keys and values, with their true positions) and the attention
each key receives from later queries. One forward pass over an offline text of ``--tokens`` tokens records
the post-RoPE queries, keys and values of each layer (through ``patched_attention``); the received attention
of a key is the softmax attention of the last ``--queries`` queries, averaged over those queries and over
the query heads that share the KV head. Only keys every observed query can see (positions before the
observation window) are ranked, so causal masking does not bias later keys, and the scorers are told that
the next query to read them sits at position ``tokens - queries`` (the first observed query), as a cache
would after prefilling the text up to there.

Scorers are compared in pairs on the same heads: the mean per-head difference against Q-Filters with a
bootstrap 95% interval over heads (heads of one model are not independent draws; read it as descriptive).

The text is a window of the offline prose corpus or of Python source (``--corpus``); note that Q-Filters
for embedded models are calibrated on other windows of the same prose corpus, while the code corpus is
held out. Spearman is computed as the Pearson correlation of ranks (ties are negligible for float scores).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvpress_like.base import Press
from kvpress_like.data import corpus_ids
from kvpress_like.integrations.transformers import attention_layers, patched_attention

from . import stats
from .common import (
    add_out_argument, add_threads_argument, build_press, environment, markdown_footer, parse_list, query_free_presses,
    set_threads, write_result,
)

MODELS = ("smollm2-135m", "gemma3-270m")
REFERENCE = "qfilters"


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dimension (rank-Pearson)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.double().argsort(-1).argsort(-1).double()

    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def received_attention(module, query: torch.Tensor, key: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Mean attention ``(kv_heads, n_keys)`` that the last ``n_queries`` queries give each earlier key."""
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if b != 1 or q != n:
        raise ValueError("received_attention expects one sequence prefilled in a single call")
    qs = query[0, :, -n_queries:].float()  # (hq, Q, d)
    ks = key[0].float().repeat_interleave(hq // hkv, dim=0)  # (hq, n, d)
    logits = qs @ ks.transpose(-1, -2) * getattr(module, "scaling", d**-0.5)
    softcap = getattr(module.config, "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    qpos = torch.arange(n - n_queries, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > qpos, float("-inf"))
    weights = logits.softmax(-1)  # (hq, Q, n)
    return weights.mean(1).view(hkv, hq // hkv, n).mean(1)[:, : n - n_queries]


def press_scores(p: Press, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, reading: int) -> torch.Tensor:
    """Scores ``(kv_heads, n)`` the press gives keys at positions ``0..n-1`` read from position ``reading``."""
    k, v = keys[None], values[None]
    positions = torch.arange(k.shape[2], device=k.device).expand(1, k.shape[1], -1)
    at = torch.full((1, 1, 1), reading, dtype=torch.long, device=k.device)
    return p.score(layer_idx, k, v, positions, at)[0].float()


@torch.no_grad()
def correlations(model, ids: torch.Tensor, presses: dict[str, Press], n_queries: int = 64) -> dict:
    """Per full-attention layer and KV head: Spearman of each press's scores with received attention."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] <= n_queries + 1:
        raise ValueError(f"need one sequence longer than n_queries={n_queries} + 1 tokens, got shape {tuple(ids.shape)}")
    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    reading = ids.shape[1] - n_queries
    out: dict[int, dict[str, list[float]]] = {}

    def observe(module, query, key, value) -> None:
        att = received_attention(module, query, key, n_queries)  # (hkv, m)
        m = att.shape[-1]
        keys, values = key[0, :, :m].float(), value[0, :, :m].float()
        out[module.layer_idx] = {
            name: spearman(press_scores(p, module.layer_idx, keys, values, reading), att).tolist()
            for name, p in presses.items()
        }

    with patched_attention(model, layers, observe):
        model(ids.to(model.device), use_cache=False, logits_to_keep=1)
    layer_ids = sorted(out)
    per = {name: [out[i][name] for i in layer_ids] for name in presses}
    return dict(layers=layer_ids, reading_position=reading, correlations=per, summary=summarize(per))


def summarize(per: dict[str, list[list[float]]]) -> dict:
    """Mean/median/positive share per scorer over all heads, and paired differences against Q-Filters."""
    flat = {name: torch.tensor(v, dtype=torch.float64).flatten() for name, v in per.items()}
    out = {}
    for name, x in flat.items():
        row = dict(heads=int(x.numel()), mean=float(x.mean()), median=float(x.median()),
                   positive_share=float((x > 0).double().mean()))
        if REFERENCE in flat and name != REFERENCE:
            d = stats.paired_bootstrap(x, flat[REFERENCE])
            row["vs_qfilters"] = dict(diff=d["diff"], lo=d["lo"], hi=d["hi"],
                                      higher_share=float((x > flat[REFERENCE]).double().mean()))
        out[name] = row
    return out


def text_ids(tokenizer, corpus: str, tokens: int, offset: int) -> torch.Tensor:
    """``tokens`` ids from an offline corpus starting at ``offset`` (BOS first when the tokenizer has one)."""
    ids = corpus_ids(tokenizer, corpus)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = ids[offset : offset + tokens - len(bos)].tolist()
    if len(body) < tokens - len(bos):
        raise ValueError(f"the {corpus} corpus has {len(ids)} tokens; offset {offset} + {tokens} does not fit")
    return torch.tensor([bos + body])


def figure(results: dict):
    """Per-layer mean correlation per scorer, one panel per model/corpus (dots: single heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, c, r) for m, by in results.items() for c, r in by.items() if "correlations" in r]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.8 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (model, corpus, r) in zip(axes[0], panels):
        xs = torch.tensor(r["layers"], dtype=torch.float)
        for i, (name, vals) in enumerate(r["correlations"].items()):
            vals = torch.tensor(vals)  # (layers, heads)
            color = f"C{i}"
            for h in range(vals.shape[1]):
                ax.scatter(xs, vals[:, h], s=4, color=color, alpha=0.35)
            ax.plot(xs, vals.mean(1), color=color, label=f"{name} (mean {vals.mean():.2f})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{model}, {corpus}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("Spearman with received attention")
        ax.set_ylim(-1, 1)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def markdown(results: dict, env: dict, settings: dict, image: str | None) -> str:
    md = [
        "## Attention correlation per layer and head (paper Figure 4), every query-free scorer\n",
        f"- Text: {settings['tokens']} tokens per corpus from the offline corpora (offset {settings['offset']}); "
        f"received attention from the last {settings['queries']} queries; scorers read from position "
        f"{settings['tokens']} - {settings['queries']}; full-attention layers only. Per-layer, per-head values are in "
        "correlation.json.",
        "- `vs qfilters`: mean per-head difference (scorer - Q-Filters) with a bootstrap 95% interval over heads, "
        "and the share of heads where the scorer is higher.\n",
        "| model | corpus | scorer | heads | mean Spearman (median) | heads > 0 | vs qfilters [95% CI] | heads higher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failures = []
    for model, by in results.items():
        for corpus, r in by.items():
            if "error" in r:
                failures.append(f"- **{model}** could not be evaluated: {r['error']}")
                continue
            for name, s in sorted(r["summary"].items(), key=lambda kv: -kv[1]["mean"]):
                vs = s.get("vs_qfilters")
                cmp = "-" if vs is None else f"{vs['diff']:+.3f} [{vs['lo']:+.3f}, {vs['hi']:+.3f}]"
                higher = "-" if vs is None else f"{vs['higher_share']:.0%}"
                md.append(f"| {model} | {corpus} | {name} | {s['heads']} | {s['mean']:.3f} ({s['median']:.3f}) | "
                          f"{s['positive_share']:.0%} | {cmp} | {higher} |")
    md.extend(["", *failures])
    if image is not None:
        md.append(f"\n![correlation]({image})")
    return "\n".join(md) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="embedded model names or local paths")
    parser.add_argument("--methods", default=None, help="registered query-free presses (default: all of them)")
    parser.add_argument("--corpora", default="prose,code", help="offline corpora to read (prose, code)")
    parser.add_argument("--tokens", type=int, default=2048, help="length of the text")
    parser.add_argument("--queries", type=int, default=64, help="last queries whose attention is measured")
    parser.add_argument("--offset", type=int, default=20000, help="start of the text in each corpus (tokens)")
    add_threads_argument(parser)
    add_out_argument(parser)
    parser.add_argument("--name", default="correlation", help="basename of the result files")


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    names = parse_list(args.methods) if args.methods else query_free_presses()
    for name in names:
        if build_press(name).scoring.needs_queries:
            raise SystemExit(f"{name} needs queries to score keys; choose from {', '.join(query_free_presses())}")
    env = environment()
    results: dict = {}
    start = time.time()
    for model_name in parse_list(args.models):
        try:
            model, tokenizer = load_model(model_name)
            presses = {name: build_press(name) for name in names}
            for p in presses.values():
                p.prepare(model)  # filters / calibration statistics for this model
        except Exception as err:  # report exactly why a model cannot be evaluated, keep the others
            results[model_name] = {"-": {"error": f"{type(err).__name__}: {err}"}}
            print(f"{model_name}: {type(err).__name__}: {err}")
            continue
        for corpus in parse_list(args.corpora):
            ids = text_ids(tokenizer, corpus, args.tokens, args.offset)
            results.setdefault(model_name, {})[corpus] = correlations(model, ids, presses, args.queries)
            print(model_name, corpus, {k: round(v["mean"], 3) for k, v in results[model_name][corpus]["summary"].items()})
        del model
    settings = dict(tokens=args.tokens, queries=args.queries, offset=args.offset, corpora=args.corpora, methods=names)
    has_data = any("correlations" in r for by in results.values() for r in by.values())
    figures = {f"{args.name}.png": figure(results)} if has_data else {}
    payload = dict(settings=settings, results=results, environment=env, elapsed_s=time.time() - start)
    md = "\n".join([markdown(results, env, settings, f"{args.name}.png" if has_data else None)]
                   + markdown_footer(payload))
    write_result(args.out, args.name, payload, md, figures)
    print(md)
    return 0
