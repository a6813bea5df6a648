"""Issue 12 §3: calibrated expected attention against the formula computed directly (rotated mu and Sigma)."""

import pytest
import torch

from kvpress_like import get_press
from kvpress_like.integrations import calibration
from kvpress_like.filters import save_query_stats
from kvpress_like.rope import rotary
from kvpress_like.methods import ExpectedAttentionPress
from tiny import tiny_model


def rotation_matrix(model, layer_idx, p, d=16):
    """``R(p)`` as a ``d x d`` matrix, column j = R(p) e_j (the model's rotation, independent of the press)."""
    rot = rotary(model, layer_idx, d)
    cos, sin = rot.cos_sin(torch.tensor([p]))
    return rot.rotate(torch.eye(d), cos, sin).T


@pytest.mark.parametrize("shrinkage,rank,combine", [(0.0, None, "logsumexp"), (0.3, None, "mean"), (0.5, 3, "logsumexp")])
def test_score_matches_the_rotated_gaussian_formula(tmp_path, shrinkage, rank, combine):
    model = tiny_model("gemma3")
    ids = torch.randint(2, 128, (3, 48), generator=torch.Generator().manual_seed(0))
    result = calibration.run_calibration(model, texts=ids, progress=False)
    save_query_stats(result.stats, tmp_path, **result.stats_info)
    p = ExpectedAttentionPress(ratio=0.5, stats=tmp_path, shrinkage=shrinkage, rank=rank, combine=combine)
    p.prepare(model)
    layer, pos, d = 3, 77, 16
    keys = torch.randn(1, 2, 20, d)
    got = p.score(layer, keys, keys, torch.arange(20).expand(1, 2, 20), torch.tensor([[[pos]]]))

    s = model.model.layers[layer].self_attn.scaling  # Gemma: query_pre_attn_scalar ** -0.5
    R = rotation_matrix(model, layer, pos).double()
    heads = []
    for h in range(4):
        mu, cov = result.stats["mean"][layer, h].double(), result.stats["covariance"][layer, h].double()
        if rank is not None:
            vals, vecs = torch.linalg.eigh(cov)
            low = vecs[:, -rank:] @ torch.diag(vals[-rank:]) @ vecs[:, -rank:].T
            cov_used = (1 - shrinkage) * low + shrinkage * vals.sum() / d * torch.eye(d)
        else:
            cov_used = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / d * torch.eye(d)
        mu_p, cov_p = R @ mu, R @ cov_used @ R.T
        k = keys[0, h // 2].double()  # GQA: heads 0, 1 read KV head 0
        heads.append(s * k @ mu_p + s**2 / 2 * torch.einsum("nd,de,ne->n", k, cov_p, k))
    heads = torch.stack(heads).view(2, 2, 20)
    want = heads.logsumexp(1) if combine == "logsumexp" else heads.mean(1)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused():
    assert isinstance(get_press("expected_attention_calibrated"), ExpectedAttentionPress)
    for kwargs, match in [
        (dict(shrinkage=1.5), "shrinkage"),
        (dict(shrinkage=True), "shrinkage"),
        (dict(rank=-1), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(combine="max"), "combine"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExpectedAttentionPress(**kwargs)
