"""``kvpress-like bench kvpress``: side by side with NVIDIA kvpress on the same model and inputs (optional).

kvpress pins ``transformers<5.3`` while kvpress_like needs a newer one, so the two run in separate
environments and meet through files in ``--out``:

1. main environment: ``kvpress-like bench kvpress --out /tmp/kvcmp`` writes the inputs (token ids, model
   folder, Q-Filters) and kvpress_like's measurements (``ours.json``), then says what to run next;
2. kvpress environment (``python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install kvpress``):
   ``/tmp/kvpress-venv/bin/python evaluations/kvpress_compare.py --side kvpress --out /tmp/kvcmp`` runs
   kvpress's presses on the same inputs (``theirs.json``); this file then imports neither kvpress_like nor
   anything newer than kvpress allows;
3. main environment again: ``kvpress-like bench kvpress --out /tmp/kvcmp`` finds both files and writes the
   comparison: prefill time and peak RSS ratios ours/theirs, and per layer and KV head the Jaccard index of
   the kept token sets. kvpress does not record positions, so its kept keys are matched back to the
   uncompressed prefill's keys (nearest key vector; identical computations give exact matches).

Q-Filters are the same on both sides: ours are written to a file and handed to kvpress's QFilterPress in
place of its hub download (the published sign convention is shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

METHODS = {"qfilters": "QFilterPress", "knorm": "KnormPress", "snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress"}
MISSING = (
    "kvpress is not importable here. It pins transformers<5.3, so install it in its own environment:\n"
    "  python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install kvpress\n"
    "then run its side on the inputs written by `kvpress-like bench kvpress --out DIR`:\n"
    "  /tmp/kvpress-venv/bin/python evaluations/kvpress_compare.py --side kvpress --out DIR"
)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two sets of token positions."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


def match_positions(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Positions ``(heads, m)`` of kept key vectors ``(heads, m, d)`` within the full keys ``(heads, n, d)``."""
    return torch.cdist(kept.float(), full.float()).argmin(-1)


def _peak_rss_reset() -> int:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _layer_keys(cache, idx: int) -> torch.Tensor:
    layer = cache.layers[idx] if hasattr(cache, "layers") else None
    return (layer.keys if layer is not None else cache.key_cache[idx])[0]


@torch.no_grad()
def _measure(model, ids: torch.Tensor, make_cache, run_pressed, repeats: int) -> tuple[list[float], list[int], object]:
    times, peaks, cache = [], [], None
    for _ in range(repeats):
        cache = make_cache()
        start_rss = _peak_rss_reset()
        start = time.perf_counter()
        run_pressed(cache)
        times.append(time.perf_counter() - start)
        peaks.append(_status("VmHWM") - start_rss)
    return times, peaks, cache


def run_ours(out: Path, model_name: str, tokens: int, ratio: float, repeats: int) -> dict:
    """kvpress_like's side, plus the shared inputs."""
    from safetensors.torch import save_file
    from transformers import DynamicCache

    from kvpress_like import get_press, press
    from kvpress_like.data import corpus_ids
    from kvpress_like.integrations.transformers import cache_kwargs
    from kvpress_like.methods.qfilters import filters_for
    from kvpress_like.models import cache_dir, load_model

    model, tokenizer = load_model(model_name, attn_implementation="eager")
    filters = filters_for(model, tokenizer)
    ids = corpus_ids(tokenizer, "prose")[1000 : 1000 + tokens][None]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"q_filters": filters.contiguous()}, str(out / "filters.safetensors"))
    inputs = dict(model_dir=str(cache_dir() / "models" / model_name), ids=ids[0].tolist(), ratio=ratio, repeats=repeats)
    (out / "inputs.json").write_text(json.dumps(inputs))
    result = {}
    for method in METHODS:
        p = get_press(method, ratio=ratio, **({"filters": filters} if method == "qfilters" else {}))

        def run(cache, p=p):
            with press(model, p):
                model(ids, **cache_kwargs(cache), logits_to_keep=1)

        times, peaks, cache = _measure(model, ids, lambda: DynamicCache(config=model.config), run, repeats)
        kept = [layer.positions[0].tolist() for layer in cache.layers]
        result[method] = dict(prefill_s=statistics.median(times), peak_rss=statistics.median(peaks), kept=kept)
    (out / "ours.json").write_text(json.dumps(result))
    return result


def run_theirs(out: Path) -> dict:
    """kvpress's side (run in the kvpress environment)."""
    try:
        import kvpress
    except ImportError:
        raise SystemExit(MISSING) from None
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, DynamicCache

    inputs = json.loads((out / "inputs.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(inputs["model_dir"], dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([inputs["ids"]])
    filters = load_file(str(out / "filters.safetensors"))["q_filters"]
    full = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full)
    result = {}
    for method, cls in METHODS.items():
        p = getattr(kvpress, cls)(compression_ratio=inputs["ratio"])
        if method == "qfilters":
            p.load_q_filters = lambda name: filters  # our filters instead of the hub download

        def run(cache, p=p):
            with p(model):
                model(ids, past_key_values=cache)

        times, peaks, cache = _measure(model, ids, DynamicCache, run, inputs["repeats"])
        kept = [match_positions(_layer_keys(cache, i), _layer_keys(full, i)).tolist() for i in range(len(model.model.layers))]
        result[method] = dict(prefill_s=statistics.median(times), peak_rss=statistics.median(peaks), kept=kept,
                              kvpress=getattr(kvpress, "__version__", "?"))
    (out / "theirs.json").write_text(json.dumps(result))
    return result


def compare(ours: dict, theirs: dict) -> dict:
    """Time and memory ratios ours/theirs and mean Jaccard of kept sets, per method."""
    rows = {}
    for method in METHODS:
        if method not in ours or method not in theirs:
            continue
        a, b = ours[method], theirs[method]
        scores = [jaccard(torch.tensor(ha), torch.tensor(hb)) for la, lb in zip(a["kept"], b["kept"]) for ha, hb in zip(la, lb)]
        rows[method] = dict(time_ratio=a["prefill_s"] / b["prefill_s"],
                            memory_ratio=a["peak_rss"] / b["peak_rss"] if b["peak_rss"] else None,
                            jaccard_mean=sum(scores) / len(scores), jaccard_min=min(scores))
    return rows


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--side", choices=("ours", "kvpress"), default="ours",
                        help="'ours' (main environment; compares when theirs.json exists) or 'kvpress' (kvpress venv)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kvcmp"), help="folder shared by both sides")
    # a literal, not kvpress_like.models.DEFAULT_MODEL: the kvpress side runs without kvpress_like installed
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of KV pairs removed")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per method (median reported)")


def main(args: argparse.Namespace) -> int:
    if args.side == "kvpress":
        run_theirs(args.out)
        print(f"wrote {args.out / 'theirs.json'}; now run `kvpress-like bench kvpress --out {args.out}` in the main environment")
        return 0
    theirs_path = args.out / "theirs.json"
    if not theirs_path.exists():
        run_ours(args.out, args.model, args.tokens, args.ratio, args.repeats)
        print(f"wrote kvpress_like's side to {args.out}. Next, in a kvpress environment:\n{MISSING.split(chr(10), 1)[1]}")
        return 0
    ours = json.loads((args.out / "ours.json").read_text())
    rows = compare(ours, json.loads(theirs_path.read_text()))
    print("| method | time ours/theirs | peak RSS ours/theirs | kept-set Jaccard mean (min) |\n|---|---|---|---|")
    for m, r in rows.items():
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        print(f"| {m} | {r['time_ratio']:.2f} | {mem} | {r['jaccard_mean']:.3f} ({r['jaccard_min']:.3f}) |")
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":  # the kvpress side runs this file directly, outside the package
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    sys.exit(main(parser.parse_args()))
