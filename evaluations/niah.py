"""``kvpress-like eval niah``: needle-in-a-haystack accuracy grid per method and compression ratio.

Grid: context lengths x needle depths x seeds x haystacks (the classic repetitive pass-key filler and
natural prose from the offline corpus) x methods x compression factors. Methods are no press, Q-Filters,
K-norm, SnapKV and StreamingLLM, plus the variants small models need (first two layers left
uncompressed; 4 sink tokens and a 64-token recent window protected, combined with a scorer) and an
*oracle* that always keeps the needle's tokens (the rest ranked by Q-Filters) to show the headroom of a
better scorer.

Question placement: by default the question comes after the compressed context and is not compressed
(``uncompressed(cache)``), as in the Q-Filters paper; ``--compress-question`` compresses it with the
context (then the first answer token comes from the prefill's own logits, as in any compress-then-generate
pipeline).

Shared prefill. With a single-call prefill, a press never changes the prefill's computation: every layer
attends over all prompt tokens and only *stores* the selected ones (query-dependent presses select from
the same queries). So each haystack is prefilled once without a press, and each (method, ratio) gets a
copy of that cache compressed exactly as the pressed prefill would have compressed it
(:func:`compress_prefilled`; a test checks equality with a real pressed prefill). This makes the grid
~20x cheaper on CPU.

Scoring (``--scoring``): ``forced`` (default) feeds the question and the answer in one pass and checks
the model's greedy prediction at every answer token: exact match is then the same event as greedy
decoding producing the answer's tokens; partial is the share of digit tokens predicted right.
``generate`` decodes greedily instead (slower) and counts digits recovered in place.

Lengths are checked first: at each length the uncompressed model answers every cell, and a (length,
haystack) whose no-press exact-match accuracy is below ``--min-baseline`` is dropped from the summaries
(its rows stay in the JSON, flagged).
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_like import QFilterPress, SnapKVPress, press, uncompressed
from kvpress_like.base import Press
from kvpress_like.cache import PressedLayer
from kvpress_like.data import passkey_sample
from kvpress_like.integrations.transformers import cache_kwargs

from . import passkey
from .common import (
    add_model_argument, add_out_argument, add_threads_argument, build_press, command_line, environment,
    environment_markdown, factor_to_ratio, set_threads, write_result,
)

METHODS = ("no_press", "qfilters", "knorm", "snapkv", "streaming_llm")
#: variant name -> (base method, extra settings); "oracle" is handled separately
VARIANTS = {
    "qfilters+skip01": ("qfilters", dict(skip_layers=(0, 1))),
    "knorm+skip01": ("knorm", dict(skip_layers=(0, 1))),
    "qfilters+sink4+win64": ("qfilters", dict(n_sink=4, window=64)),
    "knorm+sink4+win64": ("knorm", dict(n_sink=4, window=64)),
    "oracle": ("oracle", {}),
}
HAYSTACKS = ("repetitive", "prose")


@dataclass
class NeedleOraclePress(QFilterPress):
    """Keeps the needle's tokens whatever their score; other tokens are ranked by Q-Filters.

    Not a usable method (it knows where the answer is): it bounds what a better scorer could reach at a
    given budget. Deliberately not registered.
    """

    name = "needle_oracle"
    needle_span: tuple[int, int] = (0, 0)

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        scores = super().score(layer_idx, keys, values, positions, reading_position)
        start, end = self.needle_span
        return scores.masked_fill((positions >= start) & (positions < end), 1e9)


def make_press(method: str, factor: float, filters=None, needle_span=(0, 0)) -> Press | None:
    """The press for a registered name or a variant at compression ``factor`` (None for no press).

    Built through the registry (:func:`~.common.build_press`); only the oracle, which is deliberately not
    registered, is constructed here. ``filters`` (tests) are handed to Q-Filters presses.
    """
    ratio = factor_to_ratio(factor)
    base, extra = VARIANTS.get(method, (method, {}))
    if base == "oracle":
        return NeedleOraclePress(ratio=ratio, filters=filters, needle_span=tuple(needle_span))
    if base == "qfilters" and filters is not None:
        extra = dict(extra, filters=filters)
    return build_press(base, ratio=ratio, **extra)


def compress_prefilled(model, cache: DynamicCache, p: Press | None, queries: dict[int, torch.Tensor]) -> DynamicCache:
    """A copy of an unpressed prefill cache, compressed as a prefill under ``press(model, p)`` would be
    (:func:`.passkey.compress_prefilled`; must run inside ``press(model, p)``)."""
    return passkey.compress_prefilled(model, passkey.Prefill(cache, queries, None), p)


def prefill(model, ids: torch.Tensor, window: int) -> tuple[DynamicCache, dict[int, torch.Tensor], torch.Tensor]:
    """Unpressed prefill: the cache, each full layer's last ``window`` queries, and the last logits."""
    shared = passkey.prefill(model, ids, window=window)
    return shared.cache, shared.queries, shared.logits


def _digit_mask(tokenizer, answer_ids: list[int]) -> list[bool]:
    return [any(c.isdigit() for c in tokenizer.decode([t])) for t in answer_ids]


@torch.no_grad()
def answer(
    model, tokenizer, cache, question_ids: torch.Tensor, answer_text: str, first_logits: torch.Tensor | None,
    scoring: str = "forced", max_new_tokens: int = 8,
) -> tuple[float, float, str]:
    """Score the model's answer on a prepared cache: (exact, partial, what it said).

    ``first_logits`` are the prefill's last logits when the question was compressed with the context
    (then ``question_ids`` is empty); otherwise the question is fed first. Must run inside
    ``uncompressed(cache)`` for the answer tokens not to be compressed.
    """
    device = model.device
    target = tokenizer(" " + answer_text, add_special_tokens=False)["input_ids"]
    if scoring == "forced":
        feed = torch.tensor([question_ids[0].tolist() + target[:-1]], device=device)
        if first_logits is None:
            logits = model(feed, **cache_kwargs(cache)).logits[0, -len(target):]
        else:
            rest = model(feed, **cache_kwargs(cache)).logits[0] if feed.shape[1] else first_logits.new_empty(0, first_logits.shape[-1])
            logits = torch.cat([first_logits.reshape(1, -1), rest], 0)[-len(target):]
        pred = logits.argmax(-1).tolist()
        hits = [p == t for p, t in zip(pred, target)]
        digits = [h for h, d in zip(hits, _digit_mask(tokenizer, target)) if d] or hits
        return float(all(hits)), sum(digits) / len(digits), tokenizer.decode(pred)
    if scoring != "generate":
        raise ValueError(f"scoring must be 'forced' or 'generate', got {scoring!r}")
    logits = first_logits if first_logits is not None else model(question_ids.to(device), **cache_kwargs(cache)).logits[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.reshape(-1).argmax())
        out.append(token)
        text = tokenizer.decode(out)
        run = "".join(c for c in text.split(".")[0] if c.isdigit())
        if len(run) >= len(answer_text) or (run and not text.rstrip()[-1:].isdigit()):
            break
        logits = model(torch.tensor([[token]], device=device), **cache_kwargs(cache)).logits[:, -1]
    text = tokenizer.decode(out)
    digits = ""
    for c in text.lstrip():
        if not c.isdigit():
            break
        digits += c
    partial = sum(a == b for a, b in zip(digits, answer_text)) / len(answer_text)
    return float(digits == answer_text), partial, text


@dataclass
class Grid:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.25, 0.75)
    factors: tuple[float, ...] = (2, 4, 8, 16)
    seeds: tuple[int, ...] = (0,)
    haystacks: tuple[str, ...] = HAYSTACKS
    methods: tuple[str, ...] = METHODS
    variants: tuple[str, ...] = tuple(VARIANTS)
    compress_question: bool = False
    scoring: str = "forced"
    min_baseline: float = 0.5


def run_grid(model, tokenizer, grid: Grid, filters=None, progress: bool = True) -> dict:
    """Run the needle grid; returns ``{"settings", "baseline", "dropped", "rows", "summary"}``."""
    for h in grid.haystacks:
        if h not in HAYSTACKS:
            raise ValueError(f"unknown haystack {h!r}; use {', '.join(HAYSTACKS)}")
    names = [m for m in grid.methods if m != "no_press"] + list(grid.variants)
    for m in names:
        make_press(m, 2)  # validate names early
    snap_window = SnapKVPress().window_size  # queries kept per layer for SnapKV's selection
    rows, baseline, dropped = [], {}, []
    bar = tqdm(total=len(grid.lengths) * len(grid.haystacks) * len(grid.depths) * len(grid.seeds) * (1 + len(names) * len(grid.factors)),
               desc="niah", disable=not progress)
    for length in grid.lengths:
        cells = []
        for haystack in grid.haystacks:
            for depth in grid.depths:
                for seed in grid.seeds:
                    s = passkey_sample(tokenizer, length, depth, seed, haystack=haystack)
                    ids = torch.cat([s.context_ids, s.question_ids], 1) if grid.compress_question else s.context_ids
                    question = s.question_ids[:, :0] if grid.compress_question else s.question_ids
                    cache, queries, last = prefill(model, ids, snap_window)
                    first = last if grid.compress_question else None
                    base = compress_prefilled(model, cache, None, queries)  # a copy, nothing evicted
                    exact, partial, said = answer(model, tokenizer, base, question, s.answer, first, grid.scoring)
                    del base
                    key = dict(haystack=haystack, length=length, depth=depth, seed=seed)
                    rows.append(dict(key, method="no_press", factor=1.0, exact=exact, partial=partial, output=said,
                                     kv_tokens=length))
                    bar.update()
                    cells.append((key, s, cache, queries, question, first))
        # drop (length, haystack) where the uncompressed model fails before spending time on presses
        for haystack in grid.haystacks:
            accs = [r["exact"] for r in rows if r["method"] == "no_press" and r["length"] == length and r["haystack"] == haystack]
            acc = sum(accs) / len(accs)
            baseline.setdefault(haystack, {})[length] = acc
            if acc < grid.min_baseline:
                dropped.append(dict(haystack=haystack, length=length, no_press_accuracy=acc))
        for key, s, cache, queries, question, first in cells:
            if any(d["haystack"] == key["haystack"] and d["length"] == length for d in dropped):
                bar.update(len(names) * len(grid.factors))
                continue
            for method in names:
                for factor in grid.factors:
                    p = make_press(method, factor, filters, s.needle_span)
                    with torch.no_grad(), press(model, p):
                        pressed = compress_prefilled(model, cache, p, queries)
                        kept = sum(l.n for l in pressed.layers if isinstance(l, PressedLayer))
                        n_pressed = sum(isinstance(l, PressedLayer) for l in pressed.layers)
                        with uncompressed(pressed):
                            exact, partial, said = answer(model, tokenizer, pressed, question, s.answer, first, grid.scoring)
                    rows.append(dict(key, method=method, factor=float(factor), exact=exact, partial=partial, output=said,
                                     kv_tokens=kept / n_pressed if n_pressed else length))
                    del pressed
                    bar.update()
        del cells
    bar.close()
    return dict(
        settings=dataclasses.asdict(grid),
        baseline=baseline,
        dropped=dropped,
        rows=rows,
        summary=summarize(rows, dropped),
    )


def summarize(rows: list[dict], dropped: list[dict]) -> dict:
    """Mean exact/partial per haystack, method and factor, over kept (length, haystack) cells."""
    gone = {(d["haystack"], d["length"]) for d in dropped}
    out: dict = {}
    for r in rows:
        if (r["haystack"], r["length"]) in gone:
            continue
        factors = [1.0] if r["method"] == "no_press" else [r["factor"]]
        for f in factors:
            cell = out.setdefault(r["haystack"], {}).setdefault(r["method"], {}).setdefault(str(f), [0.0, 0.0, 0])
            cell[0] += r["exact"]
            cell[1] += r["partial"]
            cell[2] += 1
    return {h: {m: {f: dict(exact=v[0] / v[2], partial=v[1] / v[2], n=v[2]) for f, v in fs.items()} for m, fs in ms.items()}
            for h, ms in out.items()}


# -- reporting -------------------------------------------------------------------------------------
def _label(f: float) -> str:
    return f"x{f:g}"


def heatmaps(result: dict, out_dir: Path, stem: str = "niah") -> list[Path]:
    """One PNG per haystack: rows = methods, columns = factors; each panel is length x depth accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, settings = result["rows"], result["settings"]
    gone = {(d["haystack"], d["length"]) for d in result["dropped"]}
    lengths, depths = list(settings["lengths"]), list(settings["depths"])
    methods = [m for m in settings["methods"] if m != "no_press"] + list(settings["variants"])
    factors = list(settings["factors"])
    paths = []
    for haystack in settings["haystacks"]:
        fig, axes = plt.subplots(len(methods) + 1, len(factors), figsize=(2.2 * len(factors) + 1, 1.6 * (len(methods) + 1)),
                                 squeeze=False)
        for i, method in enumerate(["no_press", *methods]):
            for j, factor in enumerate(factors):
                ax = axes[i][j]
                grid = torch.full((len(depths), len(lengths)), float("nan"))
                for a, d in enumerate(depths):
                    for b, n in enumerate(lengths):
                        if (haystack, n) in gone:
                            continue
                        vals = [r["exact"] for r in rows if r["haystack"] == haystack and r["length"] == n
                                and r["depth"] == d and r["method"] == method and (method == "no_press" or r["factor"] == factor)]
                        if vals:
                            grid[a, b] = sum(vals) / len(vals)
                ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
                ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
                if i == 0:
                    ax.set_title("no press" if method == "no_press" else "", fontsize=7)
                if method != "no_press" and i == 1:
                    ax.set_title(_label(factor), fontsize=8)
                if j == 0:
                    ax.set_ylabel(method, fontsize=6)
                if method == "no_press" and j > 0:
                    ax.set_visible(False)
        fig.suptitle(f"Needle in a haystack ({haystack}): exact match; x = context tokens, y = depth", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}_{haystack}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _table(summary: dict, haystack: str, methods: list[str], factors: list[float]) -> str:
    head = "| method | " + " | ".join(_label(f) for f in factors) + " |\n|---|" + "---|" * len(factors) + "\n"
    lines = []
    base = summary.get(haystack, {}).get("no_press", {}).get("1.0")
    if base:
        lines.append("| no press | " + " | ".join(f"{base['exact']:.2f} ({base['partial']:.2f})" for _ in factors) + " |")
    for m in methods:
        cells = summary.get(haystack, {}).get(m, {})
        lines.append(f"| {m} | " + " | ".join(
            f"{cells[str(float(f))]['exact']:.2f} ({cells[str(float(f))]['partial']:.2f})" if str(float(f)) in cells else "-"
            for f in factors) + " |")
    return head + "\n".join(lines) + "\n"


def targets(summary: dict, factors: list[float]) -> list[str]:
    """The issue's pass-key targets, checked against the measured summary (nothing assumed)."""
    rep = summary.get("repetitive", {})
    out = []
    if "no_press" in rep and "qfilters" in rep and "2.0" in rep["qfilters"]:
        q2, base = rep["qfilters"]["2.0"]["exact"], rep["no_press"]["1.0"]["exact"]
        out.append(f"- Q-Filters at x2 {'matches' if q2 >= base else 'does NOT match'} no press on the pass-key test: "
                   f"{q2:.2f} vs {base:.2f}.")
    others = [m for m in ("knorm", "snapkv", "streaming_llm") if m in rep]
    for f in factors:
        key = str(float(f))
        if f < 4 or f > 16 or "qfilters" not in rep or key not in rep["qfilters"]:
            continue
        q = rep["qfilters"][key]["exact"]
        beaten = [m for m in others if key in rep[m] and q > rep[m][key]["exact"]]
        missed = [f"{m} {rep[m][key]['exact']:.2f}" for m in others if key in rep[m] and q <= rep[m][key]["exact"]]
        verdict = "beats all others" if not missed else "does NOT beat " + ", ".join(missed)
        out.append(f"- {_label(f)}: Q-Filters {q:.2f} {verdict}" + (f" (beats {', '.join(beaten)})" if beaten and missed else "") + ".")
    return out


def markdown(result: dict, env: dict, model_name: str, command: str, images: list[Path], elapsed: float) -> str:
    s = result["settings"]
    methods = [m for m in s["methods"] if m != "no_press"] + list(s["variants"])
    factors = list(s["factors"])
    md = [
        "## Needle in a haystack" + (" (question compressed with the context)" if s["compress_question"] else "") + "\n",
        environment_markdown(env),
        f"- Model: {model_name}; lengths {list(s['lengths'])}, depths {list(s['depths'])}, seeds {list(s['seeds'])}, "
        f"factors {[_label(f) for f in factors]}, haystacks {list(s['haystacks'])}; question "
        f"{'compressed with the context' if s['compress_question'] else 'after the compressed context (uncompressed)'}; "
        f"scoring `{s['scoring']}`; wall time {elapsed / 60:.1f} min",
        f"- Command: `{command}`\n",
        "Variants: `+skip01` leaves layers 0 and 1 uncompressed; `+sink4+win64` protects 4 sink tokens and the 64 most "
        "recent context tokens; `oracle` always keeps the needle's tokens and ranks the rest with Q-Filters (an upper "
        "bound for a better scorer, not a method). Cells: exact match (partial = share of answer digits predicted).\n",
        "### Uncompressed baseline per length (exact match)\n",
        "| haystack | " + " | ".join(str(n) for n in s["lengths"]) + " |\n|---|" + "---|" * len(s["lengths"]),
    ]
    for h, accs in result["baseline"].items():
        md.append(f"| {h} | " + " | ".join(f"{accs.get(n, accs.get(str(n), float('nan'))):.2f}" for n in s["lengths"]) + " |")
    if result["dropped"]:
        md.append("\nDropped (no-press accuracy below "
                  f"{s['min_baseline']}): " + ", ".join(f"{d['haystack']} @ {d['length']} ({d['no_press_accuracy']:.2f})"
                                                        for d in result["dropped"]) + ".")
    else:
        md.append(f"\nNo length dropped (threshold {s['min_baseline']}).")
    for h in s["haystacks"]:
        md.append(f"\n### {h} haystack: mean exact (partial) over kept lengths, depths and seeds\n")
        md.append(_table(result["summary"], h, methods, factors))
    md.append("### Against the issue's targets (pass-key haystack)\n")
    md.extend(targets(result["summary"], factors) or ["- not measurable with these settings"])
    md.append("")
    md.extend(f"![{p.stem}]({p.name})" for p in images)
    return "\n".join(md) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded model name or local path")
    parser.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens (comma-separated)")
    parser.add_argument("--depths", default="0.25,0.75", help="needle depths in [0, 1]")
    parser.add_argument("--factors", default="2,4,8,16", help="compression factors (x2 keeps half; 1.33 ... 32)")
    parser.add_argument("--seeds", default="0", help="haystack/pass-key seeds (each doubles the run time)")
    parser.add_argument("--haystacks", default=",".join(HAYSTACKS), help=f"comma-separated, from {', '.join(HAYSTACKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, or 'none'")
    parser.add_argument("--compress-question", action="store_true", help="compress the question with the context")
    parser.add_argument("--scoring", choices=("forced", "generate"), default="forced",
                        help="forced: one pass over question + answer (default); generate: greedy decoding")
    parser.add_argument("--min-baseline", type=float, default=0.5,
                        help="drop a (length, haystack) whose no-press exact-match accuracy is below this")
    add_threads_argument(parser)
    add_out_argument(parser)
    parser.add_argument("--name", default="niah", help="basename of the result files")


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    grid = Grid(
        lengths=tuple(int(x) for x in _floats(args.lengths)),
        depths=_floats(args.depths),
        factors=_floats(args.factors),
        seeds=tuple(int(x) for x in _floats(args.seeds)),
        haystacks=tuple(x for x in args.haystacks.split(",") if x),
        methods=tuple(x for x in args.methods.split(",") if x),
        variants=() if args.variants == "none" else tuple(x for x in args.variants.split(",") if x),
        compress_question=args.compress_question,
        scoring=args.scoring,
        min_baseline=args.min_baseline,
    )
    for f in grid.factors:
        factor_to_ratio(f)
    model, tokenizer = load_model(args.model)
    env = environment()
    start = time.time()
    result = run_grid(model, tokenizer, grid)
    elapsed = time.time() - start
    result.update(model=args.model, environment=env, command=command_line(), elapsed_s=elapsed)
    args.out.mkdir(parents=True, exist_ok=True)
    images = heatmaps(result, args.out, args.name)
    write_csv(result["rows"], args.out / f"{args.name}.csv")
    path = write_result(args.out, args.name, result, markdown(result, env, args.model, command_line(), images, elapsed))
    print(markdown(result, env, args.model, command_line(), images, elapsed))
    print(f"wrote {path}")
    return 0
