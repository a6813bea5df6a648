"""``pipeline("kvpress-qa")``: read a long context once, compress its KV cache, answer many questions on it.

    import kvpress_like.integrations.pipeline          # registers the task (its only import-time effect)
    from transformers import pipeline
    from kvpress_like import QFilterPress

    pipe = pipeline("kvpress-qa", model=model, tokenizer=tokenizer)
    out = pipe(context, questions=["Who?", "When?"], press=QFilterPress(ratio=0.875))
    out["answers"], out["kv_bytes"]

The context is prefilled and compressed **once**; each question is then answered on its own copy of the
compressed cache (:func:`fork`), so questions never see each other. By default a question's tokens are
appended uncompressed (:func:`kvpress_like.uncompressed`): every question reads the same pruned context.
``compress_questions=True`` lets the press evict among context and question tokens instead (the question
goes through the cache like more context). Decoding budgets (``max_cache_tokens``, ``decoding=True``) apply
while the answer is generated. Query-dependent presses (SnapKV) score the context with the context's own
last queries: the question is not part of them, since the context is compressed before any question is seen.

The task is registered under ``"kvpress-qa"`` and, unless another package (NVIDIA kvpress) already took it,
under kvpress's name ``"kv-press-text-generation"``, through ``transformers.pipelines.PIPELINE_REGISTRY``.
Importing ``kvpress_like`` does not register it: transformers' pipelines module roughly doubles the
package's import time, and ``import kvpress_like`` promises to change nothing. Importing this module (or
calling :func:`register`, idempotent) does.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, Pipeline
from transformers.cache_utils import Cache
from transformers.pipelines import PIPELINE_REGISTRY

from kvpress_like.base import Press
from kvpress_like.cache import cache_nbytes, uncompressed
from kvpress_like.cache_api import cache_kwargs
from kvpress_like.cache_ops import cache_presses, chunked_prefill, fork_cache
from kvpress_like.integrations.context import press as press_model
from kvpress_like.filters import expected_shape
from kvpress_like.models import chat_frame, model_identity
from kvpress_like.registry import accepted_settings, resolve_press

__all__ = ["KVPressQAPipeline", "register", "fork", "resolve_press", "cache_press", "model_key", "TASK", "KVPRESS_TASK"]

TASK = "kvpress-qa"
#: NVIDIA kvpress's task name, registered as an alias when free.
KVPRESS_TASK = "kv-press-text-generation"
#: Attribute under which a cache made by the pipeline remembers its context's token ids (``(1, n)``).
PROMPT_ATTR = "kvpress_like_prompt_ids"
#: Attribute under which it remembers the context text, so later questions tokenize as one prompt with it.
CONTEXT_ATTR = "kvpress_like_context"
#: Attribute under which it remembers the model that made it (:func:`model_key`): only that model continues it.
MODEL_ATTR = "kvpress_like_model"


def model_key(model) -> tuple[str, str]:
    """``(model_identity, weights fingerprint)``: name, architecture and shapes, plus a hash of a strided sample
    of every parameter (16 values each), so models sharing a config but not their weights differ."""
    params = [p for p in model.parameters() if p.device.type != "meta" and p.numel()]  # offloaded ones: on meta
    samples = [p.detach().reshape(-1)[:: max(1, p.numel() // 16)][:16].float().cpu() for p in params]
    raw = torch.cat(samples).numpy().tobytes() if samples else b""
    return model_identity(model), hashlib.sha1(raw).hexdigest()[:16]


def cache_press(cache: Cache) -> Press | None:
    """The press that compressed ``cache`` (None for a plain cache); a cache must be continued under it."""
    presses = cache_presses(cache)
    if len(presses) > 1:
        raise ValueError("this cache was compressed by several presses; continue it layer by layer with press().")
    return next(iter(presses), None)


def fork(cache: Cache, rows: int = 1) -> Cache:
    """An independent copy of ``cache`` repeated ``rows`` times along the batch (for ``rows`` questions);
    :func:`kvpress_like.cache_ops.fork_cache`, the copy every front-end makes."""
    return fork_cache(cache, rows)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _check_questions(question: Any, questions: Any) -> list[str]:
    if (question is None) == (questions is None):
        raise ValueError("ask exactly one of question='...' or questions=['...', ...].")
    if question is not None:
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}; use questions=[...] for several.")
        questions = [question]
    if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
        raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}.")
    if not questions:
        raise ValueError("questions is empty: pass at least one question.")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"questions[{i}] is a {type(q).__name__}, not a string.")
        if not q.strip():
            raise ValueError(f"questions[{i}] is empty.")
    return list(questions)


class KVPressQAPipeline(Pipeline):
    """Question answering over one long context whose KV cache is compressed once and reused per question.

    Call ``pipe(context, question=... | questions=[...], press=..., **options)``, or
    ``pipe(cache=<a cache from return_cache=True>, question=...)`` to keep asking later. Options:

    * ``press``: a :class:`~kvpress_like.Press`, a registered name (its settings as keywords: ``press="knorm",
      ratio=0.5``), or None for a full cache. A cache passed back is continued under the press that made it.
    * ``compress_questions`` (False): let the press evict among the question's tokens too.
    * ``answer_prefix`` (""): text the answer starts with (after the chat template's assistant header).
    * ``question_batch_size`` (8): questions answered together, left-padded to the longest (sorted by length;
      a query-dependent press such as SnapKV only batches questions of equal token length).
    * ``return_cache`` (False): also return the compressed context cache (never modified by answering).
    * anything else (``max_new_tokens``, default 50; ``do_sample``, ``num_beams``, ...) goes to ``generate()``.
      With ``num_return_sequences=k`` each answer is a list of ``k`` strings. ``return_dict_in_generate``
      is accepted (answers are still returned); ``output_scores`` and the like are refused: run
      ``generate()`` on a returned cache for them.

    A returned cache remembers the model that made it (:func:`model_key`: identity and a weights
    fingerprint) and its context text; passed to a pipeline on another model it is refused, and later
    questions are tokenized with the context as one prompt (see :meth:`encode`).

    Returns ``{"answer": str}`` for ``question=`` or ``{"answers": [str, ...]}`` for ``questions=``, plus
    ``kv_bytes`` (the compressed context cache), ``peak_kv_bytes`` (that cache plus the copies of one batch of
    questions, after answering; the last batch uses the context cache itself unless it is returned or was
    passed in), ``context_tokens``, ``prefill_seconds``, ``answer_seconds`` (per question; a
    batch's time is split evenly) and, on request, ``cache``.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=50)

    def __call__(
        self,
        context: str | None = None,
        question: str | None = None,
        questions: list[str] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if cache is None:
            if not isinstance(context, str):
                raise TypeError(
                    f"context must be a string (one context per call), got {type(context).__name__}; "
                    "or pass cache=<a cache from return_cache=True> to continue."
                )
            if not context.strip():
                raise ValueError("context is empty: pass the document to ask about.")
        else:
            if context is not None:
                raise ValueError("pass either a context or a cache returned with return_cache=True, not both.")
            if not isinstance(cache, Cache) or cache.get_seq_length() == 0:
                raise TypeError("cache must be a non-empty transformers Cache, e.g. out['cache'] from return_cache=True.")
        inputs = {"context": context, "questions": _check_questions(question, questions), "cache": cache}
        out = super().__call__(inputs, **kwargs)
        if question is not None:
            out["answer"] = out.pop("answers")[0]
        return out

    def _sanitize_parameters(
        self,
        press: Press | str | None = None,
        compress_questions: bool | None = None,
        answer_prefix: str | None = None,
        question_batch_size: int | None = None,
        return_cache: bool | None = None,
        **kwargs: Any,
    ):
        fields = accepted_settings(press)
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
        preprocess, forward = {}, {}
        if press is not None or settings:
            forward["press"] = resolve_press(press, settings)
        if answer_prefix is not None:
            if not isinstance(answer_prefix, str):
                raise TypeError(f"answer_prefix must be a string, got {type(answer_prefix).__name__}")
            preprocess["answer_prefix"] = answer_prefix
        if compress_questions is not None:
            forward["compress_questions"] = bool(compress_questions)
        if question_batch_size is not None:
            if isinstance(question_batch_size, bool) or not isinstance(question_batch_size, int) or question_batch_size < 1:
                raise ValueError(f"question_batch_size must be a positive integer, got {question_batch_size!r}")
            forward["question_batch_size"] = question_batch_size
        if return_cache is not None:
            forward["return_cache"] = bool(return_cache)
        forward.update(kwargs)  # generation parameters
        return preprocess, forward, {}

    # -- prompt -------------------------------------------------------------------------------------
    def encode(self, context: str | None, questions: list[str], answer_prefix: str = "", cached: torch.Tensor | None = None) -> tuple:
        """``(context_ids (1, n) or None, [question_ids (1, m), ...])``: the prompt, split where the context ends.

        With a chat template, the context opens the user turn and each question follows it (after a blank
        line), then the assistant header and ``answer_prefix``. Without one: context, blank line, question,
        newline, ``answer_prefix``. Each whole prompt is tokenized at once and the context's ids are the
        longest prefix that every whole prompt and the context alone share, so context ids plus question ids
        are exactly the whole prompt's ids (a context ending in a newline or a space merges with the blank
        line after it; those last tokens then travel with the questions). ``cached``: the ids of a cache made
        from ``context`` earlier; the questions then continue them, exactly where the whole prompt starts with
        them, else after the rest of the context tokenized alone (the same text, as the cache was split).
        """
        tok = self.tokenizer
        frame = chat_frame(tok)
        if frame is not None:
            head, tail = frame
            context_text, specials = (None if context is None else head + context), False
            question_texts = [f"\n\n{q}{tail}{answer_prefix}" for q in questions]
        else:
            context_text, specials = context, True
            question_texts = [f"\n\n{q}\n{answer_prefix}" for q in questions]
        alone = [tok(text, add_special_tokens=False)["input_ids"] for text in question_texts]
        if context_text is None:  # a question on its own (a cache made outside the pipeline)
            return (cached, [torch.tensor([ids]) for ids in alone])
        context_alone = tok(context_text, add_special_tokens=specials)["input_ids"]
        whole = [tok(context_text + text, add_special_tokens=specials)["input_ids"] for text in question_texts]
        if cached is None:
            cached = torch.tensor([context_alone[: min(_shared_prefix(context_alone, ids) for ids in whole)]])
        prefix = cached[0].tolist()
        cut = len(prefix)
        if context_alone[:cut] != prefix:
            raise ValueError(
                "this cache's context tokenizes differently with this pipeline's tokenizer: it was made with another "
                "tokenizer. Pass the context again to compress it here."
            )
        question_ids = [w[cut:] if w[:cut] == prefix else context_alone[cut:] + a for w, a in zip(whole, alone)]
        return cached, [torch.tensor([ids]) for ids in question_ids]

    def preprocess(self, inputs: dict, answer_prefix: str = "") -> dict:
        cache, context = inputs["cache"], inputs["context"]
        cached = None
        if cache is not None:  # continue a cache: its context text and ids, when the pipeline made it
            context, cached = getattr(cache, CONTEXT_ATTR, None), getattr(cache, PROMPT_ATTR, None)
        context_ids, question_ids = self.encode(context, inputs["questions"], answer_prefix, cached)
        return {"context": context, "context_ids": context_ids, "question_ids": question_ids, "cache": cache}

    # -- compress once, ask many ----------------------------------------------------------------------
    def _forward(
        self,
        inputs: dict,
        press: Press | None = None,
        compress_questions: bool = False,
        question_batch_size: int = 8,
        return_cache: bool = False,
        **generate_kwargs: Any,
    ) -> dict:
        cache, context_ids = inputs["cache"], inputs["context_ids"]
        prefill_seconds = 0.0
        if cache is not None:
            made_by = cache_press(cache)
            if press is not None and press is not made_by:
                raise ValueError(
                    f"this cache was compressed by {type(made_by).__name__ if made_by else 'no press'}; "
                    "omit press= when continuing it (the cache keeps its own press)."
                )
            self._check_cache_model(cache)
            press, context_ids = made_by, self._prompt_of(cache)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        sequences = self._sequences_per_question(generate_kwargs)
        with ExitStack() as stack:
            if press is not None:
                stack.enter_context(press_model(self.model, press))
            if cache is None:
                start = time.perf_counter()
                cache = DynamicCache(config=self.model.config)
                chunked_prefill(self.model, context_ids, cache, None if press is None else press.policy.prefill_chunk)
                setattr(cache, PROMPT_ATTR, context_ids)
                setattr(cache, CONTEXT_ATTR, inputs["context"])
                setattr(cache, MODEL_ATTR, model_key(self.model))
                prefill_seconds = time.perf_counter() - start
            kv_bytes = cache_nbytes(cache)
            questions = inputs["question_ids"]
            # Left-padded batches of questions need a query-free press (or none): a query-dependent press
            # scores with each row's own last queries, so it only batches questions of equal length.
            pads_ok = press is None or not press.scoring.needs_queries
            groups: dict[int, list[int]] = defaultdict(list)
            for i in sorted(range(len(questions)), key=lambda i: -questions[i].shape[1]):
                groups[0 if pads_ok else questions[i].shape[1]].append(i)
            answers: list = [None] * len(questions)
            seconds: list = [None] * len(questions)
            peak = kv_bytes
            batches = [m[lo : lo + question_batch_size] for m in groups.values() for lo in range(0, len(m), question_batch_size)]
            for b, part in enumerate(batches):
                # The last batch answers on the context cache itself unless the caller keeps it (or passed it).
                in_place = b == len(batches) - 1 and not (return_cache or inputs["cache"] is not None)
                start = time.perf_counter()
                tokens, batch_bytes = self._answer(
                    cache, context_ids, [questions[i] for i in part], compress_questions, generate_kwargs, in_place, sequences
                )
                elapsed = (time.perf_counter() - start) / len(part)
                peak = max(peak, batch_bytes if in_place else kv_bytes + batch_bytes)
                for row, i in enumerate(part):
                    answers[i], seconds[i] = tokens[row], elapsed
        out = {
            "answer_ids": answers,
            "sequences_per_question": sequences,
            "kv_bytes": kv_bytes,
            "peak_kv_bytes": peak,
            "context_tokens": context_ids.shape[1],
            "prefill_seconds": prefill_seconds,
            "answer_seconds": seconds,
        }
        if return_cache:
            out["cache"] = cache
        return out

    def _prompt_of(self, cache: Cache) -> torch.Tensor:
        """Context ids of a cache passed back; placeholders (pad tokens) for a cache made outside the pipeline,
        which only logits processors that read the prompt (repetition penalties) could notice."""
        ids = getattr(cache, PROMPT_ATTR, None)
        if ids is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((1, cache.get_seq_length()), pad, dtype=torch.long)
        return ids.to(self.device)

    def _sequences_per_question(self, generate_kwargs: dict) -> tuple[int, int]:
        """``(num_return_sequences, rows generate() gives each question)``: beams and returned sequences expand
        each question's row inside generate(), so its cache must be expanded the same way beforehand."""
        params = self._get_set_generation_params(generate_kwargs)
        extra = [key for key in ("output_scores", "output_logits", "output_attentions", "output_hidden_states") if params.get(key)]
        if extra:
            raise ValueError(
                f"{', '.join(extra)}: the kvpress-qa pipeline returns answers only; for scores, run generate() on "
                "the cache yourself (return_cache=True gives it, kvpress_like.integrations.pipeline.fork copies it)."
            )
        returned = int(params.get("num_return_sequences") or 1)
        return returned, max(int(params.get("num_beams") or 1), returned)

    def _check_cache_model(self, cache: Cache) -> None:
        """Refuse a cache made by another model: its keys would be read by other weights (a crash when the
        shapes differ, silently wrong answers when they do not)."""
        made_for = getattr(cache, MODEL_ATTR, None)
        here = model_key(self.model)
        if made_for is not None and made_for != here:
            why = "another model" if made_for[0] != here[0] else "a model with other weights"
            raise ValueError(
                f"this cache was made by {why} ({made_for[0]}) than this pipeline's ({here[0]}): a cache can only be "
                "continued on the model that made it. Pass the context again to compress it for this model."
            )
        layers, heads, dim = expected_shape(self.model)
        shapes = {tuple(layer.keys.shape[1::2]) for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()}
        if len(cache.layers) != layers or shapes - {(heads, dim)}:
            raise ValueError(
                f"this cache ({len(cache.layers)} layers, KV heads x head_dim {sorted(shapes)}) does not fit this "
                f"pipeline's model ({layers} layers, {heads} x {dim}): it was made by another model. Pass the context "
                "again to compress it for this model."
            )

    def _answer(
        self, cache, context_ids, questions: list[torch.Tensor], compress_questions: bool, generate_kwargs: dict,
        in_place: bool, sequences: tuple[int, int] = (1, 1),
    ):
        """Generated token ids of a batch of questions, each on its own copy of ``cache`` (``in_place``: on
        ``cache`` itself, repeated along the batch), left-padded to the longest (the pads sit between the
        cached context and the question, which press() accepts); and the KV bytes the batch ends with.
        ``sequences``: ``(returned, expanded)`` rows per question (beams, num_return_sequences); each
        question's answer is then a list of its ``returned`` sequences."""
        rows, width, n = len(questions), max(q.shape[1] for q in questions), context_ids.shape[1]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.stack([torch.nn.functional.pad(q[0], (width - q.shape[1], 0), value=pad) for q in questions])
        mask = torch.ones(rows, n + width, dtype=torch.long, device=ids.device)
        for row, q in enumerate(questions):
            mask[row, n : n + width - q.shape[1]] = 0
        own = fork_cache(cache, rows, in_place=in_place)
        # All question tokens but the last are appended here (kept whole unless compress_questions); the
        # last one starts generate(), whose decoding steps follow the press's decoding rules (budgets).
        if width > 1:
            with nullcontext() if compress_questions else uncompressed(own):
                chunked_prefill(self.model, ids[:, :-1], own, mask=mask[:, :-1])
        returned, expanded = sequences
        if expanded > 1:  # generate() expands the prompt per beam / sequence, and leaves the cache to its caller
            own.batch_repeat_interleave(expanded)
        prompt = torch.cat([context_ids.expand(rows, -1), ids], dim=1)
        out = self.model.generate(prompt, attention_mask=mask, **cache_kwargs(own), **generate_kwargs)
        out = out if isinstance(out, torch.Tensor) else out.sequences  # return_dict_in_generate=True
        tokens = out[:, prompt.shape[1] :].reshape(rows, returned, -1)
        return [row[0] if returned == 1 else list(row) for row in tokens], cache_nbytes(own)

    def postprocess(self, outputs: dict) -> dict:
        def text(ids: torch.Tensor) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

        answers = outputs.pop("answer_ids")
        returned, _ = outputs.pop("sequences_per_question")
        outputs["answers"] = [text(a) if returned == 1 else [text(one) for one in a] for a in answers]
        return outputs


def register() -> None:
    """Register ``"kvpress-qa"`` (and ``"kv-press-text-generation"`` when no other package holds it)."""
    from transformers import AutoModelForCausalLM

    for task in (TASK, KVPRESS_TASK):
        current = PIPELINE_REGISTRY.supported_tasks.get(task)
        if current is not None and (current["impl"] is KVPressQAPipeline or task == KVPRESS_TASK):
            continue
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=KVPressQAPipeline, pt_model=AutoModelForCausalLM, type="text")
    KVPressQAPipeline._registered_impl = {TASK: PIPELINE_REGISTRY.supported_tasks[TASK]}


register()
