import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import falcon_supported  # noqa: E402

#: Families the pruning-equals-masking tests cover; Falcon where transformers routes it through the interface.
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt_neox", "gpt2"] + (["falcon"] if falcon_supported() else [])


@pytest.fixture(scope="session", autouse=True)
def _private_filter_store(tmp_path_factory):
    """Filters calibrated or saved by tests go to a temporary store, never into the user's.

    Converted models stay in the shared cache (``$KVPRESS_LIKE_CACHE``): converting a GGUF takes ~20 s.
    Subprocesses started by tests inherit the variable.
    """
    before = os.environ.get("KVPRESS_LIKE_FILTERS")
    os.environ["KVPRESS_LIKE_FILTERS"] = str(tmp_path_factory.mktemp("filter-store"))
    yield
    if before is None:
        del os.environ["KVPRESS_LIKE_FILTERS"]
    else:
        os.environ["KVPRESS_LIKE_FILTERS"] = before


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (safetensors cache after the first GGUF conversion)."""
    from kvpress_like.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with the SmolLM2 tokenizer beside it: loadable by name like any local model."""
    from transformers import AutoTokenizer

    from kvpress_like.models import _materialize
    from tiny import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama-smol-vocab")
    tiny_model("llama", seed=0, attn_implementation="sdpa", vocab_size=49152, max_position_embeddings=4096).save_pretrained(out)
    AutoTokenizer.from_pretrained(_materialize("smollm2-135m")).save_pretrained(out)
    return out
