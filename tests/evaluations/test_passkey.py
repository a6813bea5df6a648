"""Paired pass-key evaluation: the shared prefill equals a real pressed prefill, and the output schema."""

import dataclasses
import json

import pytest
import torch
from transformers import DynamicCache

from kvpress_like import PressedLayer, list_presses, press, uncompressed
from kvpress_like.cache_ops import fork_cache
from kvpress_like.registry import press_class
from kvpress_like.evaluations import passkey
from kvpress_like.integrations.transformers import cache_kwargs
from tiny import ByteTokenizer, tiny_byte_model

FILTERS = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))




@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """Pre-RoPE query statistics of the tiny model, for the calibrated (position-aware) presses."""
    from kvpress_like.integrations.calibration import run_calibration
    from kvpress_like.filters import save_query_stats

    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(4))
    result = run_calibration(tiny_byte_model(), texts=ids, num_sequences=2, seq_len=128, samples_per_head=64, progress=False)
    return save_query_stats(result.stats, tmp_path_factory.mktemp("stats"), **result.stats_info).parent


def _press(name: str, stats_dir, **settings):
    """A registered press for the tiny model: explicit filters / statistics, never the user's store
    (``adakv+kvzip``: AdaKV around KVzip, whose reconstruction pass must survive the wrapper)."""
    if name == "adakv+kvzip":
        return press_class("adakv")(base=_press("kvzip", stats_dir, **settings))
    cls = press_class(name)
    if name == "qfilters":
        settings["filters"] = FILTERS
    elif name == "kvzip":  # the byte model has no tokenizer for the repeat prompt
        settings["prompt_ids"] = tuple(b"\n\nRepeat the previous context exactly.\n")
    elif dataclasses.is_dataclass(cls) and "stats" in {f.name for f in dataclasses.fields(cls)}:
        settings["stats"] = stats_dir
    return cls(**settings)


@pytest.mark.parametrize("variant", ["uncompressed", "compressed"])
@pytest.mark.parametrize("name", [*list_presses(), "adakv+kvzip"])
def test_shared_prefill_equals_pressed_prefill(name, variant, stats_dir):
    """Compressing a copy of one full-cache prefill keeps the same entries, and gives the same answer logits,
    as prefilling under press() (for every registered press, with sinks, a window and a skipped layer)."""
    model = tiny_byte_model()
    p = _press(name, stats_dir, ratio=0.75, n_sink=2, window=8, skip_layers=(1,))
    ctx = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    question = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    answer = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))
    real = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        if variant == "uncompressed":
            model(ctx, **cache_kwargs(real))
            with uncompressed(real):
                real_logits = model(torch.cat([question, answer], 1), **cache_kwargs(real)).logits
        else:
            model(torch.cat([ctx, question], 1), **cache_kwargs(real))
            with uncompressed(real):
                real_logits = model(answer, **cache_kwargs(real)).logits
    shared = passkey.prefill(model, ctx)
    if variant == "compressed":
        shared = passkey.prefill(model, question, previous=shared)
    with torch.no_grad(), press(model, p):
        copy = passkey.compress_prefilled(model, shared, p)
        with uncompressed(copy):
            feed = torch.cat([question, answer], 1) if variant == "uncompressed" else answer
            copy_logits = model(feed, **cache_kwargs(copy)).logits
    n = 400 if variant == "uncompressed" else 407
    assert shared.cache.layers[0].keys.shape[-2] == n  # the shared full cache itself is left untouched
    pressed = 0
    for a, b in zip(real.layers, copy.layers):
        assert type(a) is type(b)
        if isinstance(a, PressedLayer):
            pressed += 1
            assert torch.equal(a.positions, b.positions)
    assert pressed == 3  # 4 layers, one skipped
    torch.testing.assert_close(copy_logits, real_logits, rtol=1e-4, atol=1e-4)


def test_grid_schema_and_pairing():
    model, tok = tiny_byte_model(), ByteTokenizer()
    grid = passkey.Grid(lengths=(300,), factors=(4,), depths=2, keys=2, methods=("knorm", "streaming_llm"),
                        reference="knorm", quick=True)
    assert grid.haystacks == ("filler", "prose")  # both by default
    result = passkey.run_grid(model, tok, grid, progress=False)
    rows = result["rows"]
    assert result["prompts"] == 8 and len(result["prefill_s"]) == 8
    assert len(rows) == 8 * 2 * (1 + 2)  # prompts (2 haystacks) x variants x (no press + methods x factors)
    assert {"haystack", "length", "depth", "key", "answer", "variant", "method", "factor", "exact", "output"} <= set(rows[0])
    assert sorted({r["haystack"] for r in rows}) == ["filler", "prose"]
    assert all(r["exact"] in (0, 1) for r in rows)
    assert sorted({r["depth"] for r in rows}) == [0.25, 0.75]
    result.update(model="tiny", environment=passkey.environment(), elapsed_s=1.0)
    result["summary"] = passkey.summarize(result)
    cells = result["summary"]["cells"]
    assert sorted((c["haystack"], c["variant"]) for c in cells) == sorted(
        (h, v) for h in ("filler", "prose") for v in passkey.VARIANTS)
    cell = cells[0]
    assert set(cell["methods"]) == {"no_press", "knorm", "streaming_llm"}
    assert all(m["n"] == 4 and m["lo"] <= m["exact"] <= m["hi"] for m in cell["methods"].values())
    assert set(cell["vs_reference"]) == {"streaming_llm"} and set(cell["vs_no_press"]) == {"knorm", "streaming_llm"}
    d = cell["vs_reference"]["streaming_llm"]
    assert d["n"] == 4 and d["lo"] <= d["diff"] <= d["hi"] and 0 <= d["p"] <= 1
    text = passkey.markdown(result)
    assert "n = 4 prompts per cell" in text and "QUICK" in text and "Command:" in text
    assert "### filler haystack, question fed" in text and "### prose haystack, question compressed" in text
    json.dumps(result)
    old = dict(result, rows=[{k: v for k, v in r.items() if k != "haystack"} for r in rows if r["haystack"] == "filler"],
               settings={k: v for k, v in result["settings"].items() if k != "haystacks"})
    old_cells = passkey.summarize(old)["cells"]  # a result written before --haystack: its rows are the filler's
    assert [c["methods"] for c in old_cells] == [c["methods"] for c in cells if c["haystack"] == "filler"]
    with pytest.raises(ValueError, match="unknown haystack 'noise'; use filler, prose"):
        passkey.run_grid(model, tok, dataclasses.replace(grid, haystacks=("noise",)), progress=False)


def test_haystacks_are_deterministic_hold_the_key_and_differ():
    """Each haystack's prompt is the same for a seed and holds its key; prose is not the filler: it does not
    repeat, and two seeds draw different windows of it."""
    from kvpress_like.data import passkey_sample

    tok = ByteTokenizer()
    made = {}
    for name, kind in passkey.HAYSTACKS.items():
        a, b = (passkey_sample(tok, 600, 0.5, seed=3, haystack=kind) for _ in range(2))
        assert torch.equal(a.context_ids, b.context_ids) and a.answer == b.answer
        text = bytes(a.context_ids[0, 1:].tolist()).decode()
        assert text.count(a.answer) == 2  # "The pass key is K. Remember it. K is the pass key."
        lo, hi = a.needle_span
        assert a.answer in bytes(a.context_ids[0, lo:hi].tolist()).decode()
        made[name] = a
    filler, prose = made["filler"], made["prose"]
    assert filler.answer == prose.answer and filler.context_ids.shape == prose.context_ids.shape
    assert not torch.equal(filler.context_ids, prose.context_ids)
    hay = lambda s: s.context_ids[0, s.needle_span[1]:].tolist()  # noqa: E731
    periodic = lambda x: any(x[p:] == x[:-p] for p in range(1, len(x) // 2))  # noqa: E731
    assert periodic(hay(filler)) and not periodic(hay(prose))  # the filler repeats one sentence; prose does not
    other = passkey_sample(tok, 600, 0.5, seed=4, haystack="prose")
    assert hay(other) != hay(prose)


def test_prompt_order_balances_cells_and_merge_of_disjoint_runs(tmp_path):
    """Prompts go key by key (a stopped run leaves equal cells); runs over disjoint lengths merge, overlaps fail."""
    grid = passkey.Grid(lengths=(2048, 4096), depths=3, keys=2)
    order = passkey.prompt_order(grid)
    assert len(order) == 24 and len(set(order)) == 24
    first_half = order[:12]
    assert {k for _, _, k, _ in first_half} == {0} and sorted(n for n, _, _, _ in first_half) == [2048] * 6 + [4096] * 6
    assert [h for _, _, _, h in first_half] == ["filler", "prose"] * 6  # a stopped run has both haystacks

    def part(length, prompts, finished):
        rows = [dict(variant="uncompressed", length=length, depth=d, key=0, answer="1", method=m, factor=f,
                     exact=int(m == "no_press" or d < 0.5), output="")
                for d in (0.25, 0.75)[:prompts] for m, f in (("no_press", 1.0), ("knorm", 4.0))]
        settings = dict(dataclasses.asdict(passkey.Grid(lengths=(length,), factors=(4,), depths=2, keys=1,
                                                                methods=("knorm",), variants=("uncompressed",),
                                                                haystacks=("filler",), reference="knorm")),
                        depth_values=[0.25, 0.75])
        data = dict(settings=settings, rows=rows, prompts=prompts, prefill_s=[1.0] * prompts)
        if finished:
            data.update(model="tiny", environment=passkey.environment(), elapsed_s=5.0, cpu_s=4.0)
        path = tmp_path / f"{length}.json"
        path.write_text(json.dumps(data))
        return path

    import argparse

    args = argparse.Namespace(summarize=[part(2048, 2, True), part(4096, 1, False)], model="tiny", out=tmp_path)
    assert passkey._summarize_checkpoint(args, "merged") == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["partial"] and merged["prompts"] == 3 and merged["settings"]["lengths"] == [2048, 4096]
    counts = {c["length"]: c["methods"]["knorm"]["n"] for c in merged["summary"]["cells"]}
    assert counts == {2048: 2, 4096: 1}
    assert "PARTIAL: stopped after 3 of 4 prompts" in (tmp_path / "merged.md").read_text()
    args.summarize = [args.summarize[0], args.summarize[0]]
    with pytest.raises(ValueError, match="overlap"):
        passkey._summarize_checkpoint(args, "twice")


def test_unknown_method_fails_before_work():
    with pytest.raises(ValueError, match="registered presses"):
        passkey._presses(passkey.Grid(methods=("h2o",)))
    with pytest.raises(ValueError, match="factors must be >= 1"):
        passkey._presses(passkey.Grid(methods=("knorm",), factors=(0.5,)))


def test_answer_cell_batch_equals_each_method_alone(stats_dir, monkeypatch):
    """Stacking the methods' compressed caches into one batch (true positions passed as position_ids) gives
    each method the text it decodes alone under press() + uncompressed(), in both variants."""
    model, tok = tiny_byte_model(), ByteTokenizer()
    cell = [(n, _press(n, stats_dir, ratio=0.75)) for n in list_presses()]
    ctx = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(5))
    question = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    context = passkey.prefill(model, ctx)
    both = passkey.prefill(model, question, previous=context)
    for pre, feed, first in ((context, question, None), (both, question[:, :0], both.logits)):
        start = pre.cache.get_seq_length()
        batched = passkey._answer_cell(model, tok, pre, cell, feed, "zz", start, first)
        monkeypatch.setattr(passkey, "stack_caches", lambda model, caches: None)  # force one by one
        alone = passkey._answer_cell(model, tok, pre, cell, feed, "zz", start, first)
        monkeypatch.undo()
        assert [said for _, said in batched] == [said for _, said in alone]
        assert len({said for _, said in batched}) > 1  # the methods kept different entries: a real comparison


def test_answers_found_stops_when_the_key_appears():
    """The key counts when it appears anywhere in the greedy text, and decoding stops there; a key the model
    never writes fails after len(key tokens) + ANSWER_SLACK tokens."""
    model, tok = tiny_byte_model(), ByteTokenizer()
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(7))
    pre = passkey.prefill(model, ids)
    ((_, free),) = passkey.answers_found(model, tok, fork_cache(pre.cache, share_storage=True), 1, ids[:, :0], "\x00" * 40,
                                          50, pre.logits)
    key = free[2:5]  # what greedy decoding writes anyway, not at the start
    ((ok, said),) = passkey.answers_found(model, tok, fork_cache(pre.cache, share_storage=True), 1, ids[:, :0], key, 50, pre.logits)
    assert ok and said == free[: free.index(key) + len(key)]
    ((ok, said),) = passkey.answers_found(model, tok, fork_cache(pre.cache, share_storage=True), 1, ids[:, :0], "\x00\x01", 50,
                                          pre.logits)
    assert not ok and len(tok(" \x00\x01", add_special_tokens=False)["input_ids"]) + passkey.ANSWER_SLACK == len(said)


def test_shards_split_the_prompts_and_merge_to_the_whole_grid(tmp_path):
    """--jobs workers run disjoint shards of the prompt order; merged, their rows are the unsharded run's."""
    model, tok = tiny_byte_model(), ByteTokenizer()
    base = dict(lengths=(300,), factors=(4,), depths=3, keys=1, methods=("knorm", "streaming_llm"), reference="knorm")
    whole = passkey.run_grid(model, tok, passkey.Grid(**base), progress=False)
    paths = []
    for i in range(2):
        part = passkey.run_grid(model, tok, passkey.Grid(**base, shard=(i, 2)), progress=False)
        assert part["prompts"] == 3  # 3 depths x 2 haystacks, split 3 / 3
        part.update(model="tiny", environment=passkey.environment(), elapsed_s=1.0, cpu_s=1.0)
        paths.append(tmp_path / f"shard{i}.json")
        paths[-1].write_text(json.dumps(part))
    import argparse

    args = argparse.Namespace(summarize=paths, model="tiny", out=tmp_path)
    assert passkey._summarize_checkpoint(args, "merged", elapsed_s=7.0) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    key = lambda r: (r["haystack"], r["variant"], r["depth"], r["method"], r["factor"])  # noqa: E731
    assert sorted(map(key, merged["rows"])) == sorted(map(key, whole["rows"]))
    assert {key(r): r["output"] for r in merged["rows"]} == {key(r): r["output"] for r in whole["rows"]}
    assert not merged["partial"] and merged["elapsed_s"] == 7.0 and merged["settings"]["shard"] is None


def test_chat_template_prompt_wraps_the_pass_key_prompt():
    """--template chat: the model's chat template around the pass-key prompt, same length, the needle at the
    same depth and where the span says, the question ending the user turn and the answer prefix starting the assistant's; a tokenizer
    without a template gets one line saying what to use instead."""
    from transformers import AutoTokenizer

    from kvpress_like.data import PREFIX
    from kvpress_like.models import _materialize

    tok = AutoTokenizer.from_pretrained(str(_materialize("smollm2-135m")))
    for haystack in passkey.HAYSTACKS:
        plain = passkey.sample(tok, 1024, 0.3, 2, haystack)
        chat = passkey.sample(tok, 1024, 0.3, 2, haystack, "chat")
        assert chat.context_ids.shape == (1, 1024) and chat.answer == plain.answer
        lo, hi = chat.needle_span
        assert tok.decode(chat.context_ids[0, lo:hi]).strip().startswith(f"The pass key is {chat.answer}.")
        text = tok.decode(chat.context_ids[0])
        assert text.startswith("<|im_start|>") and "<|im_start|>user\n" + PREFIX[:40] in text
        question = tok.decode(chat.question_ids[0])
        assert question.startswith(passkey.CHAT_QUESTION) and question.endswith("<|im_start|>assistant\nThe pass key is")
        assert abs(lo / 1024 - plain.needle_span[0] / 1024) < 0.05  # the needle at the same depth
    with pytest.raises(ValueError, match="--template plain"):
        passkey.sample(ByteTokenizer(), 600, 0.5, 0, "filler", "chat")
    with pytest.raises(ValueError, match="unknown template 'xml'"):
        passkey.sample(tok, 600, 0.5, 0, "filler", "xml")
