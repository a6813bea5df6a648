"""What the offline RULER-style benchmark says about a press and ratio, for the commands to print beside answers.

``kvpress-like ask`` tells a user how the chosen press and ratio scored against no press in the committed
``kvpress-like eval ruler`` results (``ruler.json`` at 2k, ``ruler.4k.json`` at 4k), at the length nearest their
context, so nobody reads an x8 answer without knowing what x8 costs on the embedded model. Reads the committed
results of a source checkout or editable install; prints nothing where they are absent.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["benchmark_note"]

RESULTS = tuple(Path(__file__).resolve().parent / "results" / name for name in ("ruler.json", "ruler.4k.json"))


@lru_cache(maxsize=1)
def _cells() -> tuple[dict, ...]:
    """The summary cells of every committed result, each with its model."""
    cells = []
    for path in RESULTS:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        cells += [dict(cell, model=result.get("model"), file=path.name) for cell in result["summary"]["cells"]]
    return tuple(cells)


def benchmark_note(model: str, press: str | None, ratio: float, tokens: int | None = None) -> str | None:
    """One line: the benchmark's mean for ``press`` at ``ratio`` on ``model`` next to no press, at the measured
    length nearest ``tokens`` (the user's context; ``None``: the shortest). ``None``: no results for that model."""
    ours = [c for c in _cells() if c["model"] == model]
    if not ours or press is None:
        return None
    factor = 1 / (1 - ratio) if ratio < 1 else float("inf")
    cells = [c for c in ours if abs(c["factor"] - factor) < 1e-6 and press in c["methods"] and "no_press" in c["methods"]]
    if not cells:
        return (f"offline RULER-style benchmark ({model}): {press} x{factor:g} was not measured; "
                "see evaluations/results/ruler.md for what was")
    cell = min(cells, key=lambda c: (abs(c["length"] - (tokens or 0)), c["length"]))
    got, base = cell["methods"][press]["mean"], cell["methods"]["no_press"]["mean"]
    vs = cell["vs_no_press"].get(press, {}).get("mean", {})
    verdict = f", {vs['diff'] * 100:+.0f} points [{vs['lo'] * 100:+.0f}, {vs['hi'] * 100:+.0f}], {vs['verdict']}" if vs else ""
    report = cell["file"].replace(".json", ".md")
    return (f"offline RULER-style benchmark ({model}, {cell['length']} tokens): {press} x{factor:g} scored "
            f"{got['mean'] * 100:.0f}% [{got['lo'] * 100:.0f}, {got['hi'] * 100:.0f}] vs {base['mean'] * 100:.0f}% "
            f"with no press (n={got['n']} prompts{verdict}); see evaluations/results/{report}")
