"""The cache engine's pieces on their own: the call plan (a pure function), window spans, and the
attention contract every layer served by our attention function implements."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import kvpress_like as kp
from kvpress_like.attention_api import ServedLayer
from kvpress_like.cache import PressedLayer
from kvpress_like.headwise import HeadwisePressedLayer
from kvpress_like.integrations.transformers import TRANSFORMERS_MASKS, PlainLayerGeometry
from kvpress_like.plan import ROW_APPEND, ROW_OVERWRITE, ROW_PRUNE, Plan, plan_call
from kvpress_like.static import StaticPressedLayer
from kvpress_like.windows import FullAttention, SlidingWindow, attention_span


@pytest.mark.parametrize(
    ("new", "slots", "targets", "evicts", "plan"),
    [
        (8, 0, None, True, Plan.APPEND),  # no limit
        (8, 0, [4, 4], False, Plan.APPEND),  # presses that need queries prune after attention
        (8, 0, [8], True, Plan.APPEND),  # fits exactly
        (8, 0, [7], True, Plan.PRUNE),
        (1, 4, [4, 4], True, Plan.OVERWRITE),  # a decoding step into a full cache
        (1, 0, [0], True, Plan.PRUNE),  # nothing to overwrite
        (1, 3, [4], True, Plan.APPEND),
        (2, 4, [4], True, Plan.PRUNE),  # two tokens into a full cache: not a decoding step
        (1, 5, [4], True, Plan.PRUNE),  # over its target (e.g. after uncompressed()): prune back
    ],
)
def test_plan_of_uniform_rows(new, slots, targets, evicts, plan):
    planned = plan_call(new, slots, targets, evicts)
    assert planned.plan is plan and planned.rows is None
    assert planned.plan == plan.value and str(planned.plan) == plan.value  # observers may compare strings


def test_plan_of_padded_rows_plans_each_row_as_alone():
    # row 0: full, one real token -> overwrite; row 1: room left -> append; row 2: a pad only -> nothing (append)
    planned = plan_call(1, 4, [4, 4, 4], True, row_new=torch.tensor([1, 1, 0]), row_slots=torch.tensor([4, 2, 4]))
    assert planned.rows.tolist() == [ROW_OVERWRITE, ROW_APPEND, ROW_APPEND]
    assert planned.plan is Plan.OVERWRITE  # rows that append fill an empty slot of the batch's slots
    # a chunk that overflows one row prunes the batch
    planned = plan_call(3, 4, [5, 8], True, row_new=torch.tensor([3, 2]), row_slots=torch.tensor([4, 3]))
    assert planned.rows.tolist() == [ROW_PRUNE, ROW_APPEND] and planned.plan is Plan.PRUNE
    # every row appends a multi-token call
    planned = plan_call(3, 2, [8, 8], True, row_new=torch.tensor([3, 1]), row_slots=torch.tensor([2, 2]))
    assert planned.rows.tolist() == [ROW_APPEND, ROW_APPEND] and planned.plan is Plan.APPEND
    # no limit: every row appends, even a decoding step
    planned = plan_call(1, 4, None, True, row_new=torch.tensor([1, 1]), row_slots=torch.tensor([4, 4]))
    assert planned.rows.tolist() == [ROW_APPEND, ROW_APPEND] and planned.plan is Plan.APPEND


def test_padded_plan_agrees_with_uniform_plan_when_rows_are_alike():
    for new, slots, target in [(1, 4, 4), (1, 3, 4), (5, 3, 4), (5, 0, 8), (1, 0, 0)]:
        uniform = plan_call(new, slots, [target] * 2, True).plan
        rows = plan_call(new, slots, [target] * 2, True, torch.tensor([new] * 2), torch.tensor([slots] * 2))
        code = {Plan.APPEND: ROW_APPEND, Plan.OVERWRITE: ROW_OVERWRITE, Plan.PRUNE: ROW_PRUNE}[uniform]
        assert rows.rows.tolist() == [code] * 2
        if uniform is not Plan.APPEND or new > 1 or slots == 0:
            assert rows.plan is uniform


def test_window_spans():
    assert attention_span(None) is attention_span(None) and isinstance(attention_span(None), FullAttention)
    full, sliding = attention_span(None), attention_span(4)
    assert isinstance(sliding, SlidingWindow) and sliding.window == 4
    assert full.cap(None, True) is None and full.cap(9, False) == 9
    assert sliding.cap(None, True) == 4 and sliding.cap(None, False) == 3 and sliding.cap(2, True) == 2
    positions = torch.arange(8).view(1, 1, 8)
    assert torch.equal(full.live(positions, 8), positions)
    assert sliding.live(positions, 8).tolist() == [[[-1, -1, -1, -1, -1, 5, 6, 7]]]


def test_every_served_layer_implements_the_attention_contract():
    press = kp.KnormPress(ratio=0.5)
    layers = [
        PressedLayer(press, 0),
        PressedLayer(press, 0, sliding_window=8),
        HeadwisePressedLayer(kp.get_press("adakv", ratio=0.5), 0),
        StaticPressedLayer(press, 0, budget=4),
        PlainLayerGeometry(8, None),
        TRANSFORMERS_MASKS,
    ]
    for layer in layers:
        assert isinstance(layer, ServedLayer), type(layer).__name__
    assert not isinstance(DynamicLayer(), ServedLayer)  # transformers' layers are served through the adapter
    query = torch.randn(1, 2, 1, 4)
    assert layers[0].own_attention(None, query, query, query) is None  # the model's kernel
    assert not layers[0].wants_own_mask(None, query) and layers[1].wants_own_mask(None, query)


def test_seen_is_the_tokens_given():
    layer = PressedLayer(kp.KnormPress(ratio=0.5), 0)
    layer.update(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    assert layer.tokens_given == layer.seen == layer.get_seq_length() == 6 and layer.n == 3
