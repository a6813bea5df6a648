"""Intervals and paired tests for comparing methods on the same prompts / the same text.

Why paired: two methods evaluated on the same prompts share each prompt's difficulty, so the difference
of their accuracies is much better determined than either accuracy alone. The paired bootstrap resamples
prompts (keeping each prompt's pair of outcomes together); McNemar's exact test looks only at the prompts
where the two methods disagree. Per-token NLLs of a text are autocorrelated, so their paired difference is
resampled in contiguous blocks (moving-block bootstrap), not token by token.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score 95% interval for a proportion (well-behaved at 0/n and n/n, unlike the normal one)."""
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_float(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("need at least one observation")
    return t


def paired_bootstrap(a, b, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired observations and its percentile bootstrap interval (resampling pairs)."""
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.numel()} and {b.numel()}")
    d = a - b
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return dict(diff=float(d.mean()), lo=lo, hi=hi, n=int(d.numel()))


def mcnemar_exact(a, b) -> dict:
    """Exact two-sided McNemar test on paired 0/1 outcomes: binomial test of the discordant pairs."""
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.numel()} and {b.numel()}")
    if not bool(((a == 0) | (a == 1)).all() and ((b == 0) | (b == 1)).all()):
        raise ValueError("McNemar's test takes 0/1 outcomes")
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    return dict(only_a=only_a, only_b=only_b, p=mcnemar_p(only_a, only_b))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value for ``only_a`` vs ``only_b`` discordant pairs (1.0 when there are none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def block_bootstrap(d, block: int = 64, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a serially correlated series ``d`` and its moving-block bootstrap interval.

    Each replicate concatenates ``ceil(T / block)`` blocks of ``block`` consecutive values starting at
    uniformly drawn offsets, cut to ``T`` values.
    """
    d = _as_float(d)
    t = d.numel()
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    block = min(block, t)
    n_blocks = math.ceil(t / block)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, t - block + 1, (n_boot, n_blocks), generator=g)
    idx = (starts[..., None] + torch.arange(block)).reshape(n_boot, -1)[:, :t]
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return dict(mean=float(d.mean()), lo=lo, hi=hi, n=t, block=block)


def verdict(lo: float, hi: float, better_when: str = "positive") -> str:
    """'beats' / 'worse' only when the paired interval excludes zero, else 'no difference shown'."""
    sign = 1 if better_when == "positive" else -1
    lo, hi = sorted((sign * lo, sign * hi))
    if lo > 0:
        return "beats"
    if hi < 0:
        return "worse"
    return "no difference shown"
