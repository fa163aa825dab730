"""The ablation's report: the table of PAPER §8 at this scale and the four claims checked with
intervals. Pure functions of the per-row results the runner collects (JSON-able dicts), so the
committed report JSON can be re-rendered without re-running anything.

A row result (`pipeline.ablation.results.collect_result`, one per (row, training seed)) holds
`key`, `row`, `seed`, the paper's columns (`method`, `init`, `schedule`, `time`), `note`,
`mlflow` (run ids), `train` (`seconds`, `curve` of the validation bound) and `evaluate` (the
bound's mean/std over evaluation seeds, BLEU, Self-BLEU, entropy, and for detail rows
`steps_table` and `quality_diversity`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pipeline.ablation.student_t import t_ppf, welch_df

HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell"


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


def paired_interval(a_runs: Sequence[dict], b_runs: Sequence[dict], metric: str = "ppl_token") -> dict[str, float]:
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


def verdict_lower(interval: dict[str, float]) -> str:
    """The claim "a is lower than b": holds when the whole interval of a - b is below 0."""
    if interval["high"] < 0:
        return HOLDS
    if interval["low"] > 0:
        return FAILS
    return UNSURE


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


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------


def by_row(results: Iterable[dict]) -> dict[str, list[dict]]:
    """Row name -> its results, one per training seed (seed order)."""
    out: dict[str, list[dict]] = {}
    for result in sorted(results, key=lambda r: r["seed"]):
        out.setdefault(result["row"], []).append(result)
    return out


def eval_stats(result: dict, metric: str = "ppl_token") -> tuple[float, float, int]:
    """(mean, std, n) of a bound perplexity over the evaluation seeds of one trained model."""
    ev = result["evaluate"]
    return ev[f"{metric}_mean"], ev[f"{metric}_std"], len(ev["seeds"])


def train_seed_stats(results: Sequence[dict], metric: str = "ppl_token") -> tuple[float, float, int]:
    """(mean, std, n) over training seeds of each model's evaluation-seed mean."""
    mean, std = mean_std([r["evaluate"][f"{metric}_mean"] for r in results])
    return mean, std, len(results)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def mean_curves(results: Iterable[dict]) -> dict[str, dict[str, list[float]]]:
    """Row name -> its validation curve over training seeds: at every step all its seeds
    evaluated, the mean and the lowest and highest seed (`step`, `mean`, `low`, `high`; `seeds`
    is how many). One line per schedule on a plot instead of one per (schedule, seed)."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, runs in by_row(results).items():
        points = [_curve_points(r) for r in runs]
        steps = sorted(set.intersection(*(set(p) for p in points)))
        values = [[p[s] for p in points] for s in steps]  # [step][seed]
        out[row] = {
            "step": [float(s) for s in steps],
            "mean": [sum(v) / len(v) for v in values],
            "low": [min(v) for v in values],
            "high": [max(v) for v in values],
            "seeds": [float(len(runs))],
        }
    return out


def table_rows(results: Iterable[dict]) -> list[dict]:
    """One line per row: the paper's columns and our numbers (means over training seeds)."""
    lines = []
    for runs in by_row(results).values():
        first = runs[0]
        ev = [r["evaluate"] for r in runs]
        line = {key: first[key] for key in ("row", "method", "init", "schedule", "time", "note")}
        line["training_seeds"] = [r["seed"] for r in runs]
        for metric in ("ppl_token", "ppl_word"):
            values = [e[f"{metric}_mean"] for e in ev]
            line[metric] = sum(values) / len(values)
            line[f"{metric}_per_seed"] = values
            line[f"{metric}_eval_std"] = max(e[f"{metric}_std"] for e in ev)
            line[f"{metric}_train_std"] = mean_std(values)[1]  # over training seeds (0 with one)
        for metric in ("bleu", "self_bleu", "unigram_entropy_bits"):
            line[metric], line[f"{metric}_train_std"] = mean_std([e[metric] for e in ev])
        for metric in ("bleu", "self_bleu"):  # no shared 4-gram in any sample set: no measurement
            line[f"{metric}_measured"] = all(e.get(f"{metric}_measured", True) for e in ev)
        line["format"] = ev[0]["format"]
        line["leaky"] = bool(ev[0]["leaky"])
        line["train_minutes"] = sum(r["train"]["seconds"] for r in runs) / len(runs) / 60.0
        line["train_precision"] = [r["train"].get("precision") or "?" for r in runs]  # per training seed
        line["eval_minutes"] = sum(e["seconds"] for e in ev) / len(ev) / 60.0
        line["mlflow_row_runs"] = [r["mlflow"]["row"] for r in runs]
        lines.append(line)
    return lines


def _ppl_cell(line: dict, metric: str) -> str:
    """Trained once: mean ± std over evaluation seeds. Trained more than once: mean ± std over
    training seeds (the spread that decides a comparison), then each seed's value."""
    per_seed = line[f"{metric}_per_seed"]
    if len(per_seed) > 1:
        seeds = " / ".join(f"{v:.1f}" for v in per_seed)
        return f"{line[metric]:.1f} ± {line[f'{metric}_train_std']:.1f} ({seeds})"
    return f"{line[metric]:.1f} ± {line[f'{metric}_eval_std']:.1f}"


def _bleu_cell(line: dict, metric: str) -> str:
    if not line.get(f"{metric}_measured", True):
        return "n/a (no 4-gram match)"
    spread = f" ± {line[f'{metric}_train_std']:.4f}" if len(line["training_seeds"]) > 1 else ""
    return f"{line[metric]:.4f}{spread}"


def _precision_cell(line: dict) -> str:
    """One value when every seed trained in it, else each seed's (rows can span machines)."""
    precisions = line.get("train_precision") or ["?"]
    return precisions[0] if len(set(precisions)) == 1 else " / ".join(precisions)


def markdown_table(lines: Sequence[dict], *, label: str) -> str:
    header = (
        "| Row | Method | Init | Schedule | Time | PPL/word | PPL/token | BLEU | Self-BLEU | Entropy (bits) "
        "| Train min | Precision |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for line in lines:
        flags = " (LEAKY)" if line["leaky"] else ""
        flags += " (packed)" if line["format"] == "packed" else ""
        body.append(
            f"| `{line['row']}`{flags} | {line['method']} | {line['init']} | {line['schedule']} | {line['time']} | "
            f"{_ppl_cell(line, 'ppl_word')} | {_ppl_cell(line, 'ppl_token')} | {_bleu_cell(line, 'bleu')} | "
            f"{_bleu_cell(line, 'self_bleu')} | {line['unigram_entropy_bits']:.2f} | {line['train_minutes']:.1f} | "
            f"{_precision_cell(line)} |"
        )
    notes = [f"- `{line['row']}`: {line['note']}" for line in lines if line.get("note")]
    caption = (
        f"{label} numbers. PPL: the bound on the test split, mean ± std over evaluation seeds (one "
        "trained model), or for rows trained more than once mean ± std over training seeds (each "
        "model's mean over evaluation seeds) and each seed's value (`a / b / c`); per token = "
        "content WordPieces, per word = whitespace words of the scored text (a line cut at max_seq_len "
        "counts only its kept words). BLEU-4: mean over samples of each sample's nltk corpus_bleu "
        "against the whole test split, no smoothing (PAPER §7); Self-BLEU: mean over a disjoint sample "
        "set of each sample against the others (± std over training seeds where there are several). "
        "Entropy: unigram entropy of the samples' words, in bits. Train min: wall-clock minutes per "
        "training (mean over seeds) on the machine that ran it; Precision: the training's autocast "
        "per seed (`precision: auto` takes bf16 where the CPU/GPU has it; the bound differs < 0.1%)."
    )
    return caption + "\n\n" + header + "\n".join(body) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


# ---------------------------------------------------------------------------------------------
# The four claims of PAPER §8
# ---------------------------------------------------------------------------------------------


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


def _curve_points(result: dict) -> dict[int, float]:
    curve = result["train"]["curve"]
    return {int(s): v for s, v in zip(curve["step"], curve["val_bound"]) if v is not None}


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
        ca, cb = _curve_points(a), _curve_points(b)
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


def _training_comparison(a_runs: Sequence[dict], b_runs: Sequence[dict]) -> dict | None:
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
    (`_training_comparison`), which then decides."""
    pair = _pair(rows, row, "dbert_linear_tad")
    if pair is None:
        return []
    schedule, linear = pair
    by_seed = {r["seed"]: r for r in linear}
    spread = training_spread(rows)
    comparisons = [_eval_comparison(s, by_seed[s["seed"]], spread) for s in schedule if s["seed"] in by_seed]
    training = _training_comparison(schedule, linear)
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
    (`_training_comparison`), which then decides."""
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
    training = _training_comparison(*pair)
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
        for lo, hi in zip(table, table[1:]):
            interval = difference_interval(
                (hi["ppl_token"], hi.get("ppl_token_std", 0.0), n), (lo["ppl_token"], lo.get("ppl_token_std", 0.0), n)
            )
            steps_pairs.append({"from": lo["steps"], "to": hi["steps"], **interval, "verdict": verdict_lower(interval)})
        faster = all(a < b for a, b in zip(seconds, seconds[1:]))
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


def _fmt_interval(c: dict) -> str:
    return f"{c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"


def _fmt_verdict(c: dict) -> str:
    """An undecided training-seed comparison says what deciding it would take."""
    if c["verdict"] == UNSURE and c.get("seeds_needed"):
        return f"{UNSURE} at this budget, would need ~{c['seeds_needed']} training seeds per row"
    return c["verdict"]


def _fmt_pairs(pairs: Sequence[dict]) -> str:
    cells = [
        f"`{p['a']}` vs `{p['b']}`: {p['verdict']}" + (" (reference, does not decide)" if p["reference"] else "")
        for p in pairs
    ]
    return "   - per pair, on its deciding comparisons: " + "; ".join(cells)


def markdown_claims(claims: Sequence[dict]) -> str:
    """One paragraph per claim: verdict, then each comparison's interval and what it covers."""
    out = []
    for claim in claims:
        out.append(f"{claim['claim']}. **{claim['text']}: {claim['verdict']}.**")
        if claim.get("pairs"):
            out.append(_fmt_pairs(claim["pairs"]))
        for c in claim["comparisons"]:
            if "consecutive" in c:
                cells = ", ".join(
                    f"{s}: {p:.1f}±{(sd or 0):.1f} ({t:.2f} s)"
                    for s, p, sd, t in zip(c["steps"], c["ppl_token"], c["ppl_token_std"], c["seconds_per_sample"])
                )
                out.append(
                    f"   - `{c['a']}` steps → PPL/token ± eval-seed std (s/sample): {cells}; "
                    f"most minus fewest steps {_fmt_interval(c['most_vs_fewest'])}; "
                    f"time rises with steps: {c['time_increases_with_steps']} → {c['verdict']}"
                )
                continue
            how = f"paired over {c['n_a']} evaluation seeds" if c.get("paired") else f"n={c['n_a']}+{c['n_b']}"
            if not c.get("paired") and c.get("df") is not None and math.isfinite(c["high"]):
                how += f", t at {c['df']:.2f} df"
            line = f"   - `{c['a']}` − `{c['b']}` PPL/token: {_fmt_interval(c)} (95%, {c['covers']}, {how}) → {_fmt_verdict(c)}"
            if c.get("reference"):
                line += " (reference row: shown, does not decide the claim)"
            if c.get("eval_only_verdict"):
                line += (
                    f" (against evaluation noise alone: {c['eval_only_verdict']}, but the gap is smaller than "
                    f"the {c['training_seed_spread']:.1f} between two training seeds of one row)"
                )
            if "bert_lower_at_every_eval_step" in c:
                line += (
                    f"; validation bound (nats/token) at the start {c['start_val_bound_bert']:.2f} vs "
                    f"{c['start_val_bound_random']:.2f}, then lower at every later eval step: "
                    f"{c['bert_lower_at_every_eval_step']}; "
                    f"BERT reaches random's final validation bound at step {c['first_step_bert_reaches_random_final']}"
                )
            out.append(line)
    return "\n".join(out) + "\n"
