"""``kvpress-like eval needle-trace``: where, per layer and KV head, a press loses a needle hidden in prose.

A benchmark score says *that* a press lost the answer; this says *where*. For RULER-style needle prompts
(:mod:`.ruler_tasks`, the needle in real prose by default) it locates the answer's tokens in the context,
compresses one shared full prefill with each (press, ratio) exactly as ``eval ruler`` does
(:func:`.passkey.compress_prefilled`), and records, per (layer, KV head), the fraction of those tokens the
compressed cache still holds, then whether the model still answers (greedy, question fed uncompressed after
the context). An ``oracle`` row keeps, in every head, 4 sink tokens, the needle's sentence and the most recent tokens, as
many per head as the press keeps at that ratio: whether the model could answer from a cache of that size.

Output: per (press, ratio) the answer rate, the mean fraction of needle tokens kept, the layers that keep
least, and a heat-map per press (layers x KV heads) of the kept fraction at the first ratio.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_like import press
from kvpress_like.cache import PressedLayer
from kvpress_like.cache_ops import fork_cache

from .common import (
    RESULTS_DIR, add_model_argument, build_press, environment, factor_to_ratio, markdown_footer,
    one_reconstruction_per_prompt, parse_list, set_threads, write_result,
)
from .passkey import compress_prefilled, prefill
from .ruler import answer_cell, generate_rows
from .ruler_tasks import ruler_sample, score

NEEDLE_TASKS = ("niah_single_prose", "niah_single_noise", "niah_multikey_prose")


def needle_positions(tokenizer, context_ids: list[int], answers: list[str]) -> list[int]:
    """Positions in ``context_ids`` of the tokens that spell each answer (the first occurrence); an answer
    the context does not spell token for token raises ``ValueError`` (the trace would be meaningless)."""
    found: list[int] = []
    for answer in answers:
        for text in (answer, " " + answer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            hit = next((i for i in range(len(context_ids) - len(ids) + 1) if context_ids[i : i + len(ids)] == ids), None)
            if hit is not None:
                found.extend(range(hit, hit + len(ids)))
                break
        else:
            raise ValueError(f"the answer {answer!r} is not spelled by the context's tokens; pick another task or seed")
    return found


def kept_fraction(cache, needle: list[int]) -> torch.Tensor:
    """``(layers, kv_heads)``: fraction of the ``needle`` positions each full-attention layer and head holds
    (row 0; ``nan`` for layers the press leaves uncompressed, which hold everything)."""
    rows = []
    target = torch.tensor(needle)
    for layer in cache.layers:
        if not isinstance(layer, PressedLayer):
            rows.append(None)
            continue
        pos = layer.positions[0]  # (kv_heads, slots), -1 for empty slots
        rows.append(torch.isin(pos, target.to(pos.device)).sum(-1).float() / len(needle))
    heads = next(r.numel() for r in rows if r is not None)
    return torch.stack([torch.full((heads,), float("nan")) if r is None else r.cpu() for r in rows])


def needle_sentence(tokenizer, context_ids: list[int], needle: list[int]) -> list[int]:
    """Positions of the whole sentences holding the ``needle`` tokens (out to the nearest ``.`` or line break
    on each side): what a reader needs to tie the answer to its key."""
    def boundary(i: int) -> bool:
        text = tokenizer.decode([context_ids[i]])
        return "." in text or "\n" in text

    spans = set()
    for i in needle:
        lo = i
        while lo > 0 and not boundary(lo - 1):
            lo -= 1
        hi = i
        while hi < len(context_ids) - 1 and not boundary(hi):
            hi += 1
        spans.update(range(lo, hi + 1))
    return sorted(spans)


def oracle_cache(shared, sentence: list[int], keep: int, sinks: int = 4) -> DynamicCache:
    """The shared prefill with every layer and head holding the first ``sinks`` tokens, the needle's
    ``sentence`` and the most recent others, ``keep`` per head in all: a cache of the press's size that
    surely holds the answer (new tokens need their true positions from the caller)."""
    n = shared.cache.get_seq_length()
    fixed = set(range(min(sinks, n))) | set(sentence)
    chosen = torch.tensor(sorted(fixed | set(range(max(0, n - max(0, keep - len(fixed))), n))))
    cache = DynamicCache()
    for idx, layer in enumerate(shared.cache.layers):
        cache.update(layer.keys[:, :, chosen], layer.values[:, :, chosen], idx)
    return cache


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--task", default="niah_single_prose", choices=NEEDLE_TASKS, help="needle task family")
    parser.add_argument("--samples", type=int, default=6, help="prompts (seeds F..F+N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="F, the first seed")
    parser.add_argument("--factors", default="4", help="compression factors")
    parser.add_argument("--methods", default="kvzip,adakv:base=kvzip:normalization=none:scope=model,qfilters,streaming_llm",
                        help="presses (name or name:key=value:...)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--name", default="needle_trace", help="result file stem")


def run(model, tokenizer, task: str, length: int, seeds: list[int], methods: list[str], factors: list[float]) -> dict:
    """Every (press, factor) on every seed: answered or not, and the kept fraction per (layer, KV head)."""
    rows = []
    for seed in tqdm(seeds, desc="needle prompts"):
        s = ruler_sample(tokenizer, task, length, seed)
        needle = needle_positions(tokenizer, s.context_ids, s.answers)
        sentence = needle_sentence(tokenizer, s.context_ids, needle)
        shared = prefill(model, torch.tensor([s.context_ids]))
        feed, start = torch.tensor([s.question_ids]), len(s.context_ids)
        (said,) = generate_rows(model, tokenizer, fork_cache(shared.cache, share_storage=True), 1, feed, s, start)
        rows.append(dict(seed=seed, method="no_press", factor=1.0, score=score(said, s.answers), output=said, kept=None))
        with one_reconstruction_per_prompt():
            for factor in factors:
                for method in methods:
                    p = build_press(method, ratio=factor_to_ratio(factor))
                    with press(model, p):
                        cache = compress_prefilled(model, shared, p)
                    kept = kept_fraction(cache, needle)
                    (said,) = answer_cell(model, tokenizer, [p], [cache], feed, s, start)  # as eval ruler answers
                    rows.append(dict(seed=seed, method=method, factor=factor, score=score(said, s.answers), output=said,
                                     kept=kept.tolist()))
                keep = round(len(s.context_ids) / factor)
                (said,) = generate_rows(model, tokenizer, oracle_cache(shared, sentence, keep), 1, feed, s, start)
                rows.append(dict(seed=seed, method="oracle", factor=factor, score=score(said, s.answers), output=said,
                                 kept=None))
    return dict(rows=rows)


def summarize(rows: list[dict]) -> list[dict]:
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["factor"]), []).append(r)
    out = []
    for (method, factor), rs in cells.items():
        kept = [torch.tensor(r["kept"]) for r in rs if r["kept"] is not None]
        mean = torch.stack(kept).nanmean(0) if kept else None
        whole = None if not kept else sum(float((k == 1).sum()) for k in kept) / len(kept)  # nan == 1 is False
        out.append(dict(method=method, factor=factor, n=len(rs), answered=sum(r["score"] for r in rs),
                        kept_mean=None if mean is None else float(mean.nanmean()), whole_heads=whole,
                        heads=None if mean is None else int((~mean.isnan()).sum()),
                        kept_per_layer=None if mean is None else mean.nanmean(-1).tolist(),
                        kept_map=None if mean is None else mean.tolist()))
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    md = [f"## Where the needle is lost: {s['task']}, {s['length']} tokens, seeds {s['seeds'][0]}..{s['seeds'][-1]}", "",
          "Kept: fraction of the answer's tokens a press's cache still holds, mean over prompts, layers and KV heads "
          "(uncompressed layers left out). Oracle: every head holds 4 sink tokens, the needle's sentence and the most "
          "recent tokens, as many per head as the presses keep at that ratio. Whole: (layer, KV head) pairs holding every "
          "token of the answer, mean over prompts, of the compressed ones.", "",
          "| press | factor | answered | needle tokens kept | heads holding it whole | 3 layers keeping least (layer: kept) |",
          "|---|---|---|---|---|---|"]
    for c in report["cells"]:
        worst = ""
        if c["kept_per_layer"] is not None:
            ranked = sorted((v, i) for i, v in enumerate(c["kept_per_layer"]) if v == v)[:3]
            worst = ", ".join(f"{i}: {v:.0%}" for v, i in ranked)
        kept = "" if c["kept_mean"] is None else f"{c['kept_mean']:.0%}"
        whole = "" if c.get("whole_heads") is None else f"{c['whole_heads']:.1f} of {c['heads']}"
        md.append(f"| {c['method']} | x{c['factor']:g} | {c['answered']:g}/{c['n']} | {kept} | {whole} | {worst} |")
    return "\n".join(md + [""] + markdown_footer(report))


def figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if c["kept_map"] is not None and c["factor"] == report["settings"]["factors"][0]]
    if not cells:
        return None
    fig, axes = plt.subplots(1, len(cells), figsize=(2.2 * len(cells) + 1, 5), squeeze=False)
    for ax, c in zip(axes[0], cells):
        im = ax.imshow(torch.tensor(c["kept_map"]).numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis")
        name = "\n".join(textwrap.wrap(c["method"].replace(":", ": "), 22))  # variants spelled name:key=value
        ax.set_title(f"{name}\nx{c['factor']:g}: {c['answered']:g}/{c['n']}", fontsize=7)
        ax.set_xlabel("KV head")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="needle tokens kept")
    return fig


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    factors, methods = parse_list(args.factors, float), parse_list(args.methods)
    for m in methods:
        for f in factors:
            build_press(m, ratio=factor_to_ratio(f))  # a bad name fails before the model loads
    model, tokenizer = load_model(args.model)
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    begin = time.time()
    result = run(model, tokenizer, args.task, args.length, seeds, methods, factors)
    report = dict(settings=dict(task=args.task, length=args.length, seeds=seeds, factors=factors, methods=methods),
                  cells=summarize(result["rows"]), rows=result["rows"], elapsed_s=time.time() - begin,
                  environment=environment())
    fig = figure(report)
    path = write_result(args.out, args.name, report, markdown(report), {f"{args.name}.png": fig} if fig else None)
    print(markdown(report))
    print(f"wrote {path}")
    return 0
