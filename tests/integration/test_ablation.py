"""The ablation: rows as configurations of one params set, the claims' interval logic, the packed
bound's denominators, and a tiny end-to-end run on real LM1B-sample text with a real MLflow store
(parent run, a child per row, the stages under each child; rerun reuses; numbers trace)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.ablation import claims as cl
from pipeline.ablation import statistics as st
from pipeline.ablation import tables as tb
from pipeline.ablation.rows import ROWS, plan, row_params
from pipeline.artifacts import Layout, read_json, write_json_atomic
from pipeline.config import ABLATION_ROWS, PAPER_ROWS, ParamsError, load_params
from tests.integration.test_stages import REPO, tiny_params
from tests.support.env import without_project_env

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def test_every_paper_row_is_a_valid_configuration_that_changes_only_its_columns():
    base = load_params(None)
    for name in ABLATION_ROWS:
        params = row_params(base, ROWS[name], seed=0)
        flat, base_flat = params.flat(), base.flat()
        changed = {k for k in flat if flat[k] != base_flat[k]}
        allowed = set(ROWS[name].overrides) | {
            "train.steps",
            "evaluate.compare_init",
            "evaluate.table_steps",
            "evaluate.qd_top_k",
            "evaluate.table_sequences",
            "evaluate.table_samples",
            "evaluate.qd_samples",
            "evaluate.num_sequences",
            "evaluate.num_samples",
            "evaluate.seeds",
            "evaluate.conditional_sequences",
            "evaluate.compare_samplers",
        }
        assert changed <= allowed, (name, changed - allowed)
        assert params.train.steps == base.ablation.train_steps
        assert params.evaluate.num_sequences == base.ablation.num_sequences  # the rows' own protocol
        assert params.evaluate.num_samples == base.ablation.num_samples
        assert params.evaluate.seeds == base.ablation.bound_seeds
        assert params.evaluate.conditional_sequences == 0 and params.evaluate.compare_samplers == []  # NOT_IN_ROWS


def test_the_rows_set_what_the_paper_table_names():
    base = load_params(None)
    d3pm = row_params(base, ROWS["d3pm_linear_lte"], 0)
    assert (d3pm.model.random_init, d3pm.model.time_design, d3pm.diffusion.schedule) == (True, "layerwise", "linear")
    mouth = row_params(base, ROWS["bert_mouth"], 0)
    assert (mouth.train.objective, mouth.evaluate.sampler, mouth.model.random_init) == ("mlm", "gibbs", False)
    pte = row_params(base, ROWS["dbert_linear_pte"], 0)
    assert pte.model.time_design == "prefix"
    assert row_params(base, ROWS["dbert_spindle_tad_packed"], 0).train.packed
    assert row_params(base, ROWS["dbert_spindle_paper_tad"], 0).diffusion.schedule == "spindle_paper"


def make_ablations(target: str) -> list[tuple[list[str], list[str]]]:
    """The overrides (an `--experiment` file's, then the `--set` values) and `--row` names of every
    `dbert ablation` command `make -n target` runs."""
    import shlex
    import subprocess

    from pipeline.overrides import experiment_overrides

    make = subprocess.run(["make", "-n", target], capture_output=True, text=True, check=True).stdout
    commands = []
    for command in make.replace("\\\n", " ").split("dbert ablation")[1:]:
        words = shlex.split(command.split("&")[0].split(";")[0])
        pairs = list(itertools.pairwise(words))
        files = [experiment_overrides(REPO / v) for k, v in pairs if k in ("--experiment", "-e")]
        sets = [item for overrides in files for item in overrides] + [v for k, v in pairs if k == "--set"]
        commands.append((sets, [v for k, v in pairs if k == "--row"]))
    return commands


def test_the_schedule_experiment_preset_plans_three_seeds_of_each_schedule_in_its_own_folder():
    ((sets, rows),) = make_ablations("schedules")
    assert not rows
    base = load_params(None, sets)
    runs = plan(base)
    schedules = {r.params.diffusion.schedule for r in runs}
    assert {"linear", "spindle", "power", "loglinear"} <= schedules
    for schedule in schedules - {"spindle_paper"}:
        seeds = {
            r.seed for r in runs if r.params.diffusion.schedule == schedule and r.params.model.time_design == "none"
        }
        assert len(seeds) >= 3, schedule
    assert all(r.params.train.steps >= 2000 and r.params.evaluate.num_sequences >= 1024 for r in runs)
    assert base.ablation.out != "outputs/ablation"  # never mixes with the paper's table
    assert base.ablation.publish == "reports/schedules"  # rows land in git as they finish
    assert len(base.ablation.bound_seeds) >= 2  # a mean and a spread over chain seeds (PAPER §7)
    assert row_params(base, ROWS["mdlm_loglinear_tad"], 0).diffusion.schedule == "loglinear"


def test_the_two_halves_of_schedules_parallel_cover_the_plan_once_in_their_own_folders_then_merge():
    (sets, _), *_ = make_ablations("schedules")
    (a_sets, a_rows), (b_sets, b_rows), (merge_sets, merge_rows) = make_ablations("schedules-parallel")
    whole = [r.key for r in plan(load_params(None, sets))]
    halves = [[r.key for r in plan(load_params(None, s), rows)] for s, rows in ((a_sets, a_rows), (b_sets, b_rows))]
    assert sorted(halves[0] + halves[1]) == sorted(whole) and not set(halves[0]) & set(halves[1])
    outs = {load_params(None, s).ablation.out for s in (a_sets, b_sets)}
    assert len(outs) == 2  # each half its own state.json and rows
    assert {load_params(None, s).ablation.publish for s in (a_sets, b_sets)} == {"reports/schedules"}
    assert (merge_sets, merge_rows) == (sets, [])  # the merge is make schedules: reuses all 14 rows


def test_one_param_switches_every_row_to_another_bert():
    base = load_params(None, ["model.name_or_path=bert-base-uncased"])
    assert {r.params.model.name_or_path for r in plan(base)} == {"bert-base-uncased"}


def test_plan_repeats_the_spindle_linear_pair_with_the_second_training_seed():
    runs = plan(load_params(None))
    keys = [r.key for r in runs]
    rows = list(load_params(None).ablation.rows)
    assert rows == list(PAPER_ROWS)  # the default plan is the paper's table; the schedule rows are opt-in
    assert keys[: len(rows)] == rows
    assert keys[len(rows) :] == ["dbert_spindle_tad.seed1", "dbert_linear_tad.seed1"]
    assert [r.params.train.seed for r in runs[-2:]] == [1, 1]
    assert len({r.fingerprint for r in runs}) == len(runs)


def test_only_the_detail_row_gets_the_steps_table_and_top_k_curve():
    runs = {r.key: r.params.evaluate for r in plan(load_params(None))}
    assert runs["dbert_spindle_tad"].table_steps and runs["dbert_spindle_tad"].qd_top_k
    assert runs["dbert_spindle_tad"].table_sequences == 128
    for key, ev in runs.items():
        if key != "dbert_spindle_tad":
            assert ev.table_steps == [] and ev.qd_top_k == [], key


def test_unknown_rows_are_refused_with_their_names():
    with pytest.raises(ValueError, match="nope"):
        plan(load_params(None), only=["nope"])
    with pytest.raises(ParamsError, match=r"ablation.rows"):
        load_params(None, ["ablation.rows=[nope]"])
    with pytest.raises(ParamsError, match=r"ablation.seeds"):
        load_params(None, ["ablation.seeds=[1,1]"])


# ---------------------------------------------------------------------------------------------
# Intervals and claims
# ---------------------------------------------------------------------------------------------


def test_difference_interval_is_the_welch_t_interval():
    out = st.difference_interval((10.0, 1.0, 3), (12.0, 2.0, 3))
    # Welch-Satterthwaite: (1/3 + 4/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17 df, t(0.975, 50/17) = 3.21876 (mpmath)
    assert out["df"] == pytest.approx(50 / 17)
    half = 3.218759 * math.sqrt(1 / 3 + 4 / 3)
    assert out["difference"] == -2.0
    assert out["low"] == pytest.approx(-2.0 - half) and out["high"] == pytest.approx(-2.0 + half)
    assert cl.verdict_lower(out) == cl.UNSURE
    assert cl.verdict_lower(st.difference_interval((10.0, 0.1, 3), (12.0, 0.1, 3))) == cl.HOLDS
    assert cl.verdict_lower(st.difference_interval((12.0, 0.1, 3), (10.0, 0.1, 3))) == cl.FAILS


def test_one_value_per_side_gives_no_interval_and_no_verdict():
    out = st.difference_interval((10.0, 0.0, 1), (12.0, 0.0, 1))
    assert out["low"] == -math.inf and out["high"] == math.inf
    assert cl.verdict_lower(out) == cl.UNSURE


def test_paired_interval_cancels_noise_shared_by_seed():
    a = [{"seed": 0, "ppl_token": 565.5}, {"seed": 1, "ppl_token": 534.1}, {"seed": 2, "ppl_token": 519.4}]
    b = [{"seed": 0, "ppl_token": 560.5}, {"seed": 1, "ppl_token": 529.3}, {"seed": 2, "ppl_token": 514.2}]
    paired = st.paired_interval(a, b)
    unpaired = st.difference_interval(
        (*st.mean_std([r["ppl_token"] for r in a]), 3), (*st.mean_std([r["ppl_token"] for r in b]), 3)
    )
    assert paired["difference"] == pytest.approx(unpaired["difference"])
    assert cl.verdict_lower(unpaired) == cl.UNSURE and paired["low"] > 0  # a is reliably worse
    assert paired["high"] - paired["low"] < (unpaired["high"] - unpaired["low"]) / 10


def test_a_gap_smaller_than_two_trainings_of_one_row_stays_undecided():
    def with_runs(result, values):
        result["evaluate"]["runs"] = [{"seed": s, "ppl_token": v} for s, v in enumerate(values)]
        return result

    results = [
        with_runs(fake("dbert_linear_tad", 0, 101.0), [111.0, 101.0, 91.0]),
        with_runs(fake("dbert_linear_pte", 0, 98.0), [108.0, 98.0, 88.0]),
        with_runs(fake("dbert_linear_tad", 1, 105.0), [115.0, 105.0, 95.0]),
    ]
    comparison = cl.check_claims(results)[2]["comparisons"][0]
    assert comparison["eval_only_verdict"] == cl.FAILS and comparison["training_seed_spread"] == 4.0
    assert comparison["verdict"] == cl.UNSURE


def fake(row: str, seed: int, ppl: float, std: float = 0.5, curve=(9.0, 8.0, 7.0), table=None) -> dict:
    spec = ROWS[row]
    return {
        "key": row if seed == 0 else f"{row}.seed{seed}",
        "row": row,
        "seed": seed,
        "method": spec.method,
        "init": spec.init,
        "schedule": spec.schedule,
        "time": spec.time,
        "note": spec.note,
        "mlflow": {"row": f"run-{row}-{seed}"},
        "train": {"seconds": 60.0, "curve": {"step": [50, 100, 150], "val_bound": list(curve)}},
        "evaluate": {
            "ppl_token_mean": ppl,
            "ppl_token_std": std,
            "ppl_word_mean": 2 * ppl,
            "ppl_word_std": 2 * std,
            "seeds": [0, 1, 2],
            "bleu": 0.2,
            "self_bleu": 0.3,
            "unigram_entropy_bits": 7.0,
            "format": "padded",
            "leaky": spec.schedule == "spindle_paper",
            "seconds": 30.0,
            "steps_table": table or [],
            "quality_diversity": [],
        },
    }


def test_claims_hold_fail_or_stay_open_as_the_numbers_say():
    results = [
        fake("dbert_linear_tad", 0, 100.0, curve=(10.0, 7.0, 6.0)),
        fake("d3pm_linear_tad", 0, 300.0),
        fake("dbert_linear_lte", 0, 100.3),
        fake("d3pm_linear_lte", 0, 290.0, curve=(9.5, 7.4, 7.3)),
        fake("dbert_linear_pte", 0, 80.0),
        fake("dbert_spindle_tad", 0, 90.0),
        fake("dbert_spindle_tad", 1, 91.0),
        fake("dbert_linear_tad", 1, 99.0),
    ]
    claims = {c["claim"]: c for c in cl.check_claims(results)}
    first = claims[1]["comparisons"]
    assert first[0]["verdict"] == cl.HOLDS and first[0]["bert_lower_at_every_eval_step"]
    # a worse start does not count against "faster"; lower at the end but not at step 100 does
    assert first[1]["verdict"] == cl.UNSURE and not first[1]["bert_lower_at_every_eval_step"]
    assert claims[1]["verdict"] == cl.UNSURE
    assert claims[2]["verdict"] == cl.HOLDS  # decided on the training-seed interval
    assert claims[2]["comparisons"][-1]["covers"].startswith("training seeds")
    tad = {c["b"]: c["verdict"] for c in claims[3]["comparisons"]}
    assert tad == {
        "dbert_linear_lte": cl.UNSURE,
        "dbert_linear_pte": cl.FAILS,
        # LTE/PTE trained once: TAD's two seeds (99, 100; std 0.707) give both sides' spread, and
        # these intervals decide: 99.5 - 80 = 19.5 ± t(1) 12.706 x 0.707 x sqrt(1/2 + 1) = 11.0
        "dbert_linear_lte (all seeds)": cl.UNSURE,
        "dbert_linear_pte (all seeds)": cl.FAILS,
    }
    pte = claims[3]["comparisons"][-1]
    assert pte["decides"] and "std stands for both" in pte["covers"]
    assert (pte["low"], pte["high"]) == pytest.approx((19.5 - 11.004, 19.5 + 11.004), abs=1e-3)
    assert claims[3]["verdict"] == cl.UNSURE
    assert claims[4]["verdict"] == "not run (rows missing)"


def test_steps_claim_needs_rising_time_and_a_bound_that_does_not_get_worse():
    def row(steps, ppl, secs):
        return {
            "steps": steps,
            "ppl_token": ppl,
            "ppl_token_std": 0.1,
            "seconds_per_sample": secs,
            "seeds": [0, 1, 2],
            "bleu": 0.1,
            "self_bleu": 0.2,
        }

    smooth = [row(2, 300.0, 0.1), row(8, 120.0, 0.2), row(64, 90.0, 0.9)]
    bumpy = [row(2, 300.0, 0.1), row(8, 120.0, 0.2), row(64, 150.0, 0.9)]
    assert cl.check_claims([fake("dbert_spindle_tad", 0, 90.0, table=smooth)])[3]["verdict"] == cl.HOLDS
    assert cl.check_claims([fake("dbert_spindle_tad", 0, 90.0, table=bumpy)])[3]["verdict"] == cl.FAILS


def test_mean_curves_average_the_seeds_at_the_steps_they_all_evaluated(tmp_path):
    a = fake("dbert_linear_tad", 0, 90.0, curve=(9.0, 8.0, 7.0))
    b = fake("dbert_linear_tad", 1, 91.0, curve=(10.0, 6.0, None))  # its step-150 evaluation is missing
    c = fake("dbert_spindle_tad", 0, 80.0, curve=(9.5, 7.5, 6.5))
    curves = tb.mean_curves([b, c, a])
    assert curves["dbert_linear_tad"] == {
        "step": [50.0, 100.0],
        "mean": [9.5, 7.0],
        "low": [9.0, 6.0],
        "high": [10.0, 8.0],
        "seeds": [2.0],
    }
    assert curves["dbert_spindle_tad"]["mean"] == [9.5, 7.5, 6.5] and curves["dbert_spindle_tad"]["seeds"] == [1.0]
    from pipeline.viz import band_curves_plot

    png = band_curves_plot(tmp_path / "c.png", curves, zoom_from=100)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_flags_leaky_and_packed_rows_and_shows_both_training_seeds():
    results = [
        fake("dbert_spindle_tad", 0, 90.0),
        fake("dbert_spindle_tad", 1, 91.0),
        fake("dbert_spindle_paper_tad", 0, 40.0),
    ]
    results[0]["evaluate"]["format"] = results[1]["evaluate"]["format"] = "padded"
    text = tb.markdown_table(tb.table_rows(results), label="LM1B-sample")
    assert "LM1B-sample numbers" in text
    assert "90.0 / 91.0" in text and "(LEAKY)" in text and "40.0 ± 0.5" in text
    # mean ± std over the two training seeds: sqrt(((90 - 90.5)^2 + (91 - 90.5)^2) / 1) = 0.707
    assert "90.5 ± 0.7 (90.0 / 91.0)" in text


def test_the_table_shows_each_rows_training_precision_and_each_seeds_where_they_differ():
    results = [fake("dbert_linear_tad", 0, 90.0), fake("dbert_linear_tad", 1, 91.0), fake("dbert_spindle_tad", 0, 89.0)]
    results[0]["train"]["precision"] = "fp32"  # seed 0 ran on a machine without fast bf16
    results[1]["train"]["precision"] = results[2]["train"]["precision"] = "bf16"
    lines = {line["row"]: line for line in tb.table_rows(results)}
    assert lines["dbert_linear_tad"]["train_precision"] == ["fp32", "bf16"]
    table = tb.markdown_table(list(lines.values()), label="LM1B-sample").splitlines()
    assert table[2].endswith("| Train min | Precision |")
    linear = next(t for t in table if t.startswith("| `dbert_linear_tad`"))
    spindle = next(t for t in table if t.startswith("| `dbert_spindle_tad`"))
    assert linear.endswith("| fp32 / bf16 |") and spindle.endswith("| bf16 |")


# ---------------------------------------------------------------------------------------------
# Packed bound
# ---------------------------------------------------------------------------------------------


def test_packed_rows_count_content_tokens_and_share_words_across_cut_sentences():
    from pipeline.data.tokenize import TokenizedSplit
    from pipeline.eval.bound import PackedRows

    cls, sep = 101, 102
    sentences = [[cls, 5, 6, 7, sep], [cls, 8, 9, sep], [cls, 10, 11, 12, 13, sep]]  # 3, 2, 4 content
    ids = np.array([t for s in sentences for t in s], dtype=np.int32)
    offsets = np.cumsum([0] + [len(s) for s in sentences]).astype(np.int64)
    split = TokenizedSplit(ids, offsets, np.array([3, 1, 2], dtype=np.int32))
    rows = PackedRows(split, seq_len=6)  # 15 ids -> 2 rows of 6, the last 3 dropped
    assert len(rows) == 2 and rows[0].tolist() == [cls, 5, 6, 7, sep, cls]
    kept = ids[:12]
    assert rows.num_content_tokens == int(((kept != cls) & (kept != sep)).sum()) == 7
    # row 0: sentence 1 whole (3 words); row 1: sentence 2 whole (1 word) + 2 of sentence 3's 4 pieces (1 word)
    assert rows.word_counts.tolist() == pytest.approx([3.0, 2.0])


# ---------------------------------------------------------------------------------------------
# End to end (tiny model, real text, real MLflow)
# ---------------------------------------------------------------------------------------------


TINY_ABLATION = [
    "ablation.rows=[dbert_spindle_tad,dbert_linear_tad,d3pm_linear_tad,dbert_spindle_tad_packed]",
    "ablation.train_steps=4",
    "ablation.table_sequences=4",
    "ablation.num_sequences=16",  # the rows' own evaluation sizes (defaults 256 and 128: minutes here)
    "ablation.num_samples=4",
    "ablation.detail_samples=4",
    "ablation.bound_seeds=[0,1]",
    "ablation.table_steps=[2,4]",  # the detail row's own table and curve (the tiny evaluate.* ones are ignored)
    "ablation.qd_top_k=[1,0]",
    "ablation.publish=reports/tiny",  # finished rows and the report so far, as a committed folder gets them
]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, lm1b_dir):
    """A tiny ablation: four rows, the spindle/linear pair twice, in a tmp project."""
    from stages import ablation, prepare, token_stats

    mp = without_project_env()
    root = tmp_path_factory.mktemp("ablation")
    params = tiny_params(lm1b_dir, *TINY_ABLATION)
    prepare.run(params, root)
    token_stats.run(params, root)
    seen: list[tuple[str, str]] = []
    published_before: list[int] = []  # rows the published report held when each row began

    def on_row(index: int, total: int, key: str, status: str) -> None:
        seen.append((key, status))
        report = root / "reports/tiny/report/report.json"
        if status == "start":
            published_before.append(read_json(report)["rows_finished"] if report.is_file() else 0)

    progressed: dict[str, list[tuple[int, int | None]]] = {}  # task -> its (advance, total) calls
    summary = ablation.run(
        params, root, on_row=on_row, progress=lambda task, n, total: progressed.setdefault(task, []).append((n, total))
    )
    mp.undo()
    return {
        "root": root,
        "params": params,
        "summary": summary,
        "seen": seen,
        "published_before": published_before,
        "progressed": progressed,
    }


def _runs(root):
    import mlflow

    from pipeline.tracking.store import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name("diffusionbert")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_ablation_writes_a_report_with_every_row_and_plots(ablated):
    from pipeline.artifacts import read_json

    out = ablated["root"] / "outputs/ablation/report"
    report = read_json(out / "report.json")
    assert [r["key"] for r in report["rows"]] == [
        "dbert_spindle_tad",
        "dbert_linear_tad",
        "d3pm_linear_tad",
        "dbert_spindle_tad_packed",
        "dbert_spindle_tad.seed1",
        "dbert_linear_tad.seed1",
    ]
    assert report["label"] == "LM1B-sample" and report["budget"]["train_steps"] == 4
    assert [c["claim"] for c in report["claims"]] == [1, 2, 3, 4]
    for name in ("report.md", "curves.png", "curves_by_row.png", "quality_diversity.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "`dbert_spindle_tad_packed` (packed)" in text and "LM1B-sample numbers" in text
    packed = next(r for r in report["rows"] if r["key"] == "dbert_spindle_tad_packed")
    assert packed["evaluate"]["format"] == "packed"
    detail = report["rows"][0]["evaluate"]
    assert [r["steps"] for r in detail["steps_table"]] == [2, 4] and detail["quality_diversity"]
    for row in report["rows"]:
        ev = row["evaluate"]
        assert ev["split"] == "test" and ev["seeds"] == [0, 1] and ev["time_grid"]
        assert row["train"]["curve"]["step"][-1] == 4
    assert report["budget"]["evaluation"]["seeds"] == [0, 1]  # the rows' ablation.bound_seeds, not evaluate.seeds
    assert report["rows_finished"] == report["rows_planned"] == 6 and "Partial" not in text


def test_each_rows_progress_counts_its_own_steps_from_zero(ablated):
    """One process trains every row: a shared "training" task counted on from the first row's
    steps ("training: 8/4 (200%)" in the log of the second row)."""
    trained = [key for key, status in ablated["seen"] if status == "start"]
    steps = ablated["params"].ablation.train_steps
    for key in trained:
        calls = ablated["progressed"][f"{key}: training"]
        assert sum(n for n, _ in calls) == steps and {total for _, total in calls} == {steps}, key
    assert not any(task.startswith("training") for task in ablated["progressed"])


def test_rows_are_published_as_they_land_and_a_fresh_checkout_reuses_them(ablated, tmp_path):
    """ablation.publish: a long experiment commits its finished rows as they land, and a checkout
    that has only that committed folder (no outputs/) reuses them instead of training again."""
    import shutil

    from stages import ablation

    root, params = ablated["root"], ablated["params"]
    assert ablated["published_before"] == [0, 1, 2, 3, 4, 5]  # the report so far, after every row
    published = read_json(root / "reports/tiny/report/report.json")
    assert published["rows_finished"] == published["rows_planned"] == 6
    for key in [r["key"] for r in published["rows"]]:
        mine = read_json(root / "outputs/ablation/rows" / key / "result.json")
        assert read_json(root / "reports/tiny/rows" / key / "result.json")["fingerprint"] == mine["fingerprint"]
    fresh = tmp_path / "fresh"
    shutil.copytree(root / "reports", fresh / "reports")
    for name in ("prepared", "token_stats"):
        shutil.copytree(root / "data" / name, fresh / "data" / name)
    seen: list[tuple[str, str]] = []
    mp = without_project_env()
    try:
        ablation.run(params, fresh, on_row=lambda i, n, key, status: seen.append((key, status)))
    finally:
        mp.undo()
    assert {status for _, status in seen} == {"reused"}
    _, runs = _runs(fresh)
    assert not {"train", "evaluate"} & {r.data.tags.get("stage") for r in runs}
    # a published row with other params is not taken: it is measured again
    other = params.model_copy(deep=True)
    other.ablation.rows = ["dbert_linear_tad"]
    other.ablation.train_steps = 5
    run = plan(other)[0]
    ablation._reuse_published(run, Layout(fresh / "elsewhere"), fresh / "reports/tiny")
    assert not (fresh / "elsewhere" / "outputs/ablation/rows/dbert_linear_tad/result.json").exists()


def test_each_half_of_a_split_experiment_publishes_the_report_of_the_whole_plan(tmp_path):
    """make schedules-parallel: two runs with their own --row halves share ablation.publish; each
    one's report so far holds its own rows and the rows the other half published with the same
    params (plan order, planned = the whole plan), never a published row with other params."""
    from stages import ablation

    rows = "ablation.rows=[dbert_linear_tad,dbert_spindle_tad,dbert_power_tad]"
    params = load_params(None, [rows, "ablation.seeds=[0,1]", "ablation.repeat_rows=[dbert_linear_tad]"])
    runs = {r.key: r for r in plan(params)}  # linear, spindle, power, linear.seed1
    publish = tmp_path / "reports"

    def finished(key: str, ppl: float, fingerprint: str | None = None) -> dict:
        run = runs[key]
        return {**fake(run.row.name, run.seed, ppl), "fingerprint": fingerprint or run.fingerprint}

    mine = [finished("dbert_power_tad", 95.0)]  # this half: power
    write_json_atomic(finished("dbert_spindle_tad", 90.0), publish / "rows/dbert_spindle_tad/result.json")
    write_json_atomic(finished("dbert_linear_tad", 100.0), publish / "rows/dbert_linear_tad/result.json")
    stale = finished("dbert_linear_tad.seed1", 99.0, fingerprint="other-params")
    write_json_atomic(stale, publish / "rows/dbert_linear_tad.seed1/result.json")
    report = ablation._published_report(params, mine, publish, "parent")
    assert [r["key"] for r in report["rows"]] == ["dbert_linear_tad", "dbert_spindle_tad", "dbert_power_tad"]
    assert (report["rows_finished"], report["rows_planned"]) == (3, 4)
    assert report["rows"][2] is mine[0]


def test_report_only_renders_the_finished_rows_and_trains_nothing(tmp_path):
    """`dbert ablation --report-only`: the rows finished here or published (with these params), in
    plan order, into the published report; no row is trained, no MLflow run is opened."""
    from stages import ablation

    rows = "ablation.rows=[dbert_linear_tad,dbert_spindle_tad,dbert_power_tad]"
    params = load_params(
        None, [rows, "ablation.seeds=[0,1]", "ablation.repeat_rows=[dbert_linear_tad]", "ablation.publish=reports/x"]
    )
    runs = {r.key: r for r in plan(params)}

    def finished(key: str, ppl: float, fingerprint: str | None = None) -> dict:
        run = runs[key]
        return {**fake(run.row.name, run.seed, ppl), "fingerprint": fingerprint or run.fingerprint}

    with pytest.raises(FileNotFoundError, match="no finished row of this plan"):
        ablation.report_only(params, tmp_path)
    assert not (tmp_path / "reports/x/report").exists()
    out, publish = tmp_path / "outputs/ablation", tmp_path / "reports/x"
    write_json_atomic(finished("dbert_power_tad", 95.0), out / "rows/dbert_power_tad/result.json")  # here only
    write_json_atomic(finished("dbert_spindle_tad", 90.0), publish / "rows/dbert_spindle_tad/result.json")
    stale = finished("dbert_linear_tad", 99.0, fingerprint="other-params")
    write_json_atomic(stale, publish / "rows/dbert_linear_tad/result.json")
    write_json_atomic({"parent_run_id": "p123"}, out / "state.json")

    summary = ablation.report_only(params, tmp_path)
    report = read_json(publish / "report/report.json")
    assert [r["key"] for r in report["rows"]] == ["dbert_spindle_tad", "dbert_power_tad"]
    assert (report["rows_finished"], report["rows_planned"]) == (2, 4)
    assert report["command"] == "dbert ablation --report-only" and report["mlflow_parent_run_id"] == "p123"
    assert (publish / "report/curves_by_row.png").is_file() and "Partial: 2 of 4" in (
        publish / "report/report.md"
    ).read_text()
    assert read_json(publish / "rows/dbert_power_tad/result.json")["fingerprint"] == runs["dbert_power_tad"].fingerprint
    assert summary["report"] == str(publish / "report") and summary["rows"] == 2
    assert not (out / "rows/dbert_linear_tad").exists() and not list(tmp_path.rglob("mlflow.db"))
    assert "trained_by" not in report  # the earlier report was none: nothing to carry

    # A re-render of a published report (fresh checkout: no state.json) keeps who trained the rows.
    (out / "state.json").unlink()
    write_json_atomic(
        {**report, "command": "dbert ablation --set x=1", "git_commit": "abc"}, publish / "report/report.json"
    )
    ablation.report_only(params, tmp_path, command="dbert ablation --report-only")
    again = read_json(publish / "report/report.json")
    assert again["mlflow_parent_run_id"] == "p123"
    assert again["trained_by"] == {"command": "dbert ablation --set x=1", "git_commit": "abc"}
    assert "trained by `dbert ablation --set x=1` at commit `abc`" in (publish / "report/report.md").read_text()
    ablation.report_only(params, tmp_path)  # a re-render of a re-render still names the training
    assert read_json(publish / "report/report.json")["trained_by"]["command"] == "dbert ablation --set x=1"


def test_choosing_gamma_changes_only_the_power_rows(tmp_path):
    """diffusion.power_gamma is read by the power schedule alone: a Tune sweep that picks it must
    not make the linear or spindle rows stale, while the power row and the parent run see it."""
    from pipeline.ablation.rows import plan_fingerprint

    rows = "ablation.rows=[dbert_linear_tad,dbert_spindle_tad,dbert_power_tad]"
    one, two = load_params(None, [rows]), load_params(None, [rows, "diffusion.power_gamma=2.5"])
    a, b = {r.key: r for r in plan(one)}, {r.key: r for r in plan(two)}
    for key in ("dbert_linear_tad", "dbert_spindle_tad"):
        assert (a[key].fingerprint, a[key].train_fingerprint) == (b[key].fingerprint, b[key].train_fingerprint)
    assert a["dbert_power_tad"].fingerprint != b["dbert_power_tad"].fingerprint
    assert a["dbert_power_tad"].train_fingerprint != b["dbert_power_tad"].train_fingerprint
    assert plan_fingerprint(one) != plan_fingerprint(two)  # the parent run logs every param


def test_mlflow_holds_one_parent_a_child_per_row_and_the_stages_under_each(ablated):
    from pipeline.artifacts import read_json

    client, runs = _runs(ablated["root"])
    by_id = {r.info.run_id: r for r in runs}
    parent_id = ablated["summary"]["mlflow_run_id"]
    assert by_id[parent_id].data.tags["stage"] == "ablation"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        [
            "dbert_spindle_tad",
            "dbert_linear_tad",
            "d3pm_linear_tad",
            "dbert_spindle_tad_packed",
            "dbert_spindle_tad.seed1",
            "dbert_linear_tad.seed1",
        ]
    )
    report = read_json(ablated["root"] / "outputs/ablation/report/report.json")
    for row in report["rows"]:
        child = by_id[row["mlflow"]["row"]]
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.metrics["ppl_token_mean"] == pytest.approx(row["evaluate"]["ppl_token_mean"])
        stages = {by_id[i].data.tags["stage"] for i in (row["mlflow"][s] for s in ("schedule", "train", "evaluate"))}
        assert stages == {"schedule", "train", "evaluate"}
        for stage in ("schedule", "train", "evaluate"):
            assert by_id[row["mlflow"][stage]].data.tags["mlflow.parentRunId"] == row["mlflow"]["row"]
    for line in report["table"]:
        assert by_id[parent_id].data.metrics[f"{line['row']}.ppl_token"] == pytest.approx(line["ppl_token"])
    assert "report/report.json" in {a.path for a in client.list_artifacts(parent_id, "report")}


def test_a_second_run_reuses_finished_rows_and_an_interrupted_row_gives_the_same_numbers(ablated):
    from pipeline.artifacts import read_json
    from stages import ablation

    root, params = ablated["root"], ablated["params"]
    before = read_json(root / "outputs/ablation/report/report.json")
    _, runs_before = _runs(root)
    row = root / "outputs/ablation/rows/dbert_linear_tad"
    (row / "result.json").unlink()  # as if it had been killed during its evaluation
    (root / "reports/tiny/rows/dbert_linear_tad/result.json").unlink()  # (and never published)
    seen: list[tuple[str, str]] = []
    summary = ablation.run(params, root, on_row=lambda i, n, key, status: seen.append((key, status)))
    assert summary["mlflow_run_id"] == ablated["summary"]["mlflow_run_id"]  # the parent run is reopened
    assert dict(seen)["dbert_spindle_tad"] == "reused" and dict(seen)["dbert_linear_tad"] == "done"
    _, runs_after = _runs(root)
    new = {r.data.tags.get("stage") for r in runs_after} and [
        r for r in runs_after if r.info.run_id not in {x.info.run_id for x in runs_before}
    ]
    assert sorted(r.data.tags["stage"] for r in new) == ["evaluate", "schedule"]  # no retraining
    after = read_json(root / "outputs/ablation/report/report.json")
    old_row = next(r for r in before["rows"] if r["key"] == "dbert_linear_tad")
    new_row = next(r for r in after["rows"] if r["key"] == "dbert_linear_tad")
    assert new_row["evaluate"]["runs"] == old_row["evaluate"]["runs"]  # the same bound twice
    assert new_row["mlflow"]["row"] == old_row["mlflow"]["row"]


def test_cli_ablation_refuses_an_unknown_row_in_one_line(tmp_path, lm1b_dir):
    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["ablation", "--root", str(tmp_path), "--row", "nope"])
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown ablation row(s) ['nope']") and result.output.count("\n") == 1
    assert not (tmp_path / "outputs").exists()


def test_cli_report_only_says_in_one_line_when_nothing_has_finished_and_refuses_row_choices(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["ablation", "--root", str(tmp_path), "--report-only"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: no finished row of this plan in ")
    result = CliRunner().invoke(
        app, ["ablation", "--root", str(tmp_path), "--report-only", "--row", "dbert_linear_tad"]
    )
    assert result.exit_code == 2 and "drop --row" in result.output
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_report_names_the_command_line_that_wrote_it(tmp_path, monkeypatch):
    """`make schedules` runs `dbert ablation --set ...`: the report says so, not a bare `dbert ablation`."""
    import sys

    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    first = plan(load_params(tmp_path / "params.yaml"))[0]
    result = {**fake(first.row.name, first.seed, 90.0), "fingerprint": first.fingerprint}
    write_json_atomic(result, tmp_path / "outputs/ablation/rows" / first.key / "result.json")
    argv = ["ablation", "--root", str(tmp_path), "--set", "ablation.publish=", "--report-only"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/.venv/bin/dbert", *argv])
    outcome = CliRunner().invoke(app, argv)
    assert outcome.exit_code == 0, outcome.output
    report = read_json(tmp_path / "outputs/ablation/report/report.json")
    assert report["command"] == f"dbert ablation --root {tmp_path} --set ablation.publish= --report-only"
    assert f"Command: `{report['command']}`" in (tmp_path / "outputs/ablation/report/report.md").read_text()


def test_changing_only_the_evaluation_re_evaluates_without_retraining(ablated):
    from pipeline.artifacts import read_json
    from stages import ablation

    root = ablated["root"]
    params = ablated["params"].model_copy(deep=True)
    params.ablation.detail_samples = 3  # the detail row's evaluation only
    _, runs_before = _runs(root)
    seen: list[tuple[str, str]] = []
    ablation.run(params, root, on_row=lambda i, n, key, status: seen.append((key, status)))
    assert dict(seen)["dbert_spindle_tad"] == "done" and dict(seen)["dbert_linear_tad"] == "reused"
    _, runs_after = _runs(root)
    new = [r for r in runs_after if r.info.run_id not in {x.info.run_id for x in runs_before}]
    assert "train" not in {r.data.tags.get("stage") for r in new}
    detail = read_json(root / "outputs/ablation/rows/dbert_spindle_tad/result.json")
    assert detail["evaluate"]["steps_table"][0]["num_samples"] == 3
    # a new parent (the ablation params changed): every row is its child, reused rows point back
    client, _ = _runs(root)
    report = read_json(root / "outputs/ablation/report/report.json")
    parents = {r["key"]: client.get_run(r["mlflow"]["row"]).data.tags["mlflow.parentRunId"] for r in report["rows"]}
    assert set(parents.values()) == {report["mlflow_parent_run_id"]}
    reused = next(r for r in report["rows"] if r["key"] == "dbert_linear_tad")
    assert (
        client.get_run(reused["mlflow"]["train"]).data.tags["mlflow.parentRunId"] == reused["mlflow"]["trained_in_row"]
    )


def test_the_carried_rows_are_still_reused_by_the_current_params_and_code():
    """reports/ablation/rows/ carries rows measured in an earlier sitting; a param added since
    (plumbing, or a new one at its neutral default) must not change their fingerprints, or the
    next `make ablation` silently re-measures hours of rows."""
    import json

    from pipeline.ablation.rows import plan
    from pipeline.config import load_params

    root = Path(__file__).resolve().parents[2]
    carried = sorted((root / "reports" / "ablation" / "rows").glob("*/result.json"))
    if not carried:
        pytest.skip("no carried rows")
    runs = {run.key: run for run in plan(load_params(root / "params.yaml"))}
    for path in carried:
        result = json.loads(path.read_text())
        run = runs[result["key"]]
        assert (result["fingerprint"], result["train_fingerprint"]) == (run.fingerprint, run.train_fingerprint), path


def test_a_rows_training_time_is_on_disk_at_every_report_not_only_when_training_ends(tmp_path, monkeypatch):
    """A session killed outright runs no `finally`: timing.json must already hold the time so far."""
    from stages import ablation, evaluate, samplers, schedule, train

    row_root = tmp_path / "row"
    row_root.mkdir()
    write_json_atomic({"train": 100.0, "evaluate": 0.0}, row_root / "timing.json")  # an earlier session's
    on_disk_mid_training: list[dict] = []
    reported: list[tuple] = []

    def training(params, root, resume, progress, tracking_uri):
        progress("training", 100, 2000)  # the driver's first report (a checkpoint has just landed)
        on_disk_mid_training.append(read_json(row_root / "timing.json"))

    monkeypatch.setattr(schedule, "run", lambda *a, **k: None)
    monkeypatch.setattr(train, "run", training)
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: None)
    monkeypatch.setattr(samplers, "run", lambda *a, **k: None)
    params = load_params(REPO / "params.yaml")
    seconds = ablation._train_and_evaluate(params, row_root, lambda *a: reported.append(a), "sqlite:///x.db")
    assert reported == [("training", 100, 2000)]  # the caller's progress still sees every report
    assert len(on_disk_mid_training) == 1 and on_disk_mid_training[0]["train"] > 100.0
    assert seconds["train"] >= on_disk_mid_training[0]["train"]


def test_a_row_killed_before_its_first_checkpoint_trains_again_instead_of_failing(tmp_path, monkeypatch):
    """Its run is recorded but nothing was saved: `resume=True` would stop on "nothing to resume"."""
    from pipeline.train.ray.runs import record_run
    from stages import ablation, evaluate, samplers, schedule, train

    row_root = tmp_path / "row"
    record_run(Layout(row_root), "train-killed", row_root / "ray_results", num_workers=0)
    resumed: list[bool] = []
    monkeypatch.setattr(schedule, "run", lambda *a, **k: None)
    monkeypatch.setattr(train, "run", lambda params, root, resume, progress, tracking_uri: resumed.append(resume))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: None)
    monkeypatch.setattr(samplers, "run", lambda *a, **k: None)
    ablation._train_and_evaluate(load_params(REPO / "params.yaml"), row_root, None, "sqlite:///x.db")
    assert resumed == [False]


def test_cli_ablation_reads_an_experiment_file_and_its_report_names_the_file(tmp_path):
    """`--experiment FILE`: the file's params (here its rows and folders), and the report's command
    line names the file. The schedule experiment's published rows re-render into a report."""
    import shutil

    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    experiment = REPO / "experiments/schedules.yaml"
    result = CliRunner().invoke(
        app, ["ablation", "--root", str(tmp_path), "--experiment", str(experiment), "--report-only"]
    )
    assert (
        result.exit_code == 1
        and "outputs/schedules/rows" in result.output
        and "reports/schedules/rows" in result.output
    )
    shutil.copytree(REPO / "reports/schedules/rows", tmp_path / "reports/schedules/rows")
    result = CliRunner().invoke(app, ["ablation", "--root", str(tmp_path), "-e", str(experiment), "--report-only"])
    assert result.exit_code == 0, result.output
    assert "(14 rows finished)" in result.output and "claim 2: holds" in result.output
    assert read_json(tmp_path / "reports/schedules/report/report.json")["rows_finished"] == 14
    missing = CliRunner().invoke(app, ["ablation", "--root", str(tmp_path), "-e", str(tmp_path / "no.yaml")])
    assert (
        missing.exit_code == 1
        and missing.output.startswith("error: experiment file")
        and "does not exist" in missing.output
    )
