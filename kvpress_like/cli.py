"""``kvpress-like``: one command line for the demo, calibration, evaluations and benchmarks.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``main(args)``; modules are
imported only when their command runs, so ``kvpress-like --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS = {
    "demo": ("kvpress_like.demo", "answer a pass-key question with and without Q-Filters on the embedded model"),
    "calibrate": ("kvpress_like.calibration", "compute Q-Filters for a model and save them (safetensors)"),
}
#: ``kvpress-like eval <name>`` / ``kvpress-like bench <name>``
EVALUATIONS = {
    "niah": ("kvpress_like.evaluations.niah", "needle-in-a-haystack grid: accuracy heat-maps per method"),
    "correlation": ("kvpress_like.evaluations.correlation", "Spearman correlation of scores with received attention"),
    "perplexity": ("kvpress_like.evaluations.perplexity", "streaming perplexity with a capped KV cache"),
    "robustness": ("kvpress_like.evaluations.robustness", "Q-Filters stability across corpora and sample counts"),
    "results": ("kvpress_like.evaluations.results", "regenerate evaluations/RESULTS.md from every evaluation"),
}
BENCHMARKS = {
    "speed": ("kvpress_like.evaluations.bench", "prefill overhead, peak memory, KV bytes, decode ms/token"),
    "decode": ("kvpress_like.evaluations.decode_bench", "per-step eviction overhead of the capped cache"),
    "gpu-decode": ("kvpress_like.evaluations.gpu_decode", "static compressed cache + torch.compile decode on GPU"),
    "kvpress": ("kvpress_like.evaluations.kvpress_compare", "side by side with NVIDIA kvpress (separate venv)"),
}


def _add(subparsers, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    try:
        importlib.import_module(module).configure(parser)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        parser.set_defaults(_missing=f"{module} is not available in this installation")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-like", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv else None
    groups = {"eval": EVALUATIONS, "bench": BENCHMARKS}
    for name, (module, help_text) in COMMANDS.items():
        if wanted in (name, None, "-h", "--help"):
            _add(sub, name, module, help_text)
        else:
            sub.add_parser(name, help=help_text)
    for group, table in groups.items():
        group_parser = sub.add_parser(group, help=f"{group}: " + ", ".join(table))
        inner = group_parser.add_subparsers(dest="name", required=True)
        for name, (module, help_text) in table.items():
            if wanted == group:
                _add(inner, name, module, help_text)
            else:
                inner.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"kvpress-like: {args._missing}", file=sys.stderr)
        return 2
    result = importlib.import_module(args._module).main(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
