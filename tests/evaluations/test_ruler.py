"""Offline RULER-style benchmark: deterministic prompts, checkable answers, the scoring rule, the runner and
the lm-eval tasks."""

import argparse
import json
import re
from collections import Counter

import pytest
import torch

from kvpress_like.evaluations import ruler
from kvpress_like.evaluations.common import build_press
from kvpress_like.evaluations.ruler_tasks import NEEDLE, TASKS, ruler_sample, score


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvpress_like.models import _materialize

    return AutoTokenizer.from_pretrained(str(_materialize("smollm2-135m")))


@pytest.fixture(scope="module")
def samples(tok):
    return {t: ruler_sample(tok, t, 1024, seed=3) for t in TASKS}


@pytest.mark.parametrize("task", list(TASKS))
def test_generators_are_deterministic_for_a_seed(tok, samples, task):
    again = ruler_sample(tok, task, 1024, seed=3)
    assert (again.context_ids, again.question_ids, again.answers) == (samples[task].context_ids, samples[task].question_ids, samples[task].answers)
    other = ruler_sample(tok, task, 1024, seed=4)
    assert other.context_ids != again.context_ids and other.answers != again.answers


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_fill_the_length_and_end_with_the_answer_prefix(tok, samples, task):
    s = samples[task]
    assert 0.85 * 1024 <= s.tokens <= 1024
    text = tok.decode(s.context_ids + s.question_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n" + s.answer_prefix)
    assert s.question in tok.decode(s.question_ids) and s.question not in tok.decode(s.context_ids)
    context = tok.decode(s.context_ids)
    assert all(a in context for a in s.answers)  # the tokenized context still holds every answer


def _word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text))


@pytest.mark.parametrize("task", [t for t, (family, _) in TASKS.items() if family == "niah"])
def test_needle_answers_are_stated_once_in_their_needle(samples, task):
    s = samples[task]
    for value in s.answers:
        assert _word(s.context, value) == 1
        (key,) = re.findall(rf"special magic numbers for ([a-z]+-[a-z]+) is: {value}\.", s.context)
        assert key in s.question and key in s.answer_prefix
    distractors = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is:", s.context)
    assert len(distractors) == len(set(distractors)) or TASKS[task][1].get("values", 1) > 1
    if task == "niah_multikey_needles":
        assert len(distractors) > 20  # the haystack itself is made of key-like needles
    if task == "niah_single_noise":
        assert s.context.count(NEEDLE.split("{")[0]) == 1 and "The grass is green." in s.context


def test_variable_tracking_chain_resolves_to_the_answers(samples):
    s = samples["vt"]
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context))
    resolve = lambda v: resolve(assign[v[4:]]) if v.startswith("VAR ") else v  # noqa: E731
    assert sorted(v for v in assign if resolve(assign[v]) == value) == sorted(s.answers)


def test_common_words_are_the_most_frequent(samples):
    s = samples["cwe"]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
    top = {w for w, _ in counts.most_common(len(s.answers))}
    assert top == set(s.answers) and min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in top)


def test_frequent_words_have_an_unambiguous_top_three(samples):
    s = samples["fwe"]
    counts = Counter(s.context.split(". ", 1)[1].split())
    ranked = [c for _, c in counts.most_common()]
    assert [w for w, _ in counts.most_common(3)] == s.answers and ranked[2] > ranked[3]


def test_document_qa_fact_is_stated_once_and_asked(samples):
    s = samples["qa"]
    (place,) = s.answers
    thing = re.search(r"Where is the (\w+ \w+) kept\?", s.question).group(1)
    assert _word(s.context, place) == 1 and f"The {thing} is kept in the {place}." in s.context
    assert len(re.findall(r"is kept in the \w+\.", s.context)) == s.context.count("Document ") > 1


def test_string_match_scoring():
    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert score("1234567", ["1234567", "7654321"]) == 0.5
    assert score("Answer: the GARDEN", ["garden"]) == 1.0
    assert score("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        score("x", [])


def test_unknown_task_and_too_short_length_say_what_to_do(tok):
    with pytest.raises(ValueError, match="tasks: niah_single_noise"):
        ruler_sample(tok, "niah", 1024, 0)
    with pytest.raises(ValueError, match="too short"):
        ruler_sample(tok, "qa", 64, 0)


def test_intervals_and_paired_summary():
    assert ruler.interval([1, 0, 1, 1])["lo"] == pytest.approx(ruler.stats.wilson(3, 4)[0])
    frac = ruler.interval([0.5, 0.5, 0.5])  # every prompt alike: still an interval, as wide as for 0/1 scores
    assert frac["mean"] == 0.5 and (frac["lo"], frac["hi"]) == pytest.approx(ruler.stats.wilson(1.5, 3))
    assert frac["hi"] - frac["lo"] > 0.5
    m = ruler.stratified_mean([[1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert m["mean"] == pytest.approx(0.75) and m["n"] == 6
    settings = dict(lengths=[8], factors=[2.0], tasks=["a", "b"], methods=["m"], samples=3)
    rows = [dict(seed=i, length=8, task=t, method=meth, factor=f, score=sc)
            for t in ("a", "b") for i in range(3)
            for meth, f, sc in (("no_press", 1.0, 1.0), ("m", 2.0, float(i == 0)))]
    (cell,) = ruler.summarize(dict(settings=settings, rows=rows))["cells"]
    assert cell["methods"]["no_press"]["mean"]["mean"] == 1.0
    assert cell["vs_no_press"]["m"]["mean"]["diff"] == pytest.approx(-2 / 3)
    assert cell["vs_no_press"]["m"]["a"]["only_b"] == 2  # McNemar counts for 0/1 tasks
    assert cell["vs_no_press"]["m"]["mean"]["p"] == pytest.approx(ruler.stats.mcnemar_p(0, 4))  # sign test, 4 of 6 worse
    assert cell["vs_no_press"]["m"]["mean"]["verdict"] == "no difference shown"  # p = 0.125: too few prompts
    # --versus: press against press on the same prompts (here m2 wins where m lost, on seeds 1 and 2 of task a)
    rows += [dict(seed=i, length=8, task=t, method="m2", factor=2.0, score=float(t == "a" or i == 0)) for t in ("a", "b") for i in range(3)]
    (cell,) = ruler.summarize(dict(settings=dict(settings, methods=["m", "m2"]), rows=rows, versus=["m"]))["cells"]
    vs = cell["versus"]["m"]["m2"]
    assert (vs["wins"], vs["losses"], vs["diff"]) == (2, 0, pytest.approx(1 / 3))
    assert "m" not in cell["versus"]["m"]


def _tiny():
    from tiny import tiny_model

    return tiny_model("llama", seed=0, attn_implementation="sdpa", vocab_size=49152, max_position_embeddings=4096).eval()


def test_resume_and_shards_give_the_rows_of_one_run(tok, tmp_path):
    model = _tiny()
    grid = ruler.Grid(lengths=(512,), factors=(2.0, 4.0), samples=2, tasks=("niah_single_noise", "vt"),
                      methods=("knorm", "streaming_llm"))
    whole = ruler.run_grid(model, tok, grid, progress=False)["rows"]
    assert len(whole) == 4 * (1 + 2 * 2)
    key = lambda r: (r["seed"], r["task"], r["method"], r["factor"])  # noqa: E731
    checkpoint = tmp_path / "ck.json"
    first = ruler.run_grid(model, tok, ruler.Grid(**{**grid.__dict__, "shard": (0, 2)}), progress=False)
    checkpoint.write_text(json.dumps(dict(first, settings=ruler.asdict(grid))))
    resumed = ruler.run_grid(model, tok, grid, progress=False, checkpoint=checkpoint)
    assert resumed["resumed_prompts"] == 2 and len(resumed["prefill_s"]) == 4  # ran only the prompts it lacked
    assert sorted(map(key, resumed["rows"])) == sorted(map(key, whole))
    assert {key(r): r["output"] for r in resumed["rows"]} == {key(r): r["output"] for r in whole}
    checkpoint.write_text(json.dumps(dict(first, settings=dict(ruler.asdict(grid), samples=9))))
    with pytest.raises(SystemExit, match="other settings"):
        ruler.run_grid(model, tok, grid, progress=False, checkpoint=checkpoint)


def test_resumed_jobs_run_reports_the_wall_time_of_both_sessions(tmp_path, monkeypatch):
    """A stopped ``--jobs`` run, rerun to resume, reports the earlier session's wall time too (it reported the
    last session's alone). The workers are stand-ins that finish their shard as a resumed worker would."""
    import subprocess

    parser = argparse.ArgumentParser()
    ruler.configure(parser)
    args = parser.parse_args(["--lengths", "8", "--factors", "2", "--samples", "2", "--tasks", "vt", "--methods", "knorm",
                              "--jobs", "2", "--out", str(tmp_path), "--name", "r"])
    grid = ruler._grid(args, None)

    def shard_rows(i):
        return [dict(seed=i, length=8, task="vt", tokens=8, answers=["x"], method=m, factor=f, score=1.0, output="x")
                for m, f in (("no_press", 1.0), ("knorm", 2.0))]

    for i in range(2):
        settings = ruler.asdict(ruler.Grid(**{**grid.__dict__, "shard": (i, 2)}))
        (tmp_path / f"r.shard{i}of2.checkpoint.json").write_text(json.dumps(dict(settings=settings, rows=[], prefill_s=[], elapsed_s=3600.0)))

    real_popen = subprocess.Popen

    class Worker:
        def __new__(cls, cmd, **kwargs):  # other commands (git, for the environment) run for real
            return super().__new__(cls) if "--shard" in cmd else real_popen(cmd, **kwargs)

        def __init__(self, cmd, **kwargs):
            name = cmd[cmd.index("--name") + 1]
            i = int(cmd[cmd.index("--shard") + 1].split("/")[0])
            saved = json.loads((tmp_path / f"{name}.checkpoint.json").read_text())
            (tmp_path / f"{name}.json").write_text(json.dumps(dict(saved, rows=shard_rows(i), prefill_s=[1.0], elapsed_s=saved["elapsed_s"] + 60)))

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Worker)
    assert ruler._run_jobs(args, "r", grid) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["prompts"] == 2 and not result["partial"]
    assert 3600 <= result["elapsed_s"] < 3660


def test_first_seed_and_press_variants_written_as_name_key_value(tok):
    """Held-out prompts start at --first-seed; a method written ``name:key=value`` is that press with those
    settings (so variants of one press compare side by side), and a bad one fails saying how to write it."""
    grid = ruler.Grid(lengths=(512,), factors=(4.0,), samples=2, first_seed=3, tasks=("vt",),
                      methods=("adakv:base=kvzip:normalization=none:scope=model",))
    assert [seed for seed, _, _ in ruler.prompt_order(grid)] == [3, 4]
    p = build_press(grid.methods[0], ratio=0.75)
    assert (type(p.base).__name__, p.base.ratio, p.normalization, p.scope) == ("KVzipPress", 0.75, "none", "model")
    assert build_press("kvzip:n_sink=4:chunk_size=64", ratio=0.5).n_sink == 4
    # a base declared in another module than the field's annotation (CalibratedPress's ``os.PathLike``)
    p = build_press("adakv:base=expected_attention_calibrated:rank=3", ratio=0.75)
    assert (type(p.base).__name__, p.base.rank, p.base.ratio) == ("ExpectedAttentionPress", 3, 0.75)
    with pytest.raises(ValueError, match="name:key=value"):
        build_press("kvzip:n_sink", ratio=0.5)
    with pytest.raises(ValueError, match="scores each layer as its keys arrive"):
        build_press("adakv:base=knorm:scope=model", ratio=0.5)


@pytest.mark.slow
def test_no_press_oracle_answers_short_prompts(smollm):
    """The real embedded SmolLM2, uncompressed, finds one needle in prose and all four values of a key (the
    prompts are solvable and the question is fed after the context correctly)."""
    model, tokenizer = smollm
    grid = ruler.Grid(lengths=(768,), factors=(2.0,), samples=1, tasks=("niah_single_prose", "niah_multivalue"), methods=("streaming_llm",))
    rows = ruler.run_grid(model, tokenizer, grid, progress=False)["rows"]
    oracle = [r for r in rows if r["method"] == "no_press"]
    assert [r["score"] for r in oracle] == [1.0, 1.0], [r["output"] for r in oracle]


def test_lm_eval_tasks_load_offline(tok, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from kvpress_like.integrations.lm_eval import tasks_path

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks_path()), metadata={"pretrained": "smollm2-135m", "samples": 1, "seed": 3})
    assert {"kvpress_ruler", "kvpress_ruler_2k", "kvpress_ruler_4k", "kvpress_ruler_qa_4k"} <= set(manager.all_tasks)
    loaded = manager.load(["kvpress_ruler_2k"])
    assert len(loaded["tasks"]) == len(TASKS) and "kvpress_ruler_2k" in loaded["groups"]
    task = loaded["tasks"]["kvpress_ruler_vt_2k"]
    (doc,) = task.test_docs()
    s = ruler_sample(tok, "vt", 2048, 3)
    assert doc["answers"] == s.answers and doc["prompt"] == tok.decode(s.context_ids + s.question_ids)
    assert task.config.generation_kwargs["max_gen_toks"] == s.max_new_tokens
    assert task.process_results(doc, [" " + ", ".join(s.answers[:2])]) == {"score": 0.4}


def test_one_reconstruction_per_prompt_keeps_the_same_entries_at_every_ratio(monkeypatch):
    """Reusing KVzip's reconstruction scores across the ratios of one prompt keeps exactly the entries that a
    pass of its own per ratio keeps, with one pass per prompt instead of one per ratio."""
    from kvpress_like import press
    from kvpress_like.evaluations.common import one_reconstruction_per_prompt
    from kvpress_like.evaluations.passkey import compress_prefilled, prefill
    from kvpress_like.methods import KVzipPress, kvzip
    from tiny import tiny_byte_model

    model = tiny_byte_model()
    prompt = tuple(b"\n\nRepeat the previous context exactly.\n")
    passes = []
    original = kvzip.reconstruction_scores
    monkeypatch.setattr(kvzip, "reconstruction_scores", lambda *a: passes.append(1) or original(*a))

    def kept(shared):
        out = {}
        for ratio, skip in ((0.5, (1,)), (0.5, ()), (0.75, ()), (0.875, ())):  # skipped layers: not scored, a pass of its own
            p = KVzipPress(ratio=ratio, prompt_ids=prompt, chunk_size=96, skip_layers=skip)
            with press(model, p):
                cache = compress_prefilled(model, shared, p)
            out[ratio, skip] = [layer.positions.clone() if hasattr(layer, "positions") else None for layer in cache.layers]
        return out

    pre = [prefill(model, torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
    alone = [kept(x) for x in pre]
    assert len(passes) == 8
    passes.clear()
    counter = kvzip.reconstruction_scores
    with one_reconstruction_per_prompt():
        shared = [kept(x) for x in pre]  # two prompts in one block: each gets its own pass
    assert len(passes) == 4 and kvzip.reconstruction_scores is counter  # restored on leaving
    for a, b in zip(alone, shared):
        for setting in a:
            assert all(x is y is None or torch.equal(x, y) for x, y in zip(a[setting], b[setting]))
    assert not torch.equal(alone[0][0.5, ()][0], alone[1][0.5, ()][0])  # the prompts' kept sets differ: the key is the prompt


def test_one_reconstruction_per_prompt_scores_each_compressed_copy_on_its_own():
    """Tokens fed under KVzip to compressed copies of one prefill (x2 and x4: other slots, the same ids and
    length) are each scored on their own copy inside the block, as outside it."""
    from kvpress_like import press
    from kvpress_like.evaluations.common import one_reconstruction_per_prompt
    from kvpress_like.evaluations.passkey import compress_prefilled, prefill
    from kvpress_like.cache_api import cache_kwargs
    from kvpress_like.methods import KVzipPress
    from tiny import tiny_byte_model

    model = tiny_byte_model()
    prompt, more = tuple(b"\n\nRepeat the previous context exactly.\n"), torch.tensor([list(b"Then a question?")])
    shared = prefill(model, torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3)))

    def kept_after_more() -> list[list[torch.Tensor]]:
        out = []
        for ratio in (0.5, 0.75):
            p = KVzipPress(ratio=ratio, prompt_ids=prompt, chunk_size=96)
            with press(model, p):
                cache = compress_prefilled(model, shared, p)
                model(more, **cache_kwargs(cache), use_cache=True)  # KVzip scores these 16 tokens on this copy
            out.append([layer.positions.clone() for layer in cache.layers])
        return out

    alone = kept_after_more()
    with one_reconstruction_per_prompt():
        memo = kept_after_more()
    assert all(torch.equal(a, b) for x, y in zip(alone, memo) for a, b in zip(x, y))


def test_merge_adds_presses_run_later_and_refuses_runs_that_disagree(tmp_path):
    """Runs of the same prompts with other presses, or of later seeds, merge into one table (each press paired
    with the no-press rows of its own prompts); a run whose shared rows differ, whose grid or model differs,
    or whose seeds leave a gap, is refused."""
    def run(method, seeds, score_of, output="x"):
        settings = dict(lengths=[8], factors=[2.0], samples=len(seeds), first_seed=seeds[0], tasks=["a", "b"], methods=[method],
                        quick=False, shard=None)
        rows = [dict(seed=i, length=8, task=t, tokens=8, answers=["x"], method=meth, factor=f, score=sc, output=out)
                for t in ("a", "b") for i in seeds
                for meth, f, sc, out in (("no_press", 1.0, 1.0, output), (method, 2.0, score_of(i), "y"))]
        return dict(settings=settings, rows=rows, prefill_s=[1.0] * 2 * len(seeds), model="tiny",
                    environment=ruler.environment(), elapsed_s=60.0)

    old, new = run("m", range(3), lambda i: 0.0), run("k", range(2), lambda i: 1.0)
    merged = ruler.merge([old, new])
    assert merged["settings"]["methods"] == ["m", "k"] and len(merged["rows"]) == 2 * 3 + 2 * 3 + 2 * 2
    merged["environment"] = ruler.environment()
    assert ruler._write(tmp_path, "merged", merged, figures=False) == 0
    (cell,) = json.loads((tmp_path / "merged.json").read_text())["summary"]["cells"]
    assert cell["methods"]["m"]["mean"]["n"] == 6 and cell["methods"]["k"]["mean"]["n"] == 4
    assert cell["vs_no_press"]["m"]["mean"]["diff"] == -1.0 and cell["vs_no_press"]["k"]["mean"]["diff"] == 0.0
    assert "Merged from:" in (tmp_path / "merged.md").read_text()
    with pytest.raises(SystemExit, match="disagree"):
        ruler.merge([old, run("k", range(2), lambda i: 1.0, output="z")])
    other = run("k", range(2), lambda i: 1.0)
    other["settings"]["tasks"] = ["a"]
    with pytest.raises(SystemExit, match="differ in tasks"):
        ruler.merge([old, other])
    other = run("k", range(2), lambda i: 1.0)
    other["model"] = "other"
    with pytest.raises(SystemExit, match="other models"):
        ruler.merge([old, other])

    later = run("m", range(3, 5), lambda i: 1.0)  # seeds 3-4 of press m: n grows, k stays on seeds 0-1
    merged = ruler.merge([new, later, old])
    assert (merged["settings"]["first_seed"], merged["settings"]["samples"]) == (0, 5)
    merged["environment"] = ruler.environment()
    assert ruler._write(tmp_path, "more", merged, figures=False) == 0
    result = json.loads((tmp_path / "more.json").read_text())
    assert result["prompts"] == result["planned"] == 10 and not result["partial"]
    (cell,) = result["summary"]["cells"]
    assert cell["methods"]["m"]["mean"]["n"] == 10 and cell["methods"]["k"]["mean"]["n"] == 4
    assert cell["vs_no_press"]["m"]["mean"]["diff"] == pytest.approx(-0.6)
    legend = [t.get_text() for t in ruler.figure(result).axes[0].get_legend().get_texts()]
    assert legend == ["no press", "k (n=2/task)", "m"]  # a press on fewer seeds says so
    with pytest.raises(SystemExit, match="no run holds seeds 3..4"):
        ruler.merge([old, run("m", range(5, 7), lambda i: 1.0)])
    again = ruler.merge([result, run("m", range(5, 7), lambda i: 1.0)])  # a merge merged again keeps every run
    assert [e["prompts"] for e in again["merged_from"]] == [4, 4, 6, 4]
    assert again["elapsed_s"] == 4 * 60.0 and again["settings"]["samples"] == 7
