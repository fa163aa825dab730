"""The statistics of the ablation's claims: means and spreads, Welch's interval of a difference,
the paired interval over evaluation seeds, and how many training seeds a difference would need.
Pure functions of (mean, std, n) triples; Student's t at real degrees of freedom from
`pipeline.ablation.student_t`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.ablation.student_t import t_ppf, welch_df


def t_quantile(df: float) -> float:
    """Two-sided 95% Student t quantile (the intervals), exact for any real df; inf below df 1e-9
    (no spread measured: no interval)."""
    return t_ppf(0.975, df) if df > 1e-9 else math.inf


def t80(df: float) -> float:
    """One-sided 80% Student t quantile (80% power), exact for any real df."""
    return t_ppf(0.8, df) if df > 1e-9 else math.inf


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def difference_interval(a: tuple[float, float, int], b: tuple[float, float, int]) -> dict[str, float]:
    """Welch's 95% interval of mean_a - mean_b from (mean, std, n) of each: the unpooled standard
    error with the Welch–Satterthwaite df (`welch_df`), so unequal spreads keep their coverage.
    `df` is returned with the interval, since at a few seeds it sets most of the width."""
    (ma, sa, na), (mb, sb, nb) = a, b
    se = math.sqrt(sa * sa / na + sb * sb / nb)
    df = welch_df(sa * sa, na, sb * sb, nb) if max(na, nb) >= 2 else 0.0
    half = t_quantile(df) * se if max(na, nb) >= 2 else math.inf  # one value each: no interval at all
    diff = ma - mb
    return {"difference": diff, "low": diff - half, "high": diff + half, "n_a": na, "n_b": nb, "df": df}


def paired_interval(
    a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]], metric: str = "ppl_token"
) -> dict[str, float]:
    """95% interval of mean(a - b) over evaluation seeds both were bounded with. The same seed
    draws the same test sentences' times and masks for both models, so the seed-to-seed noise
    (which moves every model alike) cancels in the difference."""
    b_by_seed = {r["seed"]: r[metric] for r in b_runs}
    diffs = [r[metric] - b_by_seed[r["seed"]] for r in a_runs if r["seed"] in b_by_seed]
    mean, std = mean_std(diffs)
    half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return {
        "difference": mean,
        "low": mean - half,
        "high": mean + half,
        "n_a": len(diffs),
        "n_b": len(diffs),
        "df": float(len(diffs) - 1),
        "paired": True,
    }


def pooled_std(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """The pooled std of two (mean, std, n) samples, each weighted by its degrees of freedom."""
    (_, sa, na), (_, sb, nb) = a, b
    return math.sqrt(((na - 1) * sa * sa + (nb - 1) * sb * sb) / (na + nb - 2))


def detectable(std: float, n: int) -> float:
    """The smallest true difference a two-sided 95% two-sample t-test finds with 80% power with
    n training seeds per row: (t_0.975 + t_0.80) s sqrt(2 / n), both at df = 2n - 2."""
    df = 2 * n - 2
    return (t_quantile(df) + t80(df)) * std * math.sqrt(2 / n)


def seeds_for(std: float, effect: float, most: int = 1000) -> int | None:
    """Training seeds per row that detect `effect` (searched, as the t quantiles move with n);
    None past `most`."""
    return next((n for n in range(2, most + 1) if detectable(std, n) <= abs(effect)), None)


def seeds_needed(a: tuple[float, float, int], b: tuple[float, float, int]) -> int | None:
    """Training seeds per row for a two-sided 95% two-sample t-test to detect the observed
    difference at 80% power (`seeds_for` with the pooled std): what an undecided comparison would
    cost to decide, if the gap is real. None without a gap or without two seeds a side (no std to
    pool)."""
    if a[2] < 2 or b[2] < 2 or a[0] == b[0]:
        return None
    return seeds_for(pooled_std(a, b), a[0] - b[0])
