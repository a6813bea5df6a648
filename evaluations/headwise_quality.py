"""``python -m kvpress_like.evaluations.headwise_quality``: head-wise (AdaKV) vs uniform budgets of the same press
at equal kept pairs, on the offline RULER-style prompts (:mod:`.ruler_tasks`), paired prompt by prompt.

Protocol as :mod:`.ruler`: one shared full prefill per prompt, every press compresses its copy
(:func:`.passkey.compress_prefilled`), the question is fed uncompressed after the compressed context. Per
compression factor: the base press with uniform budgets, ``AdaptivePress`` around it with softmax-normalised
scores (the default) and with raw scores (``normalization="none"``), the comparison the issue asks for. Each
compressed cache's real bytes (``cache_nbytes``, before the question) are recorded, so "equal bytes" is
measured, not assumed. Seeds start at ``--first-seed`` so that prompts used to pick the press stay out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvpress_like import press, uncompressed
from kvpress_like.cache import cache_nbytes
from kvpress_like.cache_ops import fork_cache
from kvpress_like.methods.adaptive import AdaptivePress

from . import stats
from .common import add_model_argument, add_out_argument, add_threads_argument, build_press, environment, factor_to_ratio, markdown_footer, parse_list, set_threads, write_result
from .passkey import _parse_shard, compress_prefilled, prefill
from .ruler import generate_rows
from .ruler_tasks import ruler_sample, score

VARIANTS = ("uniform", "headwise", "headwise_raw")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded model name or local path")
    parser.add_argument("--method", default="qfilters", help="registered query-free base press")
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--factors", default="8,4", help="compression factors")
    parser.add_argument("--tasks", default="niah_single_prose,niah_multikey_prose,niah_single_noise,qa",
                        help="RULER-style task families, comma-separated (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=8, help="prompts per task")
    parser.add_argument("--first-seed", type=int, default=2, help="seed of the first prompt")
    parser.add_argument("--floor", type=float, default=0.2, help="AdaptivePress floor")
    add_threads_argument(parser, default=1)
    parser.add_argument("--shard", default=None, help="I/N: prompts I, I+N, ...")
    parser.add_argument("--summarize", action="store_true", help="merge the shards' checkpoints and write the result")
    add_out_argument(parser)
    parser.add_argument("--name", default="headwise_quality", help="result file stem (default: %(default)s)")


def _presses(method: str, factors, floor: float) -> dict:
    out = {}
    for f in factors:
        ratio = factor_to_ratio(f)
        out[(f, "uniform")] = build_press(method, ratio=ratio)
        out[(f, "headwise")] = AdaptivePress(build_press(method, ratio=ratio), floor=floor)
        out[(f, "headwise_raw")] = AdaptivePress(build_press(method, ratio=ratio), floor=floor, normalization="none")
    return out


@torch.no_grad()
def run(args: argparse.Namespace, checkpoint: Path) -> None:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    factors, tasks = parse_list(args.factors, float), parse_list(args.tasks)
    presses = _presses(args.method, factors, args.floor)
    rows = json.loads(checkpoint.read_text())["rows"] if checkpoint.exists() else []
    done = {(r["seed"], r["task"]) for r in rows}
    prompts = [(s, t) for s in range(args.first_seed, args.first_seed + args.samples) for t in tasks]
    shard = _parse_shard(args.shard)
    if shard is not None:
        prompts = prompts[shard[0] :: shard[1]]
    for seed, task in prompts:
        if (seed, task) in done:
            continue
        s = ruler_sample(tokenizer, task, args.length, seed)
        feed = torch.tensor([s.question_ids])
        pre = prefill(model, torch.tensor([s.context_ids]))
        meta = dict(seed=seed, task=task, answers=s.answers)
        (said,) = generate_rows(model, tokenizer, fork_cache(pre.cache, share_storage=True), 1, feed, s, len(s.context_ids))
        rows.append(dict(meta, variant="no_press", factor=1.0, score=score(said, s.answers), output=said, kv_bytes=None))
        for (factor, variant), p in presses.items():
            with press(model, p):
                cache = compress_prefilled(model, pre, p)
            nbytes = cache_nbytes(cache)
            with press(model, p), uncompressed(cache):
                (said,) = generate_rows(model, tokenizer, cache, 1, feed, s, None)
            rows.append(dict(meta, variant=variant, factor=factor, score=score(said, s.answers), output=said, kv_bytes=nbytes))
        checkpoint.write_text(json.dumps(dict(rows=rows)))
        print(f"seed {seed} {task}: " + ", ".join(f"{r['variant']}x{r['factor']:g}={r['score']:.2f}" for r in rows[-7:]), flush=True)


def summarize(args: argparse.Namespace, checkpoints: list[Path]) -> dict:
    set_threads(args.threads)  # the footer reports the workers' thread count
    rows = [r for c in checkpoints if c.exists() for r in json.loads(c.read_text())["rows"]]
    factors, tasks = parse_list(args.factors, float), parse_list(args.tasks)
    key = lambda r: (r["seed"], r["task"])  # noqa: E731
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["factor"]), {})[key(r)] = r
    cells, md = [], []
    for f in factors:
        common = sorted(set.intersection(*(set(by.get((v, f), {})) for v in VARIANTS)) & set(by.get(("no_press", 1.0), {})))
        if not common:
            continue
        get = lambda v, ff=f: [by[(v, ff if v != "no_press" else 1.0)][k]["score"] for k in common]  # noqa: E731
        cell = dict(factor=f, n=len(common), mean={}, per_task={}, bytes={}, paired={})
        for v in ("no_press", *VARIANTS):
            cell["mean"][v] = 100 * statistics.fmean(get(v))
            cell["per_task"][v] = {t: 100 * statistics.fmean([by[(v, f if v != "no_press" else 1.0)][k]["score"]
                                                             for k in common if k[1] == t]) for t in tasks}
            if v != "no_press":
                cell["bytes"][v] = statistics.fmean(by[(v, f)][k]["kv_bytes"] for k in common)
        for a, b in (("headwise", "uniform"), ("headwise_raw", "uniform"), ("headwise", "headwise_raw")):
            boot = stats.paired_bootstrap([100 * x for x in get(a)], [100 * x for x in get(b)])
            wins = sum(x > y for x, y in zip(get(a), get(b)))
            losses = sum(x < y for x, y in zip(get(a), get(b)))
            cell["paired"][f"{a} - {b}"] = dict(boot, wins=wins, losses=losses, p=stats.mcnemar_p(wins, losses))
        cells.append(cell)
    report = dict(environment=environment(), settings=vars(args) | dict(out=str(args.out)), cells=cells, rows=rows)
    md = [f"## Head-wise vs uniform budgets at equal kept pairs: {args.model}, {args.method}, {args.length} tokens, "
          f"floor {args.floor}", "",
          "Score: RULER string match in % (mean over prompts); paired differences in points with a bootstrap 95% "
          "interval over prompts and an exact sign test (wins/losses). `headwise`: softmax-normalised scores per "
          "head (default); `headwise_raw`: raw scores compete (`normalization=\"none\"`). Bytes: mean `cache_nbytes` "
          "of the compressed context (keys + values), before the question. Scores do not depend on the storage layout "
          "(attention is exact), so they hold for any `memory_slack`.", ""]
    for c in cells:
        md += [f"### x{c['factor']:g} (n = {c['n']} prompts, {len(tasks)} tasks)", "",
               "| variant | mean | " + " | ".join(tasks) + " | K/V bytes |", "|---" * (len(tasks) + 3) + "|"]
        for v in ("no_press", *VARIANTS):
            nb = f"{c['bytes'][v]:.0f}" if v in c["bytes"] else "-"
            md.append(f"| {v} | **{c['mean'][v]:.1f}** | " + " | ".join(f"{c['per_task'][v][t]:.1f}" for t in tasks) + f" | {nb} |")
        md.append("")
        for name, d in c["paired"].items():
            md.append(f"- {name}: {d['diff']:+.1f} points [{d['lo']:+.1f}, {d['hi']:+.1f}], wins/losses {d['wins']}/{d['losses']}, "
                      f"sign test p = {d['p']:.3g}")
        md.append("")
    md += markdown_footer(report)
    write_result(args.out, args.name, report, "\n".join(md))
    print("\n".join(md))
    return report


def main(args: argparse.Namespace) -> None:
    shards = _parse_shard(args.shard)
    if args.summarize:
        n = 1 if shards is None else shards[1]
        names = [f"{args.name}.checkpoint.json"] if shards is None else [f"{args.name}.shard{i}of{n}.checkpoint.json" for i in range(n)]
        summarize(args, [args.out / c for c in names])
        return
    name = f"{args.name}.checkpoint.json" if shards is None else f"{args.name}.shard{shards[0]}of{shards[1]}.checkpoint.json"
    begin = time.time()
    run(args, args.out / name)
    print(f"done in {time.time() - begin:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    main(parser.parse_args())
