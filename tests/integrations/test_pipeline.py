"""The ``kvpress-qa`` pipeline: compress a context once, answer many questions, each on its own copy.

A tiny random Llama saved with SmolLM2's tokenizer (and chat template) stands in for a real model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvpress_like.methods.adaptive import AdaptivePress
from kvpress_like.methods.kvzip import KVzipPress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

import kvpress_like.integrations.pipeline as qa
from kvpress_like import KnormPress, SnapKVPress, StreamingLLMPress, cache_nbytes, press, uncompressed
from kvpress_like.data import offline_corpus
from kvpress_like.integrations.transformers import cache_kwargs

GREEDY = {"max_new_tokens": 8, "do_sample": False}
CONTEXT = offline_corpus()[:1500]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # sharper attention, so which keys are kept visibly matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.v_proj.weight.mul_(8)
    return pipeline("kvpress-qa", model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), device="cpu")


def _by_hand(pipe, p, question: str) -> tuple[str, int]:
    """press() + generate() on the pipeline's prompt, as a user would write it (demo style)."""
    model, tokenizer = pipe.model, pipe.tokenizer
    context_ids, (question_ids,) = pipe.encode(CONTEXT, [question])
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(context_ids, **cache_kwargs(cache))
        kv_bytes = cache_nbytes(cache)
        ids = torch.cat([context_ids, question_ids], dim=1)
        with uncompressed(cache):
            out = model.generate(ids, **cache_kwargs(cache), **GREEDY)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip(), kv_bytes


@pytest.mark.parametrize("make_press", [lambda: KnormPress(ratio=0.75), lambda: SnapKVPress(ratio=0.75, window_size=8)],
                         ids=["knorm", "snapkv"])
def test_answer_equals_press_and_generate_by_hand(pipe, make_press):
    question = "What is this text about?"
    out = pipe(CONTEXT, question=question, press=make_press(), **GREEDY)
    expected, kv_bytes = _by_hand(pipe, make_press(), question)
    assert out["answer"] == expected
    assert out["kv_bytes"] == kv_bytes
    full = pipe(CONTEXT, question=question, **GREEDY)
    assert out["kv_bytes"] < 0.3 * full["kv_bytes"], "ratio=0.75 must keep about a quarter of the context"


def test_prompt_is_the_chat_template_split_where_the_context_ends(pipe):
    context_ids, question_ids = pipe.encode(CONTEXT, ["Who?", "When?"], answer_prefix="Answer:")
    for q, ids in zip(["Who?", "When?"], question_ids, strict=True):
        text = pipe.tokenizer.decode(torch.cat([context_ids, ids], dim=1)[0])
        chat = [{"role": "user", "content": f"{CONTEXT}\n\n{q}"}]
        assert text == pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + "Answer:"


def _whole_prompt_ids(tokenizer, context: str, question: str, answer_prefix: str = "") -> list[int]:
    chat = [{"role": "user", "content": f"{context}\n\n{question}"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("end", ["\n", "\n\n", " ", "Pyth"], ids=["newline", "blank-line", "space", "mid-word"])
def test_context_and_question_ids_are_the_whole_prompt_tokenized_at_once(pipe, end):
    """SmolLM2's tokenizer merges a context's final newline or space with the blank line after it: the ids of
    context + question must still be the chat prompt's, for fresh contexts and for a returned cache."""
    context = CONTEXT[:400] + end
    questions = ["Who?", "What is this text about?"]
    context_ids, question_ids = pipe.encode(context, questions, answer_prefix="Answer:")
    for q, ids in zip(questions, question_ids, strict=True):
        assert torch.cat([context_ids, ids], dim=1)[0].tolist() == _whole_prompt_ids(pipe.tokenizer, context, q, "Answer:")
    out = pipe(context, question=questions[0], return_cache=True, press=KnormPress(ratio=0.5), max_new_tokens=1)
    later = pipe.preprocess({"context": None, "questions": ["Why is it so?"], "cache": out["cache"]})
    ids = torch.cat([later["context_ids"], later["question_ids"][0]], dim=1)[0].tolist()
    assert ids == _whole_prompt_ids(pipe.tokenizer, context, "Why is it so?")
    assert out["context_tokens"] == later["context_ids"].shape[1] == context_ids.shape[1]


def test_full_cache_answer_equals_generate_on_the_whole_prompt(pipe):
    context = CONTEXT[:600] + "\n"  # as `ask --context` reads a file
    ids = torch.tensor([_whole_prompt_ids(pipe.tokenizer, context, "Who?")])
    with torch.no_grad():
        direct = pipe.model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)[0, ids.shape[1] :]
    assert pipe(context, question="Who?", **GREEDY)["answer"] == pipe.tokenizer.decode(direct, skip_special_tokens=True).strip()


def test_beams_and_several_sequences_per_question(pipe):
    questions = ["Who?", "What is this text about, in a few words?"]
    context = CONTEXT[:600]
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    full = pipe(context, questions=questions, **beams)["answers"]
    assert [len(a) for a in full] == [2, 2] and all(isinstance(t, str) for a in full for t in a)
    for q, answers in zip(questions, full, strict=True):  # a full cache answers as generate() on the prompt
        ids = torch.tensor([_whole_prompt_ids(pipe.tokenizer, context, q)])
        with torch.no_grad():
            direct = pipe.model.generate(ids, attention_mask=torch.ones_like(ids), **beams)[:, ids.shape[1] :]
        assert answers == [pipe.tokenizer.decode(d, skip_special_tokens=True).strip() for d in direct]
    for kind in ({"num_beams": 2}, {"num_return_sequences": 2, "num_beams": 2}):
        settings = dict(max_new_tokens=4, do_sample=False, **kind)
        batched = pipe(context, questions=questions, press=KnormPress(ratio=0.5), **settings)["answers"]
        alone = pipe(context, questions=questions, press=KnormPress(ratio=0.5), question_batch_size=1, **settings)["answers"]
        assert batched == alone
    dict_out = pipe(context, questions=questions, return_dict_in_generate=True, **GREEDY)["answers"]
    assert dict_out == pipe(context, questions=questions, **GREEDY)["answers"]
    with pytest.raises(ValueError, match="output_scores: the kvpress-qa pipeline returns answers only"):
        pipe(context, question="Who?", return_dict_in_generate=True, output_scores=True, **GREEDY)


def test_a_cache_is_refused_on_another_model(pipe):
    """Two tiny models of one config and different seeds (same shapes, other weights), and one with fewer layers."""
    from tiny import tiny_model

    smol = dict(vocab_size=49152, max_position_embeddings=4096, attn_implementation="sdpa")
    made_by, same_config, fewer_layers = (
        pipeline("kvpress-qa", model=model, tokenizer=pipe.tokenizer, device="cpu")
        for model in (tiny_model("llama", seed=0, **smol), tiny_model("llama", seed=1, **smol),
                      tiny_model("llama", seed=0, num_hidden_layers=2, **smol))
    )
    out = made_by(CONTEXT[:600], question="Who?", press=KnormPress(ratio=0.5), return_cache=True, **GREEDY)
    for other, why in [(same_config, "a model with other weights"), (fewer_layers, "another model")]:
        with pytest.raises(ValueError, match=f"this cache was made by {why} .*Pass the context again"):
            other(cache=out["cache"], question="Why?", **GREEDY)
    assert isinstance(made_by(cache=out["cache"], question="Why?", **GREEDY)["answer"], str)  # its own model continues it
    outside = DynamicCache(config=made_by.model.config)  # made without the pipeline: the shapes are still checked
    with torch.no_grad():
        made_by.model(torch.tensor([[1, 2, 3]]), **cache_kwargs(outside))
    with pytest.raises(ValueError, match=r"this cache \(4 layers.* does not fit this pipeline's model \(2 layers"):
        fewer_layers(cache=outside, question="Why?", **GREEDY)


def test_returned_cache_answers_later_questions_like_asking_at_once(pipe):
    questions = ["What is this text about?", "Which keyword is described first, and why?"]
    p = StreamingLLMPress(ratio=0.8)
    both = pipe(CONTEXT, questions=questions, press=p, return_cache=True, **GREEDY)
    cache = both["cache"]
    kept = cache_nbytes(cache)
    later = [pipe(cache=cache, question=q, **GREEDY) for q in reversed(questions)]
    assert [o["answer"] for o in reversed(later)] == both["answers"]
    assert cache_nbytes(cache) == kept and later[0]["prefill_seconds"] == 0.0, "answering must not touch the cache"
    with pytest.raises(ValueError, match="omit press="):
        pipe(cache=cache, question="Why?", press=KnormPress(ratio=0.8))


def test_equal_length_questions_batched_equal_one_by_one(pipe):
    questions = ["Who wrote it?", "Who read it?", "Who sold it?"]
    assert len({ids.shape[1] for ids in pipe.encode(None, questions)[1]}) == 1, "the test needs equal lengths"
    batched = pipe(CONTEXT, questions=questions, press=KnormPress(ratio=0.75), **GREEDY)
    alone = pipe(CONTEXT, questions=questions, press=KnormPress(ratio=0.75), question_batch_size=1, **GREEDY)
    assert batched["answers"] == alone["answers"]
    assert batched["peak_kv_bytes"] > alone["peak_kv_bytes"], "a batch holds one copy of the cache per question"


def test_questions_of_different_lengths_share_one_padded_batch(pipe):
    questions = ["Who?", "What is this text about?", "Which keyword is described first, and why is it there?"]
    assert len({ids.shape[1] for ids in pipe.encode(None, questions)[1]}) == 3, "the test needs different lengths"
    calls = []
    generate = pipe.model.generate
    pipe.model.generate = lambda *args, **kwargs: calls.append(kwargs["attention_mask"]) or generate(*args, **kwargs)
    try:
        batched = pipe(CONTEXT, questions=questions, press=KnormPress(ratio=0.75), **GREEDY)
    finally:
        del pipe.model.generate
    alone = pipe(CONTEXT, questions=questions, press=KnormPress(ratio=0.75), question_batch_size=1, **GREEDY)
    assert len(calls) == 1 and not bool(calls[0].all()), "one left-padded batch for the three questions"
    assert batched["answers"] == alone["answers"]


@pytest.mark.parametrize("make", [
    lambda: AdaptivePress(KnormPress(ratio=0.75)),
    lambda: AdaptivePress(KVzipPress(prompt_ids=(5, 6, 7), ratio=0.75), normalization="none", scope="model"),
], ids=["adakv", "kvzip-model-wide"])
def test_headwise_cache_answers_a_padded_batch_of_questions_like_one_by_one(pipe, make):
    """A head-wise compressed context (ragged heads, one flat buffer per layer) is repeated per question and
    answers a left-padded batch exactly as each question alone."""
    questions = ["Who?", "What is this text about?", "Which keyword is described first, and why is it there?"]
    batched = pipe(CONTEXT, questions=questions, press=make(), **GREEDY)
    alone = pipe(CONTEXT, questions=questions, press=make(), question_batch_size=1, **GREEDY)
    assert batched["answers"] == alone["answers"] and batched["kv_bytes"] == alone["kv_bytes"]


def test_press_by_name_with_settings_equals_instance(pipe):
    question = "What is this text about?"
    by_name = pipe(CONTEXT, question=question, press="knorm", ratio=0.75, **GREEDY)
    assert by_name["answer"] == pipe(CONTEXT, question=question, press=KnormPress(ratio=0.75), **GREEDY)["answer"]
    assert by_name["kv_bytes"] == pipe(CONTEXT, question=question, press=KnormPress(ratio=0.75), **GREEDY)["kv_bytes"]
    # a wrapper's forwarded settings and a name carrying its settings reach the press, not generate()
    wrapped = AdaptivePress(KnormPress(ratio=0.75), floor=0.5)
    expected = pipe(CONTEXT, question=question, press=wrapped, **GREEDY)
    for kwargs in (dict(press="adakv", base="knorm", floor=0.5, ratio=0.75), dict(press="adakv:base=knorm:floor=0.5", ratio=0.75)):
        got = pipe(CONTEXT, question=question, **kwargs, **GREEDY)
        assert (got["answer"], got["kv_bytes"]) == (expected["answer"], expected["kv_bytes"])


def test_compress_questions_lets_the_press_evict_question_tokens(pipe):
    question = "Tell me, in plain words and with an example, what this long text is about and who it is for."
    kept = pipe(CONTEXT, question=question, press=KnormPress(ratio=0.75), **GREEDY)
    pressed = pipe(CONTEXT, question=question, press=KnormPress(ratio=0.75), compress_questions=True, **GREEDY)
    assert pressed["kv_bytes"] == kept["kv_bytes"]
    assert pressed["peak_kv_bytes"] < kept["peak_kv_bytes"]


def test_decoding_budget_holds_while_answering(pipe):
    p = KnormPress(max_cache_tokens=48, window=8)
    out = pipe(CONTEXT, question="What is this text about?", press=p, return_cache=True, max_new_tokens=12, do_sample=False)
    assert all(layer.n <= 48 for layer in out["cache"].layers)
    later = qa.fork(out["cache"])
    with torch.no_grad(), press(pipe.model, p):
        _, (q,) = pipe.encode(None, ["Why?"])
        ids = torch.cat([getattr(out["cache"], qa.PROMPT_ATTR), q], dim=1)
        pipe.model.generate(ids, **cache_kwargs(later), max_new_tokens=12, do_sample=False)
    assert all(layer.n <= 48 for layer in later.layers), "decoding steps evict back to the budget"


def test_bad_input_gets_clear_errors(pipe):
    with pytest.raises(ValueError, match="context is empty"):
        pipe("   ", question="Why?")
    with pytest.raises(ValueError, match="exactly one of question"):
        pipe(CONTEXT)
    with pytest.raises(TypeError, match=r"questions\[1\] is a int"):
        pipe(CONTEXT, questions=["Why?", 3])
    with pytest.raises(ValueError, match=r"questions\[0\] is empty"):
        pipe(CONTEXT, questions=[""])
    with pytest.raises(ValueError, match="unknown press 'nope'; registered presses: .*knorm"):
        pipe(CONTEXT, question="Why?", press="nope")
    with pytest.raises(TypeError, match="go with a press name"):
        pipe(CONTEXT, question="Why?", press=KnormPress(ratio=0.5), ratio=0.5)
    with pytest.raises(TypeError, match="one context per call"):
        pipe([CONTEXT, CONTEXT], question="Why?")
    with pytest.raises(ValueError, match="not both"):
        pipe(CONTEXT, question="Why?", cache=DynamicCache())


def test_kvpress_alias_and_no_registration_on_package_import(pipe):
    alias = pipeline("kv-press-text-generation", model=pipe.model, tokenizer=pipe.tokenizer, device="cpu")
    assert isinstance(alias, qa.KVPressQAPipeline)
    code = (
        "import kvpress_like, sys; from transformers.pipelines import PIPELINE_REGISTRY as R; "
        "assert 'kvpress-qa' not in R.supported_tasks; import kvpress_like.integrations.pipeline; "
        "assert 'kvpress-qa' in R.supported_tasks and 'kv-press-text-generation' in R.supported_tasks"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_ask_cli_prints_answers_and_kv_bytes(tiny_model_dir, tmp_path, capsys):
    from kvpress_like.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    argv = ["ask", "--model", str(tiny_model_dir), "--context", str(doc), "--question", "Who?", "--question",
            "What is it about?", "--press", "knorm", "--ratio", "0.75", "--set", "window=4", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "knorm ratio=0.75, window=4" in printed and printed.count("\nA: ") == 2 and "KV cache kept" in printed
    assert main(["ask", "--model", str(tiny_model_dir), "--context", str(doc), "--question", "Who?", "--set", "windw=4",
                 "--press", "knorm"]) == 2
    assert "windw do not apply to press knorm" in capsys.readouterr().err
