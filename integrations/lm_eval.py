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

import difflib
import importlib.util
import json
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
from kvpress_like.cache_api import cache_kwargs
from kvpress_like.cache_ops import chunked_prefill, fork_cache
from kvpress_like.integrations.context import press as press_model
from kvpress_like.models import EMBEDDED_MODELS, _materialize
from kvpress_like.registry import UnknownSettings, list_presses, press_class, press_settings, resolve_press

__all__ = ["QFiltersHFLM", "build_press", "press_options", "tasks_path", "MODEL_NAME", "ROLLING_CHUNK"]

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
    """A press from ``--model_args`` values (text, converted to each setting's type); a ``ValueError`` naming
    valid presses/options otherwise."""
    try:
        return resolve_press(name, options, parse=True)
    except UnknownSettings as err:
        raise ValueError(
            f"option(s) {', '.join(err.unknown)} do not apply to press={name}; its options are: {', '.join(err.valid)}"
        ) from None


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
        """Run ``ids`` (left-padded where ``mask`` says) into ``cache`` under the press, ``prefill_chunk_size``
        tokens per call."""
        chunked_prefill(self.model, ids, cache, self._press.policy.prefill_chunk if self._press is not None else None, mask)

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or torch.float32)

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
                        sub = fork_cache(cache, [row for row, _ in part], in_place=last) if length else self._new_cache()
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


if __name__ != "__main__":  # run as a script, this module only prints; the importable copy is the registered one
    register_model(MODEL_NAME)(QFiltersHFLM)
else:
    import argparse

    parser = argparse.ArgumentParser(description="kvpress_like's lm-eval integration")
    parser.add_argument("--tasks-path", action="store_true", help="print the directory for --include_path")
    parser.add_argument("--presses", action="store_true", help="list presses and their --model_args options")
    cli = parser.parse_args()
    if cli.presses:
        for press_name, fields in press_options().items():
            print(f"{press_name}: {', '.join(sorted(fields))}")
    if cli.tasks_path or not cli.presses:
        print(tasks_path())
