"""``kvpress-like eval ruler``: an offline RULER-style benchmark, every press on the same prompts, paired with no press.

Tasks: :mod:`.ruler_tasks` (needles in noise / prose / distractor needles, single, multi-key, multi-value and
multi-query; variable tracking; common- and frequent-word extraction; document QA), each prompt built from
a seed in the model's chat template with RULER's answer prefix. Score: RULER's string match, the fraction of
expected strings in the greedy output.

Protocol: one shared full prefill of each prompt's context (:func:`.passkey.prefill`); every (press, ratio)
compresses its copy with :func:`.passkey.compress_prefilled` (equal to a pressed prefill, tested there),
and the question with its answer prefix is fed *after* the compressed context, uncompressed (compress once,
ask after, as ``kvpress-like ask`` does). Query-dependent presses (SnapKV) see the context's last queries,
not the question's. The presses of one ratio answer in one batch when their caches stack.

Reported per (length, ratio, press): each task's mean score and the mean over tasks, with 95% intervals
(Wilson on the summed score of a task, and of all prompts for the mean over tasks), and the
paired difference to no press on the same prompts (bootstrap over prompts, and an exact sign test over the
prompts where the two differ, McNemar's test for 0/1 tasks). "worse" only when both say so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpress_like import press, uncompressed
from kvpress_like.cache_ops import fork_cache
from kvpress_like.registry import list_presses

from . import stats
from .common import (
    add_model_argument,
    RESULTS_DIR, build_press, environment, factor_to_ratio, markdown_footer, one_reconstruction_per_prompt, parse_list,
    set_threads, write_result,
)
from .passkey import _parse_shard, _pct, cached_step, compress_prefilled, prefill, stack_caches
from .ruler_tasks import TASKS, RulerSample, ruler_sample, score

#: the presses of issue 21's grid (every registered one by default)
DEFAULT_FACTORS = (2, 4, 8)


@dataclass
class Grid:
    """The prompts and settings of one run (``--quick`` shrinks lengths and samples, never presses or tasks)."""

    lengths: tuple[int, ...] = (2048, 4096)
    factors: tuple[float, ...] = DEFAULT_FACTORS
    samples: int = 20
    first_seed: int = 0  # seeds first_seed .. first_seed + samples - 1 (dev prompts apart from held-out ones)
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(list_presses()))
    quick: bool = False
    shard: tuple[int, int] | None = None  # (i, n): prompts i, i + n, ... of prompt_order


def prompt_order(grid: Grid) -> list[tuple[int, int, str]]:
    """(seed, length, task) of every prompt, seed-major: a run stopped early has balanced cells."""
    seeds = range(grid.first_seed, grid.first_seed + grid.samples)
    return [(s, n, t) for s in seeds for n in grid.lengths for t in grid.tasks]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_rows(model, tokenizer, cache, rows: int, feed_ids: torch.Tensor, sample: RulerSample,
                  start: int | None) -> list[str]:
    """Greedy continuation of ``feed_ids`` (question + answer prefix) for each of the cache's ``rows``.

    A row stops at end of sequence or once every expected answer is in its text (its score can no longer
    change), at most ``sample.max_new_tokens``. ``start``: true position of the first fed token (needed when
    ``cache`` stacks compressed caches); ``None`` lets the cache say.
    """
    device, stop = model.device, _eos_ids(model, tokenizer)
    step = cached_step(model, cache, rows, start)

    logits = step(feed_ids.to(device).expand(rows, -1))
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for i in range(sample.max_new_tokens):
        nxt = logits.argmax(-1)
        for r in range(rows):
            if not done[r]:
                token = int(nxt[r])
                done[r] = token in stop
                if not done[r]:
                    out[r].append(token)
                    done[r] = score(tokenizer.decode(out[r]), sample.answers) == 1.0
        if all(done) or i == sample.max_new_tokens - 1:
            break
        logits = step(nxt[:, None])
    return [tokenizer.decode(ids) for ids in out]


def compress_cell(model, pre, cell: list) -> list:
    """Every press of one ratio on one prompt, each compressing its own copy of the shared prefill."""
    caches = []
    for p in cell:
        with press(model, p):
            caches.append(compress_prefilled(model, pre, p))
    return caches


def answer_cell(model, tokenizer, cell: list, caches: list, feed: torch.Tensor, sample: RulerSample, start: int) -> list[str]:
    """The answers over the compressed ``caches`` of ``cell`` (:func:`compress_cell`): in one batch, or one by
    one when the caches do not stack."""
    batch = stack_caches(model, caches)
    if batch is not None:
        return generate_rows(model, tokenizer, batch, len(caches), feed, sample, start)
    said = []
    for p, cache in zip(cell, caches):
        with press(model, p), uncompressed(cache):
            said += generate_rows(model, tokenizer, cache, 1, feed, sample, None)
    return said


def _load_checkpoint(path: Path | None, settings: dict) -> dict:
    """Rows, prefill times and elapsed time of an interrupted run of the same grid (resume); a checkpoint of
    other settings is refused."""
    if path is None or not path.exists():
        return dict(rows=[], prefill_s=[], elapsed_s=0.0)
    saved = json.loads(path.read_text())
    saved["settings"].setdefault("first_seed", 0)  # checkpoints written before the option
    if saved["settings"] != json.loads(json.dumps(settings)):
        raise SystemExit(f"{path} is a checkpoint of other settings; delete it or pass the same options to resume")
    return saved


def run_grid(model, tokenizer, grid: Grid, progress: bool = True, checkpoint: Path | None = None) -> dict:
    """Every prompt of the grid; returns ``{"settings", "rows", "prefill_s"}``. With ``checkpoint`` the rows
    are rewritten there after every prompt, and prompts already there are skipped (resume)."""
    presses = {(m, float(f)): build_press(m, ratio=factor_to_ratio(f)) for m in grid.methods for f in grid.factors}
    settings = asdict(grid)
    saved, began = _load_checkpoint(checkpoint, settings), time.time()
    rows, prefill_s, resumed = saved["rows"], saved["prefill_s"], len(saved["prefill_s"])
    done = {(r["seed"], r["length"], r["task"]) for r in rows}
    prompts = prompt_order(grid)
    if grid.shard is not None:
        prompts = prompts[grid.shard[0] :: grid.shard[1]]
    for seed, length, task in tqdm([p for p in prompts if p not in done], desc="ruler prompts", disable=not progress):
        s = ruler_sample(tokenizer, task, length, seed)
        feed = torch.tensor([s.question_ids])
        begin = time.perf_counter()
        pre = prefill(model, torch.tensor([s.context_ids]))
        prefill_s.append(time.perf_counter() - begin)
        start = len(s.context_ids)
        meta = dict(seed=seed, length=length, task=task, tokens=s.tokens, answers=s.answers)
        (said,) = generate_rows(model, tokenizer, fork_cache(pre.cache, share_storage=True), 1, feed, s, start)
        rows.append(dict(meta, method="no_press", factor=1.0, score=score(said, s.answers), output=said))
        with one_reconstruction_per_prompt():  # KVzip's scores do not depend on the ratio
            for factor in grid.factors:
                cell = [presses[(m, float(factor))] for m in grid.methods]
                caches = compress_cell(model, pre, cell)
                for method, said in zip(grid.methods, answer_cell(model, tokenizer, cell, caches, feed, s, start)):
                    rows.append(dict(meta, method=method, factor=float(factor), score=score(said, s.answers), output=said))
        del pre
        if checkpoint is not None:
            elapsed = saved["elapsed_s"] + time.time() - began
            checkpoint.write_text(json.dumps(dict(settings=settings, rows=rows, prefill_s=prefill_s, elapsed_s=elapsed)))
    return dict(settings=settings, rows=rows, prefill_s=prefill_s, resumed_prompts=resumed,
                elapsed_s=saved["elapsed_s"] + time.time() - began)


# -- statistics -------------------------------------------------------------------------------------------
def _scores(rows: list[dict], length: int, method: str, factor: float, task: str) -> dict[int, float]:
    f = 1.0 if method == "no_press" else float(factor)
    return {r["seed"]: r["score"] for r in rows
            if r["length"] == length and r["method"] == method and r["factor"] == f and r["task"] == task}


def interval(x: list[float]) -> dict:
    """Mean of one task's scores with its Wilson 95% interval on the summed score (a score in [0, 1] has at
    most the variance of a 0/1 one of the same mean, so this stays valid, and honest at small n, unlike a
    bootstrap, which collapses to a point when every prompt scores the same)."""
    lo, hi = stats.wilson(sum(x), len(x))
    return dict(n=len(x), mean=sum(x) / len(x), lo=lo, hi=hi)


def stratified_mean(groups: list[list[float]], n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of the group (task) means, with a bootstrap interval resampling within each group."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(n_boot, dtype=torch.float64)
    for x in groups:
        t = torch.tensor(x, dtype=torch.float64)
        means += t[torch.randint(0, len(x), (n_boot, len(x)), generator=g)].mean(1)
    means /= len(groups)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return dict(n=sum(len(x) for x in groups), mean=sum(sum(x) / len(x) for x in groups) / len(groups), lo=lo, hi=hi)


def paired_task(a: list[float], b: list[float]) -> dict:
    """Paired difference ``a - b`` on the same prompts: bootstrap interval, and an exact sign test on the
    prompts where they differ (McNemar's test for 0/1 scores); a verdict needs both (p < 0.05)."""
    out = stats.paired_bootstrap(a, b)
    out.update(only_a=sum(x > y for x, y in zip(a, b)), only_b=sum(x < y for x, y in zip(a, b)))
    out["p"] = stats.mcnemar_p(out["only_a"], out["only_b"])
    out["verdict"] = stats.verdict(out["lo"], out["hi"]) if out["p"] < 0.05 else "no difference shown"
    return out


def summarize(result: dict) -> dict:
    """Per (length, factor): every method's per-task and mean scores, and paired differences to no press."""
    s, rows = result["settings"], result["rows"]
    cells = []
    for length in s["lengths"]:
        for factor in s["factors"]:
            tasks = [t for t in s["tasks"] if _scores(rows, length, "no_press", factor, t)]
            if not tasks:
                continue
            cell = dict(length=length, factor=float(factor), tasks=tasks, methods={}, vs_no_press={})
            for method in ("no_press", *s["methods"]):
                per, vs, groups, diffs = {}, {}, [], []
                for t in tasks:
                    mine, base = _scores(rows, length, method, factor, t), _scores(rows, length, "no_press", factor, t)
                    common = sorted(set(mine) & set(base))
                    if not common:
                        continue
                    x, y = [mine[k] for k in common], [base[k] for k in common]
                    per[t] = interval(x)
                    groups.append(x)
                    diffs.append([u - v for u, v in zip(x, y)])
                    if method != "no_press":
                        vs[t] = paired_task(x, y)
                if len(groups) != len(tasks):
                    continue  # a partial run: this method has not answered every task yet
                mean = sum(sum(x) / len(x) for x in groups) / len(groups)
                total = sum(len(x) for x in groups)  # Wilson on all prompts pooled (the task means' mean at equal n)
                per["mean"] = dict(n=total, mean=mean, **dict(zip(("lo", "hi"), stats.wilson(mean * total, total))))
                cell["methods"][method] = per
                if method != "no_press":
                    vs["mean"] = _paired_mean(diffs)
                    cell["vs_no_press"][method] = vs
            for base in result.get("versus", []):  # press against press, on the prompts both answered
                cell.setdefault("versus", {})[base] = {
                    method: _paired_mean(diffs) for method in s["methods"] if method != base
                    and (diffs := _diffs(rows, length, factor, tasks, method, base)) is not None
                }
            cells.append(cell)
    return dict(cells=cells)


def _diffs(rows, length, factor, tasks, a: str, b: str) -> list[list[float]] | None:
    """Per task, ``a - b`` on the prompts both answered (``None`` unless both answered every task)."""
    out = []
    for t in tasks:
        x, y = _scores(rows, length, a, factor, t), _scores(rows, length, b, factor, t)
        common = sorted(set(x) & set(y))
        if not common:
            return None
        out.append([x[k] - y[k] for k in common])
    return out


def _paired_mean(diffs: list[list[float]]) -> dict:
    """The mean over tasks of paired differences: stratified bootstrap interval and a sign test over prompts."""
    d = stratified_mean(diffs)
    flat = [v for x in diffs for v in x]
    p = stats.mcnemar_p(sum(v > 0 for v in flat), sum(v < 0 for v in flat))
    verdict = stats.verdict(d["lo"], d["hi"]) if p < 0.05 else "no difference shown"
    return dict(diff=d["mean"], lo=d["lo"], hi=d["hi"], n=d["n"], p=p, verdict=verdict,
                wins=sum(v > 0 for v in flat), losses=sum(v < 0 for v in flat))


def merge(parts: list[dict]) -> dict:
    """One result from runs of one grid with other presses (presses added later) or other seeds (more prompts).

    Model, lengths, factors and tasks must agree, and the runs' seed ranges must join (overlap or touch);
    presses are the union in order of appearance; a prompt's rows come from every run that answered it, so
    a press run on fewer seeds is paired with no press on its own prompts. Rows two runs both hold (no
    press, a press run twice) must give the same output, which checks that the prompts and the model are
    the same; otherwise the runs disagree and are refused. ``parts`` keep their own environments under
    ``merged_from``.
    """
    if len(parts) < 2:
        raise SystemExit("--merge needs at least two results")
    first = parts[0]["settings"]
    for p in parts[1:]:
        for key in ("lengths", "factors", "tasks"):
            if list(p["settings"][key]) != list(first[key]):
                raise SystemExit(f"--merge: the runs differ in {key} ({first[key]} vs {p['settings'][key]}); merge runs of one grid")
        if p["model"] != parts[0]["model"]:
            raise SystemExit(f"--merge: the runs used other models ({parts[0]['model']} vs {p['model']}); merge runs of one model")
    firsts = [p["settings"].get("first_seed", 0) for p in parts]
    spans = sorted((f, f + p["settings"]["samples"]) for f, p in zip(firsts, parts))
    end = spans[0][1]
    for lo, hi in spans[1:]:
        if lo > end:
            raise SystemExit(f"--merge: no run holds seeds {end}..{lo - 1}; merge runs whose seed ranges join")
        end = max(end, hi)
    rows: dict[tuple, dict] = {}
    for p in parts:
        for r in p["rows"]:
            key = (r["seed"], r["length"], r["task"], r["method"], r["factor"])
            if key in rows and rows[key]["output"] != r["output"]:
                raise SystemExit(f"--merge: the runs disagree on {key}: {rows[key]['output']!r} vs {r['output']!r} "
                                 "(other prompts, model or code); merge runs of the same prompts")
            rows.setdefault(key, r)
    methods = list(dict.fromkeys(m for p in parts for m in p["settings"]["methods"]))
    settings = dict(first, methods=methods, first_seed=spans[0][0], samples=end - spans[0][0], shard=None)
    return dict(settings=settings, rows=list(rows.values()), prefill_s=[x for p in parts for x in p["prefill_s"]],
                model=parts[0]["model"], elapsed_s=sum(p["elapsed_s"] for p in parts),
                merged_from=[entry for p in parts for entry in _provenance(p)])


def _provenance(part: dict) -> list[dict]:
    """The runs behind ``part``: its own ``merged_from`` when it is itself a merge, so re-merging keeps every command."""
    return part.get("merged_from") or [dict(environment=part["environment"], methods=part["settings"]["methods"],
                                            elapsed_s=part["elapsed_s"], prompts=len({(r["seed"], r["task"]) for r in part["rows"]}))]


# -- report -----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    s = result["settings"]
    cells = result["summary"]["cells"]
    counts = sorted({m[t]["n"] for c in cells for m in c["methods"].values() for t in c["tasks"]})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    label = " (QUICK run)" if s.get("quick") else ""
    if result.get("partial"):
        label += f" (PARTIAL: {result['prompts']} of {result['planned']} prompts)"
    times = sorted(result["prefill_s"]) or [0.0]
    md = [
        "## Offline RULER-style benchmark, paired with no press" + label,
        "",
        f"Model {result['model']}; lengths {list(s['lengths'])}; factors {['x%g' % f for f in s['factors']]} (ratio = 1 - 1/factor); "
        f"tasks {', '.join(s['tasks'])}; **n = {n} prompts per task and cell** (seeds {s.get('first_seed', 0)}..{s.get('first_seed', 0) + s['samples'] - 1}), the same prompts "
        f"for every press; question + answer prefix fed uncompressed after the compressed context; one shared full prefill per "
        f"prompt ({result['prompts']} prompts, median prefill {times[len(times) // 2]:.1f} s, wall time {result['elapsed_s'] / 60:.1f} min"
        + (f", {result['environment']['jobs']} worker processes" if result["environment"].get("jobs") else "")
        + "). Each press keeps its registry defaults.",
        "",
        "Cells: RULER string-match score in % (fraction of expected strings in the greedy output) with its Wilson 95% interval "
        "(on the summed score); `mean` is the mean over tasks, with the Wilson interval of all its prompts pooled. `vs no press`: paired difference of the mean in points with its bootstrap 95% interval and an exact "
        "sign test over prompts (the bootstrap resamples prompts within each task); **worse** / **beats** only when the interval excludes zero and p < 0.05.",
    ]
    for part in result.get("merged_from", []):
        env = part["environment"]
        md += ["", (f"Merged from: `{env.get('command', '').strip()}` (commit {env['git_commit']}, {env['date']}, presses "
                    f"{', '.join(part['methods'])}; {part['prompts']} prompts, {part['elapsed_s'] / 60:.1f} min wall, load average "
                    f"{env.get('load_average_1min')} at start).")]
    for length in s["lengths"]:
        rows = [c for c in cells if c["length"] == length]
        if not rows:
            continue
        tasks = rows[0]["tasks"]
        md += ["", f"### {length} tokens", "", "| factor | press | mean | vs no press | " + " | ".join(tasks) + " |",
               "|---|---|---|---|" + "---|" * len(tasks)]
        first = True
        for c in rows:
            for method, per in c["methods"].items():
                if method == "no_press" and not first:
                    continue
                fmt = lambda m: f"{_pct(m['mean'])} [{_pct(m['lo'])}, {_pct(m['hi'])}]"  # noqa: E731
                vs = c["vs_no_press"].get(method, {}).get("mean")
                cmp = "-" if vs is None else (f"{100 * vs['diff']:+.0f} [{100 * vs['lo']:+.0f}, {100 * vs['hi']:+.0f}], p={vs['p']:.2g}"
                                              + (f" **{vs['verdict']}**" if vs["verdict"] != "no difference shown" else ""))
                factor = "x1" if method == "no_press" else f"x{c['factor']:g}"
                md.append(f"| {factor} | {method} | **{fmt(per['mean'])}** | {cmp} | " + " | ".join(fmt(per[t]) for t in tasks) + " |")
            first = False
        for base in result.get("versus", []):
            md += ["", f"Paired against `{base}` ({length} tokens; mean over tasks, points, on the prompts both answered):", "",
                   "| factor | press | minus " + base + " | wins / losses |", "|---|---|---|---|"]
            for c in rows:
                for method, d in c.get("versus", {}).get(base, {}).items():
                    verdict = f" **{d['verdict']}**" if d["verdict"] != "no difference shown" else ""
                    md.append(f"| x{c['factor']:g} | {method} | {100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], "
                              f"p={d['p']:.2g}{verdict} | {d['wins']} / {d['losses']} |")
    return "\n".join(md + markdown_footer(result))


def figure(result: dict):
    """Mean score against compression factor, one panel per length, one line per press (95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, cells = result["settings"], result["summary"]["cells"]
    lengths = [n for n in s["lengths"] if any(c["length"] == n for c in cells)]
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        mine = [c for c in cells if c["length"] == length]
        base = mine[0]["methods"]["no_press"]["mean"]
        ax.axhline(100 * base["mean"], color="black", lw=1, label="no press")
        ax.axhspan(100 * base["lo"], 100 * base["hi"], color="black", alpha=0.08)
        for k, method in enumerate(s["methods"]):
            pts = [(c["factor"], c["methods"][method]["mean"]) for c in mine if method in c["methods"]]
            if not pts:
                continue
            x = [f * 1.03 ** (k - len(s["methods"]) / 2) for f, _ in pts]  # side by side, not on top of each other
            y = [100 * m["mean"] for _, m in pts]
            err = [[100 * (m["mean"] - m["lo"]) for _, m in pts], [100 * (m["hi"] - m["mean"]) for _, m in pts]]
            n = pts[0][1]["n"]  # a press merged from fewer seeds says so
            label = method if n == base["n"] else f"{method} (n={n // len(mine[0]['tasks'])}/task)"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(s["factors"]), [f"x{f:g}" for f in s["factors"]])
        ax.set_ylim(0, 100)
        ax.set_xlabel("compression factor")
        ax.set_ylabel("mean RULER-style score (%)")
        ax.set_title(f"{result['model']}, {length} tokens, n={mine[0]['methods']['no_press']['mean']['n'] // len(mine[0]['tasks'])}/task")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


# -- command line -----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded model name or local path")
    parser.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens (template and question included)")
    parser.add_argument("--factors", default="2,4,8", help="compression factors (x4 keeps a quarter: ratio 0.75)")
    parser.add_argument("--samples", type=int, default=20, help="prompts per task and length (seeds F..F+N-1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="F, the first prompt seed (e.g. choose settings on seeds 0-1, report from --first-seed 2)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="tasks (default: all): " + ", ".join(TASKS))
    parser.add_argument("--methods", default=None, help="registered press names (default: every registered press)")
    parser.add_argument("--quick", action="store_true",
                        help="2048 tokens, 1 prompt per task (10 prompts) to validate the pipeline, not to rank presses; "
                             "with --jobs 2 about 6 min at ~70 s a prompt per worker (27 min measured at load average 11)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each, sharing the prompts")
    parser.add_argument("--shard", default=None, help="I/N: run only prompts I, I+N, ... (what each --jobs worker does)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: evaluations/results)")
    parser.add_argument("--summarize", action="store_true",
                        help="with --jobs: write the result from the workers' checkpoints so far (a stopped run, labelled "
                             "partial), or re-render <name>.json when no worker files are left")
    parser.add_argument("--name", default=None, help="basename of the result files (default ruler / ruler.quick); "
                                                     "rerunning the same command resumes from <name>.checkpoint.json")
    parser.add_argument("--versus", action="append", default=[], metavar="PRESS",
                        help="also pair every press against PRESS (repeatable), e.g. --versus kvzip")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULT",
                        help="write one result (--name) from finished results (<name>.json) of one grid with other presses "
                             "or other seeds; rows both hold must agree")


def _grid(args: argparse.Namespace, shard: tuple[int, int] | None) -> Grid:
    grid = Grid(
        lengths=(2048,) if args.quick else tuple(parse_list(args.lengths, int)),
        factors=tuple(parse_list(args.factors, float)),
        samples=1 if args.quick else args.samples,
        first_seed=args.first_seed,
        tasks=tuple(parse_list(args.tasks)),
        methods=tuple(parse_list(args.methods)) if args.methods else tuple(list_presses()),
        quick=args.quick,
        shard=shard,
    )
    unknown = [t for t in grid.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    if grid.samples < 1:
        raise SystemExit(f"--samples must be at least 1, got {grid.samples}")
    for m in grid.methods:
        for f in grid.factors:
            build_press(m, ratio=factor_to_ratio(f))  # a bad name or factor fails before the model loads
    return grid


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    name = args.name or ("ruler.quick" if args.quick else "ruler")
    if args.merge is not None:
        result = merge([json.loads(path.read_text()) for path in args.merge])
        result["environment"] = environment()
        return _write(args.out, name, result, versus=args.versus)
    shard = _parse_shard(args.shard)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    grid = _grid(args, shard)
    if args.summarize and args.jobs < 2:
        raise SystemExit("--summarize merges the checkpoints of a --jobs N run: pass the same --jobs N")
    if args.jobs > 1:
        if shard is not None:
            raise SystemExit("--jobs and --shard do not combine: --jobs starts the shards itself")
        return _run_jobs(args, name, grid)
    model, tokenizer = load_model(args.model)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / f"{name}.checkpoint.json"
    result = run_grid(model, tokenizer, grid, checkpoint=checkpoint)
    result.update(model=args.model, environment=env)
    checkpoint.unlink(missing_ok=True)
    return _write(args.out, name, result, figures=shard is None, versus=args.versus)


def _run_jobs(args: argparse.Namespace, name: str, grid: Grid) -> int:
    """``--jobs`` shards as child processes (one thread each), then one result from their rows."""
    import subprocess
    import sys

    forwarded = ["--model", args.model, "--lengths", args.lengths, "--factors", args.factors, "--samples", str(args.samples),
                 "--first-seed", str(args.first_seed),
                 "--tasks", args.tasks, "--threads", "1", "--out", str(args.out)]
    forwarded += ["--methods", args.methods] if args.methods else []
    forwarded += ["--quick"] if args.quick else []
    names = [f"{name}.shard{i}of{args.jobs}" for i in range(args.jobs)]
    start, children = time.time(), []
    earlier = max((json.loads(c.read_text())["elapsed_s"] for c in (args.out / f"{n}.checkpoint.json" for n in names) if c.exists()),
                  default=0.0)  # a resumed run's wall time so far, as its workers recorded it
    if not args.summarize:
        for i, shard_name in enumerate(names):
            cmd = [sys.executable, "-m", "kvpress_like.cli", "eval", "ruler", *forwarded, "--shard", f"{i}/{args.jobs}", "--name", shard_name]
            children.append(subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL))
        failed = [n for n, child in zip(names, children) if child.wait() != 0]
        if failed:
            raise SystemExit(f"ruler workers failed: {', '.join(failed)} (rerun the same command to resume from their checkpoints)")
    parts = []
    for n in names:  # a finished shard's result, else (--summarize) its checkpoint
        path = next((p for p in (args.out / f"{n}.json", args.out / f"{n}.checkpoint.json") if p.exists()), None)
        if path is None and args.summarize and (args.out / f"{name}.json").exists() and not parts:
            return _write(args.out, name, json.loads((args.out / f"{name}.json").read_text()), versus=args.versus)  # re-render
        if path is None:
            raise SystemExit(f"no result or checkpoint of {n} in {args.out}: run the command without --summarize first")
        parts.append(json.loads(path.read_text()))
    result = dict(
        settings=dict(asdict(grid)), rows=[r for p in parts for r in p["rows"]],
        prefill_s=[x for p in parts for x in p["prefill_s"]], model=args.model,
        environment=dict(environment(), torch_threads=1, jobs=args.jobs),
        elapsed_s=max(p["elapsed_s"] for p in parts) if args.summarize else earlier + time.time() - start,
    )
    code = _write(args.out, name, result, versus=args.versus)
    if not args.summarize:
        for n in names:
            for suffix in (".json", ".md"):
                (args.out / f"{n}{suffix}").unlink(missing_ok=True)
    return code


def _write(out: Path, name: str, result: dict, figures: bool = True, versus: list[str] | None = None) -> int:
    s = result["settings"]
    if versus:
        missing = [v for v in versus if v not in s["methods"]]
        if missing:
            raise SystemExit(f"--versus {', '.join(missing)}: not a press of this run ({', '.join(s['methods'])})")
        result["versus"] = list(versus)
    result["prompts"] = len({(r["seed"], r["length"], r["task"]) for r in result["rows"]})
    result["planned"] = len(prompt_order(Grid(**dict(s, shard=None))))
    result["partial"] = s["shard"] is None and result["prompts"] < result["planned"]
    result["summary"] = summarize(result)
    text = markdown(result)
    figs = {f"{name}.png": figure(result)} if figures and result["summary"]["cells"] else None
    path = write_result(out, name, result, text, figs)
    print(text)
    print(f"wrote {path}")
    return 0
