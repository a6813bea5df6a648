"""What the offline RULER-style benchmark says about a press and ratio, for the commands to print beside answers.

``kvpress-like ask`` and the demo pick their defaults from ``results/ruler.json`` (``kvpress-like eval ruler``)
and tell a user who asks for another press or ratio how that cell scored against no press, so nobody reads an
x8 answer without knowing what x8 costs on the embedded model. Reads the committed results of a source
checkout or editable install; prints nothing where they are absent.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["benchmark_note"]

RESULTS = Path(__file__).resolve().parent / "results" / "ruler.json"


@lru_cache(maxsize=1)
def _summary() -> dict | None:
    try:
        result = json.loads(RESULTS.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result


def benchmark_note(model: str, press: str | None, ratio: float) -> str | None:
    """One line: the benchmark's mean for ``press`` at ``ratio`` on ``model`` next to no press (``None``: no
    results for that model)."""
    result = _summary()
    if result is None or result.get("model") != model or press is None:
        return None
    factor = 1 / (1 - ratio) if ratio < 1 else float("inf")
    cells = [c for c in result["summary"]["cells"] if abs(c["factor"] - factor) < 1e-6]
    where = f"offline RULER-style benchmark ({model}, {', '.join(str(c['length']) for c in cells) or 'no cell at this ratio'} tokens)"
    for cell in cells:
        if press in cell["methods"] and "no_press" in cell["methods"]:
            ours, base = cell["methods"][press]["mean"], cell["methods"]["no_press"]["mean"]
            vs = cell["vs_no_press"].get(press, {}).get("mean", {})
            verdict = f", {vs['diff'] * 100:+.0f} points [{vs['lo'] * 100:+.0f}, {vs['hi'] * 100:+.0f}], {vs['verdict']}" if vs else ""
            return (f"{where}: {press} x{factor:g} scored {ours['mean'] * 100:.0f}% [{ours['lo'] * 100:.0f}, "
                    f"{ours['hi'] * 100:.0f}] vs {base['mean'] * 100:.0f}% with no press (n={ours['n']} prompts{verdict}); "
                    "see evaluations/results/ruler.md")
    return f"{where}: {press} x{factor:g} was not measured; see evaluations/results/ruler.md for what was"
