"""Compression settings from vLLM's configuration: which press a request gets, and how many pairs it keeps."""

from __future__ import annotations

import json
import logging
from functools import lru_cache

from kvpress_like.base import Press, ScorerPress

__all__ = ["CONFIG_KEY", "press_from_settings", "engine_settings", "request_press", "request_settings", "kept_count"]

log = logging.getLogger("vllm.kvpress_like")

#: Key under ``additional_config`` (engine) and ``SamplingParams.extra_args`` (request).
CONFIG_KEY = "kvpress_like"


def engine_settings(vllm_config) -> dict | None:
    """The engine's settings dict (``None``: plugin inactive for this engine). ``{}`` or ``{"press": None}``
    activate the plugin with no default compression, so that requests can ask for it."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if CONFIG_KEY not in extra:
        return None
    settings = extra[CONFIG_KEY]
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise TypeError(
            f"additional_config[{CONFIG_KEY!r}] must be a dict such as {{'press': 'qfilters', 'ratio': 0.75}}, "
            f"got {settings!r}"
        )
    return settings


def request_settings(engine: dict, sampling_params) -> dict:
    """A request's settings: ``extra_args[CONFIG_KEY]`` when given (a dict, its JSON text, or ``None``/``"null"``:
    uncompressed), else the engine's."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if CONFIG_KEY in extra:
        settings = extra[CONFIG_KEY]
        if isinstance(settings, str):  # the OpenAI server's vllm_xargs carry no nested dicts: JSON text instead
            try:
                settings = json.loads(settings)
            except json.JSONDecodeError as err:
                raise ValueError(f"extra_args[{CONFIG_KEY!r}] is not JSON ({err}): {settings!r}") from err
        if settings is not None and not isinstance(settings, dict):
            raise TypeError(f"extra_args[{CONFIG_KEY!r}] must be a dict or None, got {settings!r}")
        return settings or {}
    return engine


def request_press(engine: dict, sampling_params) -> Press | None:
    """The press a request runs with. Settings a request cannot have (an unknown or query-dependent press,
    bad values) leave that request uncompressed with an error in the log, rather than stopping the engine
    that serves every other request; the engine's own settings are checked when it starts."""
    try:
        return press_from_settings(request_settings(engine, sampling_params))
    except (ValueError, TypeError, KeyError) as err:
        _refused(str(err))
        return None


@lru_cache(maxsize=256)
def _refused(reason: str) -> None:
    log.error("kvpress_like: a request's compression settings were refused, it runs uncompressed: %s", reason)


def press_from_settings(settings: dict) -> Press | None:
    """The registry press these settings name (``None`` when they compress nothing); refuses what the
    paged cache cannot honour, saying why."""
    return _press(json.dumps(settings, sort_keys=True, default=str))


@lru_cache(maxsize=64)
def _press(frozen: str) -> Press | None:
    from kvpress_like import get_press

    settings = json.loads(frozen)
    name = settings.pop("press", None)
    if name is None:
        return None
    press = get_press(name, **settings)
    if press.scoring.needs_queries:
        raise ValueError(
            f"press {name!r} needs the queries' attention, which vLLM's fused paged attention never exposes; "
            "use a query-free press (qfilters, knorm, streaming_llm, ...)."
        )
    if press.skip_layers:
        raise ValueError(
            f"skip_layers={press.skip_layers!r} is not supported with vLLM: every layer shares one block table, "
            "so all layers must keep the same number of pairs."
        )
    if press.prefill_chunk_size is not None:
        raise ValueError(
            "prefill_chunk_size is not used with vLLM: the plugin prunes after every prefill chunk vLLM schedules; "
            "set the chunk with vLLM's max_num_batched_tokens."
        )
    if press.decoding:
        raise ValueError(
            "decoding=True is not supported with vLLM: the plugin compresses the prompt after prefill; bound long "
            "generations with max_cache_tokens (re-compacted every block_size tokens past it)."
        )
    return press


def kept_count(press: Press | None, n: int, block_size: int) -> int:
    """Pairs kept per (layer, KV head) from an ``n``-token prefill: the press's target, or its protected sinks
    and window when they are more (its ``select()`` keeps them whatever the target, as under ``press()``),
    rounded up so the dropped prefix is whole blocks (``n`` when nothing is dropped)."""
    target = None if press is None else press.target_size(n, decoding=False)
    if target is None or target >= n:
        return n
    if isinstance(press, ScorerPress):
        target = max(target, press.n_protected(n))
    dropped = (n - target) // block_size * block_size
    return n - dropped
