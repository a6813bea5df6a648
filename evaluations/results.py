"""``kvpress-like eval results``: stitch every evaluation's markdown section into ``evaluations/RESULTS.md``.

Each evaluation writes ``evaluations/results/<name>.md`` (plus JSON/CSV/PNG) stating its settings and the
command that produced it; this module puts them under one header naming the machine and versions, so a
reader sees where every number comes from. ``--run`` first reruns this module's evaluations (needle,
correlation, CPU speed) with their default, results-producing settings.

The small helpers below (environment description, writing a result, thread setting) are shared by the
evaluation modules so every results file carries the same header.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"
#: sections first in RESULTS.md, in this order; any other ``*.md`` follows alphabetically
ORDER = ("niah", "correlation", "bench")


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


def environment(device: str | torch.device = "cpu") -> dict:
    """Machine and versions behind a number: CPU/GPU, cores, memory, threads, library versions."""
    import transformers

    import kvpress_like

    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gib = None
    env = dict(
        cpu=_cpu_name(),
        cpu_cores=os.cpu_count(),
        memory_gib=memory_gib,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        kvpress_like=kvpress_like.__version__,
        git_commit=_git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_average_1min=round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    )
    device = torch.device(device)
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({env['cpu']})"
    return env


def environment_markdown(env: dict) -> str:
    return (
        f"- Machine: {env['device']}; {env['cpu_cores']} CPU cores ({env['cpu']}), {env['memory_gib']} GiB RAM, "
        f"torch threads {env['torch_threads']}"
        + (f", load average {env['load_average_1min']} at start" if env.get("load_average_1min") is not None else "")
        + "\n"
        f"- Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"kvpress_like {env['kvpress_like']} (commit {env['git_commit']}), {env['date']}\n"
    )


def markdown_footer(report: dict) -> list[str]:
    """The lines every results section ends with: machine and versions, then the command."""
    return ["", environment_markdown(report["environment"]), "", f"Command: `{report['command'].strip()}`", ""]


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("kvpress-like", "cli.py"):
        argv[0] = "kvpress-like"
    return " ".join(shlex.quote(a) for a in argv)


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (on a shared machine, 1 thread avoids oversubscription stalls)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def write_result(out_dir: Path, name: str, payload: dict, markdown: str) -> Path:
    """Write ``<name>.json`` and the ``<name>.md`` section into ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return path


def stitch(results_dir: Path = RESULTS_DIR, target: Path = RESULTS_FILE) -> Path:
    """Concatenate the sections in ``results_dir`` into ``target`` under a header; returns ``target``."""
    sections = sorted(Path(results_dir).glob("*.md"))
    if not sections:
        raise FileNotFoundError(
            f"no result sections (*.md) in {results_dir}; run an evaluation first, e.g. `kvpress-like eval niah`, "
            "or `kvpress-like eval results --run`."
        )

    def rank(path: Path) -> tuple[int, bool, str]:
        stem = path.stem.split(".")[0]  # "niah.compress_question" follows "niah"
        return (ORDER.index(stem) if stem in ORDER else len(ORDER), path.stem != stem, path.name)

    env = environment()
    rel = os.path.relpath(results_dir, target.parent)
    parts = [
        "# kvpress_like: evaluation results\n",
        "Generated by `kvpress-like eval results` from the sections in "
        f"`{rel}/` (each section names its own machine, versions, settings and command).\n",
        "Stitched on:\n\n" + environment_markdown(env),
        "Contents: " + ", ".join(f"`{p.name}`" for p in sorted(sections, key=rank)) + "\n",
    ]
    for path in sorted(sections, key=rank):
        text = path.read_text().strip()
        parts.append(re.sub(r"\]\((?!https?://|/)([^)]+)\)", rf"]({rel}/\1)", text))  # relative links
    target.write_text("\n\n".join(part.strip() for part in parts) + "\n")
    return target


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", action="store_true", help="rerun niah, correlation and CPU speed first (default settings)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for --run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)


def main(args: argparse.Namespace) -> int:
    if args.run:
        from . import bench, correlation, niah

        for module in (niah, correlation, bench):
            sub = argparse.ArgumentParser()
            module.configure(sub)
            extra = [] if args.threads is None else ["--threads", str(args.threads)]
            module.main(sub.parse_args(["--out", str(args.results_dir), *extra]))
    path = stitch(args.results_dir, args.out)
    print(f"wrote {path}")
    return 0
