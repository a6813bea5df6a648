"""The calibration algorithm: from sampled queries to Q-Filters and pre-RoPE query statistics.

This module is the pure part (no model is run here): the calibration windows, and the reductions of sampled
queries into Q-Filters (:func:`filters_from_queries`, the paper's method) and into the statistics the
position-targeted presses rotate (:func:`query_statistics`). Sampling the queries a model really uses needs
its attention calls, which is the transformers integration's job
(:mod:`kvpress_like.integrations.calibration`, also ``kvpress-like calibrate``); see its docstring for the
measured effect of the window length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used, so `kvpress-like calibrate --help` stays fast
    import torch

__all__ = [
    "CalibrationResult",
    "QuerySample",
    "calibration_ids",
    "filters_from_queries",
    "query_statistics",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_NUM_SEQUENCES",
    "DEFAULT_SAMPLES",
]

log = logging.getLogger(__name__)

#: Characters of text read per calibration token asked for: enough for a random choice of windows.
CHARS_PER_TOKEN = 32
#: Default calibration window length (tokens per sequence) and windows: 4096 tokens in all, the original
#: recipe (module docstring: why 2 x 2048 correlates better yet is not the default).
DEFAULT_SEQ_LEN = 512
DEFAULT_NUM_SEQUENCES = 8
DEFAULT_SAMPLES = 2048


def calibration_ids(texts, tokenizer, num_sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(num_sequences, seq_len)`` token windows drawn at random (``seed``) from ``texts``.

    ``texts`` is ``None`` (the offline prose corpus), a string or list of strings, or token ids: a 2-D
    tensor is used as given (one row per sequence), a 1-D tensor is cut into windows like text.
    """
    import torch

    if isinstance(texts, torch.Tensor) and texts.dim() == 2:
        return texts.long()
    if isinstance(texts, torch.Tensor):
        ids = texts.long().flatten()
    elif texts is None:
        if tokenizer is None:
            raise ValueError("calibrate() needs a tokenizer to tokenize the offline corpus (or pass token ids).")
        from kvpress_like.data import corpus_ids

        ids = corpus_ids(tokenizer, "prose")
    else:
        if tokenizer is None:
            raise ValueError("calibrate() needs a tokenizer to turn texts into token ids (or pass token ids).")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}: give more text")
    if n_windows < num_sequences:
        log.warning(
            "kvpress_like: calibration text holds %d windows of %d tokens, fewer than the %d sequences asked",
            n_windows,
            seq_len,
            num_sequences,
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:num_sequences]
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in pick.tolist()])


@dataclass
class QuerySample:
    """Queries sampled per full-attention layer, ``{layer: (q_heads, S, head_dim)}``, and their positions.

    ``post_rope`` is what attention received; ``pre_rope`` the same queries un-rotated by ``positions``
    (equal to ``post_rope`` for a model without RoPE). ``rotary_dims[layer]`` is the number of rotated
    dims (0 without RoPE).
    """

    post_rope: dict[int, torch.Tensor]
    pre_rope: dict[int, torch.Tensor]
    positions: torch.Tensor
    rotary_dims: dict[int, int] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)


def _dominant(q: torch.Tensor) -> torch.Tensor:
    """Per head, the first right singular vector of ``q`` ``(h, S, d)``, signed so the mean projection is positive.

    It is the top eigenvector of the ``d x d`` Gram matrix ``Q^T Q``: the same vector as an SVD of ``Q``, at
    a fraction of the cost.
    """
    import torch

    _, vectors = torch.linalg.eigh((q.transpose(1, 2) @ q).double())  # eigenvalues ascending
    direction = vectors[:, :, -1].float()  # (h, d)
    sign = torch.sign(torch.einsum("hsd,hd->hs", q, direction).mean(dim=1))
    return direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]


def filters_from_queries(queries: dict[int, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    """Filters ``shape = [num_layers, num_kv_heads, head_dim]`` from sampled queries (published sign).

    Per query head, the dominant direction ``u`` (:func:`_dominant`); directions are averaged over each GQA
    group and negated. Layers absent from ``queries`` (never compressed) stay zero.
    """
    import torch

    n_layers, n_kv, head_dim = shape
    filters = torch.zeros(n_layers, n_kv, head_dim)
    for idx, q in queries.items():
        direction = _dominant(q)
        filters[idx] = -direction.view(n_kv, direction.shape[0] // n_kv, head_dim).mean(dim=1)
    return filters


def query_statistics(queries: dict[int, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Per layer and query head: ``mean`` ``[L, hq, d]``, ``direction`` ``[L, hq, d]`` (dominant, signed as
    Q-Filters' ``u``), ``covariance`` ``[L, hq, d, d]`` (unbiased), and ``count`` ``[L]`` samples (0: layer
    not calibrated, statistics zero)."""
    import torch

    some = next(iter(queries.values()))
    hq, _, d = some.shape
    mean = torch.zeros(num_layers, hq, d)
    direction = torch.zeros(num_layers, hq, d)
    covariance = torch.zeros(num_layers, hq, d, d)
    count = torch.zeros(num_layers)
    for idx, q in queries.items():
        q64 = q.double()
        mu = q64.mean(dim=1)
        centered = q64 - mu[:, None]
        mean[idx] = mu.float()
        covariance[idx] = (centered.transpose(1, 2) @ centered / max(q.shape[1] - 1, 1)).float()
        direction[idx] = _dominant(q)
        count[idx] = q.shape[1]
    return dict(mean=mean, direction=direction, covariance=covariance, count=count)


@dataclass
class CalibrationResult:
    """What one calibration pass produces: Q-Filters and their ``config.json`` metadata, pre-RoPE
    statistics and their header metadata."""

    filters: torch.Tensor
    info: dict
    stats: dict[str, torch.Tensor]
    stats_info: dict
