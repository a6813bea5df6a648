"""Run one vLLM engine in a fresh process and print its results as JSON (tests compare engines this way:
vLLM keeps per-process global state, so a second engine cannot be started and shut down beside the first).

Input (argv[1], JSON): model, engine (LLM keyword arguments), prompts (token-id lists), sampling (one
SamplingParams keyword dict per prompt), optionally rounds (lists of prompt indices, each one ``generate`` call
after the previous finished; default: one call with every prompt). Output (last stdout line, JSON), one entry
per request in the order submitted: tokens, logprobs and prefix-cache hits (``num_cached_tokens``), and, when
the engine core runs in this process, the most blocks it held during a step and the plugin's kept positions per
layer at each compaction; and the most requests running in a step.
"""

import json
import sys


def kept_positions(worker) -> dict | None:
    """On a worker: the plugin's compactions, request id (engine suffix removed) -> list of (tokens in the
    cache then, layer -> kept positions per head), oldest first."""
    from kvpress_like.integrations.vllm.patches import runner_state

    state = runner_state(worker.model_runner)
    if state is None:
        return None
    return {internal.rsplit("-", 1)[0]: [(end, {layer: k.tolist() for layer, k in kept.items()}) for end, kept in history]
            for internal, history in state.history.items()}


def side_by_side(ranks: list[list], i: int) -> dict:
    """Compaction ``i`` of one request on every rank: heads of all ranks side by side, as one rank would hold them."""
    return {layer: [h for rank in ranks for h in rank[i][1][layer]] for layer in ranks[0][i][1]}


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], **spec["engine"])
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    preemptions, peak_blocks, running = [], {}, [0]
    if core is not None:  # count the scheduler's preemptions, and the blocks each request holds during a step
        scheduler, preempt, schedule = core.scheduler, core.scheduler._preempt_request, core.scheduler.schedule
        scheduler._preempt_request = lambda request, *a, **k: preemptions.append(request.request_id) or preempt(request, *a, **k)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]

        def counting_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            running.append(len(scheduler.running))
            for req_id, blocks in manager.req_to_blocks.items():
                held = sum(not b.is_null for b in blocks)
                peak_blocks[req_id] = max(peak_blocks.get(req_id, 0), held)
            return out

        scheduler.schedule = counting_schedule
    outs = []
    for indices in spec.get("rounds") or [range(len(spec["prompts"]))]:
        outs += llm.generate(
            [TokensPrompt(prompt_token_ids=spec["prompts"][i]) for i in indices],
            [SamplingParams(**spec["sampling"][i]) for i in indices],
            use_tqdm=False,
        )
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "cached": [o.num_cached_tokens for o in outs],
        "logprobs": [
            None if o.outputs[0].logprobs is None
            else [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outs
        ],
    }
    if core is not None:
        pool = core.scheduler.kv_cache_manager.block_pool
        result.update(preemptions=len(preemptions), free_blocks=pool.get_num_free_blocks(), blocks=pool.num_gpu_blocks - 1)
        peaks = {internal.rsplit("-", 1)[0]: held for internal, held in peak_blocks.items()}
        result["peak_blocks"] = [peaks.get(o.request_id) for o in outs]
        result["peak_running"] = max(running)
        ranks = llm.collective_rpc(kept_positions)  # one dict per tensor-parallel rank, in rank order
        if ranks[0] is not None:
            history = [
                [(end, side_by_side([rank[o.request_id] for rank in ranks], i))
                 for i, (end, _) in enumerate(ranks[0][o.request_id])]
                if o.request_id in ranks[0] else None
                for o in outs
            ]
            result["history"] = history  # every compaction of each request
            result["kept"] = [None if h is None else h[-1][1] for h in history]  # the last one
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
