"""The pluggy registry: built-ins by name, and a third-party scorer installed through an entry point."""

import sys
import textwrap

import pytest
import torch
from transformers import DynamicCache

import kvpress_like as kp
from kvpress_like.registry import plugin_manager
from tiny import tiny_model
from kvpress_like.integrations.transformers import cache_kwargs

PLUGIN = '''
from dataclasses import dataclass

import torch

from kvpress_like import ScorerPress, hookimpl


@dataclass
class OddPositionsPress(ScorerPress):
    """Keeps odd positions first: an easy rule to verify from the outside."""

    name = "odd_positions"

    def key_scores(self, layer_idx, keys, positions):
        return (positions % 2).float() + positions.float() * 1e-6


@hookimpl
def kvpress_like_presses():
    return {"odd_positions": OddPositionsPress}
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    (tmp_path / "odd_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "odd_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: odd-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("[kvpress_like]\nodd = odd_plugin\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_manager.cache_clear()
    yield
    plugin_manager.cache_clear()
    sys.modules.pop("odd_plugin", None)


def test_builtins_by_name():
    assert {"qfilters", "knorm", "snapkv", "streaming_llm"} <= set(kp.list_presses())
    p = kp.get_press("qfilters", ratio=0.5)
    assert isinstance(p, kp.QFilterPress) and p.ratio == 0.5


def test_third_party_press_through_entry_point(installed_plugin):
    assert "odd_positions" in kp.list_presses()
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kp.press(model, "odd_positions", ratio=0.5):
        model(torch.randint(3, 100, (1, 20)), **cache_kwargs(cache))
    for layer in cache.layers:
        assert layer.positions.tolist() == [[list(range(1, 20, 2))] * 2]


def test_settings_need_a_name():
    with pytest.raises(TypeError, match="settings"):
        with kp.press(tiny_model("llama"), kp.KnormPress(), ratio=0.5):
            pass


def test_a_name_may_carry_its_settings():
    """``name:key=value:...`` is one string for a configured press (command lines, results tables); settings
    passed beside it win, and a malformed one says how to write it."""
    from kvpress_like.registry import resolve_press

    p = resolve_press("adakv:base=kvzip:normalization=none:scope=model", {"ratio": 0.75})
    assert (type(p.base).__name__, p.base.ratio, p.normalization, p.scope) == ("KVzipPress", 0.75, "none", "model")
    assert resolve_press("knorm:ratio=0.25:skip_layers=0;1", {"ratio": 0.5}).skip_layers == (0, 1)
    assert resolve_press("knorm:ratio=0.25", {"ratio": 0.5}).ratio == 0.5
    with pytest.raises(ValueError, match="name:key=value"):
        resolve_press("knorm:ratio", {})
