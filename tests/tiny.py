"""Tiny random models of each supported family: the test suite's fixtures (deterministic, built offline)."""

import torch

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A small random model of a given architecture, deterministic for a seed (for tests and smoke runs).

    ``arch`` is one of llama, mistral, qwen2, qwen3, phi3, gemma3, gpt_neox, gpt2. Gemma3 alternates sliding
    and full layers; Qwen3 and Gemma3 have QK-norm; Qwen2 has attention biases; Phi3 a fused qkv
    projection; GPT-NeoX (Pythia) a fused qkv projection, rotary embedding on a quarter of each head and
    no grouped KV heads; GPT-2 no RoPE at all (learned positions); Falcon (new decoder architecture: fused
    grouped qkv, parallel attention and MLP) only where the installed transformers routes its attention through
    the attention interface (5.25 and later, see :data:`FALCON_SUPPORTED`).
    """
    import transformers as tf

    settings = dict(_TINY, **overrides)
    if arch == "llama":
        config = tf.LlamaConfig(**settings)
    elif arch == "mistral":
        config = tf.MistralConfig(**{"sliding_window": None, **settings})
    elif arch == "qwen2":
        config = tf.Qwen2Config(**settings)
    elif arch == "qwen3":
        config = tf.Qwen3Config(head_dim=16, **settings)
    elif arch == "phi3":
        config = tf.Phi3Config(pad_token_id=0, **settings)
    elif arch == "gemma3":
        settings.setdefault("head_dim", 16)
        config = tf.Gemma3TextConfig(
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (settings["num_hidden_layers"] // 2),
            **settings,
        )
    elif arch == "gpt_neox":
        settings.pop("num_key_value_heads")  # GPT-NeoX has one KV head per query head
        config = tf.GPTNeoXConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}, **settings)
    elif arch == "gpt2":  # no RoPE: learned absolute positions, so keys carry no rotation to target
        config = tf.GPT2Config(
            vocab_size=settings["vocab_size"], n_embd=settings["hidden_size"], n_inner=settings["intermediate_size"],
            n_layer=settings["num_hidden_layers"], n_head=settings["num_attention_heads"],
            n_positions=settings["max_position_embeddings"], bos_token_id=0, eos_token_id=0,
        )
    elif arch == "falcon":
        config = tf.FalconConfig(
            vocab_size=settings["vocab_size"], hidden_size=settings["hidden_size"],
            num_hidden_layers=settings["num_hidden_layers"], num_attention_heads=settings["num_attention_heads"],
            num_kv_heads=settings["num_key_value_heads"], new_decoder_architecture=True,
            max_position_embeddings=settings["max_position_embeddings"], bos_token_id=0, eos_token_id=0,
        )
    else:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; use llama, mistral, qwen2, qwen3, phi3, gemma3, gpt_neox, gpt2 or falcon"
        )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def falcon_supported() -> bool:
    """Whether the installed transformers' Falcon attention calls the attention interface (5.25 and later)."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    from kvpress_like.integrations.transformers import _uses_attention_interface

    return _uses_attention_interface(object.__new__(FalconAttention))


class ByteTokenizer:
    """A tokenizer-shaped byte codec, so evaluation grids run on a tiny random model without any download."""

    bos_token_id = 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_byte_model():
    """A tiny Llama whose vocabulary covers :class:`ByteTokenizer` (256 bytes + BOS), with room for 4k tokens."""
    return tiny_model("llama", seed=0, attn_implementation="sdpa", vocab_size=257, max_position_embeddings=4096)
