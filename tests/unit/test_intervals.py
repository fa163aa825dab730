"""The reports' 95% intervals mean 95%: Student's t at real degrees of freedom (checked against
mpmath), Welch–Satterthwaite df, a coverage simulation at the few training seeds the reports
have, and the schedule experiment's intervals recomputed from its carried rows."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import mpmath
import pytest

from pipeline.ablation import claims as cl
from pipeline.ablation import statistics as st
from pipeline.ablation import tables as tb
from pipeline.ablation.student_t import t_pdf, t_ppf, t_sf, welch_df

ROOT = Path(__file__).resolve().parents[2]
mpmath.mp.dps = 30


def _mp_sf(x: float, df: float) -> float:
    """P(T > x), x >= 0, from mpmath's regularised incomplete beta at 30 digits."""
    df_mp = mpmath.mpf(df)
    return float(
        mpmath.betainc(df_mp / 2, mpmath.mpf(1) / 2, 0, df_mp / (df_mp + mpmath.mpf(x) ** 2), regularized=True) / 2
    )


@pytest.mark.parametrize("df", [0.7, 1, 2, 2.17, 2.52, 3, 4.4, 10, 78, 1000])
def test_the_t_tail_and_quantile_match_mpmath_at_real_degrees_of_freedom(df):
    for x in (0.1, 1.0, 2.5, 9.0):
        assert t_sf(x, df) == pytest.approx(_mp_sf(x, df), rel=1e-11)
        assert t_sf(-x, df) == pytest.approx(1 - _mp_sf(x, df), rel=1e-11)
    for p in (0.6, 0.8, 0.975, 0.9999):
        q = t_ppf(p, df)
        assert _mp_sf(q, df) == pytest.approx(1 - p, rel=1e-11)
        assert t_ppf(1 - p, df) == -q
    # the density is the tail's derivative
    h = 1e-6
    assert t_pdf(1.3, df) == pytest.approx((t_sf(1.3 - h, df) - t_sf(1.3 + h, df)) / (2 * h), rel=1e-6)


def test_familiar_quantiles_and_the_normal_limit():
    assert t_ppf(0.975, 1) == pytest.approx(12.706205, rel=1e-7)
    assert t_ppf(0.975, 4) == pytest.approx(2.776445, rel=1e-7)
    assert t_ppf(0.8, 10) == pytest.approx(0.879058, rel=1e-6)
    assert t_ppf(0.975, math.inf) == pytest.approx(1.959964, rel=1e-7)
    with pytest.raises(ValueError, match="p must lie in"):
        t_ppf(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom must be > 0"):
        t_sf(1.0, 0)


def test_welch_df_lies_between_the_smaller_sample_and_the_pooled_df():
    assert welch_df(1.0, 3, 1.0, 3) == pytest.approx(4.0)  # equal spreads and sizes: the pooled df
    assert welch_df(1.0, 3, 4.0, 3) == pytest.approx(50 / 17)
    assert welch_df(0.0, 3, 4.0, 5) == pytest.approx(4.0)  # one side without spread: the other's n - 1
    for va, na, vb, nb in [(1.0, 3, 9.0, 3), (2.0, 5, 0.1, 2), (1.0, 10, 1.0, 4)]:
        assert min(na, nb) - 1 <= welch_df(va, na, vb, nb) <= na + nb - 2


def _coverage(std_a: float, std_b: float, n: int, draws: int, seed: int) -> tuple[float, float]:
    """Share of `draws` simulated pairs of n-seed samples (true difference 0) whose interval holds
    0: the report's Welch interval, and the same standard error at the pooled df n_a + n_b - 2."""
    rng = random.Random(seed)
    welch = pooled = 0
    for _ in range(draws):
        a = (*st.mean_std([rng.gauss(0.0, std_a) for _ in range(n)]), n)
        b = (*st.mean_std([rng.gauss(0.0, std_b) for _ in range(n)]), n)
        interval = st.difference_interval(a, b)
        welch += interval["low"] <= 0.0 <= interval["high"]
        se = math.sqrt(a[1] ** 2 / n + b[1] ** 2 / n)
        pooled += abs(a[0] - b[0]) <= t_ppf(0.975, 2 * n - 2) * se
    return welch / draws, pooled / draws


def test_welch_intervals_cover_95_percent_at_three_seeds_and_unequal_spreads():
    """Three training seeds a side at the schedule experiment's spreads (spindle 0.28 vs linear
    1.33 PPL): Welch covers 95% (within the simulation's ~0.15% standard error); the pooled df
    with Welch's standard error covers ~91%, which is what the reports printed before."""
    welch, pooled = _coverage(0.28, 1.33, n=3, draws=20_000, seed=0)
    assert 0.943 <= welch <= 0.965
    assert pooled < 0.93


def test_the_schedule_experiment_intervals_recomputed_from_its_carried_rows():
    rows = tb.by_row(json.loads(p.read_text()) for p in sorted((ROOT / "reports/schedules/rows").glob("*/result.json")))
    spindle = cl.training_comparison(rows["dbert_spindle_tad"], rows["dbert_linear_tad"])
    power = cl.training_comparison(rows["dbert_power_tad"], rows["dbert_linear_tad"])
    assert (round(spindle["difference"], 2), round(spindle["low"], 2), round(spindle["high"], 2)) == (
        -5.89,
        -9.02,
        -2.75,
    )
    assert spindle["df"] == pytest.approx(2.17, abs=0.005)
    assert (round(power["difference"], 2), round(power["low"], 2), round(power["high"], 2)) == (-3.78, -6.69, -0.87)
    assert power["df"] == pytest.approx(2.52, abs=0.005)
    assert spindle["verdict"] == power["verdict"] == cl.HOLDS
