"""The four claims of PAPER §8, checked with intervals: each comparison's interval (over
evaluation seeds, or over training seeds where a row was trained more than once, which then
decides), its verdict, and each claim's verdict from its deciding comparisons. Pure functions of
the per-row results, so a committed report can be re-rendered without re-running anything."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from pipeline.ablation.statistics import difference_interval, paired_interval, seeds_needed, t_quantile
from pipeline.ablation.tables import by_row, curve_points, eval_stats, train_seed_stats

HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell"


def verdict_lower(interval: dict[str, float]) -> str:
    """The claim "a is lower than b": holds when the whole interval of a - b is below 0."""
    if interval["high"] < 0:
        return HOLDS
    if interval["low"] > 0:
        return FAILS
    return UNSURE


def _pair(rows: dict[str, list[dict]], a: str, b: str) -> tuple[list[dict], list[dict]] | None:
    return (rows[a], rows[b]) if a in rows and b in rows else None


def training_spread(rows: dict[str, list[dict]], metric: str = "ppl_token") -> float | None:
    """The largest gap between two training seeds of one row (None without repeated rows): how
    far apart two trainings of the *same* configuration land."""
    gaps = [
        max(v) - min(v)
        for v in ([r["evaluate"][f"{metric}_mean"] for r in runs] for runs in rows.values() if len(runs) > 1)
    ]
    return max(gaps) if gaps else None


def _eval_comparison(a: dict, b: dict, spread: float | None = None) -> dict:
    """a - b in PPL per token over the evaluation seeds (the two trained models fixed): paired by
    seed when both have per-seed runs. An evaluation-seed interval says nothing about training
    noise, so a difference smaller than the training-seed `spread` is left undecided."""
    ea, eb = a["evaluate"], b["evaluate"]
    if ea.get("runs") and eb.get("runs"):
        interval = paired_interval(ea["runs"], eb["runs"])
    else:
        interval = {**difference_interval(eval_stats(a), eval_stats(b)), "paired": False}
    out = {
        "a": a["key"],
        "b": b["key"],
        "covers": "evaluation seeds only",
        **interval,
        "verdict": verdict_lower(interval),
        "training_seed_spread": spread,
    }
    if spread is not None and out["verdict"] != UNSURE and abs(interval["difference"]) < spread:
        out["eval_only_verdict"] = out["verdict"]
        out["verdict"] = UNSURE
    return out


def claim_bert_init(rows: dict[str, list[dict]]) -> dict:
    """1. BERT initialisation converges faster and lower than random initialisation."""
    comparisons = []
    spread = training_spread(rows)
    for bert, random in (("dbert_linear_tad", "d3pm_linear_tad"), ("dbert_linear_lte", "d3pm_linear_lte")):
        pair = _pair(rows, bert, random)
        if pair is None:
            continue
        a, b = pair[0][0], pair[1][0]
        comparison = _eval_comparison(a, b, spread)
        ca, cb = curve_points(a), curve_points(b)
        # The first report (step 1) is the starting point, not convergence: a headless pretrained
        # encoder can start above a random init and still converge faster.
        shared = sorted(set(ca) & set(cb))
        comparison["start_val_bound_bert"] = ca[shared[0]] if shared else None
        comparison["start_val_bound_random"] = cb[shared[0]] if shared else None
        shared = shared[1:]
        comparison["val_bound_steps"] = shared
        comparison["val_bound_bert"] = [ca[s] for s in shared]
        comparison["val_bound_random"] = [cb[s] for s in shared]
        comparison["bert_lower_at_every_eval_step"] = bool(shared) and all(ca[s] < cb[s] for s in shared)
        random_final = cb[shared[-1]] if shared else None
        comparison["first_step_bert_reaches_random_final"] = next(
            (s for s in shared if random_final is not None and ca[s] <= random_final), None
        )
        if comparison["verdict"] == HOLDS and not comparison["bert_lower_at_every_eval_step"]:
            comparison["verdict"] = UNSURE  # lower at the end but not faster all the way
        comparisons.append(comparison)
    return _claim(
        1, "BERT initialisation converges faster and lower than random initialisation (same steps)", comparisons
    )


def training_comparison(a_runs: Sequence[dict], b_runs: Sequence[dict]) -> dict | None:
    """a - b over training seeds (each model's mean over evaluation seeds): the only interval
    that covers how far two trainings of one configuration land, so the one that decides. With
    one side trained once (claim 3's LTE/PTE rows when time is short), the other side's
    training-seed std stands for both: a prediction interval for a new training, which assumes
    the two configurations spread alike. None when neither side was trained twice (no training
    spread to measure)."""
    if len(a_runs) < 2 and len(b_runs) < 2:
        return None
    sa, sb = train_seed_stats(a_runs), train_seed_stats(b_runs)
    borrowed = min(sa[2], sb[2]) < 2
    if borrowed:
        std, n = (sa[1], sa[2]) if sa[2] >= 2 else (sb[1], sb[2])
        half = t_quantile(n - 1) * std * math.sqrt(1 / sa[2] + 1 / sb[2])
        diff = sa[0] - sb[0]
        interval = {"difference": diff, "low": diff - half, "high": diff + half, "n_a": sa[2], "n_b": sb[2]}
        interval["df"] = float(n - 1)  # the one std's own degrees of freedom
        sa, sb = (sa[0], std, 2), (sb[0], std, 2)  # what seeds_needed pools: that one std
    else:
        interval = difference_interval(sa, sb)
    verdict = verdict_lower(interval)
    covers = "training seeds (each model's mean over evaluation seeds)"
    if borrowed:
        covers += "; one side trained once: the other side's training-seed std stands for both"
    return {
        "a": f"{a_runs[0]['row']} (all seeds)",
        "b": f"{b_runs[0]['row']} (all seeds)",
        "covers": covers,
        **interval,
        "verdict": verdict,
        "seeds_needed": seeds_needed(sa, sb) if verdict == UNSURE else None,
    }


def _agreed(verdicts: Iterable[str]) -> str:
    """The one verdict they all share, else "cannot tell"."""
    distinct = set(verdicts)
    return distinct.pop() if len(distinct) == 1 else UNSURE


def _pair_summary(a: str, b: str, comparisons: Sequence[dict], reference: bool = False) -> dict:
    """One pair's verdict: its deciding comparisons agree, else "cannot tell"."""
    return {
        "a": a,
        "b": b,
        "verdict": _agreed(c["verdict"] for c in comparisons if c["decides"]),
        "reference": reference,
    }


# The schedules claim 2 asks about; the reference rows are shown next to them but never decide.
TOKEN_AWARE_ROWS = ("dbert_spindle_tad", "dbert_power_tad")


REFERENCE_ROWS = ("mdlm_loglinear_tad",)


def _schedule_pair(rows: dict[str, list[dict]], row: str, reference: bool) -> list[dict]:
    """One schedule against linear: a comparison per shared training seed over evaluation seeds,
    and with more than one training seed on either side the training-seed interval
    (`training_comparison`), which then decides."""
    pair = _pair(rows, row, "dbert_linear_tad")
    if pair is None:
        return []
    schedule, linear = pair
    by_seed = {r["seed"]: r for r in linear}
    spread = training_spread(rows)
    comparisons = [_eval_comparison(s, by_seed[s["seed"]], spread) for s in schedule if s["seed"] in by_seed]
    training = training_comparison(schedule, linear)
    for c in comparisons:
        c["decides"] = training is None
    if training is not None:
        comparisons.append({**training, "decides": True})
    if reference:
        comparisons = [{**c, "reference": True} for c in comparisons]
    return comparisons


def _any_schedule_beats(pairs: Sequence[dict]) -> str:
    """Claim 2 over the token-aware schedules (reference rows excluded): holds when at least one
    beats linear and none is worse, fails when every one is worse, else "cannot tell". A token-
    aware schedule that is significantly worse stops "token-awareness helps" from holding even
    if another one wins."""
    verdicts = [p["verdict"] for p in pairs if not p["reference"]]
    if not verdicts:
        return "not run (rows missing)"
    if HOLDS in verdicts and FAILS not in verdicts:
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    return UNSURE


def claim_spindle(rows: dict[str, list[dict]]) -> dict:
    """2. A token-aware schedule beats the linear schedule, on the exact leak-free bound. Every
    token-aware row run (the paper's spindle, our exact power) is compared with linear, and the
    successor's MDLM recipe as a labelled reference; per pair the training-seed interval decides
    when there is one, and the claim holds when the interval of (schedule - linear) lies wholly
    below 0 for some token-aware schedule and wholly above 0 for none (`_any_schedule_beats`)."""
    comparisons: list[dict] = []
    pairs = []
    for row in (*TOKEN_AWARE_ROWS, *REFERENCE_ROWS):
        reference = row in REFERENCE_ROWS
        pair = _schedule_pair(rows, row, reference)
        if pair:
            comparisons += pair
            pairs.append(_pair_summary(row, "dbert_linear_tad", pair, reference))
    claim = _claim(
        2,
        "A token-aware schedule (spindle, or power where run) beats the linear schedule (same model and budget), "
        "exact leak-free bound",
        comparisons,
        verdict=_any_schedule_beats(pairs),
    )
    return {**claim, "pairs": pairs}


def _time_design_pair(rows: dict[str, list[dict]], other: str) -> list[dict]:
    """TAD against one other time design: each row's first training seed over evaluation seeds,
    and with more than one training seed on either side the training-seed interval
    (`training_comparison`), which then decides."""
    pair = _pair(rows, "dbert_linear_tad", other)
    if pair is None:
        return []
    comparison = _eval_comparison(pair[0][0], pair[1][0], training_spread(rows))
    # "as good as or better": only a significantly worse TAD breaks it (and not by less than
    # two trainings of one configuration differ).
    if comparison["verdict"] == FAILS or comparison.get("eval_only_verdict") == FAILS:
        decisive = (
            comparison["training_seed_spread"] is None or comparison["difference"] >= comparison["training_seed_spread"]
        )
        comparison["verdict"] = FAILS if decisive else UNSURE
    # Over training seeds the interval already holds the training noise: fails only when TAD's
    # interval lies wholly above the other's (verdict_lower's FAILS).
    training = training_comparison(*pair)
    comparison["decides"] = training is None
    return [comparison] if training is None else [comparison, {**training, "decides": True}]


def claim_tad(rows: dict[str, list[dict]]) -> dict:
    """3. For the BERT-initialised model, TAD is as good as or better than LTE/PTE: every pair's
    deciding comparison (the training-seed interval where there is one) must agree."""
    comparisons: list[dict] = []
    pairs = []
    for other in ("dbert_linear_lte", "dbert_linear_pte"):
        pair = _time_design_pair(rows, other)
        if pair:
            comparisons += pair
            pairs.append(_pair_summary("dbert_linear_tad", other, pair))
    claim = _claim(
        3,
        "For the BERT-initialised model, TAD is as good as or better than LTE/PTE",
        comparisons,
        decisive=lambda c: c["decides"],
    )
    return {**claim, "pairs": pairs}


def claim_steps(rows: dict[str, list[dict]]) -> dict:
    """4. Fewer sampling steps trade quality for speed smoothly (the steps table)."""
    comparisons = []
    for runs in rows.values():
        table = runs[0]["evaluate"].get("steps_table") or []
        if len(table) < 2:
            continue
        n = len(table[0].get("seeds") or [0])
        seconds = [r["seconds_per_sample"] for r in table]
        steps_pairs = []
        for lo, hi in itertools.pairwise(table):
            interval = difference_interval(
                (hi["ppl_token"], hi.get("ppl_token_std", 0.0), n), (lo["ppl_token"], lo.get("ppl_token_std", 0.0), n)
            )
            steps_pairs.append({"from": lo["steps"], "to": hi["steps"], **interval, "verdict": verdict_lower(interval)})
        faster = all(a < b for a, b in itertools.pairwise(seconds))
        any_worse = any(p["verdict"] == FAILS for p in steps_pairs)
        ends = difference_interval(
            (table[-1]["ppl_token"], table[-1].get("ppl_token_std", 0.0), n),
            (table[0]["ppl_token"], table[0].get("ppl_token_std", 0.0), n),
        )
        verdict = (
            HOLDS
            if faster and not any_worse and verdict_lower(ends) == HOLDS
            else (FAILS if any_worse or not faster else UNSURE)
        )
        comparisons.append(
            {
                "a": runs[0]["key"],
                "b": "its own fewer-step chains",
                "covers": "evaluation seeds only",
                "steps": [r["steps"] for r in table],
                "ppl_token": [r["ppl_token"] for r in table],
                "ppl_token_std": [r.get("ppl_token_std") for r in table],
                "seconds_per_sample": seconds,
                "bleu": [r.get("bleu") for r in table],
                "self_bleu": [r.get("self_bleu") for r in table],
                "time_increases_with_steps": faster,
                "consecutive": steps_pairs,
                "most_vs_fewest": ends,
                "verdict": verdict,
            }
        )
    return _claim(4, "Fewer sampling steps trade quality for speed smoothly", comparisons)


def _claim(number: int, text: str, comparisons: list[dict], decisive=None, verdict: str | None = None) -> dict:
    """Overall verdict: the given one, else the decisive comparisons (all by default) agree, else
    "cannot tell"."""
    deciding = [c for c in comparisons if decisive is None or decisive(c)] or comparisons
    overall = verdict or _agreed(c["verdict"] for c in deciding)
    if not comparisons:
        overall = "not run (rows missing)"
    return {"claim": number, "text": text, "verdict": overall, "comparisons": comparisons}


def check_claims(results: Iterable[dict]) -> list[dict]:
    rows = by_row(results)
    return [claim_bert_init(rows), claim_spindle(rows), claim_tad(rows), claim_steps(rows)]
