"""``kvpress-like bench lm-eval``: lm-eval's ``qfilters-hf`` model answering ``generate_until`` requests at
several batch sizes (left-padded batches under a press), requests/s and agreement with batch size 1.

    kvpress-like bench lm-eval --model-args press=qfilters,ratio=0.875,window=16 --batch-sizes 1 4

Writes ``lm_eval_speed.json`` / ``lm_eval_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from kvpress_like.models import DEFAULT_MODEL

from .common import (
    add_model_argument, add_out_argument, add_threads_argument, environment, markdown_footer, set_threads, write_result,
)


def batch_speed(
    pretrained: str = DEFAULT_MODEL,
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
    from kvpress_like.integrations.lm_eval import MODEL_NAME, QFiltersHFLM
    from lm_eval.api.instance import Instance

    from .tasks.kvpress_tasks import passkey_dataset

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


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--model-args", default="press=qfilters,ratio=0.875,window=16",
                        help="press and its settings as for lm_eval's --model_args, or '' for no press (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="batch sizes, the first is the reference")
    parser.add_argument("--context-tokens", type=int, default=1024, help="pass-key prompt length (default: %(default)s)")
    parser.add_argument("--samples-per-depth", type=int, default=4, help="prompts per needle depth (default: %(default)s)")
    add_threads_argument(parser)
    add_out_argument(parser)


def markdown(result: dict) -> str:
    """The results section: requests/s per batch size, the speed-up and the agreement."""
    first = next(iter(result["requests_per_s"]))
    lines = [
        "## lm-eval qfilters-hf: generate_until at several batch sizes", "",
        f"{result['requests']} pass-key requests, prompt lengths {result['prompt_token_lengths']}, press "
        f"{result['press'] or 'none'}.", "",
        f"| batch_size | requests/s | speed-up | generations equal to batch_size={first}'s |", "|---|---|---|---|",
    ]
    for size, rate in result["requests_per_s"].items():
        lines.append(f"| {size} | {rate:.3f} | x{result['speedup'][size]:.2f} | {result['agreeing'][size]}/{result['requests']} |")
    return "\n".join(lines + markdown_footer(result))


def main(args: argparse.Namespace) -> int:
    from lm_eval.utils import simple_parse_args_string

    set_threads(args.threads)
    press_args = simple_parse_args_string(args.model_args) if args.model_args else {}
    result = batch_speed(args.model, tuple(args.batch_sizes), args.context_tokens, args.samples_per_depth, **press_args)
    result["environment"] = environment()
    write_result(args.out, "lm_eval_speed", result, markdown(result))
    return 0
