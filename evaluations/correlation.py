"""``kvpress-like eval correlation``: do a method's key scores predict the attention keys really receive?

The Q-Filters paper's Figure 4: for every full-attention layer and KV head, the Spearman rank correlation
between a method's key scores (Q-Filters ``-<k, f>``, K-norm ``-||k||``) and the attention each key
receives from later queries. One forward pass over an offline text of ``--tokens`` tokens records the
post-RoPE queries and keys of each layer (through ``patched_attention``); the received attention of a key
is the softmax attention of the last ``--queries`` queries, averaged over those queries and over the query
heads that share the KV head. Only keys every observed query can see (positions before the observation
window) are ranked, so causal masking does not bias later keys.

The text is a window of the offline prose corpus or of Python source (``--corpus``); note that Q-Filters
for embedded models are calibrated on other windows of the same prose corpus, while the code corpus is
held out. Spearman is computed as the Pearson correlation of ranks (ties are negligible for float scores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvpress_like.data import corpus_ids
from kvpress_like.integrations.transformers import attention_layers, patched_attention
from kvpress_like.methods.qfilters import filters_for

from .results import RESULTS_DIR, command_line, environment, environment_markdown, set_threads, write_result

MODELS = ("smollm2-135m", "gemma3-270m")


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


@torch.no_grad()
def correlations(model, ids: torch.Tensor, filters: torch.Tensor, n_queries: int = 128) -> dict:
    """Per full-attention layer and KV head: Spearman of Q-Filters and K-norm scores with received attention."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] <= n_queries + 1:
        raise ValueError(f"need one sequence longer than n_queries={n_queries} + 1 tokens, got shape {tuple(ids.shape)}")
    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    out: dict[int, dict[str, list[float]]] = {}

    def observe(module, query, key, value) -> None:
        att = received_attention(module, query, key, n_queries)  # (hkv, m)
        keys = key[0, :, : att.shape[-1]].float()  # (hkv, m, d)
        f = filters[module.layer_idx].to(keys.device, torch.float32)
        scores = dict(qfilters=-torch.einsum("hnd,hd->hn", keys, f), knorm=-keys.norm(dim=-1))
        out[module.layer_idx] = {m: spearman(s, att).tolist() for m, s in scores.items()}

    with patched_attention(model, layers, observe):
        model(ids.to(model.device), use_cache=False, logits_to_keep=1)
    layer_ids = sorted(out)
    per = {m: [out[i][m] for i in layer_ids] for m in ("qfilters", "knorm")}
    return dict(layers=layer_ids, correlations=per, summary=summarize(per))


def summarize(per: dict[str, list[list[float]]]) -> dict:
    q = torch.tensor(per["qfilters"]).flatten()
    k = torch.tensor(per["knorm"]).flatten()
    return dict(
        heads=int(q.numel()),
        qfilters_mean=float(q.mean()),
        knorm_mean=float(k.mean()),
        qfilters_median=float(q.median()),
        knorm_median=float(k.median()),
        qfilters_positive_share=float((q > 0).double().mean()),
        knorm_positive_share=float((k > 0).double().mean()),
        qfilters_beats_knorm_share=float((q > k).double().mean()),
    )


def text_ids(tokenizer, corpus: str, tokens: int, offset: int) -> torch.Tensor:
    """``tokens`` ids from an offline corpus starting at ``offset`` (BOS first when the tokenizer has one)."""
    ids = corpus_ids(tokenizer, corpus)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = ids[offset : offset + tokens - len(bos)].tolist()
    if len(body) < tokens - len(bos):
        raise ValueError(f"the {corpus} corpus has {len(ids)} tokens; offset {offset} + {tokens} does not fit")
    return torch.tensor([bos + body])


def figure(results: dict, path: Path) -> Path:
    """Per-layer correlation per head (dots) and mean (line), Q-Filters vs K-norm, one panel per model/corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, c, r) for m, by in results.items() for c, r in by.items() if "correlations" in r]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.4), squeeze=False)
    for ax, (model, corpus, r) in zip(axes[0], panels):
        for method, color in (("qfilters", "tab:blue"), ("knorm", "tab:orange")):
            vals = torch.tensor(r["correlations"][method])  # (layers, heads)
            xs = torch.tensor(r["layers"], dtype=torch.float)
            for h in range(vals.shape[1]):
                ax.scatter(xs + (0.15 if method == "knorm" else -0.15), vals[:, h], s=6, color=color, alpha=0.5)
            ax.plot(xs, vals.mean(1), color=color, label=f"{method} (mean {vals.mean():.2f})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{model}, {corpus}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("Spearman with received attention")
        ax.set_ylim(-1, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict, env: dict, settings: dict, command: str, image: Path | None) -> str:
    md = [
        "## Attention correlation (paper Figure 4)\n",
        environment_markdown(env),
        f"- Text: {settings['tokens']} tokens per corpus from the offline corpora (offset {settings['offset']}); "
        f"received attention from the last {settings['queries']} queries; full-attention layers only",
        f"- Command: `{command}`\n",
        "| model | corpus | heads | Q-Filters mean (median) | K-norm mean (median) | Q-Filters > 0 | K-norm > 0 | "
        "Q-Filters beats K-norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failures = []
    for model, by in results.items():
        for corpus, r in by.items():
            if "error" in r:
                failures.append(f"- **{model}** could not be evaluated: {r['error']}")
                continue
            s = r["summary"]
            md.append(
                f"| {model} | {corpus} | {s['heads']} | {s['qfilters_mean']:.3f} ({s['qfilters_median']:.3f}) | "
                f"{s['knorm_mean']:.3f} ({s['knorm_median']:.3f}) | {s['qfilters_positive_share']:.0%} | "
                f"{s['knorm_positive_share']:.0%} | {s['qfilters_beats_knorm_share']:.0%} |"
            )
    md.extend(["", *failures])
    if image is not None:
        md.append(f"\n![correlation]({image.name})")
    return "\n".join(md) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="embedded model names or local paths")
    parser.add_argument("--corpora", default="prose,code", help="offline corpora to read (prose, code)")
    parser.add_argument("--tokens", type=int, default=2048, help="length of the text")
    parser.add_argument("--queries", type=int, default=128, help="last queries whose attention is measured")
    parser.add_argument("--offset", type=int, default=20000, help="start of the text in each corpus (tokens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="correlation")


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    env = environment()
    results: dict = {}
    start = time.time()
    for name in (m for m in args.models.split(",") if m):
        try:
            model, tokenizer = load_model(name)
            filters = filters_for(model, tokenizer)
        except Exception as err:  # report exactly why a model cannot be evaluated, keep the others
            results[name] = {"-": {"error": f"{type(err).__name__}: {err}"}}
            print(f"{name}: {type(err).__name__}: {err}")
            continue
        for corpus in (c for c in args.corpora.split(",") if c):
            ids = text_ids(tokenizer, corpus, args.tokens, args.offset)
            results.setdefault(name, {})[corpus] = correlations(model, ids, filters, args.queries)
            print(name, corpus, results[name][corpus]["summary"])
        del model
    settings = dict(tokens=args.tokens, queries=args.queries, offset=args.offset, corpora=args.corpora)
    args.out.mkdir(parents=True, exist_ok=True)
    image = figure(results, args.out / f"{args.name}.png") if any(
        "correlations" in r for by in results.values() for r in by.values()) else None
    payload = dict(settings=settings, results=results, environment=env, command=command_line(),
                   elapsed_s=time.time() - start)
    md = markdown(results, env, settings, command_line(), image)
    write_result(args.out, args.name, payload, md)
    print(md)
    return 0
