"""Claims 2 and 3 over several training seeds (the `make schedules` experiment): every token-aware
schedule against linear with the MDLM recipe as a reference that never decides, the training-seed
interval deciding each pair, and the seeds an undecided pair would need."""

from __future__ import annotations

import math

import pytest

from pipeline.ablation import claims as cl
from pipeline.ablation import report as md
from pipeline.ablation import statistics as st


def result(row: str, seed: int, ppl: float, eval_std: float = 0.5) -> dict:
    """One trained model's result, shaped like `collect_result`'s (the fields the claims read)."""
    return {
        "key": row if seed == 0 else f"{row}.seed{seed}",
        "row": row,
        "seed": seed,
        "train": {"seconds": 60.0, "curve": {"step": [50, 100], "val_bound": [8.0, 7.0]}},
        "evaluate": {"ppl_token_mean": ppl, "ppl_token_std": eval_std, "seeds": [0, 1, 2], "steps_table": []},
    }


def seeds(row: str, ppls: list[float], eval_std: float = 0.5) -> list[dict]:
    """A row trained once per value, training seeds 0, 1, 2, ..."""
    return [result(row, seed, ppl, eval_std) for seed, ppl in enumerate(ppls)]


LINEAR = seeds("dbert_linear_tad", [100.0, 101.0, 99.0])
SPINDLE_WITHIN_NOISE = seeds("dbert_spindle_tad", [99.5, 100.5, 100.0])


def claim(number: int, *rows: list[dict]) -> dict:
    return cl.check_claims([r for row in rows for r in row])[number - 1]


def pair_verdicts(c: dict) -> dict[str, str]:
    return {p["a"] if p["a"] != "dbert_linear_tad" else p["b"]: p["verdict"] for p in c["pairs"]}


def training(c: dict, row: str) -> dict:
    return next(x for x in c["comparisons"] if x["a"] == f"{row} (all seeds)")


# ---------------------------------------------------------------------------------------------
# Claim 2: every token-aware schedule against linear
# ---------------------------------------------------------------------------------------------


def test_the_power_schedule_decides_claim_2_when_its_training_seed_interval_lies_below_linear():
    power = seeds("dbert_power_tad", [90.0, 91.0, 89.0])
    c = claim(2, LINEAR, SPINDLE_WITHIN_NOISE, power)
    assert pair_verdicts(c) == {"dbert_spindle_tad": cl.UNSURE, "dbert_power_tad": cl.HOLDS}
    assert training(c, "dbert_power_tad")["high"] < 0 and training(c, "dbert_power_tad")["decides"]
    assert c["verdict"] == cl.HOLDS  # one token-aware schedule wins, none loses


def test_a_token_aware_schedule_worse_than_linear_stops_claim_2_from_holding():
    power_wins = seeds("dbert_power_tad", [90.0, 91.0, 89.0])
    spindle_loses = seeds("dbert_spindle_tad", [110.0, 111.0, 109.0])
    power_loses = seeds("dbert_power_tad", [120.0, 121.0, 119.0])
    assert claim(2, LINEAR, spindle_loses, power_wins)["verdict"] == cl.UNSURE
    assert claim(2, LINEAR, spindle_loses, power_loses)["verdict"] == cl.FAILS


def test_the_mdlm_reference_row_is_shown_but_never_decides_claim_2():
    mdlm_wins = seeds("mdlm_loglinear_tad", [80.0, 81.0, 79.0])
    mdlm_loses = seeds("mdlm_loglinear_tad", [130.0, 131.0, 129.0])
    spindle_wins = seeds("dbert_spindle_tad", [90.0, 91.0, 89.0])

    c = claim(2, LINEAR, SPINDLE_WITHIN_NOISE, mdlm_wins)
    assert pair_verdicts(c)["mdlm_loglinear_tad"] == cl.HOLDS
    assert c["verdict"] == cl.UNSURE  # the reference's clear win does not carry the claim
    mdlm = [x for x in c["comparisons"] if x["a"].startswith("mdlm_loglinear_tad")]
    assert len(mdlm) == 4 and all(x["reference"] for x in mdlm)  # 3 seeds + the training-seed interval
    assert [p["reference"] for p in c["pairs"]] == [False, True]
    assert claim(2, LINEAR, spindle_wins, mdlm_loses)["verdict"] == cl.HOLDS  # nor its clear loss
    assert claim(2, LINEAR, mdlm_wins)["verdict"] == "not run (rows missing)"  # nor alone


def test_the_spindle_pair_keeps_its_per_seed_comparisons_and_its_deciding_training_seed_interval():
    spindle = seeds("dbert_spindle_tad", [90.0, 91.0, 89.0])
    c = claim(2, LINEAR, spindle)
    covers = [x["covers"] for x in c["comparisons"]]
    assert covers == ["evaluation seeds only"] * 3 + ["training seeds (each model's mean over evaluation seeds)"]
    assert [x["decides"] for x in c["comparisons"]] == [False, False, False, True]
    assert c["verdict"] == cl.HOLDS and "reference" not in c["comparisons"][-1]


# ---------------------------------------------------------------------------------------------
# Claim 3: the training-seed interval decides each time-design pair
# ---------------------------------------------------------------------------------------------


def test_claim_3_fails_when_tad_is_clearly_worse_over_training_seeds_though_one_evaluation_cannot_tell():
    # a noisy evaluation cannot separate the first seeds; three trainings a side can
    tad = seeds("dbert_linear_tad", [110.0, 111.0, 109.0], eval_std=20.0)
    lte = seeds("dbert_linear_lte", [100.0, 101.0, 99.0], eval_std=20.0)
    c = claim(3, tad, lte)
    first, over_training = c["comparisons"]
    assert first["verdict"] == cl.UNSURE and not first["decides"]
    assert over_training["covers"].startswith("training seeds") and over_training["low"] > 0
    assert over_training["verdict"] == cl.FAILS and c["verdict"] == cl.FAILS


def test_claim_3_does_not_fail_when_tad_is_worse_within_the_training_seed_noise():
    # the first seeds differ by more than any two trainings of one row (10 > 6): on evaluation
    # seeds alone TAD fails; over the three trainings a side the gap is within noise
    tad = seeds("dbert_linear_tad", [110.0, 104.0, 107.0], eval_std=0.1)
    pte = seeds("dbert_linear_pte", [100.0, 103.0, 106.0], eval_std=0.1)
    c = claim(3, tad, pte)
    first, over_training = c["comparisons"]
    assert first["verdict"] == cl.FAILS and not first["decides"]
    assert over_training["verdict"] == cl.UNSURE and over_training["seeds_needed"] is not None
    assert c["verdict"] == cl.UNSURE and pair_verdicts(c) == {"dbert_linear_pte": cl.UNSURE}


def test_claim_3_with_lte_trained_once_borrows_the_tad_training_seed_spread():
    # make schedules trains LTE/PTE once and TAD three times (std 1): a prediction interval for
    # one new training, 100 - 110 = -10 ± t(2) 4.303 x 1 x sqrt(1/3 + 1) = 4.969, decides
    tad = seeds("dbert_linear_tad", [100.0, 101.0, 99.0])
    c = claim(3, tad, seeds("dbert_linear_lte", [110.0]))
    first, over_training = c["comparisons"]
    assert not first["decides"] and over_training["decides"]
    assert (over_training["low"], over_training["high"]) == pytest.approx((-14.969, -5.031), abs=1e-3)
    assert over_training["verdict"] == cl.HOLDS and c["verdict"] == cl.HOLDS
    close = claim(3, tad, seeds("dbert_linear_lte", [101.0]))["comparisons"][-1]
    # undecided: detecting 1 with TAD's std 1 for both rows takes 17 seeds a row (df 32:
    # (2.042 + 0.854) sqrt(2 / 17) = 0.993 <= 1; at 16, 1.024)
    assert close["verdict"] == cl.UNSURE and close["seeds_needed"] == 17
    assert (
        claim(3, seeds("dbert_linear_tad", [100.0]), seeds("dbert_linear_lte", [110.0]))["comparisons"][-1]["covers"]
        == "evaluation seeds only"
    )  # neither trained twice: no training interval at all


# ---------------------------------------------------------------------------------------------
# What an undecided comparison would need
# ---------------------------------------------------------------------------------------------


def test_seeds_needed_is_the_two_sample_power_formula_with_the_pooled_training_seed_std():
    # d = 100 - 102 = -2, pooled s = sqrt((2 * 16 + 2 * 4) / 4) = sqrt(10); the smallest n with
    # (t_0.975 + t_0.80)(df = 2n - 2) s sqrt(2 / n) <= 2: at n = 40 (df 78: 1.9908 + 0.8463)
    # 2.8371 x 3.162 x 0.2236 = 2.006 > 2, at n = 41 1.981 (the normal formula's 39.2 -> 40 is short)
    assert st.pooled_std((100.0, 4.0, 3), (102.0, 2.0, 3)) == pytest.approx(math.sqrt(10))
    assert st.detectable(math.sqrt(10), 40) == pytest.approx(2.006, abs=1e-3)
    assert st.seeds_needed((100.0, 4.0, 3), (102.0, 2.0, 3)) == 41
    # few seeds: t quantiles, not z: n = 3 (df 4) detects (2.776 + 0.941) sqrt(2/3) s = 3.035 s
    assert st.detectable(1.0, 3) == pytest.approx(3.035, abs=1e-3)
    assert st.seeds_needed((100.0, 0.1, 3), (150.0, 0.1, 3)) == 2  # never fewer than two
    assert st.seeds_needed((100.0, 4.0, 3), (100.0, 2.0, 3)) is None  # no gap to detect
    assert st.seeds_needed((100.0, 0.0, 1), (102.0, 2.0, 3)) is None  # no std to pool


def test_an_undecided_training_seed_comparison_carries_its_seed_estimate_and_a_decided_one_none():
    spindle = seeds("dbert_spindle_tad", [100.0, 104.0, 96.0])  # mean 100, std 4
    linear = seeds("dbert_linear_tad", [102.0, 100.0, 104.0])  # mean 102, std 2
    power = seeds("dbert_power_tad", [80.0, 81.0, 79.0])
    c = claim(2, linear, spindle, power)
    assert training(c, "dbert_spindle_tad")["verdict"] == cl.UNSURE
    assert training(c, "dbert_spindle_tad")["seeds_needed"] == 41
    assert training(c, "dbert_power_tad")["verdict"] == cl.HOLDS
    assert training(c, "dbert_power_tad").get("seeds_needed") is None
    text = md.markdown_claims([c])
    assert "cannot tell at this budget, would need ~41 training seeds per row" in text
    assert text.count("would need") == 1  # only the undecided comparison


def test_the_markdown_labels_the_reference_row_and_gives_each_pairs_verdict():
    mdlm = seeds("mdlm_loglinear_tad", [80.0, 81.0, 79.0])
    text = md.markdown_claims([claim(2, LINEAR, SPINDLE_WITHIN_NOISE, mdlm)])
    assert text.count("(reference row: shown, does not decide the claim)") == 4
    assert "`mdlm_loglinear_tad` vs `dbert_linear_tad`: holds (reference, does not decide)" in text
    assert "`dbert_spindle_tad` vs `dbert_linear_tad`: cannot tell" in text
