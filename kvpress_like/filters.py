"""The filter store: Q-Filters and calibration statistics on disk, keyed by the model they belong to.

Formats.
* Q-Filters: a directory in the published ``*_qfilt`` format, ``model.safetensors`` holding one tensor
  ``q_filters`` ``[num_layers, num_kv_heads, head_dim]`` (negated queries' direction, see
  :data:`SIGN_CONVENTION`) beside a ``config.json`` of metadata.
* Query statistics (for the position-aware presses): ``query_stats.safetensors`` in the same directory,
  pre-RoPE per layer and query head, with its metadata in the safetensors header (see
  :func:`save_query_stats`). The ``q_filters`` file is written and read exactly as before.

The local store lives in ``$KVPRESS_LIKE_FILTERS`` or ``<cache_dir()>/filters``; an entry is named by
:func:`store_key` (model name, architecture, shapes and a weights fingerprint), so models sharing a
basename or a config never share filters. Lookups go local store, then (embedded offline models)
calibration on the offline corpus, then the published hub repository for online users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kvpress_like.cache import layer_windows
from kvpress_like.models import EMBEDDED_MODELS, cache_dir, head_dim, kv_heads, model_identity

__all__ = [
    "FILTER_KEY",
    "FILTER_FILE",
    "STATS_FILE",
    "SIGN_CONVENTION",
    "as_filters",
    "check_filters",
    "check_query_stats",
    "expected_shape",
    "filters_dir",
    "filters_for",
    "load_filters",
    "load_query_stats",
    "query_stats_for",
    "save_filters",
    "save_query_stats",
    "store_key",
    "store_path",
]

log = logging.getLogger(__name__)

FILTER_KEY = "q_filters"
FILTER_FILE = "model.safetensors"
STATS_FILE = "query_stats.safetensors"
SIGN_CONVENTION = "negated: f = -u, where u is the queries' dominant direction; score(k) = -<k, f>"
HUB_TEMPLATE = "nthngdy/{basename}_qfilt"
#: Tensors of a statistics file, each ``[num_layers, num_q_heads, ...]`` (zeros for layers never calibrated).
STATS_KEYS = ("mean", "direction", "covariance")


def expected_shape(model) -> tuple[int, int, int]:
    """``[num_layers, num_kv_heads, head_dim]``: the filters a model needs."""
    cfg = model.config.get_text_config()
    return (cfg.num_hidden_layers, kv_heads(cfg), head_dim(cfg))


def filters_dir() -> Path:
    """Root of the local filter store: ``$KVPRESS_LIKE_FILTERS``, else ``<cache_dir()>/filters``."""
    return Path(os.environ.get("KVPRESS_LIKE_FILTERS") or cache_dir() / "filters")


def as_filters(value) -> torch.Tensor:
    """Validated float32 CPU filters from a tensor, an array-like (numpy array, nested lists) or a path."""
    if isinstance(value, (str, os.PathLike)):
        filters, source = load_filters(value), str(value)
    elif isinstance(value, torch.Tensor):
        filters, source = value, "the given tensor"
    else:
        try:
            filters = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"filters must be a tensor, an array-like or a path to Q-Filters (safetensors), got "
                f"{type(value).__name__}: {err}"
            ) from err
        source = f"the given {type(value).__name__}"
    if filters.dim() != 3 or not (filters.is_floating_point() or filters.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"Q-Filters must be a real tensor [num_layers, num_kv_heads, head_dim]; {source} has shape "
            f"{tuple(filters.shape)} and dtype {filters.dtype}"
        )
    filters = filters.detach().float().cpu()
    bad = ~torch.isfinite(filters)
    if bad.any():
        layers = sorted({int(i) for i in bad.nonzero()[:, 0]})
        raise ValueError(
            f"Q-Filters from {source} contain {int(bad.sum())} NaN/Inf values (layers {layers}): they would "
            "keep an arbitrary token set. Recompute them with `kvpress-like calibrate --model ... --out <dir>`."
        )
    return filters


def check_filters(filters: torch.Tensor, model) -> None:
    """Refuse filters made for another model (shape mismatch), naming the shape this one needs."""
    want = expected_shape(model)
    if tuple(filters.shape) != want:
        raise ValueError(
            f"Q-Filters of shape {tuple(filters.shape)} do not fit {type(model).__name__}, which needs "
            f"[num_layers, num_kv_heads, head_dim] = {list(want)}: these filters were made for another model. "
            "Calibrate filters for this one with `kvpress-like calibrate --model ...`."
        )


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


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
    _atomic_json(path / "config.json", config)
    tmp = path / f".{FILTER_FILE}.{os.getpid()}"
    save_file({FILTER_KEY: filters.detach().float().contiguous().cpu()}, str(tmp))
    os.replace(tmp, path / FILTER_FILE)
    return path


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, or an error naming the file and the format."""
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    problem = "is empty" if path.stat().st_size == 0 else None
    if problem is None:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError) as err:
            problem = f"is not a safetensors file ({err})"
    raise ValueError(
        f"{what} file {path} {problem}. Expected the safetensors format (the published *_qfilt layout: a "
        f"{FILTER_KEY!r} tensor in {FILTER_FILE}); a torch.save/pickle file is not read. Convert one with "
        f"`safetensors.torch.save_file({{'{FILTER_KEY}': tensor}}, path)` or recompute it with "
        "`kvpress-like calibrate --model ... --out <dir>`."
    )


def load_filters(path: str | os.PathLike) -> torch.Tensor:
    """Load ``q_filters`` from a safetensors file or a directory holding one (the published format).

    The tensor must be real and ``[num_layers, num_kv_heads, head_dim]``, and agree with the ``config.json``
    beside it when there is one; a clear ``ValueError`` naming the file says otherwise.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / FILTER_FILE] if (path / FILTER_FILE).exists() else sorted(path.glob("*.safetensors"))
        files = [f for f in files if f.name != STATS_FILE]
        if not files:
            raise FileNotFoundError(f"no .safetensors file with Q-Filters in {path}")
        path = files[0]
    tensors, _ = _read_safetensors(path, "Q-Filters")
    redo = "Make one with `kvpress-like calibrate --model ... --out <dir>`."
    if FILTER_KEY not in tensors:
        raise ValueError(f"{path} has no {FILTER_KEY!r} tensor (keys: {sorted(tensors)}): it is not a Q-Filters file. {redo}")
    filters = tensors[FILTER_KEY]
    if filters.dim() != 3 or not filters.is_floating_point():
        raise ValueError(
            f"Q-Filters file {path}: {FILTER_KEY!r} must be a real tensor [num_layers, num_kv_heads, head_dim], "
            f"got shape {tuple(filters.shape)} and dtype {filters.dtype}. {redo}"
        )
    config = path.parent / "config.json"
    if config.is_file():
        try:
            info = json.loads(config.read_text())
            declared = tuple(int(info[key]) for key in ("num_layers", "num_kv_heads", "kv_head_dim"))
        except (ValueError, KeyError, TypeError):
            declared = None  # a config of another format (a model's config.json): nothing to compare
        if declared is not None and declared != tuple(filters.shape):
            raise ValueError(
                f"Q-Filters file {path} holds shape {tuple(filters.shape)} but {config} declares "
                f"[num_layers, num_kv_heads, kv_head_dim] = {list(declared)}: the files do not belong together. {redo}"
            )
    return filters


def save_query_stats(stats: dict[str, torch.Tensor], path: str | os.PathLike, **metadata) -> Path:
    """Write pre-RoPE query statistics (``mean``, ``direction``, ``covariance``, ``count``) to ``path/query_stats.safetensors``.

    ``metadata`` (window length, corpus, seed, rotary dims, ...) goes to the safetensors header as JSON
    values, so the file is self-describing; :func:`load_query_stats` returns it decoded.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    header = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    tmp = path / f".{STATS_FILE}.{os.getpid()}"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in stats.items()}, str(tmp), metadata=header)
    os.replace(tmp, path / STATS_FILE)
    return path / STATS_FILE


def _bad_stats(path, problem: str) -> ValueError:
    return ValueError(
        f"query statistics {path} {problem}: the file is damaged or not made by kvpress_like. Recalibrate with "
        "`kvpress-like calibrate --model ... --out <dir>` (or delete it from the filter store to recalibrate)."
    )


def load_query_stats(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a statistics file (or the directory holding ``query_stats.safetensors``).

    Every tensor is checked (present, real, finite, shapes consistent with ``mean`` ``[L, hq, d]``) and the
    header decoded and checked (JSON values, ``scaling`` a mapping of layer to a positive number): one
    ``ValueError`` names the file and the problem. :func:`check_query_stats` then checks the shapes
    against a model.
    """
    path = Path(path)
    path = path / STATS_FILE if path.is_dir() else path
    tensors, header = _read_safetensors(path, "query statistics")
    missing = [key for key in (*STATS_KEYS, "count") if key not in tensors]
    if missing:
        raise _bad_stats(path, f"lacks {missing} (keys: {sorted(tensors)})")
    for key, value in tensors.items():
        if not (value.is_floating_point() or (key == "count" and value.dtype in (torch.int32, torch.int64))):
            raise _bad_stats(path, f"has {key!r} of dtype {value.dtype}; it must be floating point")
    mean = tensors["mean"]
    if mean.dim() != 3:
        raise _bad_stats(path, f"has 'mean' of shape {tuple(mean.shape)}; it must be [num_layers, num_q_heads, head_dim]")
    layers, heads, dim = mean.shape
    want = {"direction": (layers, heads, dim), "covariance": (layers, heads, dim, dim), "count": (layers,)}
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise _bad_stats(path, f"has {key!r} of shape {tuple(tensors[key].shape)}; with 'mean' {tuple(mean.shape)} it must be {shape}")
    bad = [key for key, value in tensors.items() if not torch.isfinite(value).all()]
    if bad:
        raise _bad_stats(path, f"contains NaN/Inf in {bad}")
    if (tensors["count"] < 0).any():
        raise _bad_stats(path, "has negative sample counts in 'count'")
    meta = {}
    for key, value in header.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise _bad_stats(path, f"has header metadata {key!r} that is not JSON ({value[:40]!r})") from None
    scaling = meta.get("scaling", {})
    if not isinstance(scaling, dict) or not all(
        isinstance(k, str) and k.isdigit() and int(k) < layers and isinstance(v, (int, float)) and not isinstance(v, bool)
        and 0 < v < float("inf")
        for k, v in scaling.items()
    ):
        raise _bad_stats(path, f"has header 'scaling' {str(scaling)[:60]}; it must map layer indices below {layers} to positive numbers")
    return tensors, meta


def check_query_stats(tensors: dict[str, torch.Tensor], model, source) -> None:
    """Refuse statistics made for another model: ``mean`` must be ``[num_layers, num_q_heads, head_dim]``."""
    cfg = model.config.get_text_config()
    want = (cfg.num_hidden_layers, cfg.num_attention_heads, head_dim(cfg))
    if tuple(tensors["mean"].shape) != want:
        raise ValueError(
            f"query statistics {source} of shape {tuple(tensors['mean'].shape)} do not fit {type(model).__name__}, which "
            f"needs [num_layers, num_q_heads, head_dim] = {list(want)}: they were made for another model. "
            "Calibrate this one with `kvpress-like calibrate --model ...`."
        )


def _weights_fingerprint(model) -> str:
    """Short hash of the first attention layer's first weight, rounded to bfloat16.

    Tells apart models that share a name and config (two random tiny models, a re-trained checkpoint at
    the same path) while a bfloat16 or float32 load of the same checkpoint hashes the same.
    """
    indexed = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    # the first innermost module with a layer index: layer 0's attention (decoder layers wrap it)
    first = next((m for m in indexed if not any(c is not m and isinstance(getattr(c, "layer_idx", None), int)
                                                  for c in m.modules())), None)
    params = [] if first is None else list(first.parameters())
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
    if any(window is not None for window in layer_windows(model.config)):
        # Stores written before sliding-window layers were calibrated hold zeros there: a new key recalibrates.
        identity += "|sliding-calibrated"
    model_type, shape = rest.split("|")[:2]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{model_type}_{shape}")
    return f"{readable[-120:]}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def store_path(model) -> Path:
    """Local filter store entry for a model (see :func:`store_key`)."""
    return filters_dir() / store_key(model)


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", ""))


def _calibrate_embedded(model, tokenizer, path: Path) -> None:
    """Calibrate an embedded model on the offline corpus and store what is missing (filters, statistics)."""
    from transformers import AutoTokenizer

    from kvpress_like.registry import plugin_manager

    name = _model_name(model)
    log.warning(
        "kvpress_like: no calibration cached for %s; calibrating on the offline corpus (once, stored in %s)", name, path
    )
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(cache_dir() / "models" / name)
    result = plugin_manager().hook.kvpress_like_calibrate(model=model, tokenizer=tokenizer)
    if result is None:
        raise RuntimeError("no calibrator is registered (entry-point group 'kvpress_like'): reinstall kvpress_like")
    if not (path / FILTER_FILE).exists():  # never replace filters a user already relies on
        save_filters(result.filters, path, **result.info)
    save_query_stats(result.stats, path, **result.stats_info)


def filters_for(model, tokenizer=None) -> torch.Tensor:
    """Q-Filters for ``model``: local store, then (embedded models) calibration, then the hub."""
    path = store_path(model)
    if (path / FILTER_FILE).exists():
        log.info("kvpress_like: Q-Filters for %s from the local store %s", model_identity(model), path)
        return as_filters(path)
    name = _model_name(model)
    if name in EMBEDDED_MODELS:
        _calibrate_embedded(model, tokenizer, path)
        return as_filters(path)
    hub_filters = from_hub(name)
    if hub_filters is not None:
        return hub_filters
    raise ValueError(
        f"no Q-Filters found for {name or type(model).__name__} (looked in the local store {path}). Compute "
        f"them once with `kvpress-like calibrate --model {name or '<model dir>'} --out <dir>`, which also "
        "stores them there, or pass QFilterPress(filters=<dir>)."
    )


def query_stats_for(model, tokenizer=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Pre-RoPE query statistics for ``model``: local store, then (embedded models) calibration; else an error."""
    path = store_path(model)
    if not (path / STATS_FILE).exists() and _model_name(model) in EMBEDDED_MODELS:
        _calibrate_embedded(model, tokenizer, path)
    if (path / STATS_FILE).exists():
        return load_query_stats(path)
    name = _model_name(model) or type(model).__name__
    raise ValueError(
        f"no query statistics found for {name} (looked in the local store {path}). Compute them once with "
        f"`kvpress-like calibrate --model {_model_name(model) or '<model dir>'} --out <dir>`, which stores them "
        "there, or pass stats=<that dir>."
    )


def from_hub(name: str) -> torch.Tensor | None:
    """Published filters for online users (``nthngdy/<model>_qfilt``); None when offline or absent."""
    if not name or Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(HUB_TEMPLATE.format(basename=name.split("/")[-1]), FILTER_FILE)
    except Exception as err:  # offline, missing repo, no network
        log.info("kvpress_like: no published Q-Filters for %s (%s)", name, err)
        return None
    return as_filters(file)
