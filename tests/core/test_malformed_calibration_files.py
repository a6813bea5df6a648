"""Issue 19 §1: a damaged statistics or Q-Filters file is refused on load with one ValueError naming the file,
what is wrong and what to do, never a bare KeyError, a reshape error deep in a press, or silent acceptance."""

import json

import pytest
import torch
from safetensors.torch import save_file

from kvpress_like import QFilterPress, press
from kvpress_like.integrations import calibration
from kvpress_like.filters import FILTER_FILE, STATS_FILE, save_filters, save_query_stats
from kvpress_like.methods import ExpectedAttentionPress, TargetedQFilterPress
from tiny import tiny_model

IDS = torch.randint(2, 128, (1, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def calibrated():
    """A tiny Llama (4 layers, 4 query heads, head_dim 16) with its statistics and filters."""
    model = tiny_model("llama")
    result = calibration.run_calibration(model, texts=torch.randint(2, 128, (2, 32)), progress=False)
    return model, result


def _drop(key):
    return lambda t, m: ({k: v for k, v in t.items() if k != key}, m)


def _set(key, make):
    return lambda t, m: ({**t, key: make(t)}, m)


def _meta(key, raw):
    return lambda t, m: (t, {**m, key: raw})


MALFORMED = {
    "no count": (_drop("count"), r"lacks \['count'\]"),
    "no covariance": (_drop("covariance"), r"lacks \['covariance'\]"),
    "covariance with the wrong head size": (_set("covariance", lambda t: torch.zeros(4, 4, 8, 8)), r"'covariance' of shape \(4, 4, 8, 8\).* must be \(4, 4, 16, 16\)"),
    "direction of the wrong shape": (_set("direction", lambda t: t["direction"][:, :2]), r"'direction' of shape \(4, 2, 16\).* must be \(4, 4, 16\)"),
    "count per head": (_set("count", lambda t: torch.ones(4, 4)), r"'count' of shape \(4, 4\).* must be \(4,\)"),
    "mean of rank 2": (_set("mean", lambda t: t["mean"][0]), r"'mean' of shape \(4, 16\); it must be \[num_layers"),
    "integer mean": (_set("mean", lambda t: t["mean"].long()), r"'mean' of dtype torch.int64"),
    "NaN in the mean": (_set("mean", lambda t: t["mean"] * float("nan")), r"NaN/Inf in \['mean'\]"),
    "negative count": (_set("count", lambda t: -t["count"]), "negative sample counts"),
    "header not JSON": (_meta("seed", "{not json"), r"header metadata 'seed' that is not JSON"),
    "scaling as a list": (_meta("scaling", "[0.25, 0.25]"), r"header 'scaling' \[0.25, 0.25\]; it must map layer indices"),
    "scaling of a missing layer": (_meta("scaling", '{"7": 0.25}'), "header 'scaling'"),
    "scaling not a number": (_meta("scaling", '{"0": "big"}'), "header 'scaling'"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
@pytest.mark.parametrize("make_press", [TargetedQFilterPress, ExpectedAttentionPress], ids=["targeted", "expected_attention"])
def test_malformed_statistics_are_refused_naming_the_file(calibrated, tmp_path, case, make_press):
    model, result = calibrated
    malform, problem = MALFORMED[case]
    header = {key: json.dumps(value, default=str) for key, value in result.stats_info.items()}
    tensors, header = malform(dict(result.stats), header)
    path = tmp_path / STATS_FILE
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    with pytest.raises(ValueError, match=problem) as err:
        with torch.no_grad(), press(model, make_press(ratio=0.5, stats=tmp_path)):
            model(IDS)
    assert str(path) in str(err.value) and "kvpress-like calibrate" in str(err.value)


def test_well_formed_statistics_still_load(calibrated, tmp_path):
    model, result = calibrated
    save_query_stats(result.stats, tmp_path, **result.stats_info)
    for make_press in (TargetedQFilterPress, ExpectedAttentionPress):
        with torch.no_grad(), press(model, make_press(ratio=0.5, stats=tmp_path)):
            model(IDS)


def test_statistics_of_another_model_name_the_file(calibrated, tmp_path):
    _, result = calibrated
    save_query_stats(result.stats, tmp_path, **result.stats_info)
    with pytest.raises(ValueError, match="made for another model") as err, press(tiny_model("llama", head_dim=8), TargetedQFilterPress(stats=tmp_path)):
        pass
    assert str(tmp_path) in str(err.value) and "[4, 4, 8]" in str(err.value)


@pytest.mark.parametrize(
    "tensors, config, problem",
    [
        ({"weights": torch.zeros(4, 2, 16)}, None, r"has no 'q_filters' tensor \(keys: \['weights'\]\)"),
        ({"q_filters": torch.zeros(8, 16)}, None, r"must be a real tensor \[num_layers, num_kv_heads, head_dim\], got shape \(8, 16\)"),
        ({"q_filters": torch.zeros(4, 2, 16, dtype=torch.int32)}, None, "dtype torch.int32"),
        ({"q_filters": torch.zeros(4, 2, 16)}, dict(num_layers=4, num_kv_heads=2, kv_head_dim=8), r"declares .* \[4, 2, 8\]"),
    ],
    ids=["missing tensor", "rank 2", "integer", "disagrees with its config.json"],
)
def test_malformed_qfilters_files_are_refused_naming_the_file(tmp_path, tensors, config, problem):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / FILTER_FILE))
    with pytest.raises(ValueError, match=problem) as err:
        QFilterPress(ratio=0.5, filters=tmp_path)
    assert str(tmp_path / FILTER_FILE) in str(err.value) and "kvpress-like calibrate" in str(err.value)


def test_qfilters_of_the_wrong_shape_for_the_model_are_refused(calibrated, tmp_path):
    model, result = calibrated
    save_filters(result.filters, tmp_path, **result.info)
    with torch.no_grad(), press(model, QFilterPress(ratio=0.5, filters=tmp_path)):
        model(IDS)
    with pytest.raises(ValueError, match=r"do not fit .*\[4, 2, 8\]"), press(tiny_model("llama", head_dim=8), QFilterPress(ratio=0.5, filters=tmp_path)):
        pass
