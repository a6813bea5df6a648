"""``kvpress-like bench kvpress``: side by side with NVIDIA kvpress on the same model and inputs (optional).

kvpress pins ``transformers<5.3`` while kvpress_like needs a newer one, so the two run in separate
environments and meet through files in ``--out``:

1. main environment: ``kvpress-like bench kvpress --out /tmp/kvcmp`` writes the inputs (token ids, model
   folder, Q-Filters) and kvpress_like's measurements (``ours.json``), then says what to run next;
2. kvpress environment (``python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install kvpress==0.5.5
   transformers==5.2.0``, the versions checked here):
   ``/tmp/kvpress-venv/bin/python evaluations/kvpress_compare.py --side kvpress --out /tmp/kvcmp`` runs
   kvpress's presses on the same inputs (``theirs.json``); this file then imports neither kvpress_like nor
   anything newer than kvpress allows;
3. main environment again: ``kvpress-like bench kvpress --out /tmp/kvcmp`` finds both files and writes the
   comparison: prefill time and peak RSS ratios ours/theirs, and per layer and KV head the Jaccard index of
   the kept token sets. kvpress does not record positions, so its kept keys are matched back to the
   uncompressed prefill's keys (nearest key vector; identical computations give exact matches).

Q-Filters are the same on both sides: ours are written to a file and handed to kvpress's QFilterPress in
place of its hub download (the published sign convention is shared).

``--accuracy``: task accuracy instead of kept sets, on the RULER-style prompts of ``eval ruler``
(:mod:`.ruler_tasks`). The main side writes the prompts (``prompts.json``: context ids, question ids,
answers, generation budget) and answers them as ``eval ruler`` does (one full prefill, compressed per press,
question + answer prefix fed uncompressed after it, greedy), rows in ``ours_accuracy.json``. The kvpress side
compresses each context with each kvpress press during the prefill, as kvpress does (KVzip through its own
context manager and reconstruction passes; the others share one prefill, each press's own ``compress`` on
the inputs its hook would get, see :class:`_Fanout`), then feeds the question at its true positions without
a press and decodes greedily, as kvpress's pipeline does (``theirs_accuracy.json``). The main side scores both with RULER's string match and writes
``kvpress_accuracy.{json,md}``: per method and factor, ours vs theirs accuracy, the paired difference, and
each side's real cache bytes after compression (kvpress's AdaKV and KVzip only mask evicted keys in a
full-size cache, so theirs count in full). Both sides resume: rerunning a step skips rows already written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

METHODS = {"qfilters": "QFilterPress", "knorm": "KnormPress", "snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress"}
#: ``--accuracy`` pairs: label -> (our method, as ``build_press`` reads it; kvpress press classes, a wrapper first).
#: kvpress's KVzip shares one budget across layers and heads with no per-head floor; ours does so under
#: ``adakv:scope=model``. Our expected attention takes query statistics from calibration, kvpress's from the
#: context's last queries: the same idea, not the same estimator.
PAIRS = {
    "kvzip": ("adakv:base=kvzip:scope=model:normalization=none:floor=0", ("KVzipPress",)),
    "adakv_expected_attention": ("adakv:base=expected_attention_calibrated", ("AdaKVPress", "ExpectedAttentionPress")),
    "expected_attention": ("expected_attention_calibrated", ("ExpectedAttentionPress",)),
    "keydiff": ("keydiff", ("KeyDiffPress",)),
    "snapkv": ("snapkv", ("SnapKVPress",)),
    "qfilters": ("qfilters", ("QFilterPress",)),
    "streaming_llm": ("streaming_llm", ("StreamingLLMPress",)),
    "knorm": ("knorm", ("KnormPress",)),
}
MISSING = (
    "kvpress is not importable here. It pins transformers<5.3, so install it in its own environment:\n"
    "  python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install kvpress==0.5.5 transformers==5.2.0\n"
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


# -- task accuracy (--accuracy) ----------------------------------------------------------------------------
def _row_key(r: dict) -> tuple:
    return r["seed"], r["task"], r["method"], float(r["factor"])


def _load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _save_rows(path: Path, rows: list[dict], **extra) -> None:
    path.write_text(json.dumps(dict(extra, rows=rows)))


def _wanted(settings: dict) -> list[tuple[str, float]]:
    """(method, factor) of every row a prompt needs on each side: no press once, then every pair per factor."""
    return [("no_press", 1.0)] + [(m, float(f)) for f in settings["factors"] for m in settings["methods"]]


def write_prompts(out: Path, prompts: dict) -> None:
    """``prompts.json`` for both sides; refuses other prompts over rows already answered. Factors and methods
    may change and more seeds or tasks may be added: rows of the prompts kept are reused, so a run grows."""
    path = out / "prompts.json"
    if path.exists() and (out / "ours_accuracy.json").exists():
        old = json.loads(path.read_text())
        new = {(p["seed"], p["task"]): p for p in prompts["prompts"]}
        if any(old[k] != prompts[k] for k in ("model", "length")) or any(new.get((p["seed"], p["task"])) != p for p in old["prompts"]):
            raise SystemExit(f"{out} holds answers to other prompts (model, length, tasks or seeds differ, or a prompt "
                             "changed); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts))


def run_ours_accuracy(out: Path, model_name: str, length: int, tasks: list[str], seeds: list[int],
                      factors: list[float], methods: list[str], env: dict | None = None) -> list[dict]:
    """kvpress_like's answers (the ``eval ruler`` protocol) and the shared prompts; resumes from ``ours_accuracy.json``."""
    from safetensors.torch import save_file

    from kvpress_like import cache_nbytes
    from kvpress_like.cache_ops import fork_cache
    from kvpress_like.methods.qfilters import filters_for
    from kvpress_like.models import load_model, model_path

    from .common import build_press, factor_to_ratio, one_reconstruction_per_prompt
    from .passkey import prefill
    from .ruler import answer_cell, compress_cell, generate_rows
    from .ruler_tasks import ruler_sample

    model, tokenizer = load_model(model_name)
    out.mkdir(parents=True, exist_ok=True)
    if "qfilters" in methods:  # handed to kvpress's QFilterPress
        save_file({"q_filters": filters_for(model, tokenizer).contiguous()}, str(out / "filters.safetensors"))
    samples = {(seed, task): ruler_sample(tokenizer, task, length, seed) for seed in seeds for task in tasks}
    settings = dict(model=model_name, model_dir=str(model_path(model_name)), length=length, factors=[float(f) for f in factors],
                    methods=list(methods))
    settings["prompts"] = [dict(seed=seed, task=task, context_ids=s.context_ids, question_ids=s.question_ids,
                                answers=s.answers, max_new_tokens=s.max_new_tokens) for (seed, task), s in samples.items()]
    write_prompts(out, settings)
    path = out / "ours_accuracy.json"
    rows = _load_rows(path)
    done = {_row_key(r) for r in rows}
    presses = {(m, f): build_press(PAIRS[m][0], ratio=factor_to_ratio(f)) for m, f in _wanted(settings)[1:]}
    began = time.time()
    for (seed, task), s in samples.items():
        todo = [(m, f) for m, f in _wanted(settings) if (seed, task, m, f) not in done]
        if not todo:
            continue
        feed, start = torch.tensor([s.question_ids]), len(s.context_ids)
        pre = prefill(model, torch.tensor([s.context_ids]))
        meta = dict(seed=seed, task=task)
        if ("no_press", 1.0) in todo:
            (said,) = generate_rows(model, tokenizer, fork_cache(pre.cache, share_storage=True), 1, feed, s, start)
            rows.append(dict(meta, method="no_press", factor=1.0, output=said, cache_bytes=cache_nbytes(pre.cache)))
        with one_reconstruction_per_prompt():
            for f in settings["factors"]:
                names = [m for m, g in todo if g == f and m != "no_press"]
                if not names:
                    continue
                cell = [presses[(m, f)] for m in names]
                caches = compress_cell(model, pre, cell)
                nbytes = [cache_nbytes(c) for c in caches]  # before the question is added
                for m, said, b in zip(names, answer_cell(model, tokenizer, cell, caches, feed, s, start), nbytes):
                    rows.append(dict(meta, method=m, factor=f, output=said, cache_bytes=b))
        _save_rows(path, rows, threads=torch.get_num_threads(), environment=env)
        print(f"ours: seed {seed} {task} done ({(time.time() - began) / 60:.1f} min)", flush=True)
    return rows


def _their_press(kvpress, classes: tuple[str, ...], ratio: float, filters: torch.Tensor | None):
    """kvpress's press from its class names (wrapper first) at ``compression_ratio=ratio``."""
    *wrappers, inner = classes
    p = getattr(kvpress, inner)(compression_ratio=ratio)
    if inner == "QFilterPress":
        p.load_q_filters = lambda name: filters  # our filters instead of the hub download
    for wrapper in reversed(wrappers):
        p = getattr(kvpress, wrapper)(p)
    return p


@torch.no_grad()
def _greedy(model, cache, prompt: dict, start: int, stop: set[int], decode) -> str:
    """The question at its true positions after the compressed context, then greedy decoding, as kvpress's
    pipeline does; stops at end of sequence, at the budget, or once every answer is in the text (RULER's
    case-insensitive match, so the score cannot change)."""
    ids = torch.tensor([prompt["question_ids"]])
    position = torch.arange(start, start + ids.shape[1])[None]
    out: list[int] = []
    for _ in range(prompt["max_new_tokens"]):
        logits = model(input_ids=ids, past_key_values=cache, position_ids=position, logits_to_keep=1).logits[0, -1]
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        text = decode(out).lower()
        if all(a.lower() in text for a in prompt["answers"]):
            break
        ids, position = torch.tensor([[token]]), position[:, -1:] + 1
    return decode(out)


class _Fanout:
    """Every hook-based kvpress press on one prefill: in each attention layer, each press's own ``compress``
    on the inputs its forward hook would get (kvpress compresses a layer after its attention output is
    computed, so the prefill's hidden states do not depend on the press), its kept keys and values, and the
    head-wise mask it leaves on the layer (AdaKV), kept apart per press. Equal to one pressed prefill per
    press (``--separate-prefills`` runs that way, to check) at a fraction of the cost."""

    def __init__(self, presses: dict):
        self.presses = presses
        self.kept: dict = {name: {} for name in presses}
        self.masks: dict = {name: {} for name in presses}

    def hook(self, module, inputs, kwargs, output):
        layer, idx = kwargs["past_key_values"].layers[module.layer_idx], module.layer_idx
        for name, p in self.presses.items():
            module.masked_key_indices = None
            self.kept[name][idx] = p.compress(module, kwargs["hidden_states"], layer.keys, layer.values, output[1], kwargs)
            self.masks[name][idx] = getattr(module, "masked_key_indices", None)
        module.masked_key_indices = None
        return output


def _cache_of(kept: dict, cache_cls):
    cache = cache_cls()
    for idx in sorted(kept):
        cache.update(*kept[idx], idx)
    return cache


def run_theirs_accuracy(out: Path, separate_prefills: bool = False) -> list[dict]:
    """kvpress's answers to ``prompts.json`` (run in the kvpress environment); resumes from ``theirs_accuracy.json``.

    KVzip runs its own prefill and reconstruction passes (its ``__call__``); the other presses share one
    prefill through :class:`_Fanout` unless ``separate_prefills``."""
    try:
        import kvpress
    except ImportError:
        raise SystemExit(MISSING) from None
    import contextlib
    import os
    from importlib.metadata import version

    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    settings = json.loads((out / "prompts.json").read_text())
    # sdpa: kvpress's head-wise masking (AdaKV, KVzip) refuses eager attention
    model = AutoModelForCausalLM.from_pretrained(settings["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(settings["model_dir"])
    eos = model.generation_config.eos_token_id
    stop = {i for i in [tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])] if i is not None}
    filters = load_file(str(out / "filters.safetensors"))["q_filters"] if "qfilters" in settings["methods"] else None
    attention = [layer.self_attn for layer in model.model.layers]
    path = out / "theirs_accuracy.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows, spent = saved.get("rows", []), saved.get("elapsed_s", 0.0)  # a resumed run adds up its time
    done = {_row_key(r) for r in rows}
    load, began = os.getloadavg()[0], time.time()

    def answer(prompt, method, factor, cache, masks, prefill_s):
        for module, mask in zip(attention, masks):
            module.masked_key_indices = mask
        nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        said = _greedy(model, cache, prompt, len(prompt["context_ids"]), stop, tokenizer.decode)
        rows.append(dict(seed=prompt["seed"], task=prompt["task"], method=method, factor=factor, output=said,
                         cache_bytes=nbytes, prefill_s=prefill_s))

    def pressed_prefill(p, ids):
        cache, start = DynamicCache(), time.perf_counter()
        with torch.no_grad(), (p(model) if p is not None else contextlib.nullcontext()):
            model.model(input_ids=ids, past_key_values=cache)
        return cache, time.perf_counter() - start

    for prompt in settings["prompts"]:  # prompt-major: a stopped run has whole prompts
        todo = [(m, f) for m, f in _wanted(settings) if (prompt["seed"], prompt["task"], m, f) not in done]
        ids = torch.tensor([prompt["context_ids"]])
        own = [(m, f) for m, f in todo if m == "kvzip" or separate_prefills]
        shared = {(m, f): _their_press(kvpress, PAIRS[m][1], 1 - 1 / f, filters) for m, f in todo if (m, f) not in own and m != "no_press"}
        if shared or ("no_press", 1.0) in todo:
            fan = _Fanout({k: p for k, p in shared.items()})
            hooks = []
            for p in shared.values():
                p.post_init_from_model(model)
            for module in attention:
                module.rotary_emb = model.model.rotary_emb  # as kvpress's press context sets it
                hooks.append(module.register_forward_hook(fan.hook, with_kwargs=True))
            try:
                full, prefill_s = pressed_prefill(None, ids)
            finally:
                for h in hooks:
                    h.remove()
            for key in shared:
                answer(prompt, *key, _cache_of(fan.kept[key], DynamicCache), [fan.masks[key].get(i) for i in range(len(attention))], prefill_s)
            if ("no_press", 1.0) in todo:
                answer(prompt, "no_press", 1.0, full, [None] * len(attention), prefill_s)
        for method, factor in own:
            p = None if method == "no_press" else _their_press(kvpress, PAIRS[method][1], 1 - 1 / factor, filters)
            cache, prefill_s = pressed_prefill(p, ids)
            answer(prompt, method, factor, cache, [getattr(m, "masked_key_indices", None) for m in attention], prefill_s)
        _save_rows(path, rows, kvpress=version("kvpress"), transformers=transformers.__version__, torch=torch.__version__,
                   threads=torch.get_num_threads(), load_average_1min=load, elapsed_s=spent + time.time() - began,
                   separate_prefills=separate_prefills)
        print(f"kvpress: seed {prompt['seed']} {prompt['task']} done ({(time.time() - began) / 60:.1f} min)", flush=True)
    return rows


def summarize_accuracy(settings: dict, ours_rows: list[dict], theirs_rows: list[dict]) -> list[dict]:
    """Per (method, factor) over the prompts both sides answered: each side's RULER score, the paired
    difference ours - theirs (bootstrap 95% interval over prompts, exact sign test), identical outputs, and
    each side's mean cache bytes after compression."""
    from . import stats
    from .ruler_tasks import score

    answers = {(p["seed"], p["task"]): p["answers"] for p in settings["prompts"]}
    ours, theirs = {_row_key(r): r for r in ours_rows}, {_row_key(r): r for r in theirs_rows}
    cells = []
    order = {m: i for i, m in enumerate(["no_press", *PAIRS])}
    for factor, method in sorted({(k[3], k[2]) for k in ours if k in theirs}, key=lambda x: (x[0], order[x[1]])):
        keys = [k for k in ours if k in theirs and k[2:] == (method, factor)]
        a = [score(ours[k]["output"], answers[k[:2]]) for k in keys]
        b = [score(theirs[k]["output"], answers[k[:2]]) for k in keys]
        diff = stats.paired_bootstrap(a, b)
        p = stats.mcnemar_p(sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b)))
        tasks = {}
        for task in dict.fromkeys(k[1] for k in keys):
            idx = [i for i, k in enumerate(keys) if k[1] == task]
            tasks[task] = dict(n=len(idx), ours=sum(a[i] for i in idx) / len(idx), theirs=sum(b[i] for i in idx) / len(idx))
        ours_bytes = statistics.mean(ours[k]["cache_bytes"] for k in keys)
        theirs_bytes = statistics.mean(theirs[k]["cache_bytes"] for k in keys)
        cells.append(dict(
            method=method, factor=factor, n=len(keys), ours_method=PAIRS[method][0] if method in PAIRS else method,
            kvpress=" around ".join(PAIRS[method][1]) if method in PAIRS else "no press",
            ours=sum(a) / len(a), theirs=sum(b) / len(b),
            ours_ci=stats.wilson(sum(a), len(a)), theirs_ci=stats.wilson(sum(b), len(b)),
            diff=diff["diff"], lo=diff["lo"], hi=diff["hi"], p=p,
            verdict=stats.verdict(diff["lo"], diff["hi"]) if p < 0.05 else "no difference shown",
            identical=sum(ours[k]["output"].strip() == theirs[k]["output"].strip() for k in keys) / len(keys),
            ours_bytes=ours_bytes, theirs_bytes=theirs_bytes, bytes_ratio=ours_bytes / theirs_bytes if theirs_bytes else math.nan,
            theirs_prefill_s=statistics.median(theirs[k]["prefill_s"] for k in keys), tasks=tasks,
        ))
    return cells


def accuracy_markdown(result: dict) -> str:
    """The ours-vs-kvpress table, then each side's per-task scores."""
    from .common import markdown_footer

    s, cells, t = result["settings"], result["cells"], result["theirs_environment"]
    ns = sorted({c["n"] for c in cells}) or [0]
    pct = lambda x: f"{100 * x:.0f}"  # noqa: E731
    md = [
        "## Side by side with NVIDIA kvpress: task accuracy on the same prompts"
        + (f" (PARTIAL: {result['compared_rows']} of {result['planned_rows']} planned rows on both sides)"
           if result["compared_rows"] < result["planned_rows"] else ""),
        "",
        f"Model {s['model']}; RULER-style prompts of {s['length']} tokens, tasks {', '.join(dict.fromkeys(p['task'] for p in s['prompts']))}, "
        f"seeds {sorted({p['seed'] for p in s['prompts']})}; **n = {ns[0] if len(ns) == 1 else f'{ns[0]}-{ns[-1]}'} prompts per row** "
        "(one per task and seed). Both sides: the context's cache compressed once, the question + answer prefix fed "
        "uncompressed after it at its true positions, greedy decoding, RULER string match (% of expected strings in "
        "the output). Ours: `eval ruler`'s protocol (one full prefill, each press compressing a copy). kvpress "
        f"{t['kvpress']} (transformers {t['transformers']}, torch {t['torch']}, {t['threads']} thread(s), sdpa attention, "
        f"its own venv): each press compresses during the prefill ("
        + ("one prefill per press" if t.get("separate_prefills") else "KVzip with its own prefill and reconstruction passes; the "
           "others share one prefill, each press's own `compress` on the inputs its hook gets, bit-identical to one pressed "
           "prefill per press on a checked prompt")
        + f"), the question without a press, as its pipeline does ({t['elapsed_s'] / 60:.1f} min, load average "
        f"{t['load_average_1min']:.1f} at start).",
        "",
        "`ours - theirs`: paired difference in points, bootstrap 95% interval over prompts, exact sign test p; "
        "**worse** / **beats** only when the interval excludes zero and p < 0.05. `same text`: prompts whose two "
        "outputs are identical. Cache: mean bytes of the key/value tensors after compression (ours "
        "`kvpress_like.cache_nbytes`, allocated slots; kvpress: its cache tensors, full size where it masks evicted "
        "keys instead of dropping them: AdaKV and KVzip).",
        "",
        "| method | factor | ours (method) | kvpress (press) | ours - theirs | same text | cache MiB ours / kvpress (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        cmp = f"{100 * c['diff']:+.0f} [{100 * c['lo']:+.0f}, {100 * c['hi']:+.0f}], p={c['p']:.2g}"
        cmp += f" **{c['verdict']}**" if c["verdict"] != "no difference shown" else ""
        md.append(
            f"| {c['method']} | x{c['factor']:g} | {pct(c['ours'])} [{pct(c['ours_ci'][0])}, {pct(c['ours_ci'][1])}] (`{c['ours_method']}`) "
            f"| {pct(c['theirs'])} [{pct(c['theirs_ci'][0])}, {pct(c['theirs_ci'][1])}] ({c['kvpress']}) | {cmp} | {pct(c['identical'])}% "
            f"| {c['ours_bytes'] / 2**20:.1f} / {c['theirs_bytes'] / 2**20:.1f} ({c['bytes_ratio']:.2f}) |")
    tasks = list(dict.fromkeys(task for c in cells for task in c["tasks"]))
    md += ["", "Per task, ours / kvpress (%, mean over seeds):", "",
           "| method | factor | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for c in cells:
        md.append(f"| {c['method']} | x{c['factor']:g} | " + " | ".join(
            f"{pct(c['tasks'][x]['ours'])} / {pct(c['tasks'][x]['theirs'])}" if x in c["tasks"] else "-" for x in tasks) + " |")
    return "\n".join(md + markdown_footer(result))


def main_accuracy(args: argparse.Namespace) -> int:
    """Main side of ``--accuracy``: answer what is missing, then compare once kvpress's rows exist."""
    from .common import RESULTS_DIR, environment, parse_list, write_result
    from .ruler_tasks import TASKS

    tasks = list(TASKS) if args.tasks == "all" else parse_list(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    methods = list(PAIRS) if args.methods == "all" else parse_list(args.methods)
    bad = [m for m in methods if m not in PAIRS]
    if unknown or bad:
        raise SystemExit(f"unknown task(s) {unknown} or method(s) {bad}; tasks: {', '.join(TASKS)}; methods: {', '.join(PAIRS)}")
    if args.samples < 1:
        raise SystemExit(f"--samples must be at least 1, got {args.samples}")
    factors = parse_list(args.factors, float)
    if any(f <= 1 for f in factors):
        raise SystemExit(f"--factors must be above 1 (x4 keeps a quarter), got {factors}")
    env = environment()
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    run_ours_accuracy(args.out, args.model, args.length, tasks, seeds, factors, methods, env)
    theirs_path = args.out / "theirs_accuracy.json"
    if not theirs_path.exists():
        print(f"wrote kvpress_like's answers to {args.out}. Next, in a kvpress environment:\n"
              f"  KVPRESS_PYTHON evaluations/kvpress_compare.py --side kvpress --accuracy --out {args.out}\n"
              "then rerun this command to compare.")
        return 0
    settings = json.loads((args.out / "prompts.json").read_text())
    theirs = json.loads(theirs_path.read_text())
    ours = json.loads((args.out / "ours_accuracy.json").read_text())
    result = dict(settings=settings, cells=summarize_accuracy(settings, ours["rows"], theirs["rows"]),
                  environment=ours.get("environment") or env, theirs_environment={k: v for k, v in theirs.items() if k != "rows"})
    result["planned_rows"] = len(settings["prompts"]) * len(_wanted(settings))
    result["compared_rows"] = sum(c["n"] for c in result["cells"])
    text = accuracy_markdown(result)
    result["settings"] = dict(settings, prompts=[{k: p[k] for k in ("seed", "task", "answers")} for p in settings["prompts"]])
    result["outputs"] = dict(ours=ours["rows"], theirs=theirs["rows"])  # the answers behind every cell
    path = write_result(args.results or RESULTS_DIR, args.name, result, text)
    print(text)
    print(f"wrote {path}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--side", choices=("ours", "kvpress"), default="ours",
                        help="'ours' (main environment; compares when theirs.json exists) or 'kvpress' (kvpress venv)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kvcmp"), help="folder shared by both sides")
    # a literal, not kvpress_like.models.DEFAULT_MODEL: the kvpress side runs without kvpress_like installed
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of KV pairs removed")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per method (median reported)")
    parser.add_argument("--accuracy", action="store_true",
                        help="task accuracy on RULER-style prompts instead of kept sets (see the module docstring)")
    parser.add_argument("--length", type=int, default=2048, help="--accuracy: prompt length in tokens")
    parser.add_argument("--tasks", default="all", help="--accuracy: RULER-style tasks, comma-separated, or 'all'")
    parser.add_argument("--samples", type=int, default=1, help="--accuracy: prompts per task (seeds F..F+N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="--accuracy: F, the first prompt seed")
    parser.add_argument("--factors", default="4", help="--accuracy: compression factors (x4 keeps a quarter)")
    parser.add_argument("--methods", default="all", help="--accuracy: pairs to run, comma-separated, or 'all': " + ", ".join(PAIRS))
    parser.add_argument("--results", type=Path, default=None, help="--accuracy: where the table goes (default evaluations/results)")
    parser.add_argument("--name", default="kvpress_accuracy", help="--accuracy: basename of the result files")
    parser.add_argument("--separate-prefills", action="store_true",
                        help="--accuracy, kvpress side: one pressed prefill per press (default: presses other than KVzip "
                             "share one prefill, each compressing with its own compress(); the same result, cheaper)")


def main(args: argparse.Namespace) -> int:
    if args.side == "kvpress" and args.accuracy:
        run_theirs_accuracy(args.out, args.separate_prefills)
        print(f"wrote {args.out / 'theirs_accuracy.json'}; now rerun `kvpress-like bench kvpress --accuracy` with the same options")
        return 0
    if args.accuracy:
        return main_accuracy(args)
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
