import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (safetensors cache after the first GGUF conversion)."""
    from kvpress_like.models import load_model

    return load_model("smollm2-135m")
