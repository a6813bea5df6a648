"""Calibration on a transformers model: sampling the queries it really uses, and ``kvpress-like calibrate``.

The reductions (Q-Filters, statistics) are the core's :mod:`kvpress_like.calibration`; this module runs the
model through the attention routing to sample queries, and registers itself (entry point ``kvpress_like``)
as the calibrator the filter store uses for embedded models on first use (:func:`kvpress_like_calibrate`).

    kvpress-like calibrate --model smollm2-135m --out filters/smollm2
    kvpress-like calibrate --model ./my-model --texts notes/ --samples 4096 --out filters/my-model

One pass over calibration windows records, per full-attention layer, a random sample of the queries the
attention function really receives (post-RoPE, after QK-norm and biases) and the same queries un-rotated
by their positions with the model's own rotary embedding (pre-RoPE). From them:

* Q-Filters (the paper's method, published ``*_qfilt`` format, unchanged): per KV head, the negated
  dominant direction of the *post-RoPE* queries (:func:`filters_from_queries`).
* Pre-RoPE statistics per layer and query head (:func:`query_statistics`): mean, dominant direction and
  covariance, for the position-targeted presses, which rotate them to the reading position.

The output directory holds ``model.safetensors`` (``q_filters``), ``config.json`` (model, corpus, sample
counts, seed, window length, timing, layers never compressed) and ``query_stats.safetensors`` (statistics,
metadata in its header). Unless ``--no-store``, both also go to the local filter store
(:mod:`kvpress_like.filters`), where the presses find them for this model without a path.

The RoPE phase. Post-RoPE queries at position ``p`` are ``R(p) q``; the dominant direction of post-RoPE
queries depends on the positions sampled. Measured on SmolLM2-135M (mean Spearman over 90 heads with the
attention the last 64 queries give each key; 4096 calibration tokens of offline prose, seed 0):

===================  ==========  ==========  ==========  =========
scorer, window       prose 1k    prose 2k    prose 4k    code 2k
===================  ==========  ==========  ==========  =========
Q-Filters, 8 x 512   0.607       0.553       0.590       0.490
Q-Filters, 2 x 2048  0.765       0.723       0.700       0.696
targeted, 8 x 512    0.756       0.831       0.861       0.777
targeted, 2 x 2048   0.757       0.829       0.870       0.792
===================  ==========  ==========  ==========  =========

(``targeted``: pre-RoPE direction rotated to the reading position, ``qfilters_targeted``.) Longer windows
help the post-RoPE filters at every length measured in correlation, and pre-RoPE statistics barely depend
on the window length. The default nevertheless stays 8 windows of 512 tokens: ``qfilters`` is the paper's
method and must keep computing what it did (a fresh default calibration is bit-identical to filters stored
before), and with 2 x 2048 filters the README demo's pass-key answer at x4 turned wrong (one sample, so no
evidence either way about retrieval). ``--seq-len 2048 --num-sequences 2`` gives the better-correlated
post-RoPE filters; ``qfilters_targeted`` removes the dependence altogether.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from kvpress_like.calibration import (
    CHARS_PER_TOKEN,
    DEFAULT_NUM_SEQUENCES,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    CalibrationResult,
    QuerySample,
    calibration_ids,
    filters_from_queries,
    query_statistics,
)
from kvpress_like.hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where used, so `kvpress-like calibrate --help` stays fast
    import torch

__all__ = [
    "calibrate",
    "collect_queries",
    "configure",
    "kvpress_like_calibrate",
    "main",
    "read_texts",
    "run_calibration",
    "sample_queries",
    "sliding_layers",
]

log = logging.getLogger(__name__)

OFFLINE = {
    "offline:prose": "offline prose (pydoc_data.topics)",
    "offline:code": "Python standard-library source code",
    "offline:random": "uniformly random token ids",
}
def sliding_layers(model) -> list[int]:
    """Sliding-window layers. They are calibrated like the others: press() compresses them whenever the press
    keeps fewer tokens than their window (zero filters there would evict arbitrarily)."""
    from kvpress_like.integrations.transformers import attention_layers

    return sorted(layer.layer_idx for layer in attention_layers(model) if layer.sliding)


def sample_queries(
    model, ids: torch.Tensor, samples_per_head: int = DEFAULT_SAMPLES, seed: int = 0, progress: bool = True
) -> QuerySample:
    """A random sample of the queries each full-attention layer really uses, with their positions.

    Queries are taken from the attention call itself, so they include QK-norm and projection biases. Each
    sequence contributes ``ceil(samples_per_head / len(ids))`` random positions (the same for every head
    and layer), so memory stays bounded whatever the corpus size; when a sequence has fewer positions, all
    of them are kept in order. Pre-RoPE queries come from un-rotating with the model's rotary module
    (:mod:`kvpress_like.rope`).
    """
    import torch
    from tqdm.auto import tqdm

    from kvpress_like.filters import expected_shape
    from kvpress_like.rope import rotary
    from kvpress_like.integrations.transformers import attention_layers, patched_attention

    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder self-attention layers to calibrate")
    if samples_per_head < 1:
        raise ValueError(f"samples_per_head must be positive, got {samples_per_head}")
    head_dim = expected_shape(model)[2]
    rotaries = {layer.layer_idx: rotary(model, layer.layer_idx, head_dim) for layer in layers}
    per_sequence = -(-samples_per_head // len(ids))
    gen = torch.Generator().manual_seed(seed + 1)
    post: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in layers}
    pre: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in layers}
    positions: list[torch.Tensor] = []
    scaling: dict[int, float] = {}
    state: dict = {"take": None}

    def record(module, query, key, value) -> None:
        b, hq, q, d = query.shape
        if state["take"] is None:  # one draw per forward call, shared by every layer
            n = b * q
            take = torch.arange(n) if per_sequence * b >= n else torch.randperm(n, generator=gen)[: per_sequence * b]
            state["take"], state["cos_sin"] = take, {}
            positions.append(take % q)
        take = state["take"].to(query.device)
        flat = query.detach().transpose(0, 1).reshape(hq, b * q, d)[:, take].float()
        idx = module.layer_idx
        scaling[idx] = float(getattr(module, "scaling", d**-0.5))
        post[idx].append(flat.cpu())
        rot = rotaries[idx]
        if rot is None:
            pre[idx].append(flat.cpu())
            return
        if rot.layer_type not in state["cos_sin"]:  # one rotation per layer type and forward call
            state["cos_sin"][rot.layer_type] = rot.cos_sin((take % q).to(query.device))
        cos, sin = state["cos_sin"][rot.layer_type]
        pre[idx].append(rot.unrotate(flat, cos, sin).cpu())

    device = next(model.parameters()).device
    # Only queries matter: skip the LM head where the model allows (a 262k vocabulary costs more than the layers).
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad(), patched_attention(model, layers, record):
        for row in tqdm(ids, desc="calibrating", unit="seq", disable=not progress):
            state["take"] = None
            model(row[None].to(device), use_cache=False, **extra)
    def cut(chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(chunks, dim=1)[:, :samples_per_head]

    return QuerySample(
        post_rope={idx: cut(c) for idx, c in post.items()},
        pre_rope={idx: cut(c) for idx, c in pre.items()},
        positions=torch.cat(positions)[:samples_per_head],
        rotary_dims={idx: 0 if r is None else r.rotary_dim for idx, r in rotaries.items()},
        scaling=scaling,
    )


def collect_queries(
    model, ids: torch.Tensor, samples_per_head: int = DEFAULT_SAMPLES, seed: int = 0, progress: bool = True
) -> dict[int, torch.Tensor]:
    """The post-RoPE queries of :func:`sample_queries`, ``{layer: (q_heads, S, d)}`` (Q-Filters' input)."""
    return sample_queries(model, ids, samples_per_head, seed, progress).post_rope


def calibrate(
    model,
    texts=None,
    tokenizer=None,
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    samples_per_head: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Compute Q-Filters ``[num_layers, num_kv_heads, head_dim]`` (published sign convention).

    Runs ``num_sequences`` windows of ``seq_len`` tokens of ``texts`` (default: the offline prose corpus;
    see :func:`calibration_ids`), samples ``samples_per_head`` queries per head and reduces them with
    :func:`filters_from_queries`. Sliding-window layers, which press() never compresses, get zero filters.
    """
    return run_calibration(model, tokenizer, texts, "", num_sequences, seq_len, samples_per_head, seed, progress).filters


def run_calibration(
    model,
    tokenizer=None,
    texts=None,
    corpus: str = OFFLINE["offline:prose"],
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    samples_per_head: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """:func:`calibrate` plus the pre-RoPE statistics, timed, with the metadata both files record."""
    import torch
    import transformers

    from kvpress_like import __version__
    from kvpress_like.filters import expected_shape, store_key
    from kvpress_like.models import model_identity

    start, cpu_start = time.perf_counter(), time.process_time()
    ids = calibration_ids(texts, tokenizer, num_sequences, seq_len, seed)
    sample = sample_queries(model, ids, samples_per_head, seed, progress)
    shape = expected_shape(model)
    filters = filters_from_queries(sample.post_rope, shape)
    stats = query_statistics(sample.pre_rope, shape[0])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    common = dict(
        model=str(getattr(model.config, "_name_or_path", "") or "unnamed"),
        model_identity=model_identity(model),
        store_key=store_key(model),
        corpus=corpus,
        num_sequences=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
        samples_per_head=int(min(q.shape[1] for q in sample.post_rope.values())),
        seed=seed,
        sliding_layers=sliding_layers(model),  # calibrated too (before 0.2 they were skipped, zero filters)
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        versions=dict(kvpress_like=__version__, torch=torch.__version__, transformers=transformers.__version__),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    info = dict(
        common,
        calibration_seconds=round(seconds, 2),
        calibration_cpu_seconds=round(cpu_seconds, 2),  # all threads; wall time depends on the machine's load
        torch_threads=torch.get_num_threads(),
        queries="post-RoPE queries as passed to the attention function (after QK-norm and biases)",
    )
    stats_info = dict(
        common,
        format="kvpress_like query statistics v1",
        window_length=int(ids.shape[1]),
        layers=sorted(sample.pre_rope),
        rotary_dims={str(k): v for k, v in sample.rotary_dims.items()},
        scaling={str(k): v for k, v in sample.scaling.items()},
        query_positions=[int(sample.positions.min()), int(sample.positions.max())],
        queries="pre-RoPE: attention's queries (after QK-norm and biases) un-rotated by their positions "
        "with the model's rotary embedding; rotary dims only",
    )
    return CalibrationResult(filters, info, stats, stats_info)


@hookimpl
def kvpress_like_calibrate(model, tokenizer) -> CalibrationResult:
    """The filter store's calibrator: the default recipe on the offline prose corpus, with a progress bar (~10 s)."""
    return run_calibration(model, tokenizer, progress=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="embedded name (smollm2-135m, gemma3-270m), local directory or hub id")
    parser.add_argument(
        "--texts",
        default="offline:prose",
        help="a text file, a directory of text files, a Hugging Face dataset name (needs network), or "
        "offline:prose | offline:code | offline:random (default: offline:prose, the CPython docs)",
    )
    parser.add_argument("--text-column", default="text", help="dataset column holding the text (default: text)")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory or hub id, for a model directory without tokenizer files"
    )
    parser.add_argument(
        "--num-sequences", type=int, default=DEFAULT_NUM_SEQUENCES, help=f"calibration windows (default: {DEFAULT_NUM_SEQUENCES})"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"calibration window length in tokens: post-RoPE Q-Filters fit contexts of about this length "
        f"(default: {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"queries sampled per head (default: {DEFAULT_SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window and query sampling (default: 0)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--no-store", action="store_true", help="do not copy the filters into the local filter store")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--attn-implementation", default="sdpa", help="eager, sdpa, flash_attention_2 (default: sdpa)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_texts(
    source: str,
    max_chars: int,
    seed: int = 0,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
) -> tuple[list[str], str]:
    """Texts for calibration from a file, a directory, or a Hugging Face dataset, capped at ``max_chars``.

    A directory's files (recursively; binary files skipped) are read in an order shuffled by ``seed`` so the
    cap does not always keep the same ones. Returns the texts and a description for ``config.json``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            return [f.read(max_chars)], f"file {path.resolve()}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        random.Random(seed).shuffle(files)
        texts, total, used = [], 0, 0
        for file in files:
            if total >= max_chars:
                break
            try:
                with open(file, encoding="utf-8") as f:
                    text = f.read(max_chars - total)
            except (UnicodeDecodeError, OSError):
                continue
            if "\x00" in text or not text.strip():
                continue
            texts.append(text)
            total += len(texts[-1])
            used += 1
        if not texts:
            raise ValueError(f"--texts {source}: the directory holds no UTF-8 text file")
        return texts, f"directory {path.resolve()} ({used} of {len(files)} files)"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not an "org/name" dataset id
        raise FileNotFoundError(f"--texts {source}: no such file or directory")
    return _dataset_texts(source, max_chars, text_column, dataset_config, split)


def _dataset_texts(name: str, max_chars: int, column: str, config: str | None, split: str) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"--texts {name} is not a file or directory; reading it as a Hugging Face dataset needs "
            "`pip install datasets` (and network access). Offline, pass a text file or directory."
        ) from err
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        texts, total = [], 0
        for row in rows:
            if column not in row:
                raise ValueError(f"dataset {name} has no column {column!r} (columns: {sorted(row)}); use --text-column")
            text = str(row[column])
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
            if total >= max_chars:
                break
    except ValueError:
        raise
    except Exception as err:
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ValueError(
            f"--texts {name} is neither a file, a directory, nor a loadable Hugging Face dataset{offline}: "
            f"{type(err).__name__}: {err}. Offline, pass a text file or a directory of text files."
        ) from err
    return texts, f"dataset {name}" + (f"/{config}" if config else "") + f" [{split}], column {column!r}"


def _calibration_input(args, tokenizer, vocab_size: int):
    """``(texts or token ids, corpus description)`` for :func:`run_calibration`."""
    import torch

    if args.texts == "offline:random":  # needs no tokenizer
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (args.num_sequences, args.seq_len), generator=gen), OFFLINE[args.texts]
    if tokenizer is None:
        raise ValueError(
            f"--model {args.model} has no tokenizer files, and --texts {args.texts} must be tokenized. Pass "
            "--tokenizer <tokenizer dir or hub id>, or calibrate on --texts offline:random, which needs none."
        )
    if args.texts == "offline:prose":
        return None, OFFLINE[args.texts]
    if args.texts == "offline:code":
        from kvpress_like.data import corpus_ids

        return corpus_ids(tokenizer, "code"), OFFLINE[args.texts]
    max_chars = CHARS_PER_TOKEN * args.num_sequences * args.seq_len
    return read_texts(args.texts, max_chars, args.seed, args.text_column, args.dataset_config, args.split)


#: Files any of which makes a directory hold a tokenizer (fast, sentencepiece, BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load(args):
    """``(model, tokenizer or None)``: a model directory without tokenizer files loads without one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpress_like.models import load_model

    dtype = getattr(torch, args.dtype)
    path = Path(args.model)
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn_implementation)
        model = model.to(args.device).eval()
    else:
        model, tokenizer = load_model(args.model, dtype=dtype, attn_implementation=args.attn_implementation, device=args.device)
        if args.tokenizer is None:
            return model, tokenizer
    return model, AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None


def main(args: argparse.Namespace) -> int:
    import torch

    from kvpress_like.filters import save_filters, save_query_stats, store_path
    from kvpress_like.models import EMBEDDED_MODELS

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("num_sequences", "seq_len", "samples"):
        if getattr(args, name) < 1:
            print(f"kvpress-like calibrate: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    try:
        model, tokenizer = _load(args)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(args.model).exists() else "hub id"
        print(
            f"kvpress-like calibrate: cannot load --model {args.model} as an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}) or {where}: {err}",
            file=sys.stderr,
        )
        return 2
    load_seconds = time.perf_counter() - start
    try:
        texts, corpus = _calibration_input(args, tokenizer, model.config.get_text_config().vocab_size)
        result = run_calibration(
            model,
            tokenizer,
            texts,
            corpus,
            num_sequences=args.num_sequences,
            seq_len=args.seq_len,
            samples_per_head=args.samples,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"kvpress-like calibrate: {err}", file=sys.stderr)
        return 2
    filters, info = result.filters, result.info
    info.update(
        load_seconds=round(load_seconds, 2),
        device=str(args.device),
        command=(
            f"kvpress-like calibrate --model {args.model} --texts {args.texts} --num-sequences {args.num_sequences} "
            f"--seq-len {args.seq_len} --samples {args.samples} --seed {args.seed} --dtype {args.dtype} --out {args.out}"
        ),
    )
    out = save_filters(filters, args.out, **info)
    save_query_stats(result.stats, out, **result.stats_info)
    print(
        f"Q-Filters {list(filters.shape)} for {info['model']} from {info['num_sequences']} x {info['seq_len']} tokens "
        f"of {corpus}, {info['samples_per_head']} queries per head: {info['calibration_seconds']:.1f} s "
        f"(model load {load_seconds:.1f} s) -> {out} (with pre-RoPE query statistics)"
    )
    if info["sliding_layers"]:
        print(f"sliding-window layers (calibrated too, compressed when a press keeps fewer tokens than the window): "
              f"{info['sliding_layers']}")
    if not args.no_store:
        stored = save_filters(filters, store_path(model), **info)
        save_query_stats(result.stats, stored, **result.stats_info)
        print(f"stored for QFilterPress() in {stored}")
    return 0
