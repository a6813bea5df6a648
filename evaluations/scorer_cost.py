"""Cost of query-free scoring next to the model's own work: prefill at 4k tokens, and one decode step.

    kvpress-like bench scorer-cost --model smollm2-135m --tokens 4096 --budget 512 --threads 1

For each press, in the same run as the reference timings:

* prefill: scoring every layer's ``tokens`` keys once (what the cache does when a prefill enters), over a
  no-press forward pass of ``tokens`` tokens;
* decode scoring: the scoring the cache does per decode step into a full cache, over one decode step of the
  model on a plain ``budget``-token cache. A position-dependent press re-scores every layer's ``budget``
  live slots for the current reading position (every ``--rescore-every`` steps: the cost per step is that
  share of a re-scoring); a position-independent one scores the new key only;
* whole step: one decode step through a full :class:`~kvpress_like.cache.PressedCache` of ``budget``
  tokens (scoring, eviction, in-place write) over the plain step: everything the press costs.

Keys are the model's real post-RoPE keys from the prefill. Plain steps, scoring and pressed steps alternate,
round by round (``3 x --repeats`` rounds); decode overheads are medians of the paired per-round ratios, with
the ratio of the fastest runs beside the scoring one (on a shared machine both are needed to see through
the load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvpress_like import get_press
from kvpress_like.cache import PressedCache
from kvpress_like.integrations.transformers import attention_layers, cache_kwargs, patched_attention
from kvpress_like.models import load_model

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, environment, markdown_footer, rescore_setting,
    set_threads, write_result,
)

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
    """Seconds and ratios: scoring vs a no-press prefill of ``ids``; per-step scoring and a whole pressed decode
    step vs a plain decode step on ``budget`` tokens. ``presses`` must be prepared and hold ``budget`` tokens."""
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

    def plain_step() -> None:
        model(step_ids, **cache_kwargs(cache), logits_to_keep=1)
        cache.crop(-1)  # back to the budget-token cache

    pressed = {}
    for name, p in presses.items():  # full caches: every further step evicts
        pressed[name] = PressedCache(p, model.config)
        model(ids[:, :budget], **cache_kwargs(pressed[name]), logits_to_keep=1)

    def pressed_step(name: str) -> None:
        model(step_ids, **cache_kwargs(pressed[name]), logits_to_keep=1)

    out = dict(tokens=n, budget=budget, prefill_seconds=prefill, presses={})
    b, h = keys[layers[0].layer_idx].shape[:2]

    def score_all(p, start: int, stop: int) -> None:
        for idx, k in keys.items():
            k = k[:, :, start:stop]
            positions = torch.arange(start, stop).expand(b, h, stop - start)
            p.score(idx, k, k, positions, torch.full((b, 1, 1), n, dtype=torch.long))

    def step_scoring(p) -> None:
        score_all(p, 0, budget) if p.scoring.rescores else score_all(p, budget, budget + 1)

    def per_step(p, seconds: list[float]) -> list[float]:  # a re-scoring every rescore_every steps
        return [t / p.policy.rescore_every for t in seconds]

    # interleaved round by round, so a load change hits both sides of a ratio
    rounds = {name: [] for name in presses}
    whole = {name: [] for name in presses}
    steps = []
    for _ in range(repeats * 3):
        steps.append(_median_seconds(plain_step, 1))
        for name, p in presses.items():
            rounds[name].append(_median_seconds(lambda: step_scoring(p), 1))
            whole[name].append(_median_seconds(lambda: pressed_step(name), 1))
    out["decode_step_seconds"] = statistics.median(steps)
    for name, p in presses.items():
        full = _median_seconds(lambda: score_all(p, 0, n), repeats)
        out["presses"][name] = dict(
            prefill_scoring_seconds=full,
            prefill_overhead=full / prefill,
            rescores=p.scoring.rescores,
            rescore_every=p.policy.rescore_every,
            step_scoring_seconds=statistics.median(per_step(p, rounds[name])),
            decode_overhead=statistics.median([r / s for r, s in zip(per_step(p, rounds[name]), steps)]),  # paired
            decode_overhead_min=min(per_step(p, rounds[name])) / min(steps),  # the least-disturbed run of each
            pressed_step_overhead=statistics.median([w / s - 1 for w, s in zip(whole[name], steps)]),
        )
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "embedded name or local directory")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length (default: 4096)")
    parser.add_argument("--budget", type=int, default=512, help="tokens in the decoding cache (default: 512)")
    parser.add_argument("--presses", default=",".join(PRESSES), help="registry names, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    add_threads_argument(parser)
    parser.add_argument("--rescore-every", type=int, default=1,
                        help="position-dependent presses re-score every this many decoding steps (default: 1, exact)")
    add_out_argument(parser)


def main(args: argparse.Namespace) -> int:
    from kvpress_like.data import corpus_ids

    set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = corpus_ids(tokenizer, "prose")[: args.tokens][None]
    presses = {}
    for name in args.presses.split(","):
        presses[name] = get_press(name, max_cache_tokens=args.budget, **rescore_setting(name, args.rescore_every))
        presses[name].prepare(model)
    env = environment()
    result = scoring_overhead(model, ids, presses, args.budget, args.repeats)
    lines = [
        "## Scoring cost" + (f" (re-scoring every {args.rescore_every} decoding steps)" if args.rescore_every > 1 else ""),
        "",
        f"{args.model}: {result['tokens']}-token prefill {result['prefill_seconds']:.2f} s; decode step on a plain "
        f"{args.budget}-token cache {1000 * result['decode_step_seconds']:.1f} ms (median of {3 * args.repeats} paired rounds). "
        "Per-step scoring: what the cache scores at each decode step into a full cache (position-dependent presses "
        "re-score every live slot; the others score the new key). Whole pressed step: a decode step through a full "
        "`PressedCache` (scoring, eviction, in-place write) over the plain step.",
        "",
        "| press | prefill scoring | of a prefill | per-step scoring | of a decode step (paired median; fastest runs) | whole pressed step |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, r in result["presses"].items():
        what = "scores the new key"
        if r["rescores"]:
            what = f"re-scores {args.budget} slots" + (f" every {r['rescore_every']} steps" if r["rescore_every"] > 1 else "")
        lines.append(
            f"| `{name}` | {1000 * r['prefill_scoring_seconds']:.1f} ms | {100 * r['prefill_overhead']:.2f}% | "
            f"{what}: {1000 * r['step_scoring_seconds']:.2f} ms | {100 * r['decode_overhead']:.2f}% "
            f"({100 * r['decode_overhead_min']:.2f}%) | {100 * r['pressed_step_overhead']:+.1f}% |"
        )
    report = dict(settings=vars(args) | dict(out=str(args.out)), environment=env, **result)
    markdown = "\n".join(lines + markdown_footer(report))
    print(markdown)
    write_result(args.out, "scorer_cost" + (f".rescore{args.rescore_every}" if args.rescore_every > 1 else ""), report, markdown)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    raise SystemExit(main(parser.parse_args()))
