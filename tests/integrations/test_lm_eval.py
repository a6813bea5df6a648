"""lm-eval integration: the stock ``lm_eval`` CLI with ``--model qfilters-hf``, and what each request type measures.

A tiny random Llama with SmolLM2's vocabulary and tokenizer (saved to a temporary directory) stands in for a
real model, so everything runs offline in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvpress_like import KnormPress, QFilterPress, SnapKVPress, StreamingLLMPress, press, uncompressed
from kvpress_like.integrations.transformers import cache_kwargs

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install kvpress_like[eval])")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama whose vocabulary matches the SmolLM2 tokenizer saved beside it."""
    from transformers import AutoTokenizer

    from kvpress_like.models import _materialize
    from tiny import tiny_model

    source = _materialize("smollm2-135m")  # the cached safetensors copy after the first conversion
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", seed=0, attn_implementation="sdpa", vocab_size=49152, max_position_embeddings=4096)
    with torch.no_grad():  # sharper, stronger attention: which keys stay in the cache then visibly matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.v_proj.weight.mul_(8)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def filters_dir(tiny_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpress_like import calibrate
    from kvpress_like.filters import save_filters

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    filters = calibrate(model, tokenizer=AutoTokenizer.from_pretrained(tiny_dir), num_sequences=2, seq_len=128, progress=False)
    return save_filters(filters, tmp_path_factory.mktemp("filters"))


def _text(start: int, chars: int) -> str:
    from kvpress_like.data import offline_corpus

    return offline_corpus()[start : start + chars]


def _qfilters_lm(pretrained, **args):
    from kvpress_like.integrations.lm_eval import QFiltersHFLM

    return QFiltersHFLM(pretrained=str(pretrained), device="cpu", **args)


def _loglikelihood(lm, pairs):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)],
        disable_tqdm=True,
    )


def _manual_pressed_logprob(model, p, context_ids, continuation_ids) -> float:
    """Prefill all but the last context token under ``p``; score the continuation on that pruned cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        model(torch.tensor([context_ids[:-1]]), **cache_kwargs(cache))
        kept = cache.layers[0].keys.shape[2]
        with uncompressed(cache):
            tail = torch.tensor([context_ids[-1:] + continuation_ids[:-1]])
            logits = model(tail, **cache_kwargs(cache)).logits[0]
    assert kept < len(context_ids) - 1, "the press should have pruned the context"
    return float(F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(continuation_ids)[:, None]).sum())


def _full_logprob(model, context_ids, continuation_ids) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids[:-1]])).logits[0, len(context_ids) - 1 :]
    return float(F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(continuation_ids)[:, None]).sum())


# -- packaging: registration without imports, and the core without lm-eval ---------------------------
def test_core_imports_and_runs_without_lm_eval():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # makes `import lm_eval` fail as if it were absent
        "import kvpress_like, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r}); from tiny import tiny_model\n"
        "m = tiny_model('llama')\n"
        "with torch.no_grad(), kvpress_like.press(m, 'knorm', ratio=0.5):\n"
        "    m.generate(torch.arange(1, 40)[None], max_new_tokens=2, do_sample=False)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_startup_hook_is_lazy_and_registers_with_stock_registry(lm_eval):
    code = (
        "import sys\n"
        "early = sorted(m for m in ('torch', 'lm_eval', 'kvpress_like') if m in sys.modules)\n"
        "from lm_eval.api.registry import get_model\n"
        "cls = get_model('qfilters-hf')\n"
        "hf = get_model('hf')\n"  # registering ours must not stop lm-eval's own lazy model table from loading
        "print(early, cls.__module__ + ':' + cls.__name__, issubclass(cls, hf))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["[]", "kvpress_like.integrations.lm_eval:QFiltersHFLM", "True"]


def test_tasks_ship_with_the_package(lm_eval):
    from kvpress_like.integrations.lm_eval import tasks_path

    names = {p.name for p in tasks_path().iterdir()}
    assert {"kvpress_passkey.yaml", "kvpress_passkey_1k.yaml", "kvpress_perplexity.yaml", "kvpress_tasks.py"} <= names


# -- model arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (dict(press="qfilter"), "registered presses: .*knorm, .*qfilters, .*snapkv, .*streaming_llm"),
        (dict(press="knorm", filters="x"), "do not apply to press=knorm; its options are:"),
        (dict(press="knorm", ration=0.5), "did you mean 'ratio'"),
        (dict(ratio=0.5), "given without a press"),
        (dict(press="knorm", ratio="half"), "ratio must be a number"),
        (dict(press="knorm", skip_layers="a;b"), "skip_layers must be integers"),
        (dict(press="snapkv", max_cache_tokens=64), "cannot prune while decoding"),
    ],
)
def test_bad_model_args_say_what_is_valid(lm_eval, args, message):
    from kvpress_like.integrations.lm_eval import QFiltersHFLM

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        QFiltersHFLM(pretrained="unused", **args)


def test_model_args_are_coerced_to_press_fields(lm_eval):
    from kvpress_like.integrations.lm_eval import build_press

    p = build_press("knorm", ratio=1 / 2, skip_layers="0;1", max_cache_tokens="64", decoding="true", window=4)
    assert (p.ratio, p.skip_layers, p.max_cache_tokens, p.decoding, p.window) == (0.5, (0, 1), 64, True, 4)
    assert build_press("knorm", skip_layers=[2]).skip_layers == (2,)


@pytest.mark.parametrize("skip", ["[0,1]", "0;1", "[ 0 , 1 ]"])
def test_documented_skip_layers_syntax_survives_lm_evals_comma_split(lm_eval, tiny_dir, skip):
    from kvpress_like.integrations.lm_eval import QFiltersHFLM

    lm = QFiltersHFLM.create_from_arg_string(f"pretrained={tiny_dir},press=knorm,skip_layers={skip},ratio=0.5", {"device": "cpu"})
    assert lm._press.skip_layers == (0, 1) and lm._press.ratio == 0.5


def test_skip_layers_are_checked_against_the_model_at_construction(lm_eval, tiny_dir):
    from kvpress_like.integrations.lm_eval import QFiltersHFLM

    with pytest.raises(ValueError, match=r"layer 9 does not exist \(layer indices are 0..3\)"):
        QFiltersHFLM.create_from_arg_string(f"pretrained={tiny_dir},press=knorm,skip_layers=9", {"device": "cpu"})
    with pytest.raises(ValueError, match=r"skip_layers=\[0,1 has no closing '\]'; write a list as skip_layers=\[0,1\] or skip_layers=0;1"):
        QFiltersHFLM.create_from_arg_string(f"pretrained={tiny_dir},press=knorm,skip_layers=[0,1", {"device": "cpu"})


# -- semantics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qfilters", "snapkv"])
def test_loglikelihood_scores_continuation_against_pruned_context(lm_eval, tiny_dir, filters_dir, name):
    args = dict(ratio=0.75, filters=str(filters_dir)) if name == "qfilters" else dict(ratio=0.75, window_size=8)
    lm = _qfilters_lm(tiny_dir, press=name, **args)
    reference = QFilterPress(ratio=0.75, filters=str(filters_dir)) if name == "qfilters" else SnapKVPress(ratio=0.75, window_size=8)
    pairs = [(_text(0, 1200), " the value of an expression"), (_text(0, 1200), " x"), (_text(5000, 900), " is")]
    got = _loglikelihood(lm, pairs)
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        expected = _manual_pressed_logprob(lm.model, reference, context_ids, continuation_ids)
        full = _full_logprob(lm.model, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert abs(logprob - full) > 5e-4, "compression must change what the continuation sees"


@pytest.mark.slow
def test_loglikelihood_of_the_pass_key_drops_when_its_needle_is_evicted(lm_eval):
    """SmolLM2-135M: a StreamingLLM x8 cache drops a mid-context needle, and the key's log-prob collapses."""
    from lm_eval.models.huggingface import HFLM

    from kvpress_like.data import passkey_sample

    lm = _qfilters_lm("smollm2-135m", press="streaming_llm", ratio=0.875, window=16)
    sample = passkey_sample(lm.tokenizer, 512, 0.5, seed=3)
    context = lm.tokenizer.decode(sample.context_ids[0].tolist() + sample.question_ids[0].tolist())
    pair = (context, " " + sample.answer)
    ((pressed, _),) = _loglikelihood(lm, [pair])
    context_ids, continuation_ids = lm._encode_pair(*pair)
    assert pressed == pytest.approx(
        _manual_pressed_logprob(lm.model, StreamingLLMPress(ratio=0.875, window=16), context_ids, continuation_ids), abs=1e-3
    )
    ((stock, stock_greedy),) = _loglikelihood(HFLM(pretrained=lm.model, tokenizer=lm.tokenizer), [pair])
    assert stock_greedy and stock > -3, "uncompressed, SmolLM2 retrieves the key"
    assert pressed < stock - 5, "without the needle's keys the continuation cannot find the key"


def test_ratio_zero_equals_stock_hf(lm_eval, tiny_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    stock = HFLM(pretrained=str(tiny_dir), device="cpu", batch_size=2)
    ours = _qfilters_lm(tiny_dir, press="knorm", ratio=0.0, batch_size=2)
    pairs = [
        (_text(0, 600), " the"),
        (_text(0, 600), " a longer continuation of several tokens"),
        (_text(3000, 600), " and"),
        (_text(9000, 300), " or"),
    ]
    for (a, greedy_a), (b, greedy_b) in zip(_loglikelihood(stock, pairs), _loglikelihood(ours, pairs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b

    gen = [
        Instance("generate_until", {}, (_text(i * 700, 500), {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), i)
        for i in range(3)
    ]
    assert ours.generate_until(gen, disable_tqdm=True) == stock.generate_until(gen, disable_tqdm=True)

    rolling = [Instance("loglikelihood_rolling", {}, (_text(20000, 1500),), 0)]
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        stock.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-3
    )


def test_generate_until_runs_on_the_pruned_cache(lm_eval, tiny_dir):
    from lm_eval.api.instance import Instance

    lm = _qfilters_lm(tiny_dir, press="knorm", ratio=0.9, max_cache_tokens=48)
    context = _text(100, 900)
    request = Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), 0)
    (text,) = lm.generate_until([request], disable_tqdm=True)

    ids = lm.tok_batch_encode([context])[0]
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad(), press(lm.model, KnormPress(ratio=0.9, max_cache_tokens=48)):
        lm.model(ids[:, :-1], **cache_kwargs(cache))
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False, **cache_kwargs(cache))
    assert all(layer.n <= 48 for layer in cache.layers), "decoding-time budget must hold"
    assert text == lm._finish(out[0, ids.shape[1] :].tolist(), ["\n\n", lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)])


def test_generate_until_batches_prompts_of_different_lengths(lm_eval, tiny_dir):
    """Left-padded batches under the press give each request the generation it gets alone, in one generate() call."""
    from lm_eval.api.instance import Instance

    lm = _qfilters_lm(tiny_dir, press="knorm", ratio=0.75, window=4, batch_size=1)
    settings = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    contexts = [_text(100 * k, 300 + 170 * k) for k in range(4)]
    assert len({len(lm.tok_encode(c)) for c in contexts}) == 4, "the test needs prompts of different lengths"
    requests = [Instance("generate_until", {}, (c, settings), i) for i, c in enumerate(contexts)]
    alone = lm.generate_until(requests, disable_tqdm=True)
    calls = []
    generate = lm.model.generate
    lm.model.generate = lambda *args, **kwargs: calls.append(kwargs["attention_mask"]) or generate(*args, **kwargs)
    lm.batch_size_per_gpu = 4
    try:
        batched = lm.generate_until(requests, disable_tqdm=True)
    finally:
        del lm.model.generate
    assert len(calls) == 1 and not bool(calls[0].all()), "one left-padded batch for the four requests"
    assert batched == alone


def test_rolling_streams_through_the_capped_cache(lm_eval, tiny_dir):
    from lm_eval.api.instance import Instance

    lm = _qfilters_lm(tiny_dir, press="streaming_llm", max_cache_tokens=24, n_sink=4)
    assert lm.rolling_chunk == 1
    text = _text(40000, 400)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)

    tokens = [lm.prefix_token_id] + lm.tok_encode(text)
    cache, expected = DynamicCache(config=lm.model.config), 0.0
    with torch.no_grad(), press(lm.model, StreamingLLMPress(max_cache_tokens=24, n_sink=4)):
        for t in range(len(tokens) - 1):
            logits = lm.model(torch.tensor([[tokens[t]]]), **cache_kwargs(cache)).logits[0, -1]
            expected += float(F.log_softmax(logits.float(), -1)[tokens[t + 1]])
            assert cache.layers[0].n <= 24
    assert got == pytest.approx(expected, abs=1e-3)
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens[:-1]])).logits[0]
    full = float(F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None]).sum())
    assert abs(got - full) > 1e-2, "a 24-token cache must change the perplexity of a longer document"


# -- the real CLI -------------------------------------------------------------------------------------
def _lm_eval_cli(*args: str, cwd: Path, launcher: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    from kvpress_like.integrations.lm_eval import tasks_path

    command = [*launcher, *(["-m", "lm_eval"] if launcher else ["lm_eval"]), "--include_path", str(tasks_path()), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV | env, timeout=600)


def _results(out: Path) -> tuple[dict, list[dict]]:
    (results_file,) = out.rglob("results_*.json")
    samples = [json.loads(line) for f in out.rglob("samples_kvpress_passkey_ll_*.jsonl") for line in f.read_text().splitlines()]
    return json.loads(results_file.read_text()), samples


def test_stock_cli_with_qfilters_hf(lm_eval, tiny_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    run = _lm_eval_cli(
        "--model", "qfilters-hf",
        "--model_args", f"pretrained={tiny_dir},press=knorm,ratio=0.75,skip_layers=[0]",
        "--device", "cpu",
        "--tasks", "kvpress_passkey_ll,kvpress_passkey_1k,kvpress_perplexity",
        "--limit", "2", "--metadata", '{"doc_chars": 400}',
        "--output_path", str(tmp_path), "--log_samples",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results, samples = _results(tmp_path)
    assert results["config"]["model"] == "qfilters-hf"
    assert results["config"]["kvpress_like"] == {"press": "knorm", "ratio": 0.75, "skip_layers": [0]}
    assert results["n-samples"]["kvpress_passkey_1k"]["effective"] == 2
    assert 0 <= results["results"]["kvpress_passkey_1k"]["acc,none"] <= 1
    assert results["results"]["kvpress_perplexity"]["word_perplexity,none"] > 1

    # The CLI's numbers are the compressed ones: equal to this class in-process, unlike the stock model's.
    pairs = [tuple(s["arguments"]["gen_args_0"].values()) for s in samples]
    logged = [float(s["resps"][0][0][0]) for s in samples]
    pressed = [lp for lp, _ in _loglikelihood(_qfilters_lm(tiny_dir, press="knorm", ratio=0.75, skip_layers=[0]), pairs)]
    stock = [lp for lp, _ in _loglikelihood(HFLM(pretrained=str(tiny_dir), device="cpu"), pairs)]
    assert logged == pytest.approx(pressed, abs=1e-4)
    assert all(abs(a - b) > 1e-3 for a, b in zip(logged, stock, strict=True))


# -- scale-out on CPU ---------------------------------------------------------------------------------
def test_parallelize_device_map_with_offload_matches_single_device(lm_eval, tiny_dir, tmp_path):
    """parallelize=True with a device_map on a CPU-only machine: accelerate keeps two layers on "disk" and
    streams their weights in through its hooks at every call; the press composes with those hooks."""
    pairs = [(_text(0, 900), " the value"), (_text(7000, 700), " is")]
    single = _loglikelihood(_qfilters_lm(tiny_dir, press="knorm", ratio=0.75), pairs)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
                  "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    split = _qfilters_lm(
        tiny_dir, press="knorm", ratio=0.75, parallelize=True, device_map=device_map, offload_folder=str(tmp_path)
    )
    assert split.model.hf_device_map == device_map
    got = _loglikelihood(split, pairs)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in single], abs=1e-4)


@pytest.mark.slow
def test_data_parallel_on_cpu_with_gloo(lm_eval, tiny_dir, tmp_path):
    """Two processes under torchrun with accelerate's CPU backend (gloo): requests are sharded across ranks and
    gathered on rank 0, with the same numbers as one process. (``accelerate launch --cpu`` needs MPI to start
    several CPU processes; on GPUs ``accelerate launch -m lm_eval ...`` is the usual launcher.)"""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    run = _lm_eval_cli(
        "--model", "qfilters-hf", "--model_args", f"pretrained={tiny_dir},press=knorm,ratio=0.75", "--device", "cpu",
        "--tasks", "kvpress_passkey_ll", "--limit", "4", "--log_samples", "--output_path", str(tmp_path),
        cwd=tmp_path, launcher=launcher, ACCELERATE_USE_CPU="true",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "kvpress_passkey_ll on rank 1" in run.stderr, "the second process must take its share"
    _, samples = _results(tmp_path)
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    pairs = [tuple(s["arguments"]["gen_args_0"].values()) for s in samples]
    single = _loglikelihood(_qfilters_lm(tiny_dir, press="knorm", ratio=0.75), pairs)
    assert [float(s["resps"][0][0][0]) for s in samples] == pytest.approx([lp for lp, _ in single], abs=1e-4)
