"""The core services every front-end calls: press resolution from a name and settings, cache copies, chunked prefill."""

import pytest
import torch
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like.cache_api import cache_kwargs
from kvpress_like.cache_ops import cache_presses, chunked_prefill, fork_cache
from kvpress_like.registry import UnknownPress, UnknownSettings, resolve_press
from tiny import tiny_model


# -- resolve_press ----------------------------------------------------------------------------------
def test_resolve_press_builds_checks_and_parses():
    assert resolve_press(None) is None
    p = kp.KnormPress(ratio=0.5)
    assert resolve_press(p) is p
    built = resolve_press("knorm", {"ratio": "0.5", "skip_layers": "0;1", "decoding": "true"}, parse=True)
    assert (built.ratio, built.skip_layers, built.decoding) == (0.5, (0, 1), True)
    with pytest.raises(UnknownPress, match="registered presses: .*knorm") as err:
        resolve_press("nope")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)  # get_press's and front-ends' errors
    assert str(err.value).startswith("unknown press 'nope'")  # no KeyError quotes around the message
    with pytest.raises(UnknownSettings, match="windw do not apply to press knorm; its settings: .*window") as bad:
        resolve_press("knorm", {"windw": 4})
    assert bad.value.unknown == ["windw"] and "window" in bad.value.valid
    with pytest.raises(TypeError, match="go with a press name"):
        resolve_press(p, {"ratio": 0.5})
    with pytest.raises(TypeError, match="a kvpress_like Press"):
        resolve_press(3)
    with pytest.raises(ValueError, match="ratio must be a number"):
        resolve_press("knorm", {"ratio": "half"}, parse=True)


def test_resolve_press_forwards_settings_of_a_wrapper_press():
    """AdaKV takes its base press's settings as ``**settings``: they are forwarded, not refused."""
    p = resolve_press("adakv", {"base": "knorm", "ratio": 0.5})
    assert p.base.ratio == 0.5


# -- fork_cache -------------------------------------------------------------------------------------
def _filled(model, ids, p=None) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if p is None:
            model(ids, **cache_kwargs(cache))
        else:
            with kp.press(model, p):
                model(ids, **cache_kwargs(cache))
    return cache


def test_fork_cache_copies_rows_and_shares_the_press():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (3, 12))
    p = kp.KnormPress(ratio=0.5)
    cache = _filled(model, ids, p)
    keys = [layer.keys.clone() for layer in cache.layers]

    picked = fork_cache(cache, [2, 0])
    assert len(cache_presses(picked)) == 1 and cache_presses(picked)[0] is p  # the press itself, not a copy
    for layer, before in zip(picked.layers, keys):
        assert torch.equal(layer.keys, before[[2, 0]])
    repeated = fork_cache(cache, 2)
    assert all(torch.equal(layer.keys, before.repeat_interleave(2, 0)) for layer, before in zip(repeated.layers, keys))
    with torch.no_grad(), kp.press(model, p):  # growing a copy leaves the original as it was
        model(torch.randint(3, 100, (2, 4)), **cache_kwargs(picked))
    assert all(torch.equal(layer.keys, before) for layer, before in zip(cache.layers, keys))
    assert fork_cache(cache, [1], in_place=True) is cache and cache.layers[0].keys.shape[0] == 1
    with pytest.raises(ValueError, match="plain layers only"):
        fork_cache(cache, share_storage=True)


def test_fork_cache_sharing_storage_leaves_a_plain_original_unchanged():
    model = tiny_model("llama")
    cache = _filled(model, torch.randint(3, 100, (1, 10)))
    copy = fork_cache(cache, share_storage=True)
    assert copy.layers[0].keys is cache.layers[0].keys  # no memory spent on the copy
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 3)), **cache_kwargs(copy))
    assert copy.get_seq_length() == 13 and cache.get_seq_length() == 10


# -- chunked_prefill --------------------------------------------------------------------------------
def test_chunked_prefill_equals_one_call_and_padded_rows_equal_their_row_alone():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 11))
    whole, chunked = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        chunked_prefill(model, ids, whole)
        chunked_prefill(model, ids, chunked, chunk=4)
    for a, b in zip(whole.layers, chunked.layers):
        torch.testing.assert_close(a.keys, b.keys)

    # row 0 left-padded by 3 tokens, after a cached prefix: its keys equal those of the row run alone
    prefix, tail = ids[:, :5], ids[:, 5:]
    padded_tail = torch.cat([torch.zeros(1, 3, dtype=torch.long), tail[0:1, 3:]], 1)
    batch = torch.cat([padded_tail, tail[1:2]])
    mask = torch.ones(2, 5 + 6, dtype=torch.long)
    mask[0, 5:8] = 0
    cache = DynamicCache(config=model.config)
    alone = DynamicCache(config=model.config)
    with torch.no_grad():
        chunked_prefill(model, prefix, cache)
        chunked_prefill(model, batch, cache, chunk=2, mask=mask)
        chunked_prefill(model, torch.cat([prefix[0:1], tail[0:1, 3:]], 1), alone)
    for a, b in zip(cache.layers, alone.layers):
        real = torch.cat([a.keys[0:1, :, :5], a.keys[0:1, :, 8:]], 2)
        torch.testing.assert_close(real, b.keys, atol=1e-5, rtol=1e-4)
