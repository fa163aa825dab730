"""The ablation's table (PAPER §8 at this scale): one line per row from the per-row results the
runner collects (JSON-able dicts, one per (row, training seed)), its markdown, and the validation
curves over training seeds.

A row result (`pipeline.ablation.results.collect_result`) holds `key`, `row`, `seed`, the paper's
columns (`method`, `init`, `schedule`, `time`), `note`, `mlflow` (run ids), `train` (`seconds`,
`curve` of the validation bound) and `evaluate` (the bound's mean/std over evaluation seeds, BLEU,
Self-BLEU, entropy, and for detail rows `steps_table` and `quality_diversity`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.ablation.statistics import mean_std


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


def mean_curves(results: Iterable[dict]) -> dict[str, dict[str, list[float]]]:
    """Row name -> its validation curve over training seeds: at every step all its seeds
    evaluated, the mean and the lowest and highest seed (`step`, `mean`, `low`, `high`; `seeds`
    is how many). One line per schedule on a plot instead of one per (schedule, seed)."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, runs in by_row(results).items():
        points = [curve_points(r) for r in runs]
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


def curve_points(result: dict) -> dict[int, float]:
    curve = result["train"]["curve"]
    return {int(s): v for s, v in zip(curve["step"], curve["val_bound"]) if v is not None}
