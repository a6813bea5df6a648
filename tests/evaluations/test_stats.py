"""Statistics behind every method comparison: intervals cover what they should, paired tests get signs right."""

import math

import pytest
import torch

from kvpress_like.evaluations import stats


def test_wilson_known_values_and_coverage():
    lo, hi = stats.wilson(0, 60)
    assert lo == 0 and hi == pytest.approx(0.0602, abs=1e-3)  # the rule of three, Wilson version
    lo, hi = stats.wilson(30, 60)
    assert lo == pytest.approx(0.3773, abs=1e-3) and hi == pytest.approx(0.6227, abs=1e-3)
    # coverage: over every outcome of Binomial(60, 0.8), the interval holds 0.8 at least ~93% of the time
    n, p = 60, 0.8
    cover = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1) if stats.wilson(k, n)[0] <= p <= stats.wilson(k, n)[1])
    assert 0.93 <= cover <= 0.99
    with pytest.raises(ValueError, match="successes"):
        stats.wilson(7, 6)


def test_mcnemar_exact_known_table():
    # 10 discordant pairs split 9 / 1: two-sided exact p = 2 * (1 + 10) / 2**10
    a = [1] * 9 + [0] * 1 + [1] * 20 + [0] * 30
    b = [0] * 9 + [1] * 1 + [1] * 20 + [0] * 30
    out = stats.mcnemar_exact(a, b)
    assert (out["only_a"], out["only_b"]) == (9, 1)
    assert out["p"] == pytest.approx(22 / 1024)
    assert stats.mcnemar_p(0, 0) == 1.0 and stats.mcnemar_p(3, 3) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.5], [1])


def test_paired_bootstrap_sign_and_pairing():
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(60, generator=g)
    a = (difficulty > 0.3).float()  # a solves everything b solves, and more
    b = (difficulty > 0.5).float()
    out = stats.paired_bootstrap(a, b)
    assert out["diff"] == pytest.approx(float((a - b).mean()))
    assert 0 < out["lo"] <= out["diff"] <= out["hi"] and stats.verdict(out["lo"], out["hi"]) == "beats"
    flipped = stats.paired_bootstrap(b, a)
    assert flipped["hi"] < 0 and stats.verdict(flipped["lo"], flipped["hi"]) == "worse"
    same = stats.paired_bootstrap(a, a)
    assert same["lo"] == same["hi"] == 0 and stats.verdict(0, 0) == "no difference shown"
    with pytest.raises(ValueError, match="same length"):
        stats.paired_bootstrap([1, 0], [1])


def test_block_bootstrap_covers_mean_and_widens_with_autocorrelation():
    g = torch.Generator().manual_seed(1)
    # AR(1) series with mean 0.2: blocks must give a wider interval than treating tokens as independent
    e = torch.randn(4000, generator=g, dtype=torch.float64)
    x = torch.zeros(4000, dtype=torch.float64)
    for t in range(1, 4000):
        x[t] = 0.9 * x[t - 1] + e[t]
    x = x + 0.2
    blocked = stats.block_bootstrap(x, block=100)
    iid = stats.block_bootstrap(x, block=1)
    assert blocked["lo"] < 0.2 < blocked["hi"]
    assert (blocked["hi"] - blocked["lo"]) > 2 * (iid["hi"] - iid["lo"])
    assert blocked["mean"] == pytest.approx(float(x.mean()))
