"""What every evaluation shares: its common options, the environment header, results writing and presses.

Every evaluation takes ``--model`` / ``--threads`` / ``--out`` through :func:`add_model_argument`,
:func:`add_threads_argument` and :func:`add_out_argument` (one default model, one wording), records the same
header (machine, cores, thread settings, load average, versions, commit, command) through
:func:`environment`, writes ``<name>.json`` / ``<name>.md`` (and optional figures) through
:func:`write_result`, and builds its presses by registry name through :func:`build_press`, so a press
registered by a plugin joins every evaluation without code here. Nothing in this module imports an
evaluation, so evaluations and :mod:`.results` (the stitcher) import it without a cycle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvpress_like.base import Press
from kvpress_like.models import DEFAULT_MODEL
from kvpress_like.registry import UnknownPress, list_presses, press_class, resolve_press

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: environment variables that set CPU thread pools; recorded because they change timings and contention
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def add_model_argument(parser: argparse.ArgumentParser, accepts: str = "embedded name, local directory or hub id") -> None:
    """``--model``, defaulting to the library's default model; ``accepts`` says what else may be named."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{accepts} (default: %(default)s)")


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads``: torch's CPU threads, set by :func:`set_threads` and recorded by :func:`environment`."""
    parser.add_argument("--threads", type=int, default=default,
                        help="torch CPU threads (1 on a shared machine; default: %(default)s, torch's choice when None)")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out``: the folder :func:`write_result` writes ``<name>.json`` / ``<name>.md`` to."""
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: evaluations/results)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("kvpress-like", "cli.py"):
        argv[0] = "kvpress-like"
    return " ".join(shlex.quote(a) for a in argv)


def environment(device: str | torch.device = "cpu", command: str | None = None) -> dict:
    """Machine, thread settings, load, versions, commit and command behind a number."""
    import transformers

    import kvpress_like

    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gib = None
    device = torch.device(device)
    cpu = _cpu_name()
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        cpu=cpu,
        cpu_cores=os.cpu_count(),
        memory_gib=memory_gib,
        torch_threads=torch.get_num_threads(),
        thread_env={v: os.environ.get(v) for v in THREAD_VARIABLES},
        load_average_1min=round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        kvpress_like=kvpress_like.__version__,
        git_commit=_git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=command_line() if command is None else command,
    )


def environment_markdown(env: dict) -> str:
    """The two header lines of a results section (machine + threads + load, versions + commit)."""
    threads = ", ".join(f"{k}={v}" for k, v in env.get("thread_env", {}).items() if v is not None)
    load = env.get("load_average_1min")
    return (
        f"- Machine: {env['device']}; {env['cpu_cores']} CPU cores ({env['cpu']}), {env['memory_gib']} GiB RAM, "
        f"torch threads {env['torch_threads']}" + (f" ({threads})" if threads else "")
        + (f", load average {load} at start" if load is not None else "") + "\n"
        f"- Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"kvpress_like {env['kvpress_like']} (commit {env['git_commit']}), {env['date']}\n"
    )


def markdown_footer(report: dict) -> list[str]:
    """The lines every results section ends with: machine and versions, then the command."""
    env = report["environment"]
    command = report.get("command") or env.get("command", "")
    return ["", environment_markdown(env), "", f"Command: `{command.strip()}`", ""]


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (on a shared machine, 1 thread avoids oversubscription stalls)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def write_result(out_dir: Path, name: str, payload: dict, markdown: str, figures: dict | None = None) -> Path:
    """Write ``<name>.json``, the ``<name>.md`` section and figures (``{file name: matplotlib figure}``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    for file_name, fig in (figures or {}).items():
        fig.savefig(out_dir / file_name, dpi=110)
    return path


def query_free_presses() -> list[str]:
    """Registered presses whose scores need no queries (every one a shared prefill can evaluate)."""
    return [name for name in list_presses() if not press_class(name).scoring.needs_queries]


def build_press(name: str, **settings) -> Press | None:
    """The registered press ``name`` with ``settings``; ``"no_press"`` / ``"full"`` give ``None``.

    ``name`` may carry settings of its own as ``name:key=value:key=value`` (e.g. ``adakv:base=kvzip:scope=model``,
    see :func:`~kvpress_like.registry.resolve_press`), so one ``--methods`` list compares variants of a press. Unknown names raise
    ``ValueError`` listing what is registered (evaluations take names from the command line, so the message must
    say what to type instead).
    """
    if name in ("no_press", "full"):
        return None
    try:
        return resolve_press(name, settings)
    except UnknownPress as err:
        raise ValueError(f"unknown method {name.split(':')[0]!r}; registered presses: {', '.join(list_presses())}") from err


def rescore_setting(method: str, rescore_every: int) -> dict:
    """``rescore_every`` for a registered reading-position press (the others refuse it), else nothing, so one
    command-line value can apply to a list of methods."""
    if rescore_every != 1 and method in list_presses() and press_class(method).scoring.rescores:
        return dict(rescore_every=rescore_every)
    return {}


def factor_to_ratio(factor: float) -> float:
    """Compression factor (x4 keeps a quarter) to the fraction removed."""
    if factor < 1:
        raise ValueError(f"compression factors must be >= 1 (x2 keeps half the tokens), got {factor}")
    return 1 - 1 / factor


def parse_list(text: str, kind=str) -> list:
    """``"a,b"`` -> ``[kind("a"), kind("b")]`` (empty items dropped)."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


@contextmanager
def one_reconstruction_per_prompt() -> Iterator[None]:
    """Inside this block KVzip's reconstruction pass runs once per distinct (tokens, cache length, pressed
    layers, :meth:`~kvpress_like.methods.kvzip.KVzipPress.framing`) and its scores are reused.

    An evaluation compresses copies of one shared full prefill for every ratio; KVzip's scores depend on the
    full cache and the re-read tokens only (the ratio changes the selection, not the scores), so one pass per
    prompt gives the same kept sets at a third of the cost of three. The caller guarantees that every KVzip
    press inside the block compresses a copy of the same full prefill of those tokens (one block per prompt).
    """
    from kvpress_like.cache import PressedLayer
    from kvpress_like.methods import kvzip

    original, memo = kvzip.reconstruction_scores, {}

    def shared(model, cache, ids: torch.Tensor, p, row=None, mask=None):
        if mask is not None:  # a padded batch's row: not an evaluation's shared prefill
            return original(model, cache, ids, p, row, mask)
        # skip_layers, and each pressed layer's slots: a compressed copy (a question fed later) is another cache
        pressed = tuple((i, tuple(layer.positions.shape)) for i, layer in enumerate(cache.layers) if isinstance(layer, PressedLayer))
        key = (tuple(ids.flatten().tolist()), tuple(ids.shape), cache.get_seq_length(), pressed, p.framing())
        if key not in memo:
            memo[key] = original(model, cache, ids, p)
        return memo[key]

    kvzip.reconstruction_scores = shared
    try:
        yield
    finally:
        kvzip.reconstruction_scores = original
