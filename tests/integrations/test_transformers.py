"""Which modules press() patches, how it patches them, and what it leaves behind."""

import pytest
import torch
import transformers as tf
from transformers import DynamicCache, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kvpress_like as kp
from kvpress_like.integrations.transformers import ATTENTION_NAME, attention_layers, cache_kwargs
from conftest import ARCHS
from tiny import falcon_supported, tiny_model


def _names(model) -> list[str]:
    return [layer.name for layer in attention_layers(model)]


def test_encoder_decoder_models_give_only_decoder_self_attention():
    small = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    bart = tf.BartForConditionalGeneration(tf.BartConfig(**small))
    assert _names(bart) == ["model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn"]
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    assert _names(t5) == ["decoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"]


def test_vision_language_model_gives_text_self_attention_not_cross_attention():
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, cross_attention_layers=[1, 3], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, vision_output_dim=32, intermediate_layers_indices=[0],
                  max_num_tiles=1, supported_aspect_ratios=[[1, 1]])
    model = tf.MllamaForConditionalGeneration(tf.MllamaConfig(text_config=text, vision_config=vision))
    # layers 1 and 3 are cross-attention layers (they read image states); the vision tower has no cache
    assert _names(model) == ["model.language_model.layers.0.self_attn", "model.language_model.layers.2.self_attn"]


def test_gpt_neox_is_found_without_attention_in_its_layer_names():
    model = tiny_model("gpt_neox")
    assert _names(model) == [f"gpt_neox.layers.{i}.attention" for i in range(4)]
    ids = torch.randint(3, 100, (1, 20))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kp.press(model, kp.KnormPress(ratio=0.5)):
        model(ids, **cache_kwargs(cache))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [10] * 4


def _falcon(**settings):
    return tf.AutoModelForCausalLM.from_config(
        tf.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **settings)
    )


@pytest.mark.skipif(falcon_supported(), reason="this transformers routes Falcon through the attention interface")
def test_falcon_is_refused_with_the_reason_where_it_bypasses_the_interface():
    with pytest.raises(ValueError, match=r"FalconForCausalLM is not supported: its attention \(FalconAttention\) "
                                         r"computes attention inside its own forward"):
        with kp.press(_falcon(), kp.KnormPress(ratio=0.5)):
            pass


@pytest.mark.skipif(not falcon_supported(), reason="this transformers' Falcon bypasses the attention interface")
def test_falcon_is_compressed_where_it_uses_the_interface_and_alibi_is_refused():
    assert "falcon" in ARCHS  # so the pruning-equals-masking tests cover it
    model = _falcon()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kp.press(model, kp.KnormPress(ratio=0.5)):
        model(torch.randint(3, 100, (1, 20)), **cache_kwargs(cache))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [10, 10]
    with pytest.raises(ValueError, match=r"FalconForCausalLM with ALiBi is not supported: .* alibi=False"):
        with kp.press(_falcon(alibi=True), kp.KnormPress(ratio=0.5)):
            pass


def test_attention_function_is_registered_only_while_a_context_is_open():
    first, second = tiny_model("llama"), tiny_model("qwen2")
    assert ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS
    with kp.press(first, kp.KnormPress(ratio=0.5)):
        with kp.press(second, kp.KnormPress(ratio=0.5)):
            assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is not None
        assert ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS  # the first context still needs it
        with torch.no_grad():
            first(torch.randint(3, 100, (1, 8)))
    assert ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS
    with pytest.raises(RuntimeError, match="boom"), kp.press(first, kp.KnormPress(ratio=0.5)):
        raise RuntimeError("boom")
    assert ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS


def test_patched_config_is_a_real_config_sharing_the_modules_settings():
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    original = module.config
    with kp.press(model, kp.KnormPress(ratio=0.5)):
        view = module.config
        assert view is not original and isinstance(view, PretrainedConfig) and isinstance(view, type(original))
        assert view._attn_implementation == ATTENTION_NAME and original._attn_implementation == "eager"
        assert view.num_key_value_heads == original.num_key_value_heads and view == original
        view.some_new_setting = 7  # writes land in the real config
        assert original.some_new_setting == 7
        original.rope_theta = 1234.0  # and reads see the real config's current values
        assert view.rope_theta == 1234.0
    assert module.config is original and original._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"


def test_attention_interface_is_read_from_the_code_not_the_source_text():
    """A forward that only mentions the interface in a comment or string bypasses it; one that reads it, even
    from a nested function or through a decorator, uses it."""
    import functools

    from kvpress_like.integrations.transformers import _forward_uses_attention_interface as uses

    def mentions(self, x):
        # computes attention itself, not through ALL_ATTENTION_FUNCTIONS
        return "ALL_ATTENTION_FUNCTIONS" and x

    def nested(self, x):
        def kernel():
            return ALL_ATTENTION_FUNCTIONS  # noqa: F821 (never called)
        return kernel

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    assert not uses(mentions)
    assert uses(nested)
    assert uses(decorate(nested))
    assert not uses(decorate(mentions))
