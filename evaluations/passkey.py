"""``kvpress-like eval passkey``: pass-key retrieval with enough prompts to tell methods apart, compared in pairs.

Grid: haystacks x context lengths x compression factors; in each (haystack, length, factor) cell every method
answers the same prompts (``depths x keys``, the needle at evenly spaced depths), so methods are compared *paired*: the bootstrap interval of the difference in exact-match
accuracy (prompts resampled with their pair of outcomes) and McNemar's exact p on the prompts where the two
disagree. A table says "beats" only when the paired interval excludes zero.

Haystacks (``--haystack``): ``filler``, the classic repetitive pass-key text, and ``prose``, a window of real
English prose (``pydoc_data.topics``, chosen by the key's seed). Both are measured by default: on filler every
token but the needle repeats, so a scorer that keeps any distinctive token keeps the key, and filler-only
numbers overstate what a press keeps in a real document (issue 21: the same presses that keep the key on
filler lose it on prose).

Methods: no press and every registered press (plugins included), each with its own default settings and
``ratio = 1 - 1/factor``; query-dependent presses (SnapKV) are evaluated from the same prefill with the
window of queries it records.

One shared prefill per prompt. With a single-call prefill a press never changes the prefill's computation:
every layer attends over all prompt tokens and the press only decides which entries are *stored* (the
library's tested guarantee that pruning equals masking). So each prompt's context is prefilled once into a
full ``DynamicCache``, and each (method, factor) gets a compressed copy built by the cache engine itself
(:func:`compress_prefilled`: the press scores and selects from the full cache exactly as at the end of a
pressed prefill, with the same reading position); ``tests/evaluations/test_passkey.py`` checks that this equals
a real pressed prefill. The question is then fed *uncompressed* after the compressed context (as the
Q-Filters paper evaluates), and, as the ``compressed`` variant, prefilled *with* the context and
compressed along with it (the full cache of context + question is the shared prefill then).

Scoring: greedy decoding after the question, as a user would run it; a prompt counts as retrieved when the
pass key appears in the first ``len(answer tokens) + ANSWER_SLACK`` generated tokens (the usual pass-key
criterion, key in the output). A teacher-forced check of the answer tokens, which this replaced, also
failed every prompt whose answer began "is a 60494": on SmolLM2 most failures of the compressed caches were
that format token, not a lost key.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_like import press, uncompressed
from kvpress_like.base import Press
from kvpress_like.cache import PressedLayer
from kvpress_like.cache_ops import fork_cache
from kvpress_like.data import passkey_sample
from kvpress_like.models import chat_frame
from kvpress_like.integrations.context import adopt_layer
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs, patched_attention
from kvpress_like.methods import AdaptivePress, KVzipPress
from kvpress_like.registry import list_presses

from . import stats
from .common import (
    add_model_argument,
    RESULTS_DIR, build_press, environment, factor_to_ratio, markdown_footer, one_reconstruction_per_prompt, parse_list,
    set_threads, write_result,
)

VARIANTS = ("uncompressed", "compressed")
#: ``--haystack`` name -> :func:`kvpress_like.data.passkey_sample`'s haystack
HAYSTACKS = {"filler": "repetitive", "prose": "prose"}
HAYSTACK_TEXT = {"filler": "the classic repetitive text", "prose": "real English prose from pydoc_data.topics"}
#: ``--template``: the plain pass-key text (the paper's), or the model's chat template around it
TEMPLATES = ("plain", "chat")
#: what the chat prompt asks and how the assistant's answer starts (RULER's answer prefix)
CHAT_QUESTION = "\n\nWhat is the pass key?"
CHAT_ANSWER_PREFIX = "The pass key is"
#: queries kept from the prefill for query-dependent presses (SnapKV's default window is 64)
QUERY_WINDOW = 64
#: tokens decoded beyond the answer's own before a prompt counts as failed
ANSWER_SLACK = 3


@dataclass
class Grid:
    """The prompts and settings of one run (``--quick`` shrinks depths and keys, never the methods)."""

    lengths: tuple[int, ...] = (2048, 4096)
    factors: tuple[float, ...] = (4, 8, 16)
    depths: int = 12
    keys: int = 5
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(list_presses()))
    variants: tuple[str, ...] = VARIANTS
    haystacks: tuple[str, ...] = tuple(HAYSTACKS)
    template: str = "plain"
    reference: str = "qfilters"
    quick: bool = False  # recorded so every result file says whether it came from --quick
    shard: tuple[int, int] | None = None  # (i, n): only prompts i, i + n, ... of prompt_order (see --jobs)

    def depth_values(self) -> list[float]:
        """Evenly spaced needle depths, centred in ``depths`` equal bins of [0, 1]."""
        return [round((i + 0.5) / self.depths, 4) for i in range(self.depths)]


@dataclass
class Prefill:
    """One prompt's shared prefill: the full cache, the last queries of each full layer, the last logits."""

    cache: DynamicCache
    queries: dict[int, torch.Tensor]
    logits: torch.Tensor
    ids: torch.Tensor | None = None  # every cached token's id (KVzip re-reads them)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache: DynamicCache | None = None, previous: Prefill | None = None,
            window: int = QUERY_WINDOW) -> Prefill:
    """Unpressed forward of ``ids`` into a full cache (a copy of ``previous``'s when continuing one).

    Records each full-attention layer's last ``window`` queries (over both calls when continuing).
    """
    queries: dict[int, torch.Tensor] = {}

    def keep(module, query, key, value) -> None:
        q = query.detach()
        if previous is not None:
            q = torch.cat([previous.queries[module.layer_idx], q], dim=2)
        queries[module.layer_idx] = q[:, :, -window:].clone()

    full = [layer for layer in attention_layers(model) if not layer.sliding]
    cache = DynamicCache(config=model.config) if previous is None else fork_cache(previous.cache, share_storage=True)
    with patched_attention(model, full, keep):
        logits = model(ids.to(model.device), **cache_kwargs(cache), logits_to_keep=1).logits[:, -1]
    return Prefill(cache, queries, logits, ids if previous is None or previous.ids is None else torch.cat([previous.ids, ids], 1))


def compress_prefilled(model, shared: Prefill, p: Press | None) -> DynamicCache:
    """A copy of the shared full cache, compressed as a single pressed prefill of the same tokens would be.

    Must run inside ``press(model, p)`` (which prepares ``p``). Each full layer is adopted exactly as press()
    adopts it (:func:`~kvpress_like.integrations.context.adopt_layer`): the engine takes the layer over in
    one update, scoring and selecting with the reading position at the end of the prefill; query-dependent
    presses then prune with the recorded queries. ``p=None`` gives a plain copy.
    """
    new = fork_cache(shared.cache, share_storage=True)
    if p is None:
        return new
    # KVzip (alone or inside AdaKV) scores with a reconstruction pass once every layer holds the prompt
    kvzip = p.base if isinstance(p, AdaptivePress) else p
    kvzip = kvzip if isinstance(kvzip, KVzipPress) else None
    if kvzip and shared.ids is None:
        raise ValueError("KVzipPress re-reads the prompt: the shared prefill must record its ids (Prefill.ids).")
    with kvzip.deferred() if kvzip else nullcontext():
        for layer in attention_layers(model):
            idx = layer.layer_idx
            if layer.sliding or not p.compresses_layer(idx):
                continue
            pressed = adopt_layer(new, idx, p)
            if p.scoring.needs_queries:
                pressed.prune_with_queries(layer.module, shared.queries[idx])
    if kvzip:
        kvzip.compress(model, new, shared.ids.to(model.device))
    return new


def stack_caches(model, caches: list) -> DynamicCache | None:
    """The compressed caches of one cell as one plain batch, a row per method, or ``None`` when they cannot
    share one: a model with sliding layers (their masks need each row's own window), or rows of different
    sizes. Entries keep their true RoPE positions in the keys; new tokens get theirs from ``position_ids``."""
    if any(layer.sliding for layer in attention_layers(model)):
        return None
    batch = DynamicCache(config=model.config)
    for idx in range(len(caches[0].layers)):
        layers = [c.layers[idx] for c in caches]
        if len({tuple(layer.keys.shape) for layer in layers}) != 1 or any(
            isinstance(layer, PressedLayer) and bool((layer.positions < 0).any()) for layer in layers
        ):
            return None
        batch.update(torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]), idx)
    return batch


@torch.no_grad()
def cached_step(model, cache, rows: int, start: int | None):
    """``step(ids)``: feed ``ids`` through ``cache`` and return the last position's logits; with ``start``, new
    tokens get explicit true positions from there on (stacked compressed caches cannot say them)."""
    position = start

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal position
        kwargs = cache_kwargs(cache)
        if position is not None:
            kwargs["position_ids"] = torch.arange(position, position + ids.shape[1], device=model.device).expand(rows, -1)
            position += ids.shape[1]
        return model(ids, **kwargs, logits_to_keep=1).logits[:, -1]

    return step


def answers_found(model, tokenizer, cache, rows: int, feed_ids: torch.Tensor, answer: str, start: int | None = None,
                  first_logits: torch.Tensor | None = None, slack: int = ANSWER_SLACK) -> list[tuple[bool, str]]:
    """Greedy decoding after ``feed_ids`` (the question, or nothing) for each of the cache's ``rows``; a row
    finds the key when ``answer`` appears in its text.

    ``start``: true position of the first fed token, passed as ``position_ids`` (needed when ``cache`` is a
    stack of compressed caches, whose length is not the position); ``None`` lets the cache say.
    ``first_logits``: the prefill's last logits when the question was prefilled with the context (then
    ``feed_ids`` is empty and they give the first token). Up to ``slack`` tokens more than the answer's own
    are decoded, so "is a 60494" or "is: 60494" still counts, as in the usual pass-key scoring (key in the
    output); a row stops growing once its key is there. Returns (found, decoded text) per row.
    """
    device = model.device
    budget = len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + slack
    step = cached_step(model, cache, rows, start)

    logits = None if first_logits is None else first_logits.reshape(1, -1).expand(rows, -1)
    if feed_ids.shape[1]:
        logits = step(feed_ids.to(device).expand(rows, -1))
    out: list[list[int]] = [[] for _ in range(rows)]
    found = [False] * rows
    for i in range(budget):
        nxt = logits.argmax(-1)
        for r in range(rows):
            if not found[r]:
                out[r].append(int(nxt[r]))
                found[r] = answer in tokenizer.decode(out[r])
        if all(found) or i == budget - 1:
            break
        logits = step(nxt[:, None])
    return [(ok, tokenizer.decode(ids)) for ok, ids in zip(found, out)]


def sample(tokenizer, length: int, depth: float, key: int, haystack: str, template: str = "plain"):
    """One pass-key prompt: :func:`kvpress_like.data.passkey_sample` as it is (``plain``), or (``chat``) inside the
    model's chat template as a user message, the question ending the message and the assistant's turn
    starting with the answer prefix, as RULER and ``eval ruler`` prompt. On prose SmolLM2 needs the chat
    form to find the key even uncompressed: in plain text the question reads as more of the document."""
    if template == "plain":
        return passkey_sample(tokenizer, length, depth, seed=key, haystack=HAYSTACKS[haystack])
    if template != "chat":
        raise ValueError(f"unknown template {template!r}; use {', '.join(TEMPLATES)}")
    frame = chat_frame(tokenizer)
    if frame is None:
        raise ValueError("--template chat needs a tokenizer with a chat template; use --template plain for this model")
    head, tail = frame
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head_ids = ids(head)
    s = passkey_sample(tokenizer, length - len(head_ids) + 1, depth, seed=key, haystack=HAYSTACKS[haystack])
    body = s.context_ids[0, 1:] if tokenizer.bos_token_id is not None else s.context_ids[0]  # the template has its own start
    shift = len(head_ids) - (s.context_ids.shape[1] - body.shape[0])
    return replace(
        s, context_ids=torch.tensor([head_ids + body.tolist()]),
        question_ids=torch.tensor([ids(CHAT_QUESTION + tail + CHAT_ANSWER_PREFIX)]),
        needle_span=(s.needle_span[0] + shift, s.needle_span[1] + shift),
    )


def _presses(grid: Grid) -> dict[tuple[str, float], Press]:
    """Every (method, factor) press, built once by registry name (unknown names fail before any prefill)."""
    return {(m, float(f)): build_press(m, ratio=factor_to_ratio(f)) for m in grid.methods for f in grid.factors}


def prompt_order(grid: Grid) -> list[tuple[int, float, int, str]]:
    """(length, depth, key, haystack) of every prompt, key-major: a run stopped early has balanced cells."""
    return [(n, d, k, h) for k in range(grid.keys) for d in grid.depth_values() for n in grid.lengths for h in grid.haystacks]


def _answer_cell(model, tokenizer, pre: Prefill, cell: list[tuple[str, Press]], feed: torch.Tensor, answer: str,
                 start: int, first: torch.Tensor | None) -> list[tuple[bool, str]]:
    """Every method of one (variant, factor) cell on one prompt: each compresses its copy of the shared
    prefill; the copies then answer in one batch (one row per method), or one by one when they cannot be
    stacked (:func:`stack_caches`)."""
    caches = []
    for _, p in cell:
        with press(model, p):
            caches.append(compress_prefilled(model, pre, p))
    batch = stack_caches(model, caches)
    if batch is not None:
        return answers_found(model, tokenizer, batch, len(caches), feed, answer, start, first)
    found = []
    for (_, p), cache in zip(cell, caches):
        with press(model, p), uncompressed(cache):
            found += answers_found(model, tokenizer, cache, 1, feed, answer, None, first)
    return found


def run_grid(model, tokenizer, grid: Grid, progress: bool = True, checkpoint: Path | None = None) -> dict:
    """Every prompt once per variant; returns ``{"settings", "rows", "prompts", "prefill_s"}``.

    With ``checkpoint``, the rows so far are rewritten there after every prompt (see ``--summarize``).
    """
    for v in grid.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; use {', '.join(VARIANTS)}")
    for h in grid.haystacks:
        if h not in HAYSTACKS:
            raise ValueError(f"unknown haystack {h!r}; use {', '.join(HAYSTACKS)}")
    if grid.template not in TEMPLATES:
        raise ValueError(f"unknown template {grid.template!r}; use {', '.join(TEMPLATES)}")
    presses = _presses(grid)
    rows: list[dict] = []
    prefill_s: list[float] = []
    prompts = prompt_order(grid)
    if grid.shard is not None:
        prompts = prompts[grid.shard[0] :: grid.shard[1]]
    settings = dict(asdict(grid), depth_values=grid.depth_values())
    for length, depth, key, haystack in tqdm(prompts, desc="passkey prompts", disable=not progress):
        s = sample(tokenizer, length, depth, key, haystack, grid.template)
        start = time.perf_counter()
        context = prefill(model, s.context_ids)
        prefill_s.append(time.perf_counter() - start)
        shared = {}
        if "uncompressed" in grid.variants:
            shared["uncompressed"] = (context, s.question_ids, None)
        if "compressed" in grid.variants:  # context + question is the prefill; the answer follows it
            both = prefill(model, s.question_ids, previous=context)
            shared["compressed"] = (both, s.question_ids[:, :0], both.logits)
        meta = dict(haystack=haystack, length=length, depth=depth, key=key, answer=s.answer)
        for variant, (pre, feed, first) in shared.items():
            start = pre.cache.get_seq_length()  # every token went in: the next one's true position
            ((ok, said),) = answers_found(model, tokenizer, fork_cache(pre.cache, share_storage=True), 1, feed, s.answer, start, first)
            rows.append(dict(meta, variant=variant, method="no_press", factor=1.0, exact=int(ok), output=said))
            with one_reconstruction_per_prompt():  # KVzip's scores of this prefill do not depend on the ratio
                for factor in grid.factors:
                    cell = [(m, presses[(m, float(factor))]) for m in grid.methods]
                    for (method, _), (ok, said) in zip(cell, _answer_cell(model, tokenizer, pre, cell, feed, s.answer, start, first)):
                        rows.append(dict(meta, variant=variant, method=method, factor=float(factor), exact=int(ok), output=said))
        del context, shared
        if checkpoint is not None:
            checkpoint.write_text(json.dumps(dict(settings=settings, rows=rows, prompts=len(prefill_s), prefill_s=prefill_s)))
    return dict(settings=settings, rows=rows, prompts=len(prompts), prefill_s=prefill_s)


def _haystack(row_or_settings: dict) -> str:
    """A row's haystack; results written before ``--haystack`` existed used the filler only."""
    return row_or_settings.get("haystack", "filler")


def _outcomes(rows: list[dict], variant: str, length: int, method: str, factor: float, haystack: str = "filler") -> dict[tuple, int]:
    f = 1.0 if method == "no_press" else float(factor)
    return {(r["depth"], r["key"]): r["exact"] for r in rows
            if r["variant"] == variant and r["length"] == length and r["method"] == method and r["factor"] == f
            and _haystack(r) == haystack}


def paired(rows: list[dict], variant: str, length: int, factor: float, a: str, b: str, seed: int = 0,
           haystack: str = "filler") -> dict:
    """Paired comparison of methods ``a`` and ``b`` on the prompts both answered in one cell."""
    oa = _outcomes(rows, variant, length, a, factor, haystack)
    ob = _outcomes(rows, variant, length, b, factor, haystack)
    common = sorted(set(oa) & set(ob))
    if not common:
        raise ValueError(f"no shared prompts for {a} and {b} at {haystack}/{variant}/{length}/x{factor:g}")
    xa = [oa[k] for k in common]
    xb = [ob[k] for k in common]
    out = stats.paired_bootstrap(xa, xb, seed=seed)
    out.update(stats.mcnemar_exact(xa, xb))
    # at small n the percentile bootstrap alone is too liberal (5/5 discordant pairs: interval excludes 0,
    # exact p = 0.0625), so a verdict also needs McNemar's exact p < 0.05
    out["verdict"] = stats.verdict(out["lo"], out["hi"]) if out["p"] < 0.05 else "no difference shown"
    return out


def summarize(result: dict) -> dict:
    """Per cell: accuracy with Wilson intervals per method, and paired comparisons against the reference
    method and against no press."""
    s, rows = result["settings"], result["rows"]
    cells = []
    for haystack in s.get("haystacks", ("filler",)):
        for variant in s["variants"]:
            for length in s["lengths"]:
                for factor in s["factors"]:
                    cell = dict(haystack=haystack, variant=variant, length=length, factor=float(factor), methods={},
                                vs_reference={}, vs_no_press={})
                    if not _outcomes(rows, variant, length, "no_press", factor, haystack):
                        continue  # a partial run that has not reached this length yet
                    for method in ("no_press", *s["methods"]):
                        o = list(_outcomes(rows, variant, length, method, factor, haystack).values())
                        lo, hi = stats.wilson(sum(o), len(o))
                        cell["methods"][method] = dict(n=len(o), exact=sum(o) / len(o), lo=lo, hi=hi)
                    for method in s["methods"]:
                        if method != s["reference"] and s["reference"] in s["methods"]:
                            cell["vs_reference"][method] = paired(rows, variant, length, factor, method, s["reference"],
                                                                  haystack=haystack)
                        cell["vs_no_press"][method] = paired(rows, variant, length, factor, method, "no_press", haystack=haystack)
                    cells.append(cell)
    return dict(cells=cells)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    haystacks = s.get("haystacks", ("filler",))
    planned = s["depths"] * s["keys"]
    counts = sorted({m["n"] for c in result["summary"]["cells"] for m in c["methods"].values()})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ref = s["reference"]
    label = " (QUICK run)" if s.get("quick") else ""
    if result.get("partial"):
        label += f" (PARTIAL: stopped after {result['prompts']} of {planned * len(s['lengths']) * len(haystacks)} prompts)"
    md = [
        "## Pass-key retrieval, paired" + label,
        "",
        f"Model {result['model']}; haystack {', '.join(f'{h} ({HAYSTACK_TEXT[h]})' for h in haystacks)}; "
        + ("prompt in the model's chat template, the answer starting 'The pass key is'; " if s.get("template") == "chat" else "")
        + f"lengths {list(s['lengths'])}; factors "
        f"{['x%g' % f for f in s['factors']]}; **n = {n} prompts per cell** (planned {s['depths']} needle depths x "
        f"{s['keys']} keys = {planned}, run key by key), the same prompts for every method; one shared full-cache prefill per prompt "
        f"({result['prompts']} prompts, median prefill {sorted(result['prefill_s'])[len(result['prefill_s']) // 2]:.1f} s, "
        f"wall time {result['elapsed_s'] / 60:.1f} min"
        + (f", CPU time {result['cpu_s'] / 60:.1f} min" if result.get("cpu_s") else "")
        + (f", {result['environment']['jobs']} worker processes" if result["environment"].get("jobs") else "")
        + "). Each press keeps its registry defaults "
        "(no skipped layers; StreamingLLM's 4 sinks).",
        "",
        "Cells: retrieval accuracy (pass key in the greedy output) in % with its Wilson 95% interval. `vs " + ref + "`: paired difference in points "
        "(method - " + ref + ") with its paired-bootstrap 95% interval and McNemar's exact p; **beats** / **worse** "
        "only when that interval excludes zero and p < 0.05.",
    ]
    def cmp(d: dict | None) -> str:
        if d is None:
            return "-"
        word = f" **{d['verdict']}**" if d["verdict"] != "no difference shown" else ""
        return f"{100 * d['diff']:+.0f} [{100 * d['lo']:+.0f}, {100 * d['hi']:+.0f}], p={d['p']:.2g}{word}"

    for haystack, variant in ((h, v) for h in haystacks for v in s["variants"]):
        title = ("question fed uncompressed after the compressed context (as the paper)" if variant == "uncompressed"
                 else "question compressed with the context")
        md += ["", f"### {haystack} haystack, {title}", ""]
        md += ["| length | factor | method | n | retrieved % [95% CI] | vs " + ref + " (points, 95% CI, p) | vs no press |",
               "|---|---|---|---|---|---|---|"]
        for cell in (c for c in result["summary"]["cells"] if c["variant"] == variant and _haystack(c) == haystack):
            for method, m in cell["methods"].items():
                acc = f"{_pct(m['exact'])} [{_pct(m['lo'])}, {_pct(m['hi'])}]"
                md.append(f"| {cell['length']} | x{cell['factor']:g} | {method} | {m['n']} | {acc} | "
                          f"{cmp(cell['vs_reference'].get(method))} | {cmp(cell['vs_no_press'].get(method))} |")
    return "\n".join(md + markdown_footer(result))


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded model name or local path")
    parser.add_argument("--lengths", default="2048,4096", help="context lengths in tokens")
    parser.add_argument("--factors", default="4,8,16", help="compression factors (x4 keeps a quarter)")
    parser.add_argument("--depths", type=int, default=12, help="needle depths per length (evenly spaced)")
    parser.add_argument("--keys", type=int, default=5, help="pass keys per depth")
    parser.add_argument("--methods", default=None, help="registered press names (default: every registered press)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="uncompressed and/or compressed question")
    parser.add_argument("--haystack", default="both", choices=(*HAYSTACKS, "both"),
                        help="text the key hides in: filler (the classic repetitive text), prose (real English prose, "
                             "pydoc_data.topics) or both (default; twice the prompts)")
    parser.add_argument("--template", default="plain", choices=TEMPLATES,
                        help="plain: the classic pass-key text; chat: the model's chat template around it, the answer "
                             "starting 'The pass key is' (how eval ruler prompts; SmolLM2 needs it on prose)")
    parser.add_argument("--reference", default="qfilters", help="method every other one is paired against")
    parser.add_argument("--quick", action="store_true",
                        help="6 depths x 1 key (n=6 per cell) to validate the pipeline, not to rank methods; 12 prompts per haystack, "
                             "~10 single-thread CPU-min per haystack (~5 min with --jobs 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one thread each, sharing the prompts; their rows are merged into one "
                             "result (2 on a 2-core machine: the full grid takes ~100 single-thread CPU-minutes per haystack)")
    parser.add_argument("--shard", default=None, help="I/N: run only prompts I, I+N, ... of the grid (what each --jobs worker does)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: evaluations/results)")
    parser.add_argument("--name", default=None, help="basename of the result files (default passkey / passkey.quick)")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None,
                        help="merge the rows of finished runs (<name>.json) and/or stopped ones (<name>.checkpoint.json, "
                             "labelled partial), e.g. one run per length, into the results named by --name")


def main(args: argparse.Namespace) -> int:
    from kvpress_like.models import load_model

    set_threads(args.threads)
    name = args.name or ("passkey.quick" if args.quick else "passkey")
    if args.summarize is not None:
        return _summarize_checkpoint(args, name)
    shard = _parse_shard(args.shard)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1:
        if shard is not None:
            raise SystemExit("--jobs and --shard do not combine: --jobs starts the shards itself")
        return _run_jobs(args, name)
    grid = Grid(
        lengths=tuple(parse_list(args.lengths, int)),
        factors=tuple(parse_list(args.factors, float)),
        depths=6 if args.quick else args.depths,
        keys=1 if args.quick else args.keys,
        methods=tuple(parse_list(args.methods)) if args.methods else tuple(list_presses()),
        variants=tuple(parse_list(args.variants)),
        haystacks=tuple(HAYSTACKS) if args.haystack == "both" else (args.haystack,),
        template=args.template,
        reference=args.reference,
        quick=args.quick,
        shard=shard,
    )
    _presses(grid)  # fail on a bad name or factor before loading the model
    model, tokenizer = load_model(args.model)
    env = environment()
    start, cpu = time.time(), time.process_time()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / f"{name}.checkpoint.json"
    result = run_grid(model, tokenizer, grid, checkpoint=checkpoint)
    result.update(model=args.model, environment=env, elapsed_s=time.time() - start, cpu_s=time.process_time() - cpu)
    checkpoint.unlink(missing_ok=True)
    return _write(args.out, name, result)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes I/N with integers, e.g. 0/2; got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text}: I must be in [0, N)")
    return i, n


def _run_jobs(args: argparse.Namespace, name: str) -> int:
    """Run ``--jobs`` shards as child processes (one thread each), then merge their rows into ``name``."""
    import subprocess
    import sys

    forwarded = ["--model", args.model, "--lengths", args.lengths, "--factors", args.factors, "--depths", str(args.depths),
                 "--keys", str(args.keys), "--variants", args.variants, "--haystack", args.haystack, "--template", args.template, "--reference", args.reference, "--threads", "1",
                 "--out", str(args.out)]
    forwarded += ["--methods", args.methods] if args.methods else []
    forwarded += ["--quick"] if args.quick else []
    names = [f"{name}.shard{i}of{args.jobs}" for i in range(args.jobs)]
    start, children = time.time(), []
    for i, shard_name in enumerate(names):
        cmd = [sys.executable, "-m", "kvpress_like.cli", "eval", "passkey", *forwarded, "--shard", f"{i}/{args.jobs}",
               "--name", shard_name]
        children.append(subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL))
    failed = [n for n, child in zip(names, children) if child.wait() != 0]
    if failed:
        raise SystemExit(f"passkey workers failed: {', '.join(failed)} (their checkpoints are in {args.out})")
    args.summarize = [args.out / f"{n}.json" for n in names]
    env = dict(environment(), torch_threads=1, jobs=args.jobs)  # this command, as typed; each worker ran one thread
    code = _summarize_checkpoint(args, name, elapsed_s=time.time() - start, env=env)
    for n in names:
        for suffix in (".json", ".md"):
            (args.out / f"{n}{suffix}").unlink(missing_ok=True)
    return code


def _write(out: Path, name: str, result: dict) -> int:
    result["summary"] = summarize(result)
    text = markdown(result)
    path = write_result(out, name, result, text)
    print(text)
    print(f"wrote {path}")
    return 0


def _summarize_checkpoint(args: argparse.Namespace, name: str, elapsed_s: float | None = None, env: dict | None = None) -> int:
    """One result from several runs of the same grid on disjoint prompts (e.g. one process per length).

    Finished runs bring their environment, wall and CPU time; a checkpoint (a run stopped early) makes
    the merged result partial. Wall time is ``elapsed_s`` when given (``--jobs``), else the longest run's
    (they ran side by side); CPU time the sum.
    """
    parts = [json.loads(path.read_text()) for path in args.summarize]
    keys = [(_haystack(r), r["variant"], r["length"], r["depth"], r["key"], r["method"], r["factor"]) for p in parts for r in p["rows"]]
    if len(set(keys)) != len(keys):
        raise ValueError("the runs to merge overlap (the same prompt twice); merge runs over disjoint prompts")
    first = parts[0]
    settings = dict(first["settings"], lengths=sorted({n for p in parts for n in p["settings"]["lengths"]}), shard=None)
    planned = len(settings["lengths"]) * settings["depths"] * settings["keys"] * len(settings.get("haystacks", ("filler",)))
    done = sum(p["prompts"] if "elapsed_s" in p else len(p["prefill_s"]) for p in parts)
    result = dict(
        settings=settings, rows=[r for p in parts for r in p["rows"]], prompts=done,
        prefill_s=[x for p in parts for x in p["prefill_s"]], model=first.get("model", args.model),
        environment=env or first.get("environment") or environment(),
        elapsed_s=elapsed_s if elapsed_s is not None else max(p.get("elapsed_s", 0.0) for p in parts),
        cpu_s=sum(p.get("cpu_s", 0.0) for p in parts),
        partial=done < planned,
        merged_from=[str(path) for path in args.summarize],
    )
    return _write(args.out, name, result)
