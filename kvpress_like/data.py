"""Offline text: the prose corpus shipped with CPython, and pass-key / needle prompts built from it.

``pydoc_data.topics`` holds the Python language reference (~90k tokens of English prose), so
calibration, haystacks and perplexity all run without a download. Prompts are built from token ids, so
their length is exact, and every random choice comes from an explicit seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["offline_corpus", "corpus_ids", "PasskeySample", "passkey_sample", "python_source_corpus"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PREFIX = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"  # a single newline: "\\n\\n" here makes SmolLM2 ramble


def offline_corpus() -> str:
    """The English prose of ``pydoc_data.topics``, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def python_source_corpus(max_chars: int = 400_000) -> str:
    """Python source code from the standard library (a second, very different calibration corpus)."""
    import inspect
    import json
    import argparse
    import collections
    import email.message
    import http.client
    import typing

    text = "\n\n".join(inspect.getsource(m) for m in (argparse, collections, email.message, http.client, json, typing))
    return text[:max_chars]


@lru_cache(maxsize=8)
def _cached_ids(tokenizer, text_key: str) -> torch.Tensor:
    text = offline_corpus() if text_key == "prose" else python_source_corpus()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def corpus_ids(tokenizer, corpus: str = "prose") -> torch.Tensor:
    """Token ids of an offline corpus (``"prose"`` or ``"code"``), tokenized once per tokenizer."""
    if corpus not in ("prose", "code"):
        raise ValueError(f"unknown offline corpus {corpus!r}; use 'prose' or 'code'")
    return _cached_ids(tokenizer, corpus)


@dataclass
class PasskeySample:
    """A needle prompt: ``context_ids`` hold the haystack and needle, ``question_ids`` the question."""

    context_ids: torch.Tensor  # (1, n)
    question_ids: torch.Tensor  # (1, m)
    answer: str
    needle_span: tuple[int, int]  # token positions of the needle inside the context


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_sample(
    tokenizer, context_tokens: int, depth: float, seed: int, haystack: str = "repetitive"
) -> PasskeySample:
    """A pass-key retrieval prompt of exactly ``context_tokens`` context tokens.

    ``depth`` in [0, 1] places the needle in the haystack; ``haystack`` is ``"repetitive"`` (the classic
    filler of the pass-key test) or ``"prose"`` (a window of the offline corpus chosen by ``seed``).
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prefix = bos + _ids(tokenizer, PREFIX)
    needle = _ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
    n_fill = context_tokens - len(prefix) - len(needle)
    if n_fill < 1:
        raise ValueError(f"context_tokens={context_tokens} is too short for the prompt and needle")
    if haystack == "repetitive":
        unit = _ids(tokenizer, FILLER)
        fill = (unit * (n_fill // len(unit) + 1))[:n_fill]
        cut = round(depth * (n_fill // len(unit))) * len(unit)  # needle between two filler sentences
    elif haystack == "prose":
        ids = corpus_ids(tokenizer, "prose")
        start = rng.randint(0, len(ids) - n_fill - 1)
        fill = ids[start : start + n_fill].tolist()
        cut = round(depth * n_fill)
    else:
        raise ValueError(f"unknown haystack {haystack!r}; use 'repetitive' or 'prose'")
    context = prefix + fill[:cut] + needle + fill[cut:]
    start = len(prefix) + cut
    return PasskeySample(
        context_ids=torch.tensor([context]),
        question_ids=torch.tensor([_ids(tokenizer, QUESTION)]),
        answer=key,
        needle_span=(start, start + len(needle)),
    )
