"""Q-Filters (Godey et al., 2025, arXiv 2503.02812): score keys by their projection on the queries' main direction.

Queries of a given head share a dominant direction ``u`` (the first right singular vector of the query
matrix). The attention a key receives on average grows with ``<k, u>``, so keys with a large projection
are kept. One vector per layer and KV head is enough: filters have shape
``[num_layers, num_kv_heads, head_dim]``.

Sign convention. The published ``*_qfilt`` repositories store the *negated* direction ``f = -u`` under the
key ``q_filters``, and the original method keeps the keys with the largest ``-<k, f>``. kvpress_like keeps
that convention everywhere (files, :func:`calibrate`'s return value, :attr:`QFilterPress.filters`), so a
published file and a locally calibrated one are interchangeable: ``score(k) = -<k, f>``, higher is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvpress_like.base import ScorerPress
from kvpress_like.integrations.transformers import attention_layers, patched_attention
from kvpress_like.models import EMBEDDED_MODELS, _head_dim, cache_dir, model_identity

__all__ = ["QFilterPress", "calibrate", "load_filters", "save_filters", "filters_for", "SIGN_CONVENTION"]

log = logging.getLogger(__name__)

FILTER_KEY = "q_filters"
FILTER_FILE = "model.safetensors"
SIGN_CONVENTION = "negated: f = -u, where u is the queries' dominant direction; score(k) = -<k, f>"
HUB_TEMPLATE = "nthngdy/{basename}_qfilt"


def expected_shape(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config()
    return (cfg.num_hidden_layers, cfg.num_key_value_heads, _head_dim(cfg))


@dataclass
class QFilterPress(ScorerPress):
    """Keep the keys with the largest ``-<k, f>`` for their layer and KV head's filter ``f``.

    ``filters`` is a tensor or a path (safetensors file or directory in the published format). Left as
    ``None``, :func:`kvpress_like.press` finds them for the model with :func:`filters_for`.
    """

    name = "qfilters"
    filters: torch.Tensor | str | os.PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._filters = None if self.filters is None else _as_filters(self.filters)
        self._on: dict[tuple, torch.Tensor] = {}

    def prepare(self, model) -> None:
        if self._filters is None:
            self._filters = filters_for(model)
        check_filters(self._filters, model)
        self._on.clear()

    def key_scores(self, layer_idx: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._filters is None:
            raise ValueError(
                "QFilterPress has no filters: pass filters=<path or tensor>, or use it inside "
                "`with press(model, ...)`, which finds or computes them for the model."
            )
        where = (keys.device, layer_idx)
        f = self._on.get(where)
        if f is None:
            f = self._on[where] = self._filters[layer_idx].to(keys.device, torch.float32)
        return -torch.einsum("bhnd,hd->bhn", keys.float(), f)


def _as_filters(value) -> torch.Tensor:
    filters = value if isinstance(value, torch.Tensor) else load_filters(value)
    if filters.dim() != 3 or not filters.is_floating_point():
        raise ValueError(
            f"Q-Filters must be a floating tensor [num_layers, num_kv_heads, head_dim], got "
            f"{tuple(filters.shape)} of {filters.dtype}"
        )
    return filters.detach().float().cpu()


def check_filters(filters: torch.Tensor, model) -> None:
    want = expected_shape(model)
    if tuple(filters.shape) != want:
        raise ValueError(
            f"Q-Filters of shape {tuple(filters.shape)} do not fit {type(model).__name__}, which needs "
            f"[num_layers, num_kv_heads, head_dim] = {list(want)}: these filters were made for another model. "
            "Calibrate filters for this one with `kvpress-like calibrate --model ...`."
        )


def save_filters(filters: torch.Tensor, path: str | os.PathLike, **metadata) -> Path:
    """Write filters as a directory in the published ``*_qfilt`` format, plus a small config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({FILTER_KEY: filters.detach().float().contiguous().cpu()}, str(path / FILTER_FILE))
    num_layers, num_kv_heads, head_dim = filters.shape
    config = dict(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        kv_head_dim=head_dim,
        sign_convention=SIGN_CONVENTION,
        **metadata,
    )
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return path


def load_filters(path: str | os.PathLike) -> torch.Tensor:
    """Load ``q_filters`` from a safetensors file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        files = [path / FILTER_FILE] if (path / FILTER_FILE).exists() else sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors file with Q-Filters in {path}")
        path = files[0]
    if not path.exists():
        raise FileNotFoundError(f"Q-Filters file {path} does not exist")
    tensors = load_file(str(path))
    if FILTER_KEY not in tensors:
        raise KeyError(f"{path} has no {FILTER_KEY!r} tensor (keys: {sorted(tensors)})")
    return tensors[FILTER_KEY]


def store_path(model) -> Path:
    """Local filter store entry for a model, keyed by its identity (name, architecture, shapes)."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", model_identity(model))
    return cache_dir() / "filters" / key


def filters_for(model, tokenizer=None) -> torch.Tensor:
    """Find Q-Filters for ``model``: local store, then (embedded models) calibration, then the hub."""
    path = store_path(model)
    if (path / FILTER_FILE).exists():
        return load_filters(path)
    name = str(getattr(model.config, "_name_or_path", ""))
    if name in EMBEDDED_MODELS:
        from transformers import AutoTokenizer

        log.warning("kvpress_like: no Q-Filters cached for %s; calibrating on the offline corpus (once)", name)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cache_dir() / "models" / name)
        filters = calibrate(model, tokenizer=tokenizer)
        save_filters(filters, path, model=name, corpus="pydoc_data.topics")
        return filters
    hub_filters = _from_hub(name)
    if hub_filters is not None:
        return hub_filters
    raise ValueError(
        f"no Q-Filters found for {name or type(model).__name__}. Compute them once with "
        f"`kvpress-like calibrate --model {name or '<model>'} --out <dir>` (or "
        "kvpress_like.methods.qfilters.calibrate(model, tokenizer=...)) and pass QFilterPress(filters=<dir>)."
    )


def _from_hub(name: str) -> torch.Tensor | None:
    """Published filters for online users (``nthngdy/<model>_qfilt``); None when offline or absent."""
    if not name or Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(HUB_TEMPLATE.format(basename=name.split("/")[-1]), FILTER_FILE)
    except Exception as err:  # offline, missing repo, no network
        log.info("kvpress_like: no published Q-Filters for %s (%s)", name, err)
        return None
    return load_filters(file)


def _calibration_ids(texts, tokenizer, num_sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    if isinstance(texts, torch.Tensor):
        return texts.long().view(-1, texts.shape[-1])
    if tokenizer is None:
        raise ValueError("calibrate() needs a tokenizer to turn texts into token ids (or pass token ids).")
    if texts is None:
        from kvpress_like.data import corpus_ids

        ids = corpus_ids(tokenizer, "prose")
    else:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:num_sequences]
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in pick.tolist()])


@torch.no_grad()
def calibrate(
    model,
    texts=None,
    tokenizer=None,
    num_sequences: int = 8,
    seq_len: int = 512,
    samples_per_head: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Compute Q-Filters ``[num_layers, num_kv_heads, head_dim]`` (published sign convention).

    Runs ``num_sequences`` windows of ``seq_len`` tokens (default: the offline prose corpus) and records
    the post-RoPE queries each full-attention layer really uses (after QK-norm and biases), keeping a
    random sample of ``samples_per_head`` queries per head so memory stays bounded. Per head, the first
    right singular vector of the sampled queries, signed so that their mean projection is positive, is
    the queries' direction ``u``; directions are averaged over each GQA group and negated. Layers that
    are never compressed (sliding-window) get zero filters.
    """
    ids = _calibration_ids(texts, tokenizer, num_sequences, seq_len, seed)
    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no full-attention layers to calibrate")
    n_layers, n_kv, head_dim = expected_shape(model)
    per_sequence = -(-samples_per_head // len(ids))
    gen = torch.Generator().manual_seed(seed + 1)
    samples: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in layers}

    def record(module, query, key, value) -> None:
        b, hq, q, d = query.shape
        flat = query.detach().float().transpose(0, 1).reshape(hq, b * q, d)
        take = torch.randperm(b * q, generator=gen)[: min(per_sequence * b, b * q)]
        samples[module.layer_idx].append(flat[:, take.to(flat.device)].cpu())

    device = next(model.parameters()).device
    with patched_attention(model, layers, record):
        for row in tqdm(ids, desc="calibrating Q-Filters", disable=not progress):
            model(row[None].to(device), use_cache=False)

    filters = torch.zeros(n_layers, n_kv, head_dim)
    for idx, chunks in samples.items():
        queries = torch.cat(chunks, dim=1)[:, :samples_per_head]  # (hq, S, d)
        _, _, vh = torch.linalg.svd(queries, full_matrices=False)
        direction = vh[:, 0]  # (hq, d)
        sign = torch.sign(torch.einsum("hsd,hd->hs", queries, direction).mean(dim=1))
        direction = direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
        hq = direction.shape[0]
        filters[idx] = -direction.view(n_kv, hq // n_kv, head_dim).mean(dim=1)
    return filters
