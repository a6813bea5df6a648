"""Offline data for the ``kvpress_ruler`` lm-eval tasks: the prompts of ``kvpress-like eval ruler``.

Each document is one prompt of :mod:`kvpress_like.evaluations.ruler_tasks` (chat template, question and
answer prefix included, decoded from its token ids), so the tasks score the same prompts as the CLI
benchmark. ``pretrained``/``tokenizer`` in ``--model_args`` name the tokenizer that sizes them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import datasets

from kvpress_like.evaluations.ruler_tasks import ruler_sample, score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvpress_tasks import _tokenizer, _tokenizer_name  # noqa: E402  (the sibling module lm-eval also loads)


def ruler_dataset(task: str, context_tokens: int, **kwargs: Any) -> dict[str, datasets.Dataset]:
    """``samples`` prompts of ``task`` with at most ``context_tokens`` tokens, seeds ``seed``, ``seed + 1``, ..."""
    tokenizer = _tokenizer(_tokenizer_name(kwargs))
    first = int(kwargs.get("seed", 0))
    rows = []
    for seed in range(first, first + int(kwargs.get("samples", 20))):
        s = ruler_sample(tokenizer, task, int(context_tokens), seed)
        rows.append(dict(prompt=tokenizer.decode(s.context_ids + s.question_ids, skip_special_tokens=False),
                         answers=s.answers, task=task, context_tokens=int(context_tokens), seed=seed))
    return {"test": datasets.Dataset.from_list(rows)}


def ruler_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's string match: the fraction of expected strings in the generation."""
    return {"score": score(results[0], doc["answers"])}
