"""``kvpress-like eval robustness``: how much do Q-Filters depend on their calibration data?

Filters are calibrated on the offline prose corpus (the reference: ``calibrate()`` defaults), on other
prose windows, on Python source code and on random token ids, and from 10 to 3000 queries per head. For
each, we report the cosine similarity to the reference per (layer, KV head), and the pass-key
(needle-in-a-haystack) accuracy at x8 compression. Random directions and the negated reference are
controls: they show how much the needle test depends on the filters at all.

Speed: compression during a single prefill call happens after each layer's attention has seen every
token, so a pressed prefill computes exactly what an uncompressed one does, and only the cache differs.
Each pass-key context is therefore prefilled once, and every variant's cache is built from that full
cache by :meth:`PressedLayer.from_dynamic`, which applies the press's prefill selection. The first sample
checks this against a real ``press()`` prefill and the run fails if they keep different tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress_like import PressedLayer, QFilterPress, press, uncompressed
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.calibration import calibration_ids, filters_from_queries
from kvpress_like.filters import expected_shape, load_filters
from kvpress_like.integrations.calibration import collect_queries

from .common import add_model_argument, add_out_argument, write_result

__all__ = ["configure", "main", "cosines", "PasskeyRunner", "RowFilterPress"]

def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--context", type=int, default=2048, help="pass-key context tokens (default: 2048)")
    parser.add_argument("--depths", type=_floats, default=[0.25, 0.5, 0.75], help="needle depths, comma-separated")
    parser.add_argument("--seeds", type=_ints, default=[0, 1], help="pass-key seeds, comma-separated")
    parser.add_argument("--ratio", type=float, default=0.875, help="fraction of KV pairs removed (default: 0.875, x8)")
    parser.add_argument("--counts", type=_ints, default=[10, 30, 100, 300, 1000, 3000], help="queries per head")
    parser.add_argument("--draws", type=int, default=5, help="random subsamples per query count (default: 5)")
    parser.add_argument("--num-sequences", type=int, default=6, help="prose windows of the sample-count pool (default: 6)")
    parser.add_argument("--corpus-sequences", type=int, default=4, help="windows of code and of random ids (default: 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    add_out_argument(parser)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per calibrated (layer, KV head), flattened; layers with zero filters are left out."""
    keep = (a.norm(dim=-1) > 0) & (b.norm(dim=-1) > 0)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)[keep]


def _stats(values: torch.Tensor) -> dict:
    return dict(mean=float(values.mean()), min=float(values.min()), p10=float(values.quantile(0.1)))


def _subsample(queries: dict[int, torch.Tensor], n: int, gen: torch.Generator) -> dict[int, torch.Tensor]:
    available = min(q.shape[1] for q in queries.values())
    if n > available:
        raise ValueError(f"asked for {n} queries per head, only {available} were collected; raise --num-sequences")
    idx = torch.randperm(available, generator=gen)[:n]
    return {layer: q[:, idx] for layer, q in queries.items()}


def _reference_by_cli(model_name: str) -> tuple[torch.Tensor, dict]:
    """Run the default calibration command in a fresh process: its filters are the reference, and its
    ``config.json`` has the timings reported for issue 6's "under 2 minutes" target."""
    exe = shutil.which("kvpress-like")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["calibrate", "--model", model_name, "--out", tmp, "--no-store", "--quiet"]
        cmd = [exe, *args] if exe else [sys.executable, "-m", "kvpress_like.cli", *args]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr[-2000:]}")
        config = json.loads((Path(tmp) / "config.json").read_text())
        filters = load_filters(tmp)
    info = {k: config[k] for k in ("corpus", "num_sequences", "seq_len", "samples_per_head", "calibration_seconds", "load_seconds")}
    info.update(command=f"kvpress-like calibrate --model {model_name} --out <dir>", wall_seconds=round(wall, 1))
    return filters, info


@dataclass
class RowFilterPress(QFilterPress):
    """Q-Filters with one filter set per batch row, so that many filter variants share one batched cache."""

    rows: torch.Tensor | None = None  # [variants, num_layers, num_kv_heads, head_dim]

    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              reading_position: torch.Tensor) -> torch.Tensor:
        return -torch.einsum("bhnd,bhd->bhn", keys.float(), self.rows[:, layer_idx].to(keys.device, torch.float32))


class PasskeyRunner:
    """Pass-key accuracy of many Q-Filters variants at one ratio, on shared prefills (see the module docstring).

    Variant ``v`` is batch row ``v``: its cache is the full prefill cache pruned with its own filters, and
    the question and answer are decoded for all variants in one batched ``generate()``.
    """

    def __init__(self, model, tokenizer, context: int, depths: list[float], seeds: list[int]):
        from kvpress_like.data import passkey_sample

        self.model, self.tokenizer = model, tokenizer
        self.samples = [passkey_sample(tokenizer, context, d, s) for d in depths for s in seeds]
        self.checked = False

    def _cache_for(self, full, p):
        from transformers import DynamicCache

        rows = p.rows.shape[0] if isinstance(p, RowFilterPress) else 1
        cache = DynamicCache(config=self.model.config)
        for idx, layer in enumerate(full.layers):
            if type(layer) is not DynamicLayer:  # sliding-window layers: never compressed
                cache.layers[idx] = copy.deepcopy(layer)
                cache.layers[idx].batch_repeat_interleave(rows)
                continue
            pressed = PressedLayer(p, idx)
            pressed.update(layer.keys.repeat(rows, 1, 1, 1), layer.values.repeat(rows, 1, 1, 1))
            cache.layers[idx] = pressed
        return cache

    def _answers(self, sample, cache, p, rows: int) -> list[str]:
        ids = torch.cat([sample.context_ids, sample.question_ids], 1).repeat(rows, 1)
        with press(self.model, p), uncompressed(cache):
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=8, do_sample=False
            )
        return self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def _check(self, sample, batched, filters: torch.Tensor, ratio: float) -> None:
        """Row 0 of the shared-prefill cache keeps exactly what a real pressed prefill keeps."""
        real = DynamicCache(config=self.model.config)
        with press(self.model, QFilterPress(ratio=ratio, filters=filters)):
            self.model(sample.context_ids, **cache_kwargs(real))
        for a, b in zip(real.layers, batched.layers):
            if isinstance(a, PressedLayer) and not (
                torch.equal(a.positions, b.positions[:1]) and torch.equal(a.keys, b.keys[:1])
            ):
                raise RuntimeError("shared-prefill shortcut disagrees with a pressed prefill; results would be wrong")
        self.checked = True

    @torch.no_grad()
    def run(self, variants: dict[str, torch.Tensor], ratio: float, progress: bool = True) -> dict[str, list[bool]]:
        """Hits per variant (and for ``"no compression"``) over the samples."""
        from tqdm.auto import tqdm

        names = list(variants)
        rows = torch.stack([variants[n] for n in names])
        hits: dict[str, list[bool]] = {name: [] for name in ["no compression", *names]}
        for sample in tqdm(self.samples, desc="pass-key samples", disable=not progress):
            full = DynamicCache(config=self.model.config)
            self.model(sample.context_ids, **cache_kwargs(full))
            plain = QFilterPress(ratio=0.0, filters=rows[0])
            hits["no compression"].append(sample.answer in self._answers(sample, self._cache_for(full, plain), plain, 1)[0])
            p = RowFilterPress(ratio=ratio, filters=rows[0], rows=rows)
            cache = self._cache_for(full, p)
            if not self.checked:
                self._check(sample, cache, rows[0], ratio)
            for name, answer in zip(names, self._answers(sample, cache, p, len(names))):
                hits[name].append(sample.answer in answer)
        return hits


def main(args: argparse.Namespace) -> int:
    import transformers

    from kvpress_like.data import corpus_ids
    from kvpress_like.models import load_model

    start = time.perf_counter()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    reference, ref_info = _reference_by_cli(args.model)
    model, tok = load_model(args.model)
    shape = expected_shape(model)
    big, per_corpus = max(args.counts), ref_info["samples_per_head"]
    if big > args.num_sequences * args.seq_len:
        raise SystemExit(f"--counts up to {big} needs --num-sequences x --seq-len >= {big}")
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    sources = {
        "prose, other windows": calibration_ids(None, tok, args.num_sequences, args.seq_len, seed=1),
        "Python source code": calibration_ids(corpus_ids(tok, "code"), tok, args.corpus_sequences, args.seq_len, seed=0),
        "random token ids": torch.randint(0, vocab, (args.corpus_sequences, args.seq_len), generator=gen),
    }
    queries = {name: collect_queries(model, ids, big, seed=0, progress=False) for name, ids in sources.items()}
    pool = queries["prose, other windows"]
    corpus_filters = {"prose (reference)": reference}
    for name, q in queries.items():  # every corpus at the reference's sample count
        corpus_filters[name] = filters_from_queries({i: x[:, :per_corpus] for i, x in q.items()}, shape)

    names = list(corpus_filters)
    matrix = [[float(cosines(corpus_filters[a], corpus_filters[b]).mean()) for b in names] for a in names]
    per_layer = {
        name: [float(torch.nn.functional.cosine_similarity(f[i], reference[i], dim=-1).mean()) for i in range(shape[0])]
        for name, f in corpus_filters.items()
        if name != "prose (reference)"
    }

    full_pool = filters_from_queries(pool, shape)
    counts, count_filters = [], {}
    gen = torch.Generator().manual_seed(123)
    for n in args.counts:
        vs_ref, vs_pool = [], []
        for draw in range(args.draws):
            f = filters_from_queries(_subsample(pool, n, gen), shape)
            vs_ref.append(cosines(f, reference))
            vs_pool.append(cosines(f, full_pool))
            if draw == 0:
                count_filters[f"prose, {n} queries/head"] = f
        means = torch.stack([c.mean() for c in vs_ref])
        counts.append(
            dict(
                queries_per_head=n,
                vs_reference=_stats(torch.cat(vs_ref)),
                vs_reference_mean_std=float(means.std()) if len(means) > 1 else 0.0,
                vs_same_corpus_max=_stats(torch.cat(vs_pool)),
            )
        )

    variants = dict(corpus_filters)
    variants.update(count_filters)
    variants["control: random directions"] = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    variants["control: negated reference"] = -reference
    runner = PasskeyRunner(model, tok, args.context, args.depths, args.seeds)
    hits = runner.run(variants, args.ratio)
    accuracy = {name: sum(h) / len(h) for name, h in hits.items()}

    result = dict(
        model=args.model,
        machine=dict(
            platform=platform.platform(),
            cpus=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            load_average_at_start=load_avg,
            load_average_at_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            device="cpu",
        ),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()),
        settings=dict(
            context=args.context, depths=args.depths, seeds=args.seeds, ratio=args.ratio, counts=args.counts,
            draws=args.draws, num_sequences=args.num_sequences, corpus_sequences=args.corpus_sequences,
            seq_len=args.seq_len, haystack="repetitive",
        ),
        reference_calibration=ref_info,
        corpora=dict(names=names, mean_cosine_matrix=matrix, per_layer_vs_reference=per_layer,
                     vs_reference={n: _stats(cosines(corpus_filters[n], reference)) for n in names[1:]}),
        sample_counts=counts,
        passkey=dict(accuracy=accuracy, hits=hits, samples=len(runner.samples), shortcut_checked=runner.checked),
        command=_command(args),
        seconds=round(time.perf_counter() - start, 1),
    )
    write_result(args.out, "robustness", result, _markdown(result), {"robustness.png": _figure(result)})
    print(_markdown(result))
    return 0


def _command(args) -> str:
    parts = ["kvpress-like eval robustness", f"--model {args.model}", f"--context {args.context}"]
    parts += [f"--depths {','.join(map(str, args.depths))}", f"--seeds {','.join(map(str, args.seeds))}"]
    parts += [f"--ratio {args.ratio}", f"--counts {','.join(map(str, args.counts))}", f"--draws {args.draws}"]
    return " ".join(parts)


def _figure(result: dict):
    """The three panels (queries per head, corpus per layer, pass-key accuracy) as one matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    counts = result["sample_counts"]
    n = [c["queries_per_head"] for c in counts]
    ax = axes[0]
    for key, label in [("vs_reference", "vs reference (default calibration)"), ("vs_same_corpus_max", f"vs the same pool's {max(n)} queries")]:
        ax.plot(n, [c[key]["mean"] for c in counts], marker="o", label=f"{label}: mean")
        ax.fill_between(n, [c[key]["min"] for c in counts], [c[key]["mean"] for c in counts], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("calibration queries per head")
    ax.set_ylabel("cosine similarity of filters")
    ax.set_title("(a) queries per head, from other prose windows\n(band: min over layer-heads and draws)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for name, values in result["corpora"]["per_layer_vs_reference"].items():
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine vs prose reference")
    ax.set_title("(b) calibration corpus, per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    acc = result["passkey"]["accuracy"]
    names = list(acc)
    ax.barh(range(len(names)), [acc[k] * 100 for k in names], color=["tab:gray" if "control" in k or k == "no compression" else "tab:blue" for k in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    s = result["settings"]
    ax.set_xlabel(f"pass-key accuracy (%), {result['passkey']['samples']} prompts")
    ax.set_title(f"(c) needle at {s['context']} tokens, x{1 / (1 - s['ratio']):.0f} compression")
    fig.suptitle(f"Q-Filters robustness on {result['model']}")
    fig.tight_layout()
    return fig


def _markdown(r: dict) -> str:
    s, m, acc, ref = r["settings"], r["machine"], r["passkey"]["accuracy"], r["reference_calibration"]
    x = 1 / (1 - s["ratio"])
    names = r["corpora"]["names"]
    lines = [
        "## Q-Filters robustness: calibration corpus and sample count",
        "",
        f"Model {r['model']} on {m['cpus']} CPU cores ({m['torch_threads']} torch threads; the machine was shared, "
        f"load average {m['load_average_at_start']:.1f} at start and {m['load_average_at_end']:.1f} at the end), "
        f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}. Reference filters: "
        f"`{ref['command']}` (defaults: {ref['num_sequences']} x {ref['seq_len']} tokens of {ref['corpus']}, "
        f"{ref['samples_per_head']} queries per head). Other corpora: {s['corpus_sequences']} x {s['seq_len']} "
        f"tokens (code, random ids) and {s['num_sequences']} x {s['seq_len']} tokens (other prose windows, the pool "
        f"for the sample counts), compared at {ref['samples_per_head']} queries per head. Cosines are per "
        f"(layer, KV head). Pass-key: repetitive haystack, {s['context']} tokens, depths {s['depths']}, seeds "
        f"{s['seeds']} ({r['passkey']['samples']} prompts), x{x:.0f} compression (`QFilterPress(ratio={s['ratio']})`, "
        "no sinks or window), question uncompressed, greedy 8 tokens.",
        "",
        f"Command: `{r['command']}` ({r['seconds']:.0f} s in all).",
        "",
        "![robustness](robustness.png)",
        "",
        "| calibration corpus | mean cosine vs reference | min | 10th pct. | pass-key accuracy |",
        "|---|---|---|---|---|",
        f"| {names[0]} | 1 | 1 | 1 | {acc[names[0]]:.0%} |",
    ]
    for name, st in r["corpora"]["vs_reference"].items():
        lines.append(f"| {name} | {st['mean']:.3f} | {st['min']:.3f} | {st['p10']:.3f} | {acc[name]:.0%} |")
    lines += [
        "",
        f"| queries per head (other prose windows) | mean cosine vs reference (std of the mean over {s['draws']} draws) "
        f"| min | mean cosine vs the same pool's {max(s['counts'])} | pass-key accuracy (draw 0) |",
        "|---|---|---|---|---|",
    ]
    for c in r["sample_counts"]:
        n = c["queries_per_head"]
        lines.append(
            f"| {n} | {c['vs_reference']['mean']:.3f} (± {c['vs_reference_mean_std']:.3f}) | {c['vs_reference']['min']:.3f} | "
            f"{c['vs_same_corpus_max']['mean']:.3f} | {acc[f'prose, {n} queries/head']:.0%} |"
        )
    lines += [
        "",
        "| no compression | control: random directions | control: negated reference |",
        "|---|---|---|",
        f"| {acc['no compression']:.0%} | {acc['control: random directions']:.0%} | {acc['control: negated reference']:.0%} |",
        "",
        "Mean cosine between the corpora's filters:",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for name, row in zip(names, r["corpora"]["mean_cosine_matrix"]):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += [
        "",
        "### Calibration time",
        "",
        f"`{ref['command']}` ({ref['num_sequences']} x {ref['seq_len']} tokens, {ref['samples_per_head']} queries "
        f"per head), CPU, this shared machine: calibration {ref['calibration_seconds']:.1f} s, model load "
        f"{ref['load_seconds']:.1f} s, {ref['wall_seconds']:.1f} s for the whole command including Python start-up "
        "(target: under 2 minutes).",
        "",
    ]
    return "\n".join(lines)
