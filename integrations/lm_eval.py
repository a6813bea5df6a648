"""lm-evaluation-harness model ``qfilters-hf``: lm-eval's ``HFLM`` with a KV cache compressed by a press.

    lm_eval --model qfilters-hf \\
        --model_args pretrained=smollm2-135m,press=qfilters,ratio=0.875,window=16,device=cpu \\
        --tasks kvpress_passkey --include_path "$(python -m kvpress_like.integrations.lm_eval --tasks-path)"

Installing kvpress_like makes the stock CLI find ``qfilters-hf`` (see :mod:`kvpress_like.integrations.lm_eval_hook`).

Model arguments. ``press=<name>`` picks a registered press (:func:`kvpress_like.list_presses`; third-party
plugins included); every field of that press is a model argument: ``ratio``, ``max_cache_tokens``, ``window``,
``n_sink``, ``skip_layers`` (``[0,1]``, ``0;1`` or ``0``; lm-eval splits ``--model_args`` on commas, and the
pieces of a bracketed list are joined back), ``decoding``, ``prefill_chunk_size``, ``filters=<path>``
(Q-Filters), ``window_size``/``kernel_size`` (SnapKV), ... Everything else goes to ``HFLM`` (``pretrained``,
``dtype``, ``device``, ``batch_size``, ``parallelize``, ...). ``pretrained`` also accepts the embedded models
(``smollm2-135m``, ``gemma3-270m``). Without ``press`` the model is exactly lm-eval's ``hf``.

What is compressed, per request type (the whole point: a single forward over context + continuation would let
every scored token attend to the full context, so compression would change nothing):

* ``loglikelihood``: the context *except its last token* is prefilled under the press and pruned; then the
  last context token and the continuation run in one forward inside :func:`kvpress_like.uncompressed`, so
  every scored log-probability (the first continuation token's included) comes from a query that sees only
  the pruned context plus the uncompressed continuation. Requests sharing a context share one prefill (the
  cache is copied per continuation, as multiple-choice tasks need); contexts of equal length are prefilled
  together in batches of ``batch_size``, continuations are right-padded (harmless under causal attention).
* ``generate_until``: the context except its last token is prefilled and pruned, then ``generate()`` runs on
  the pruned cache (decoding-time pruning applies when the press has ``max_cache_tokens`` or
  ``decoding=True``). Prompts are sorted by length and left-padded into batches of ``batch_size``: press()
  compresses each row on its own real tokens and true positions. Query-dependent presses (SnapKV) cannot
  score a padded batch row by row, so for them only prompts of equal token length share a batch.
* ``loglikelihood_rolling``: each of lm-eval's rolling windows streams through the model from an empty
  cache, ``prefill_chunk_size`` tokens per forward; each chunk is scored against the cache as the press
  left it after the previous chunks. With ``max_cache_tokens`` or ``decoding=True`` the default chunk is one
  token: true streaming with the capped cache. A ratio-only press cannot prune while decoding, so it
  streams in chunks of :data:`ROLLING_CHUNK` tokens and keeps ``1 - ratio`` of what it has seen after each.
  Windows run one at a time (each is a long sequential stream).

Sliding-window layers (Gemma 3) are never compressed: their cache is already bounded. Scale-out: data
parallelism under ``accelerate launch -m lm_eval --model qfilters-hf ...`` (also on CPU, gloo) and model
splitting with ``parallelize=True`` work unchanged: each cache layer lives and is pruned on its layer's device.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import re
import types
import typing
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm
from transformers import DynamicCache

from kvpress_like.base import Press
from kvpress_like.cache import uncompressed
from kvpress_like.integrations.context import press as press_model
from kvpress_like.integrations.transformers import cache_kwargs
from kvpress_like.models import EMBEDDED_MODELS, _materialize
from kvpress_like.registry import list_presses, press_class, press_settings

__all__ = ["QFiltersHFLM", "batch_speed", "build_press", "press_options", "tasks_path", "MODEL_NAME", "ROLLING_CHUNK"]

MODEL_NAME = "qfilters-hf"
#: Chunk size of ``loglikelihood_rolling`` streaming for presses that cannot prune while decoding.
ROLLING_CHUNK = 128


def tasks_path() -> Path:
    """Directory of the offline lm-eval tasks shipped with kvpress_like (pass it to ``--include_path``).

    The task files are data installed with ``kvpress_like.evaluations``: located, not imported (integrations
    sit below evaluations)."""
    spec = importlib.util.find_spec("kvpress_like.evaluations")
    return Path(spec.submodule_search_locations[0]).resolve() / "tasks"


# -- press options from --model_args -------------------------------------------------------------------
def press_options() -> dict[str, set[str]]:
    """Settable fields of every registered press: ``{press name: {option, ...}}``."""
    return {name: press_settings(press_class(name)) for name in list_presses()}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a ``--model_args`` value (already parsed by lm-eval into bool/int/float/str/list) into ``hint``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in args:
            return None
        raise ValueError(f"{name} cannot be None.")
    if bool in args:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    if any(typing.get_origin(a) is tuple for a in args):
        items = [value] if isinstance(value, int) else value
        if isinstance(items, str):
            items = [s for s in re.split(r"[,;:|+\s]+", items.strip("[]() ")) if s]
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be integers such as [0,1] or 0;1, got {value!r}.") from None
    if int in args:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if float in args:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}.") from None
    return str(value) if isinstance(value, (int, float)) else value


def _rejoin_lists(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Undo lm-eval's comma split of a bracketed list: ``skip_layers=[0,1]`` reaches the model as
    ``skip_layers='[0'`` plus a key ``'1]'`` with an empty value; join such pieces back into ``'[0,1]'``."""
    out: dict[str, Any] = {}
    open_key = None
    for key, value in kwargs.items():
        if open_key is not None and value == "" and "[" not in key:
            out[open_key] += f",{key}"
            open_key = None if key.strip().endswith("]") else open_key
            continue
        if open_key is not None:
            break
        out[key] = value
        if isinstance(value, str) and value.lstrip().startswith("[") and "]" not in value:
            open_key = key
    if open_key is not None:
        raise ValueError(f"{open_key}={out[open_key]} has no closing ']'; write a list as {open_key}=[0,1] or {open_key}=0;1.")
    return out


def build_press(name: str, **options: Any) -> Press:
    """A press from ``--model_args`` values; a ``ValueError`` naming valid presses/options otherwise."""
    try:
        cls = press_class(name)
    except KeyError:
        raise ValueError(
            f"unknown press={name!r} for {MODEL_NAME}; registered presses: {', '.join(list_presses())}"
        ) from None
    valid = press_options()[name]
    wrong = sorted(set(options) - valid)
    if wrong:
        raise ValueError(
            f"option(s) {', '.join(wrong)} do not apply to press={name}; its options are: {', '.join(sorted(valid))}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(key, value, hints.get(key, Any)) for key, value in options.items()})


class QFiltersHFLM(HFLM):
    """lm-eval's Hugging Face model with a kvpress_like press on its KV cache (see the module docstring)."""

    def __init__(self, pretrained: Any = None, press: str | None = None, **kwargs: Any) -> None:
        kwargs = _rejoin_lists(kwargs)
        every_option = set().union(*press_options().values())
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in every_option}
        for key in kwargs:  # anything else goes to from_pretrained, where a typo would vanish silently
            near = difflib.get_close_matches(key, every_option, n=1, cutoff=0.8)
            if near:
                raise ValueError(f"unknown model argument {key!r} for {MODEL_NAME}; did you mean {near[0]!r}?")
        if pretrained is None:
            raise ValueError(f"{MODEL_NAME} needs pretrained=<model>: a local directory, a hub id or one of {', '.join(EMBEDDED_MODELS)}")
        if isinstance(press, str) and press.lower() in ("", "none"):
            press = None
        if press is None and options:
            raise ValueError(
                f"{', '.join(sorted(options))} given without a press; add press=<name>, one of: {', '.join(list_presses())}"
            )
        self._press = None if press is None else build_press(press, **options)
        self._press_args = {} if press is None else {"press": press, **options}

        embedded = pretrained if isinstance(pretrained, str) and pretrained in EMBEDDED_MODELS else None
        if embedded:
            pretrained = str(_materialize(embedded))
        super().__init__(pretrained=pretrained, **kwargs)
        if embedded:  # filters and results are keyed by the embedded name, not by the cache path
            self.model.config._name_or_path = embedded
        if self.backend != "causal":
            raise ValueError(f"{MODEL_NAME} compresses decoder-only models; {pretrained} is {self.backend}.")
        self._enable_cpu_data_parallel()
        if self._press is not None:  # fail now (layers that do not exist, wrong filters), not mid-evaluation
            self._press.validate(num_layers=self.model.config.get_text_config().num_hidden_layers)
            self._press.prepare(self.model)

    def _enable_cpu_data_parallel(self) -> None:
        """HFLM shards requests across ``accelerate launch`` processes only on GPUs; do it on CPU too."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def get_model_info(self) -> dict:
        return super().get_model_info() | {"kvpress_like": self._press_args or None}

    # -- helpers ------------------------------------------------------------------------------------
    @contextmanager
    def _compressing(self) -> Iterator[None]:
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
            press_model(self.model, self._press),
        ):
            yield

    @property
    def _batch(self) -> int:
        """Batch size under compression; ``batch_size=auto`` probes one full-length forward, which says
        nothing about pressed caches, so it means 1 here."""
        return self.batch_size if isinstance(self.batch_size, int) else 1

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _prefill(self, ids: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None) -> None:
        """Run ``ids`` into ``cache`` under the press, ``prefill_chunk_size`` tokens per call.

        ``mask`` marks the real tokens of a left-padded batch; each row then gets its true positions (as
        ``generate()`` computes them from the mask) and every chunk the mask of everything seen so far.
        """
        chunk = (self._press.policy.prefill_chunk if self._press is not None else None) or ids.shape[1]
        padded = mask is not None and not bool(mask.all())
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        for start in range(0, ids.shape[1], chunk):
            end = start + chunk
            rows = {"attention_mask": mask[:, :end], "position_ids": positions[:, start:end]} if padded else {}
            self.model(ids[:, start:end], use_cache=True, logits_to_keep=1, **rows, **cache_kwargs(cache))

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or torch.float32)

    def _copy_rows(self, cache: DynamicCache, rows: list[int], last: bool) -> DynamicCache:
        """Cache whose batch rows are ``rows`` of ``cache`` (in place for the last use). The press is shared,
        not copied: pressed layers must stay tied to the press that is active."""
        target = cache if last else copy.deepcopy(cache, {id(self._press): self._press})
        target.batch_select_indices(torch.tensor(rows))  # CPU indices work for layers on any device
        return target

    # -- loglikelihood --------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._press is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
        tails = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("loglikelihood needs a non-empty context and a continuation within max_length")
            whole = (context + continuation)[-(self.max_length + 1) :]
            n = len(continuation)
            by_prefix[tuple(whole[: -n - 1])].append(i)
            tails.append(whole[-n - 1 : -1])
        by_length: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for prefix in by_prefix:
            by_length[len(prefix)].append(prefix)

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood (pressed)")
        with self._compressing():
            for length in sorted(by_length, reverse=True):
                prefixes = by_length[length]
                for start in range(0, len(prefixes), self._batch):
                    group = prefixes[start : start + self._batch]
                    cache = self._new_cache()
                    if length:
                        self._prefill(torch.tensor(group, device=self.device), cache)
                    members = [(row, i) for row, prefix in enumerate(group) for i in by_prefix[prefix]]
                    for m in range(0, len(members), self._batch):
                        part = members[m : m + self._batch]
                        last = m + self._batch >= len(members)
                        sub = self._copy_rows(cache, [row for row, _ in part], last) if length else self._new_cache()
                        self._score_tails(sub, part, tails, requests, results)
                        bar.update(len(part))
        bar.close()
        return results

    def _score_tails(self, cache, part, tails, requests, results) -> None:
        """One uncompressed forward of right-padded tails; fill ``results`` for the requests in ``part``."""
        width = max(len(tails[i]) for _, i in part)
        pad = self.tokenizer.pad_token_id or 0
        batch = torch.tensor([tails[i] + [pad] * (width - len(tails[i])) for _, i in part], device=self.device)
        with uncompressed(cache):
            logprobs = self._log_softmax(self.model(batch, use_cache=True, **cache_kwargs(cache)).logits)
        for row, (_, i) in enumerate(part):
            key, _, continuation = requests[i]
            n = len(continuation)
            target = torch.tensor(continuation, device=self.device)
            scored = logprobs[row, :n]
            answer = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
            results[i] = answer
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)

    # -- loglikelihood_rolling ----------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self._press is None:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        out = []
        with self._compressing():
            for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="rolling (pressed)"):
                (text,) = request.args
                windows = map(
                    lm_utils.make_disjoint_window,
                    lm_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
                total = sum(self._stream(context, continuation) for context, continuation in windows)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
        return out

    @property
    def rolling_chunk(self) -> int:
        """Tokens per forward call when streaming a rolling window (see the module docstring)."""
        policy = self._press.policy
        if policy.prefill_chunk:
            return policy.prefill_chunk
        return 1 if policy.prunes_while_decoding else ROLLING_CHUNK

    def _stream(self, context: list[int], continuation: list[int]) -> float:
        """Log-likelihood of ``continuation`` when ``context + continuation`` streams through a pressed cache."""
        tokens = torch.tensor(context + continuation, device=self.device)
        inputs, targets = tokens[:-1], tokens[1:]
        first_scored = len(inputs) - len(continuation)
        cache, total, chunk = self._new_cache(), 0.0, self.rolling_chunk
        for start in range(0, len(inputs), chunk):
            end = min(start + chunk, len(inputs))
            logits = self.model(inputs[None, start:end], use_cache=True, **cache_kwargs(cache)).logits[0]
            lo = max(start, first_scored)
            if lo < end:
                logprobs = self._log_softmax(logits[lo - start :])
                total += float(logprobs.gather(-1, targets[lo:end, None]).sum())
        return total

    # -- generate_until -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._press is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        # Prompts of different lengths share left-padded batches; a query-dependent press (SnapKV) scores
        # with each row's own last queries, which press() cannot do in a padded batch: equal lengths only.
        pads_ok = not self._press.scoring.needs_queries
        groups: dict[tuple[str, int], list[tuple[int, list[int]]]] = defaultdict(list)
        settings = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} must be below the model's max_length={self.max_length}")
            ids, _ = self.tok_batch_encode(
                [context], left_truncate_len=self.max_length - max_gen_toks, truncation=self.truncation
            )
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            settings[key] = (until, max_gen_toks, kwargs)
            groups[(key, 0 if pads_ok else ids.shape[1])].append((i, ids[0].tolist()))

        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until (pressed)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        with self._compressing():
            for (key, _), members in groups.items():
                until, max_gen_toks, kwargs = settings[key]
                members.sort(key=lambda member: -len(member[1]))  # neighbours in length share a batch
                for start in range(0, len(members), self._batch):
                    part = members[start : start + self._batch]
                    width = len(part[0][1])
                    ids = torch.tensor([[pad] * (width - len(t)) + t for _, t in part], device=self.device)
                    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for _, t in part], device=self.device)
                    cache = self._new_cache()
                    if width > 1:
                        self._prefill(ids[:, :-1], cache, mask[:, :-1])
                    generated = self._model_generate(
                        context=ids,
                        max_length=kwargs.get("max_length", width + max_gen_toks),
                        stop=until,
                        attention_mask=mask,
                        **cache_kwargs(cache),
                        **{k: v for k, v in kwargs.items() if k != "max_length"},
                    )
                    for (i, _), row in zip(part, generated[:, width:].tolist(), strict=True):
                        text = self._finish(row, until)
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(part))
        bar.close()
        return results

    def _finish(self, tokens: list[int], until: list[str]) -> str:
        """Decode generated tokens as HFLM does (thinking tokens, stop sequences)."""
        think = self.think_end_token
        if isinstance(think, int) and think in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(think) :]
        text = self.tok_decode(tokens)
        if isinstance(think, int):
            text = text.lstrip()
        return postprocess_generated_text(
            generation=text, stop=until, think_end_token=think if isinstance(think, str) else None
        )


def batch_speed(
    pretrained: str = "smollm2-135m",
    batch_sizes: tuple[int, ...] = (1, 4),
    context_tokens: int = 1024,
    samples_per_depth: int = 4,
    **press_args: Any,
) -> dict[str, Any]:
    """``generate_until`` requests/s of the offline pass-key task at each batch size, on one loaded model.

    The requests are those of ``kvpress_passkey_<n>`` (lm-eval's generation settings from the task YAML);
    each batch size answers all of them after one warm-up request. Prints and returns the rates, their
    ratio to the first batch size and how many generations agree with the first batch size's.
    """
    import os
    import sys
    import time

    from lm_eval.api.instance import Instance

    sys.path.insert(0, str(tasks_path()))
    from kvpress_tasks import passkey_dataset

    docs = passkey_dataset(context_tokens, pretrained=pretrained, samples_per_depth=samples_per_depth)["test"]
    settings = {"until": ["\n", "."], "max_gen_toks": 10, "do_sample": False, "temperature": 0.0}
    requests = [Instance("generate_until", {}, (doc["context"], settings), i) for i, doc in enumerate(docs)]
    lm = QFiltersHFLM(pretrained=pretrained, device="cpu", batch_size=batch_sizes[0], **press_args)
    lengths = sorted({len(lm.tok_encode(doc["context"])) for doc in docs})
    lm.generate_until(requests[:1], disable_tqdm=True)  # warm-up: filters, kernels
    rates, outputs, load = {}, {}, os.getloadavg()[0]
    for size in batch_sizes:
        lm.batch_size_per_gpu = size
        start = time.perf_counter()
        outputs[size] = lm.generate_until(requests, disable_tqdm=True)
        rates[size] = len(requests) / (time.perf_counter() - start)
    first = batch_sizes[0]
    result = {
        "requests": len(requests),
        "prompt_token_lengths": lengths,
        "press": press_args or None,
        "requests_per_s": rates,
        "speedup": {size: rates[size] / rates[first] for size in batch_sizes},
        "agreeing": {size: sum(a == b for a, b in zip(outputs[size], outputs[first], strict=True)) for size in batch_sizes},
        "torch_threads": torch.get_num_threads(),
        "load_average": (load, os.getloadavg()[0]),
    }
    print(f"{MODEL_NAME} generate_until on kvpress_passkey_{context_tokens}: {len(requests)} requests, prompt lengths "
          f"{lengths}, press {press_args or 'none'}; torch threads {result['torch_threads']}, load average (1 min) "
          f"{load:.1f} before, {result['load_average'][1]:.1f} after")
    for size in batch_sizes:
        print(f"  batch_size={size}: {rates[size]:.3f} requests/s (x{result['speedup'][size]:.2f}), "
              f"{result['agreeing'][size]}/{len(requests)} generations equal to batch_size={first}'s")
    return result


if __name__ != "__main__":  # run as a script, this module only prints; the importable copy is the registered one
    register_model(MODEL_NAME)(QFiltersHFLM)
else:
    import argparse

    parser = argparse.ArgumentParser(description="kvpress_like's lm-eval integration")
    parser.add_argument("--tasks-path", action="store_true", help="print the directory for --include_path")
    parser.add_argument("--presses", action="store_true", help="list presses and their --model_args options")
    parser.add_argument("--batch-speed", metavar="MODEL_ARGS", nargs="?", const="press=qfilters,ratio=0.875,window=16",
                        help="time generate_until on the pass-key task at batch_size 1 and 4 (press args as for --model_args)")
    parser.add_argument("--samples-per-depth", type=int, default=4, help="--batch-speed: prompts per needle depth")
    cli = parser.parse_args()
    if cli.batch_speed is not None:
        args = lm_utils.simple_parse_args_string(cli.batch_speed)
        batch_speed(args.pop("pretrained", "smollm2-135m"), samples_per_depth=cli.samples_per_depth, **args)
        raise SystemExit(0)
    if cli.presses:
        for press_name, fields in press_options().items():
            print(f"{press_name}: {', '.join(sorted(fields))}")
    if cli.tasks_path or not cli.presses:
        print(tasks_path())
