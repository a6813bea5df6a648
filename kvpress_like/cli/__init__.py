"""``kvpress-like``: one command line for the demo, calibration, evaluations and benchmarks.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``main(args)``; a command's
module (and with it torch and transformers, 5-30 s) is imported only when the command runs. ``--help``
stays fast without importing it: a subcommand's help is rendered once from its real ``configure()`` and
stored in ``cli_help.json`` together with a hash of that function's source; when the source changed
since, the module is imported and the help rendered live (slow, never stale). After changing a
``configure()``, refresh the stored help with ``python -m kvpress_like.cli --refresh-help``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

#: command -> (module, one-line help)
COMMANDS = {
    "demo": ("kvpress_like.cli.demo", "answer a pass-key question with and without Q-Filters on the embedded model"),
    "calibrate": ("kvpress_like.integrations.calibration", "compute Q-Filters for a model and save them (safetensors)"),
    "ask": ("kvpress_like.cli.ask", "compress a document's KV cache once, then answer many questions on it"),
}
#: ``kvpress-like eval <name>`` / ``kvpress-like bench <name>``
EVALUATIONS = {
    "niah": ("kvpress_like.evaluations.niah", "needle-in-a-haystack grid: accuracy heat-maps per method"),
    "passkey": ("kvpress_like.evaluations.passkey", "pass-key retrieval, n>=60 per cell, paired method comparisons"),
    "ruler": ("kvpress_like.evaluations.ruler", "offline RULER-style tasks (needles, tracking, aggregation, QA), paired vs no press"),
    "needle-trace": ("kvpress_like.evaluations.needle_trace", "per layer and KV head: how much of a needle each press keeps, and answers"),
    "correlation": ("kvpress_like.evaluations.correlation", "Spearman correlation of scores with received attention"),
    "perplexity": ("kvpress_like.evaluations.perplexity", "streaming perplexity with a capped KV cache"),
    "robustness": ("kvpress_like.evaluations.robustness", "Q-Filters stability across corpora and sample counts"),
    "calibration-grid": ("kvpress_like.evaluations.calibration_grid", "Spearman of calibrated scorers' settings vs received attention"),
    "results": ("kvpress_like.evaluations.results", "regenerate evaluations/RESULTS.md from every evaluation"),
}
BENCHMARKS = {
    "speed": ("kvpress_like.evaluations.bench", "prefill overhead, peak memory, KV bytes, decode ms/token"),
    "decode": ("kvpress_like.evaluations.decode_bench", "per-step eviction overhead of the capped cache"),
    "gpu-decode": ("kvpress_like.evaluations.gpu_decode", "static compressed cache + torch.compile decode on GPU"),
    "throughput": ("kvpress_like.evaluations.throughput", "decode tokens/s, full vs compressed, batch x context, vs the byte bound"),
    "headwise": ("kvpress_like.evaluations.headwise_bench", "head-wise budgets: bytes vs promised pairs, ragged vs uniform decode step"),
    "headwise-quality": ("kvpress_like.evaluations.headwise_quality", "head-wise vs uniform budgets at equal kept pairs, RULER-style prompts, paired"),
    "vllm": ("kvpress_like.evaluations.vllm_bench", "vLLM serving: running requests and tokens/s, stock vs a press (vLLM venv)"),
    "kvpress": ("kvpress_like.evaluations.kvpress_compare", "side by side with NVIDIA kvpress (separate venv)"),
    "kvzip": ("kvpress_like.evaluations.kvzip_cost", "KVzip reconstruction pass vs a plain prefill (time ratio)"),
    "scorer-cost": ("kvpress_like.evaluations.scorer_cost", "per-step cost of each press's scoring in capped decoding"),
    "qa": ("kvpress_like.evaluations.qa_bench", "kvpress-qa pipeline: one context compressed once vs one prefill per question"),
    "lm-eval": ("kvpress_like.evaluations.lm_eval_speed", "lm-eval qfilters-hf generate_until requests/s per batch size"),
}
GROUPS = {"eval": EVALUATIONS, "bench": BENCHMARKS}

HELP_FILE = Path(__file__).with_name("cli_help.json")
HELP_WIDTH = 100  # stored help is rendered at a fixed width, so it does not depend on the terminal


def plain(text: str) -> str:
    """Docstring text without reST inline markup (``code``, :func:`name`), as a terminal should show it."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text.replace("``", ""))


def commands() -> dict[tuple[str, ...], tuple[str, str]]:
    """Every command path, e.g. ``("demo",)`` or ``("eval", "niah")``, with its module and help."""
    found = {(name,): entry for name, entry in COMMANDS.items()}
    for group, table in GROUPS.items():
        found.update({(group, name): entry for name, entry in table.items()})
    return found


def _top_parser() -> argparse.ArgumentParser:
    """The command list only: built from the tables above, imports nothing."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="kvpress-like", description=plain(__doc__.splitlines()[0]))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*COMMANDS, *GROUPS]) + "}")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    for group, table in GROUPS.items():
        inner = sub.add_parser(group, help=f"{group}: " + ", ".join(table)).add_subparsers(dest="name", required=True)
        for name, (_, help_text) in table.items():
            inner.add_parser(name, help=help_text)
    return parser


def _configure_source_hash(module: str) -> str | None:
    """sha1 of the source of ``module``'s ``configure`` function, read without importing the module."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "configure":
            return hashlib.sha1(ast.get_source_segment(source, node).encode()).hexdigest()
    return None


def command_parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    """The real parser of one command (imports the command's module)."""
    module, help_text = commands()[path]
    parser = argparse.ArgumentParser(
        prog="kvpress-like " + " ".join(path),
        description=help_text,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH),
    )
    importlib.import_module(module).configure(parser)
    return parser


def _stored_help(path: tuple[str, ...]) -> str | None:
    if not HELP_FILE.exists():
        return None
    entry = json.loads(HELP_FILE.read_text(encoding="utf-8")).get(" ".join(path))
    module = commands()[path][0]
    if entry is None or entry["configure_sha1"] != _configure_source_hash(module):
        return None
    return entry["help"]


def refresh_help() -> dict[str, dict[str, str]]:
    """Render every command's help from its real ``configure()`` and write :data:`HELP_FILE`."""
    stored = {}
    for path, (module, _) in commands().items():
        try:
            text = command_parser(path).format_help()
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue  # a command whose module is not part of this installation
        stored[" ".join(path)] = {"configure_sha1": _configure_source_hash(module), "help": text}
    HELP_FILE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return stored


def _command_path(argv: list[str]) -> tuple[str, ...] | None:
    known = commands()
    for length in (1, 2):
        if tuple(argv[:length]) in known:
            return tuple(argv[:length])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--refresh-help"]:
        print(f"wrote {HELP_FILE} ({len(refresh_help())} commands)")
        return 0
    path = _command_path(argv)
    if path is None:  # no command, a bad one, or top-level --help: argparse explains (and exits)
        _top_parser().parse_args(argv)
        return 2
    rest = argv[len(path) :]
    options = rest[: rest.index("--")] if "--" in rest else rest
    if "-h" in options or "--help" in options:
        stored = _stored_help(path)
        if stored is not None:
            print(stored, end="")
            return 0
    module = commands()[path][0]
    try:
        parser = command_parser(path)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        print(f"kvpress-like: {module} is not available in this installation", file=sys.stderr)
        return 2
    args = parser.parse_args(rest)
    return int(importlib.import_module(module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
