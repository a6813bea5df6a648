"""``kvpress-like calibrate``: compute Q-Filters for any Hugging Face causal LM and save them.

    kvpress-like calibrate --model smollm2-135m --out filters/smollm2
    kvpress-like calibrate --model ./my-model --texts notes/ --samples 4096 --out filters/my-model

The output directory holds ``model.safetensors`` with a ``q_filters`` tensor
``[num_layers, num_kv_heads, head_dim]`` (the published ``*_qfilt`` format, sign convention included) and
a ``config.json`` naming the model, corpus, sample counts, seed, timing and the layers that are never
compressed. Unless ``--no-store``, the filters also go to the local filter store, where
``QFilterPress()`` finds them for this model without a path.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch

__all__ = ["configure", "main", "read_texts"]

OFFLINE = {
    "offline:prose": "offline prose (pydoc_data.topics)",
    "offline:code": "Python standard-library source code",
    "offline:random": "uniformly random token ids",
}
#: Characters of text read per calibration token asked for: enough for a random choice of windows.
CHARS_PER_TOKEN = 32


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
    parser.add_argument("--num-sequences", type=int, default=8, help="calibration windows (default: 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--samples", type=int, default=2048, help="queries sampled per head (default: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window and query sampling (default: 0)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--no-store", action="store_true", help="do not copy the filters into the local filter store")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    if args.texts == "offline:prose":
        return None, OFFLINE[args.texts]
    if args.texts == "offline:code":
        from kvpress_like.data import corpus_ids

        return corpus_ids(tokenizer, "code"), OFFLINE[args.texts]
    if args.texts == "offline:random":
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (args.num_sequences, args.seq_len), generator=gen), OFFLINE[args.texts]
    max_chars = CHARS_PER_TOKEN * args.num_sequences * args.seq_len
    return read_texts(args.texts, max_chars, args.seed, args.text_column, args.dataset_config, args.split)


def main(args: argparse.Namespace) -> int:
    from kvpress_like.methods.qfilters import run_calibration, save_filters, store_path
    from kvpress_like.models import EMBEDDED_MODELS, load_model

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("num_sequences", "seq_len", "samples"):
        if getattr(args, name) < 1:
            print(f"kvpress-like calibrate: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        model, tokenizer = load_model(
            args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn_implementation, device=args.device
        )
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
        filters, info = run_calibration(
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
    info.update(
        load_seconds=round(load_seconds, 2),
        device=str(args.device),
        command=(
            f"kvpress-like calibrate --model {args.model} --texts {args.texts} --num-sequences {args.num_sequences} "
            f"--seq-len {args.seq_len} --samples {args.samples} --seed {args.seed} --dtype {args.dtype} --out {args.out}"
        ),
    )
    out = save_filters(filters, args.out, **info)
    print(
        f"Q-Filters {list(filters.shape)} for {info['model']} from {info['num_sequences']} x {info['seq_len']} tokens "
        f"of {corpus}, {info['samples_per_head']} queries per head: {info['calibration_seconds']:.1f} s "
        f"(model load {load_seconds:.1f} s) -> {out}"
    )
    if info["uncompressed_layers"]:
        print(f"layers never compressed (sliding window, zero filters): {info['uncompressed_layers']}")
    if not args.no_store:
        stored = save_filters(filters, store_path(model), **info)
        print(f"stored for QFilterPress() in {stored}")
    return 0
