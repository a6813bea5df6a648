"""Issue 6: Q-Filters calibration, the filter directory format, the filter store and the CLI (tiny models)."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache, PreTrainedTokenizerFast

import kvpress_like.methods.qfilters as qf
from kvpress_like import calibration as core_calibration
from kvpress_like.integrations import calibration
from kvpress_like import QFilterPress, press
from kvpress_like.integrations.calibration import read_texts
from kvpress_like.data import offline_corpus
from kvpress_like.models import EMBEDDED_MODELS, load_model
from tiny import tiny_model
from kvpress_like.integrations.transformers import cache_kwargs


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer of 99 ids, so tiny models (vocabulary 128) can read real text offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def save_tiny(path, arch="llama", seed=0, **overrides):
    model = tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty cache directory for the filter store, so tests never touch the user's."""
    monkeypatch.setenv("KVPRESS_LIKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KVPRESS_LIKE_FILTERS")  # conftest's session store: here the store is <cache>/filters
    return tmp_path / "cache"


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_same_seed_gives_identical_filters():
    model = tiny_model("llama")
    ids = torch.randint(2, 128, (2000,), generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_sequences=3, seq_len=64, samples_per_head=100, progress=False)  # windows and queries are sampled
    a = calibration.calibrate(model, ids, seed=0, **kwargs)
    b = calibration.calibrate(model, ids, seed=0, **kwargs)
    c = calibration.calibrate(model, ids, seed=1, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sign_convention_on_queries_with_a_known_direction():
    """Queries = c * u + small noise per GQA group: filters must be -u, and keys along u score highest."""
    model = tiny_model("llama", attention_bias=True)
    n_kv, groups, d = 2, 2, 16
    gen = torch.Generator().manual_seed(0)
    low_freq = [6, 7, 14, 15]  # RoPE pairs (6, 14) and (7, 15) barely rotate over 64 positions
    directions = torch.zeros(4, n_kv, d)
    directions[..., low_freq] = torch.randn(4, n_kv, 4, generator=gen)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        for layer, u in zip(model.model.layers, directions):
            layer.self_attn.q_proj.weight.mul_(0.1)
            layer.self_attn.q_proj.bias.copy_(3 * u.repeat_interleave(groups, dim=0).flatten())
    ids = torch.randint(2, 128, (4, 64), generator=gen)
    filters = calibration.calibrate(model, ids, samples_per_head=256, progress=False)
    assert (cosine(filters, -directions) > 0.99).all(), cosine(filters, -directions)

    p = QFilterPress(ratio=0.5, filters=filters)
    for layer_idx in range(4):
        keys = 0.1 * torch.randn(1, n_kv, 10, d, generator=gen)
        keys[0, :, 3] = 2 * directions[layer_idx]
        keys[0, :, 5] = -2 * directions[layer_idx]
        positions = torch.arange(10).expand(1, n_kv, 10)
        scores = p.score(layer_idx, keys, keys, positions, torch.tensor([[[10]]]))
        assert (scores.argmax(-1) == 3).all() and (scores.argmin(-1) == 5).all()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "qwen2"])
def test_calibration_sees_the_queries_attention_uses(arch):
    """Captured queries equal q_proj (+ bias) -> QK-norm -> RoPE, recomputed independently per layer."""
    model = tiny_model(arch, attn_implementation="sdpa")
    with torch.no_grad():  # make biases and norms non-trivial so that skipping them would show
        for name, param in model.named_parameters():
            if "q_proj.bias" in name or "q_norm" in name:
                param.normal_(0, 0.5)
    inputs = {}

    def grab(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    ids = torch.randint(2, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    captured = calibration.collect_queries(model, ids, samples_per_head=24, progress=False)  # all 24, in order
    for h in handles:
        h.remove()

    assert sorted(captured) == [0, 1, 2, 3]  # sliding-window layers are calibrated too
    assert calibration.sliding_layers(model) == ([0, 2] if arch == "gemma3" else [])
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    for idx, queries in captured.items():
        attn = model.model.layers[idx].self_attn
        hidden, (cos, sin) = inputs[idx]
        raw = attn.q_proj(hidden).view(1, 24, -1, attn.head_dim)
        normed = attn.q_norm(raw) if hasattr(attn, "q_norm") else raw
        expected, _ = modeling.apply_rotary_pos_emb(normed.transpose(1, 2), normed.transpose(1, 2), cos, sin)
        torch.testing.assert_close(queries, expected[0].detach(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(queries, raw.transpose(1, 2)[0].detach(), atol=1e-2)


def test_sliding_layers_are_calibrated_and_zero_filters_are_refused_where_compressed(tmp_path):
    model = tiny_model("gemma3")  # layers 0 and 2 slide (window 8)
    result = calibration.run_calibration(model, texts=torch.randint(2, 128, (2, 64)), progress=False)
    filters, info = result.filters, result.info
    assert info["sliding_layers"] == [0, 2]
    assert (filters.norm(dim=-1) > 0.5).all()  # every layer, sliding ones included
    assert (result.stats["count"] > 0).all()
    qf.save_filters(filters, tmp_path, **info)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_layers"] == [0, 2]
    # Filters from before sliding layers were calibrated (zeros there): a budget below the window compresses
    # those layers, which must not happen with arbitrary scores.
    old = filters.clone()
    old[[0, 2]] = 0
    ids = torch.randint(2, 128, (1, 20))
    with pytest.raises(ValueError, match="layer 0 has all-zero Q-Filters .* Recalibrate with `kvpress-like calibrate"):
        with torch.no_grad(), press(model, qf.QFilterPress(max_cache_tokens=6, filters=old)):
            model(ids)
    with torch.no_grad(), press(model, qf.QFilterPress(max_cache_tokens=12, filters=old)):
        model(ids)  # a budget above the window leaves the sliding layers plain: their zeros are never read


def test_store_key_changes_for_models_with_sliding_layers_only():
    """Stores written before sliding layers were calibrated are not reused for those models (new key)."""
    gemma, llama = tiny_model("gemma3"), tiny_model("llama")
    assert qf.store_key(gemma) != qf.store_key(gemma.__class__(gemma.config.__class__(**{
        **gemma.config.to_dict(), "layer_types": ["full_attention"] * 4, "sliding_window": None})))
    assert qf.store_key(llama) == qf.store_key(tiny_model("llama"))


def _kept_and_logits(model, p, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, p):
        logits = model(ids, **cache_kwargs(cache)).logits
    return [layer.positions.clone() for layer in cache.layers], logits


def test_saved_directory_loads_back_and_scores_identically(tmp_path):
    model = tiny_model("qwen3")
    result = calibration.run_calibration(model, texts=torch.randint(2, 128, (3, 64)), corpus="random ids", progress=False)
    filters, info = result.filters, result.info
    qf.save_filters(filters, tmp_path / "f", **info)
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["num_layers"] == 4 and config["num_kv_heads"] == 2 and config["kv_head_dim"] == 16
    assert config["sign_convention"] == qf.SIGN_CONVENTION and config["corpus"] == "random ids"
    assert config["num_sequences"] == 3 and config["samples_per_head"] == 192 and config["seed"] == 0
    assert torch.equal(qf.load_filters(tmp_path / "f"), filters)

    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    kept_a, logits_a = _kept_and_logits(model, QFilterPress(ratio=0.5, filters=filters), ids)
    kept_b, logits_b = _kept_and_logits(model, QFilterPress(ratio=0.5, filters=tmp_path / "f"), ids)
    kept_c, _ = _kept_and_logits(model, QFilterPress(ratio=0.5, filters=-filters), ids)
    assert all(torch.equal(a, b) for a, b in zip(kept_a, kept_b))
    assert torch.equal(logits_a, logits_b)
    assert not all(torch.equal(a, c) for a, c in zip(kept_a, kept_c))  # the filters do decide what is kept


def test_wrong_shape_or_wrong_model_filters_fail_clearly(tmp_path):
    filters = calibration.calibrate(tiny_model("llama"), torch.randint(2, 128, (1, 32)), progress=False)
    qf.save_filters(filters, tmp_path / "llama")
    for other, want in [
        (tiny_model("llama", num_hidden_layers=2), "[2, 2, 16]"),
        (tiny_model("qwen3", num_key_value_heads=4), "[4, 4, 16]"),
    ]:
        with pytest.raises(ValueError) as err, press(other, QFilterPress(ratio=0.5, filters=tmp_path / "llama")):
            pass
        assert "(4, 2, 16)" in str(err.value) and want in str(err.value) and "kvpress-like calibrate" in str(err.value)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Q-Filters file"):
        QFilterPress(filters=tmp_path / "other.safetensors")


def test_cli_writes_a_loadable_directory_and_the_store(tmp_path, store, monkeypatch):
    model_dir = save_tiny(tmp_path / "a" / "tiny", "gemma3")
    text = tmp_path / "corpus.txt"
    text.write_text(offline_corpus()[:6000])  # under the CLI's reading cap (32 chars per token asked)
    out = tmp_path / "out"
    env = dict(os.environ, KVPRESS_LIKE_CACHE=str(store), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "kvpress_like.cli", "calibrate", "--model", str(model_dir), "--texts", str(text), "--num-sequences", "4",
           "--seq-len", "64", "--samples", "128", "--out", str(out), "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "sliding-window layers (calibrated too" in run.stdout and "[0, 2]" in run.stdout

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(model_dir) and config["sliding_layers"] == [0, 2]
    assert config["corpus"].startswith("file ") and config["samples_per_head"] == 128 and config["seed"] == 0
    assert config["calibration_seconds"] > 0 and config["sign_convention"] == qf.SIGN_CONVENTION
    from_cli = qf.load_filters(out)

    model, tokenizer = load_model(str(model_dir))
    again = calibration.calibrate(model, [text.read_text()], tokenizer, 4, 64, 128, seed=0, progress=False)
    assert torch.equal(from_cli, again)  # same seed, another process: the same filters

    def no_calibration(*args, **kwargs):
        raise AssertionError("filters should come from the store")

    monkeypatch.setattr(calibration, "run_calibration", no_calibration)
    with press(model, QFilterPress(ratio=0.5)) as p:
        assert torch.equal(p.active_filters, from_cli)
    assert torch.equal(qf.load_filters(qf.store_path(model)), from_cli)


def test_cli_reports_bad_input(tmp_path, store, capsys):
    from kvpress_like.cli import main

    model_dir = save_tiny(tmp_path / "tiny")
    assert main(["calibrate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load --model" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(model_dir), "--texts", str(tmp_path / "no" / "such.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["calibrate", "--model", str(model_dir), "--texts", str(short), "--out", str(tmp_path / "o")]) == 2
    assert f"fewer than seq_len={calibration.DEFAULT_SEQ_LEN}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    args = ["--texts", "offline:random", "--num-sequences", "2", "--seq-len", "32", "--out", str(tmp_path / "o"), "--no-store"]
    assert main(["calibrate", "--model", str(model_dir), *args, "--quiet"]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["corpus"] == "uniformly random token ids" and config["samples_per_head"] == 64
    assert not (store / "filters").exists()  # --no-store


def test_read_texts_from_a_directory_skips_binary_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha " * 10)
    (tmp_path / "d" / "sub" / "b.md").write_text("beta " * 10)
    (tmp_path / "d" / "c.bin").write_bytes(bytes(range(256)))
    texts, description = read_texts(str(tmp_path / "d"), max_chars=1000, seed=0)
    assert sorted(t.split()[0] for t in texts) == ["alpha", "beta"] and "2 of 3 files" in description
    texts, _ = read_texts(str(tmp_path / "d"), max_chars=20, seed=0)
    assert sum(map(len, texts)) == 20


def test_store_is_keyed_by_identity_not_basename(tmp_path, store):
    a, _ = load_model(str(save_tiny(tmp_path / "a" / "tiny", seed=0)))
    b, _ = load_model(str(save_tiny(tmp_path / "b" / "tiny", seed=0)))  # same weights, same basename
    assert qf.store_path(a) != qf.store_path(b)
    assert "_a_tiny_llama_4x2x16-" in qf.store_path(a).name
    assert qf.store_path(a) == qf.store_path(a.to(torch.bfloat16))  # a bfloat16 load is the same model
    assert qf.store_path(tiny_model("llama", seed=0)) != qf.store_path(tiny_model("llama", seed=1))  # both unnamed
    qf.save_filters(torch.ones(4, 2, 16), qf.store_path(a))
    with pytest.raises(ValueError, match="no Q-Filters found"), press(b, QFilterPress(ratio=0.5)):
        pass


def test_embedded_model_calibrates_once_then_uses_the_store(store, monkeypatch, caplog):
    """First press() on an embedded model calibrates on the offline corpus and says so; the second does not."""
    name = "tiny-embedded"
    monkeypatch.setitem(EMBEDDED_MODELS, name, "a tiny stand-in for an embedded model")
    char_tokenizer().save_pretrained(store / "models" / name)
    model = tiny_model("qwen3", num_hidden_layers=2)  # the default calibration (2 x 2048 tokens) runs here
    model.config._name_or_path = name
    calls = []
    real = calibration.run_calibration
    monkeypatch.setattr(calibration, "run_calibration", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(2, 128, (1, 32))
    with caplog.at_level(logging.WARNING, logger="kvpress_like"):
        with torch.no_grad(), press(model, QFilterPress(ratio=0.5)) as first:
            model(ids)
    assert len(calls) == 1 and "calibrating on the offline corpus" in caplog.text
    config = json.loads((qf.store_path(model) / "config.json").read_text())
    assert config["model"] == name and config["corpus"].startswith("offline prose") and config["num_sequences"] == calibration.DEFAULT_NUM_SEQUENCES
    with torch.no_grad(), press(model, QFilterPress(ratio=0.5)) as second:
        model(ids)
    assert len(calls) == 1
    assert torch.equal(first.active_filters, second.active_filters)


# -- issue 10 §3: bad filters and reuse across models -------------------------------------------------


def test_filters_with_nan_or_inf_are_refused(tmp_path):
    filters = torch.randn(4, 2, 16)
    filters[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf values \(layers \[2\]\)"):
        QFilterPress(filters=filters)
    filters[2, 1, 3] = float("inf")
    qf.save_filters(filters, tmp_path / "inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        QFilterPress(filters=tmp_path / "inf")


@pytest.mark.parametrize("kind", ["torch_save", "empty"])
def test_a_filters_file_that_is_not_safetensors_names_the_file_and_the_format(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "torch_save":
        torch.save({"q_filters": torch.zeros(4, 2, 16)}, path)
    else:
        path.write_bytes(b"")
    for source in (path, tmp_path):  # the file itself, or the directory holding it
        with pytest.raises(ValueError) as err:
            QFilterPress(filters=source)
        message = str(err.value)
        assert str(path) in message and "safetensors format" in message and "torch.save" in message
        assert ("is empty" in message) == (kind == "empty")


def test_array_like_filters_are_converted():
    import numpy as np

    filters = torch.randn(4, 2, 16)
    keys = torch.randn(1, 2, 10, 16)
    positions = torch.arange(10).expand(1, 2, 10)
    reading = torch.tensor([[[10]]])
    want = QFilterPress(filters=filters).score(1, keys, keys, positions, reading)
    for value in (filters.numpy(), filters.double().numpy(), filters.tolist()):
        assert torch.equal(QFilterPress(filters=value).score(1, keys, keys, positions, reading), want)
    with pytest.raises(TypeError, match="array-like or a path"):
        QFilterPress(filters=object())
    with pytest.raises(ValueError, match="shape"):
        QFilterPress(filters=np.zeros((2, 16)))


def test_a_reused_press_uses_each_models_own_filters(store):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)  # same shapes, other weights
    fa, fb = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    qf.save_filters(fa, qf.store_path(a))
    qf.save_filters(fb, qf.store_path(b))
    p = QFilterPress(ratio=0.5)
    with press(a, p):
        assert torch.equal(p.active_filters, fa)
    with press(b, p):
        assert torch.equal(p.active_filters, fb)
    with press(a, p):
        assert torch.equal(p.active_filters, fa)
    explicit = QFilterPress(ratio=0.5, filters=fa)
    with press(b, explicit):  # explicit filters are the user's choice: kept
        assert torch.equal(explicit.active_filters, fa)


def test_cli_on_a_model_directory_without_tokenizer(tmp_path, store, capsys):
    from kvpress_like.cli import main

    model_dir = tmp_path / "no-tokenizer"
    tiny_model("llama").save_pretrained(model_dir)
    args = ["--num-sequences", "2", "--seq-len", "32", "--quiet", "--no-store"]
    assert main(["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "o1"), *args]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "--tokenizer" in err and "offline:random" in err
    assert not (tmp_path / "o1").exists()
    assert main(["calibrate", "--model", str(model_dir), "--texts", "offline:random", "--out", str(tmp_path / "o2"), *args]) == 0
    assert qf.load_filters(tmp_path / "o2").shape == (4, 2, 16)
    tok_dir = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    text = tmp_path / "t.txt"
    text.write_text(offline_corpus()[:2000])
    rc = main(["calibrate", "--model", str(model_dir), "--tokenizer", str(tok_dir), "--texts", str(text), "--out", str(tmp_path / "o3"), *args])
    assert rc == 0 and json.loads((tmp_path / "o3" / "config.json").read_text())["corpus"].startswith("file ")


# -- issue 12 §2: pre-RoPE statistics ------------------------------------------------------------------

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0
)
#: name -> (tiny architecture, config overrides): Llama-3 rope scaling, partial rotary, QK-norm, per-layer-type rotary
ROPE_VARIANTS = {
    "llama": ("llama", {}),
    "llama-rope-scaled": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "phi3-partial": ("phi3", dict(partial_rotary_factor=0.5)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {}),
}


def _variant(name, **extra):
    arch, overrides = ROPE_VARIANTS[name]
    return tiny_model(arch, **overrides, **extra)


@pytest.mark.parametrize("variant", sorted(set(ROPE_VARIANTS) - {"qwen2"}))
def test_pre_rope_queries_equal_the_projection_before_rotation(variant):
    """Un-rotated queries equal q_proj (+ QK-norm) recomputed independently, i.e. before transformers' RoPE."""
    model = _variant(variant)
    inputs = {}

    def grab(module, args, kwargs):
        inputs[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    sample = calibration.sample_queries(model, ids, samples_per_head=17, progress=False)
    for h in handles:
        h.remove()
    assert sample.positions.shape == (17,) and len(set(sample.positions.tolist())) == 17
    for idx, pre in sample.pre_rope.items():
        attn = model.model.layers[idx].self_attn
        hq, d = pre.shape[0], attn.head_dim
        with torch.no_grad():
            if hasattr(attn, "qkv_proj"):
                raw = attn.qkv_proj(inputs[idx])[..., : hq * d]
            else:
                raw = attn.q_proj(inputs[idx])
            raw = raw.view(1, 40, hq, d)
            raw = attn.q_norm(raw) if hasattr(attn, "q_norm") else raw
        want = raw[0].transpose(0, 1)[:, sample.positions]
        torch.testing.assert_close(pre, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(sample.post_rope[idx], want, atol=1e-2)  # RoPE did rotate them
    if variant == "phi3-partial":
        assert set(sample.rotary_dims.values()) == {8}
        torch.testing.assert_close(sample.post_rope[0][..., 8:], sample.pre_rope[0][..., 8:])  # pass-through dims


@pytest.mark.parametrize("variant", ["llama", "llama-rope-scaled", "phi3-partial", "qwen2"])
def test_pre_rope_direction_rotated_to_p_is_the_post_rope_direction_of_queries_at_p(variant):
    """Queries ~ a fixed vector per head plus noise: the pre-RoPE direction rotated to p must match the
    dominant direction of the post-RoPE queries observed at position p (over many sequences)."""
    from kvpress_like.rope import rotary

    model = _variant(variant) if variant == "qwen2" else _variant(variant, attention_bias=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):
                attn.qkv_proj.weight.mul_(0.05)
                hq_d = attn.config.num_attention_heads * attn.head_dim
                if attn.qkv_proj.bias is None:
                    attn.qkv_proj.bias = torch.nn.Parameter(torch.zeros(attn.qkv_proj.out_features))
                attn.qkv_proj.bias[:hq_d] = torch.randn(hq_d, generator=gen)
            else:
                attn.q_proj.weight.mul_(0.05)
                attn.q_proj.bias.copy_(torch.randn(attn.q_proj.out_features, generator=gen))
    ids = torch.randint(2, 128, (24, 48), generator=gen)
    sample = calibration.sample_queries(model, ids, samples_per_head=24 * 48, progress=False)  # every position
    stats = calibration.query_statistics(sample.pre_rope, 4)
    for p in (5, 31, 47):
        at_p = sample.positions == p
        assert at_p.sum() == 24
        for idx in sample.pre_rope:
            rot = rotary(model, idx, 16)
            cos, sin = rot.cos_sin(torch.tensor([p]))
            targeted = rot.rotate(stats["direction"][idx], cos, sin)  # (hq, d)
            observed = core_calibration._dominant(sample.post_rope[idx][:, at_p])
            assert (cosine(targeted, observed) > 0.98).all(), (p, idx, cosine(targeted, observed))
            untargeted = stats["direction"][idx]
            if p > 20:  # the property can fail: without the rotation the directions differ
                assert (cosine(untargeted, observed) < 0.9).any()


def test_query_statistics_round_trip_through_safetensors(tmp_path):
    from kvpress_like.filters import load_query_stats, save_query_stats

    model = tiny_model("gemma3")
    ids = torch.randint(2, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    result = calibration.run_calibration(model, texts=ids, corpus="random ids", progress=False, seed=3)
    pre = calibration.sample_queries(model, ids, seed=3, progress=False).pre_rope[1].double()  # (hq, 120, d)
    torch.testing.assert_close(result.stats["mean"][1].double(), pre.mean(1), rtol=1e-5, atol=1e-6)
    centered = pre - pre.mean(1, keepdim=True)
    torch.testing.assert_close(result.stats["covariance"][1].double(), centered.transpose(1, 2) @ centered / 119, rtol=1e-4, atol=1e-6)

    save_query_stats(result.stats, tmp_path, **result.stats_info)
    tensors, meta = load_query_stats(tmp_path)
    assert set(tensors) == {"mean", "direction", "covariance", "count"}
    for key, value in result.stats.items():
        assert torch.equal(tensors[key], value), key
    assert tensors["covariance"].shape == (4, 4, 16, 16) and tensors["count"].tolist() == [120, 120, 120, 120]
    assert meta["window_length"] == 40 and meta["seed"] == 3 and meta["corpus"] == "random ids"
    assert meta["layers"] == [0, 1, 2, 3] and meta["rotary_dims"] == {str(i): 16 for i in range(4)}


def test_cli_writes_statistics_and_published_filters_unchanged(tmp_path, store):
    from kvpress_like.cli import main
    from kvpress_like.filters import load_query_stats
    from safetensors import safe_open

    model_dir = save_tiny(tmp_path / "tiny", "qwen3")
    args = ["--texts", "offline:random", "--num-sequences", "2", "--seq-len", "32", "--quiet", "--no-store"]
    assert main(["calibrate", "--model", str(model_dir), *args, "--out", str(tmp_path / "o")]) == 0
    with safe_open(str(tmp_path / "o" / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["q_filters"]  # the published format, nothing added
    tensors, meta = load_query_stats(tmp_path / "o")
    assert meta["window_length"] == 32 and meta["num_sequences"] == 2 and tensors["mean"].shape == (4, 4, 16)
