"""Cost of query-free scoring next to the model's own work: prefill at 4k tokens, and one decode step.

    python -m kvpress_like.evaluations.scorer_cost --model smollm2-135m --tokens 4096 --budget 512 --threads 1

For each press, in the same run as the reference timings:

* prefill: scoring every layer's ``tokens`` keys once (what the cache does when a prefill enters), over a
  no-press forward pass of ``tokens`` tokens;
* decode: re-scoring every layer's ``budget`` live slots for the current reading position (what a
  position-dependent press costs at each decode step into a full cache), over one decode step of the model
  on a ``budget``-token cache.

Keys are the model's real post-RoPE keys from the prefill. Decode steps and re-scoring alternate, round by
round (``3 x --repeats`` rounds); the decode overhead is the median of the paired per-round ratios, with the
ratio of the fastest runs beside it (on a shared machine both are needed to see through the load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvpress_like import get_press
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs, patched_attention
from kvpress_like.models import load_model

from .common import environment, set_threads

__all__ = ["configure", "main", "scoring_overhead"]

PRESSES = ("qfilters", "qfilters_targeted", "expected_attention_calibrated", "knorm")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def scoring_overhead(model, ids: torch.Tensor, presses: dict, budget: int, repeats: int = 3) -> dict:
    """Seconds and ratios: scoring vs a no-press prefill of ``ids``, re-scoring ``budget`` slots vs a decode step."""
    layers = [layer for layer in attention_layers(model) if not layer.sliding]
    keys: dict[int, torch.Tensor] = {}

    def grab(module, query, key, value) -> None:
        keys[module.layer_idx] = key.detach().contiguous()  # laid out as the cache stores them

    n = ids.shape[1]
    with patched_attention(model, layers, grab):
        model(ids, use_cache=False, logits_to_keep=1)
    prefill = _median_seconds(lambda: model(ids, use_cache=False, logits_to_keep=1), repeats)
    cache = DynamicCache(config=model.config)
    model(ids[:, :budget], **cache_kwargs(cache), logits_to_keep=1)
    step_ids = ids[:, budget : budget + 1]

    def decode_step() -> None:
        model(step_ids, **cache_kwargs(cache), logits_to_keep=1)
        cache.crop(-1)  # back to the budget-token cache

    out = dict(tokens=n, budget=budget, prefill_seconds=prefill, presses={})
    b, h = keys[layers[0].layer_idx].shape[:2]

    def score_all(p, m: int) -> None:
        for idx, k in keys.items():
            k = k[:, :, :m]
            positions = torch.arange(m).expand(b, h, m)
            p.score(idx, k, k, positions, torch.full((b, 1, 1), n, dtype=torch.long))

    # decode steps and re-scoring interleaved round by round, so a load change hits both sides of a ratio
    rounds = {name: [] for name in presses}
    steps = []
    for _ in range(repeats * 3):
        steps.append(_median_seconds(decode_step, 1))
        for name, p in presses.items():
            rounds[name].append(_median_seconds(lambda: score_all(p, budget), 1))
    out["decode_step_seconds"] = statistics.median(steps)
    for name, p in presses.items():
        full = _median_seconds(lambda: score_all(p, n), repeats)
        ratios = [r / s for r, s in zip(rounds[name], steps)]
        out["presses"][name] = dict(
            prefill_scoring_seconds=full,
            prefill_overhead=full / prefill,
            rescore_seconds=statistics.median(rounds[name]),
            decode_overhead=statistics.median(ratios),  # median of paired ratios
            decode_overhead_min=min(rounds[name]) / min(steps),  # the least-disturbed run of each
        )
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or local directory")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length (default: 4096)")
    parser.add_argument("--budget", type=int, default=512, help="live slots re-scored per decode step (default: 512)")
    parser.add_argument("--presses", default=",".join(PRESSES), help="registry names, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    from kvpress_like.data import corpus_ids

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = corpus_ids(tokenizer, "prose")[: args.tokens][None]
    presses = {}
    for name in args.presses.split(","):
        presses[name] = get_press(name)
        presses[name].prepare(model)
    env = environment()
    result = scoring_overhead(model, ids, presses, args.budget, args.repeats)
    print(
        f"{args.model}: {result['tokens']}-token prefill {result['prefill_seconds']:.2f} s, decode step on a "
        f"{args.budget}-token cache {1000 * result['decode_step_seconds']:.1f} ms "
        f"(torch threads {env['torch_threads']}, load average {env.get('load_average_1min')})"
    )
    for name, r in result["presses"].items():
        print(
            f"  {name:32s} prefill scoring {1000 * r['prefill_scoring_seconds']:7.1f} ms = {100 * r['prefill_overhead']:5.2f}% | "
            f"re-scoring {args.budget} slots {1000 * r['rescore_seconds']:6.2f} ms = {100 * r['decode_overhead']:5.2f}% of a step "
            f"(paired median; fastest runs {100 * r['decode_overhead_min']:.2f}%)"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    raise SystemExit(main(parser.parse_args()))
