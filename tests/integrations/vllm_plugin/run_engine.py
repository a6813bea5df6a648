"""Run one vLLM engine in a fresh process and print its results as JSON (tests compare engines this way:
vLLM keeps per-process global state, so a second engine cannot be started and shut down beside the first).

Input (argv[1], JSON): model, engine (LLM keyword arguments), prompts (token-id lists), sampling (one
SamplingParams keyword dict per prompt), optionally rounds (lists of prompt indices, each one ``generate`` call
after the previous finished; default: one call with every prompt). Output (last stdout line, JSON), one entry
per request in the order submitted: tokens, logprobs and prefix-cache hits (``num_cached_tokens``), and, when
the engine core runs in this process, the plugin's kept positions per layer.
"""

import json
import sys


def kept_positions(worker) -> dict | None:
    """On a worker: the plugin's kept positions, request id (engine suffix removed) -> layer -> per head."""
    from kvpress_like.integrations.vllm.patches import runner_state

    state = runner_state(worker.model_runner)
    if state is None:
        return None
    return {internal.rsplit("-", 1)[0]: {layer: k.tolist() for layer, k in kept.items()}
            for internal, kept in state.kept.items()}


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], **spec["engine"])
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    preemptions = []
    if core is not None:  # count the scheduler's preemptions
        scheduler, preempt = core.scheduler, core.scheduler._preempt_request
        scheduler._preempt_request = lambda request, *a, **k: preemptions.append(request.request_id) or preempt(request, *a, **k)
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
        ranks = llm.collective_rpc(kept_positions)  # one dict per tensor-parallel rank, in rank order
        if ranks[0] is not None:  # heads of all ranks side by side, as one rank would hold them
            result["kept"] = [
                {layer: [h for rank in ranks for h in rank[o.request_id][layer]] for layer in ranks[0][o.request_id]}
                if o.request_id in ranks[0] else None
                for o in outs
            ]
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
