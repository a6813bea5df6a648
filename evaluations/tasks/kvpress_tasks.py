"""Offline data for kvpress_like's lm-eval tasks, generated deterministically from a seed (no download).

lm-eval calls these through ``custom_dataset`` with the run's metadata: the task YAML's ``metadata``, then
``--metadata`` JSON, then the ``--model_args`` (``pretrained``/``tokenizer`` name the tokenizer that sizes the
pass-key prompts). See the README section "lm-evaluation-harness".
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

import datasets

from kvpress_like.data import offline_corpus, passkey_sample


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from kvpress_like.models import EMBEDDED_MODELS, _materialize

    return AutoTokenizer.from_pretrained(str(_materialize(name)) if name in EMBEDDED_MODELS else name)


def _tokenizer_name(kwargs: dict[str, Any]) -> str:
    for key in ("tokenizer", "pretrained"):
        if isinstance(kwargs.get(key), str) and kwargs[key]:
            return kwargs[key]
    raise ValueError(
        "the kvpress pass-key tasks size prompts in tokens and need a tokenizer: pass --model_args "
        "pretrained=<name or path> (or tokenizer=<name or path>)."
    )


def passkey_dataset(context_tokens: int, **kwargs: Any) -> dict[str, datasets.Dataset]:
    """Pass-key prompts of ``context_tokens`` tokens, needles at ``depths``, ``samples_per_depth`` seeds each.

    Documents are ordered seed-major (all depths of seed 0, then seed 1, ...), so ``--limit`` keeps every
    depth. The prompt ends with the question, ``...The pass key is``; the answer is the 5-digit key.
    """
    tokenizer = _tokenizer(_tokenizer_name(kwargs))
    depths = [float(d) for d in kwargs.get("depths", (0.0, 0.25, 0.5, 0.75, 1.0))]
    base_seed = int(kwargs.get("seed", 0))
    haystack = kwargs.get("haystack", "repetitive")
    rows = []
    for s in range(int(kwargs.get("samples_per_depth", 2))):
        for depth in depths:
            seed = base_seed + 1000 * s + round(depth * 100)
            sample = passkey_sample(tokenizer, int(context_tokens), depth, seed, haystack=haystack)
            ids = sample.context_ids[0].tolist() + sample.question_ids[0].tolist()
            rows.append(
                dict(
                    context=tokenizer.decode(ids, skip_special_tokens=False),
                    answer=sample.answer,
                    context_tokens=int(context_tokens),
                    depth=depth,
                    seed=seed,
                )
            )
    return {"test": datasets.Dataset.from_list(rows)}


def passkey_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the first number in the generation is the pass key."""
    numbers = re.findall(r"\d+", results[0])
    return {"acc": float(bool(numbers) and numbers[0] == doc["answer"])}


def perplexity_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """``num_docs`` documents of about ``doc_chars`` characters of the offline prose corpus, picked by ``seed``.

    Documents are runs of whole paragraphs of the Python language reference (``pydoc_data.topics``).
    """
    doc_chars, num_docs = int(kwargs.get("doc_chars", 6000)), int(kwargs.get("num_docs", 8))
    docs, current = [], []
    for paragraph in offline_corpus().split("\n\n"):
        current.append(paragraph)
        if sum(len(p) + 2 for p in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    random.Random(int(kwargs.get("seed", 0))).shuffle(docs)
    return {"test": datasets.Dataset.from_list([{"text": text} for text in docs[:num_docs]])}
