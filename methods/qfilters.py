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

import hashlib
import inspect
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvpress_like.base import ScorerPress
from kvpress_like.integrations.transformers import attention_layers, patched_attention
from kvpress_like.models import EMBEDDED_MODELS, _head_dim, cache_dir, model_identity

__all__ = [
    "QFilterPress",
    "calibrate",
    "collect_queries",
    "filters_from_queries",
    "run_calibration",
    "load_filters",
    "save_filters",
    "filters_for",
    "store_path",
    "SIGN_CONVENTION",
]

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
    """Write filters as a directory in the published ``*_qfilt`` format, plus a small config.

    Each file is written under a temporary name and renamed, and the tensor file comes last, so a reader
    that finds ``model.safetensors`` (another process sharing the filter store) sees complete files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    num_layers, num_kv_heads, head_dim = filters.shape
    config = dict(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        kv_head_dim=head_dim,
        sign_convention=SIGN_CONVENTION,
        **metadata,
    )
    tmp = path / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, default=str))
    os.replace(tmp, path / "config.json")
    tmp = path / f".{FILTER_FILE}.{os.getpid()}"
    save_file({FILTER_KEY: filters.detach().float().contiguous().cpu()}, str(tmp))
    os.replace(tmp, path / FILTER_FILE)
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
        raise KeyError(
            f"{path} has no {FILTER_KEY!r} tensor (keys: {sorted(tensors)}): it is not a Q-Filters file. "
            "Make one with `kvpress-like calibrate --model ... --out <dir>`."
        )
    return tensors[FILTER_KEY]


def uncompressed_layers(model) -> list[int]:
    """Layers press() never compresses (sliding-window attention): their filters are zeros."""
    return sorted(layer.layer_idx for layer in attention_layers(model) if layer.sliding)


def _weights_fingerprint(model) -> str:
    """Short hash of the first attention layer's first weight, rounded to bfloat16.

    Tells apart models that share a name and config (two random tiny models, a re-trained checkpoint at
    the same path) while a bfloat16 or float32 load of the same checkpoint hashes the same.
    """
    layers = attention_layers(model)
    params = list(layers[0].module.parameters()) if layers else []
    if not params or params[0].device.type == "meta":
        return "noweights"
    w = params[0].detach().flatten()
    w = w[:: max(1, w.numel() // 65536)].cpu()
    raw = w.to(torch.bfloat16).view(torch.int16) if w.is_floating_point() else w
    return hashlib.sha1(raw.numpy().tobytes()).hexdigest()[:10]


def store_key(model) -> str:
    """The model's filter-store key: its full name (local paths made absolute), architecture and shapes,
    readable, then a hash of those and of a weights fingerprint, so equal basenames or configs never collide."""
    name, rest = model_identity(model).split("|", 1)
    if name != "unnamed" and Path(name).is_dir():
        name = str(Path(name).resolve())
    identity = f"{name}|{rest}|w{_weights_fingerprint(model)}"
    model_type, shape = rest.split("|")[:2]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{model_type}_{shape}")
    return f"{readable[-120:]}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def store_path(model) -> Path:
    """Local filter store entry for a model (see :func:`store_key`)."""
    return cache_dir() / "filters" / store_key(model)


def filters_for(model, tokenizer=None) -> torch.Tensor:
    """Find Q-Filters for ``model``: local store, then (embedded models) calibration, then the hub."""
    path = store_path(model)
    if (path / FILTER_FILE).exists():
        log.info("kvpress_like: Q-Filters for %s from the local store %s", model_identity(model), path)
        return load_filters(path)
    name = str(getattr(model.config, "_name_or_path", ""))
    if name in EMBEDDED_MODELS:
        from transformers import AutoTokenizer

        log.warning(
            "kvpress_like: no Q-Filters cached for %s; calibrating on the offline corpus (once, stored in %s)",
            name,
            path,
        )
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cache_dir() / "models" / name)
        filters, info = run_calibration(model, tokenizer, progress=False)
        save_filters(filters, path, **info)
        return filters
    hub_filters = _from_hub(name)
    if hub_filters is not None:
        return hub_filters
    raise ValueError(
        f"no Q-Filters found for {name or type(model).__name__} (looked in the local store {path}). Compute "
        f"them once with `kvpress-like calibrate --model {name or '<model dir>'} --out <dir>`, which also "
        "stores them there, or pass QFilterPress(filters=<dir>)."
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


def calibration_ids(texts, tokenizer, num_sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(num_sequences, seq_len)`` token windows drawn at random (``seed``) from ``texts``.

    ``texts`` is ``None`` (the offline prose corpus), a string or list of strings, or token ids: a 2-D
    tensor is used as given (one row per sequence), a 1-D tensor is cut into windows like text.
    """
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


@torch.no_grad()
def collect_queries(
    model, ids: torch.Tensor, samples_per_head: int = 2048, seed: int = 0, progress: bool = True
) -> dict[int, torch.Tensor]:
    """A random sample of the queries each full-attention layer really uses, ``{layer: (q_heads, S, d)}``.

    Queries are taken from the attention call itself, so they are post-RoPE and include QK-norm and
    projection biases. Each sequence contributes ``ceil(samples_per_head / len(ids))`` random positions
    (the same positions for every head of a layer), so memory stays bounded whatever the corpus size;
    when a sequence has fewer positions, all of them are kept in order.
    """
    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no full-attention layers to calibrate")
    if samples_per_head < 1:
        raise ValueError(f"samples_per_head must be positive, got {samples_per_head}")
    per_sequence = -(-samples_per_head // len(ids))
    gen = torch.Generator().manual_seed(seed + 1)
    samples: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in layers}
    state = {"take": None}

    def record(module, query, key, value) -> None:
        b, hq, q, d = query.shape
        if state["take"] is None:  # one draw per forward call, shared by every layer
            n = b * q
            state["take"] = torch.arange(n) if per_sequence * b >= n else torch.randperm(n, generator=gen)[: per_sequence * b]
        flat = query.detach().transpose(0, 1).reshape(hq, b * q, d)
        samples[module.layer_idx].append(flat[:, state["take"].to(flat.device)].float().cpu())

    device = next(model.parameters()).device
    # Only queries matter: skip the LM head where the model allows (a 262k vocabulary costs more than the layers).
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with patched_attention(model, layers, record):
        for row in tqdm(ids, desc="calibrating Q-Filters", unit="seq", disable=not progress):
            state["take"] = None
            model(row[None].to(device), use_cache=False, **extra)
    return {idx: torch.cat(chunks, dim=1)[:, :samples_per_head] for idx, chunks in samples.items()}


def filters_from_queries(queries: dict[int, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    """Filters ``shape = [num_layers, num_kv_heads, head_dim]`` from sampled queries (published sign).

    Per query head, the first right singular vector of its queries, signed so that their mean projection is
    positive, is the direction ``u``; directions are averaged over each GQA group and negated. Layers
    absent from ``queries`` (never compressed) stay zero. The singular vector is the top eigenvector of the
    ``d x d`` Gram matrix ``Q^T Q``: the same vector as an SVD of ``Q``, at a fraction of the cost.
    """
    n_layers, n_kv, head_dim = shape
    filters = torch.zeros(n_layers, n_kv, head_dim)
    for idx, q in queries.items():
        _, vectors = torch.linalg.eigh((q.transpose(1, 2) @ q).double())  # eigenvalues ascending
        direction = vectors[:, :, -1].float()  # (hq, d)
        sign = torch.sign(torch.einsum("hsd,hd->hs", q, direction).mean(dim=1))
        direction = direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
        hq = direction.shape[0]
        filters[idx] = -direction.view(n_kv, hq // n_kv, head_dim).mean(dim=1)
    return filters


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

    Runs ``num_sequences`` windows of ``seq_len`` tokens of ``texts`` (default: the offline prose corpus;
    see :func:`calibration_ids`), samples ``samples_per_head`` queries per head with
    :func:`collect_queries` and reduces them with :func:`filters_from_queries`. Sliding-window layers,
    which press() never compresses, get zero filters.
    """
    return run_calibration(model, tokenizer, texts, "", num_sequences, seq_len, samples_per_head, seed, progress)[0]


def run_calibration(
    model,
    tokenizer=None,
    texts=None,
    corpus: str = "offline prose (pydoc_data.topics)",
    num_sequences: int = 8,
    seq_len: int = 512,
    samples_per_head: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, dict]:
    """:func:`calibrate`, timed, with the metadata a filter directory's ``config.json`` records."""
    start, cpu_start = time.perf_counter(), time.process_time()
    ids = calibration_ids(texts, tokenizer, num_sequences, seq_len, seed)
    queries = collect_queries(model, ids, samples_per_head, seed, progress)
    filters = filters_from_queries(queries, expected_shape(model))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    import transformers

    from kvpress_like import __version__

    info = dict(
        model=str(getattr(model.config, "_name_or_path", "") or "unnamed"),
        model_identity=model_identity(model),
        store_key=store_key(model),
        corpus=corpus,
        num_sequences=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
        samples_per_head=int(min(q.shape[1] for q in queries.values())),
        seed=seed,
        calibration_seconds=round(seconds, 2),
        calibration_cpu_seconds=round(cpu_seconds, 2),  # all threads; wall time depends on the machine's load
        torch_threads=torch.get_num_threads(),
        uncompressed_layers=uncompressed_layers(model),
        queries="post-RoPE queries as passed to the attention function (after QK-norm and biases)",
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        versions=dict(kvpress_like=__version__, torch=torch.__version__, transformers=transformers.__version__),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return filters, info
