"""The export's model card: `README.md` with Hugging Face YAML front matter, so the folder the
train stage writes is what `dbert publish` uploads, and the Hub shows what the model is.

The card is rendered from three sources: the export itself (time design, T, schedule, encoder
shape), the params that trained it (base model, corpus, optimisation) and, when given, the
evaluate stage's flat metrics. The first two are saved beside the card as `model_card.json`, so
the card can be rendered again with metrics later (`write_model_card(dir, metrics=...)`) without
the params file that trained it. Rendering is deterministic: the same inputs give the same bytes
(the export is a DVC output).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import read_json, write_json

CARD_FILE = "README.md"
FACTS_FILE = "model_card.json"
# What the card says about training: the train stage's params and the corpus it read.
FACT_KEYS = (
    "model.name_or_path",
    "model.time_design",
    "data.source",
    "data.hub_name",
    "data.max_seq_len",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.spindle_lambda",
    "diffusion.hybrid_lambda",
    "train.objective",
    "train.steps",
    "train.batch_size",
    "train.global_batch_size",
    "train.num_workers",
    "train.lr",
    "train.weight_decay",
    "train.warmup_steps",
    "train.ema_decay",
    "train.precision",
    "train.packed",
    "train.seed",
)
FINAL_KEYS = ("step", "val_bound", "val_ppl", "precision")  # from outputs/train/metrics.json
DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"  # what `model.name_or_path: default` ships
TIME_DESIGNS = {
    "none": "time-agnostic decoding (TAD): the plain masked LM, no time input",
    "embedding": "a time embedding added to the token embeddings",
    "layerwise": "a time embedding added before every layer",
    "prefix": "the time step as a prefix token",
}


def card_facts(params: Any, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The train-stage facts of `params` (a `Params`, or a flat `group.key` mapping) and the final
    validation numbers of `training` (the train stage's metrics.json)."""
    flat = params.flat() if hasattr(params, "flat") else dict(params)
    facts: dict[str, Any] = {"params": {k: flat.get(k) for k in FACT_KEYS}}
    facts["final"] = {k: training[k] for k in FINAL_KEYS if training and training.get(k) is not None}
    return facts


def _base_model(name: str | None) -> str | None:
    """A Hub id for `base_model`: the default MiniLM, or a name that is not a local path."""
    if name == "default":
        return DEFAULT_BASE
    if not name or name == "random" or name.startswith((".", "/", "~")):
        return None
    return name if name.count("/") <= 1 else None


def _corpus(p: Mapping[str, Any]) -> tuple[str, str | None]:
    """(label for numbers, Hub dataset id) of the corpus; bundled shards are "LM1B-sample"."""
    source = p.get("data.source")
    if source == "lm1b_mirror":
        return "LM1B-sample (held-out LM1B shards)", "lm1b"
    if source == "lm1b_hub":
        return "LM1B", "lm1b"
    if source == "hub" and p.get("data.hub_name"):
        return str(p["data.hub_name"]), str(p["data.hub_name"])
    return str(source or "local text files"), None


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _metric_rows(m: Mapping[str, Any]) -> list[tuple[str, str, Any, str]]:
    """(model-index type, name, value, what was counted) for the headline numbers present."""
    rows = []
    counted = f"{m.get('bound.num_tokens', '?')} content WordPieces, {m.get('bound.num_words', '?')} words"
    for key, name in (("ppl_token", "per WordPiece"), ("ppl_word", "per word")):
        if f"bound.{key}_mean" in m:
            rows.append(("perplexity", f"PPL bound {name}", m[f"bound.{key}_mean"], counted))
    for task in ("prefix", "infill"):
        key = f"conditional.{task}"
        hidden = f"{m.get(f'{key}.num_hidden_tokens', '?')} hidden WordPieces"
        for metric, name in (("ppl_token", "per hidden WordPiece"), ("ppl_word", "per hidden word")):
            if f"{key}.{metric}" in m:
                rows.append(("perplexity", f"{task} PPL bound {name}", m[f"{key}.{metric}"], hidden))
        if f"{key}.token_accuracy" in m:
            rows.append(("accuracy", f"{task} fill accuracy", m[f"{key}.token_accuracy"], hidden))
    if "generation.bleu" in m:
        refs = f"{m.get('generation.num_samples', '?')} samples vs {m.get('generation.num_references', '?')} test lines"
        rows.append(("bleu", "BLEU-4 of samples", m["generation.bleu"], refs))
    if "generation.self_bleu" in m:
        rows.append(
            (
                "self-bleu",
                "Self-BLEU-4",
                m["generation.self_bleu"],
                f"{m.get('generation.num_self_bleu_samples', '?')} samples",
            )
        )
    return rows


def front_matter(export: Mapping[str, Any], facts: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict:
    p = facts["params"]
    label, dataset = _corpus(p)
    meta: dict[str, Any] = {"library_name": "transformers", "language": ["en"]}
    if export["time_design"] == "none":
        meta["pipeline_tag"] = "fill-mask"  # a plain masked LM; the sampler lives in pipeline.api
    meta["tags"] = ["diffusion", "masked-diffusion", "text-generation", "diffusion-bert", export["model_type"]]
    if dataset:
        meta["datasets"] = [dataset]
    base = _base_model(p.get("model.name_or_path"))
    if base:
        meta["base_model"] = base
    rows = _metric_rows(metrics or {})
    if rows:
        data = {"type": dataset or str(p.get("data.source")), "name": label}
        results = [{"type": t, "name": n, "value": round(float(v), 4)} for t, n, v, _ in rows]
        task = {"type": "text-generation", "name": "Text generation (discrete diffusion)"}
        name = f"diffusion-bert-{export['time_design']}-{export['schedule'].get('schedule')}"
        meta["model-index"] = [{"name": name, "results": [{"task": task, "dataset": data, "metrics": results}]}]
    return meta


def _export_facts(export_dir: Path) -> dict[str, Any]:
    """What the export says about itself: time design, T, schedule, encoder type and shape."""
    spec_path = export_dir / "diffusion_config.json"
    spec = read_json(spec_path) if spec_path.is_file() else {}
    config = read_json(export_dir / "config.json")
    bert = config.get("bert", config)  # format 1 and time designs nest the encoder config
    schedule = read_json(export_dir / "diffusion_schedule.json")
    return {
        "time_design": spec.get("time_design", config.get("time_design", "none")),
        "num_timesteps": spec.get("num_timesteps", schedule.get("num_timesteps")),
        "schedule": schedule,
        "model_type": bert.get("model_type", "bert"),
        "layers": bert.get("num_hidden_layers"),
        "hidden": bert.get("hidden_size"),
    }


def _schedule_text(schedule: Mapping[str, Any]) -> str:
    name = str(schedule.get("schedule"))
    if name == "spindle":
        return f"spindle (token-information-ordered, lambda={schedule.get('spindle_lambda')})"
    if name == "power":
        return f"power (alpha = 1 - s^exp(-gamma h(v)), gamma={schedule.get('power_gamma')})"
    return name


def _training_lines(p: Mapping[str, Any], final: Mapping[str, Any]) -> list[str]:
    workers = max(int(p.get("train.num_workers") or 0), 1)
    batch = p.get("train.global_batch_size") or (p.get("train.batch_size") or 0) * workers
    rows = [
        ("objective", p.get("train.objective")),
        ("optimizer steps", p.get("train.steps")),
        ("sequences per step", f"{batch} ({p.get('train.batch_size')} per worker, {workers} worker(s))"),
        ("learning rate", f"{p.get('train.lr')} (warmup {p.get('train.warmup_steps')} steps)"),
        ("weight decay", p.get("train.weight_decay")),
        ("EMA decay", p.get("train.ema_decay")),
        ("precision", f"{final.get('precision', p.get('train.precision'))} (asked: {p.get('train.precision')})"),
        (
            "max sequence length",
            f"{p.get('data.max_seq_len')} WordPieces" + (", packed" if p.get("train.packed") else ""),
        ),
        ("hybrid loss lambda", p.get("diffusion.hybrid_lambda")),
        ("seed", p.get("train.seed")),
    ]
    lines = ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if final.get("val_bound") is not None:
        lines += [
            "",
            f"Validation bound at step {final.get('step')}: {_num(final['val_bound'], 4)} nats per WordPiece "
            f"(PPL bound {_num(final.get('val_ppl'))}).",
        ]
    return lines


def _evaluation_lines(m: Mapping[str, Any] | None, label: str) -> list[str]:
    if not m:
        return ["Not evaluated yet: `dbert evaluate` writes outputs/evaluate/metrics.json; the card takes its numbers."]
    lines = [
        f"On {label} test sentences (upper bounds on perplexity: the diffusion ELBO, not an exact likelihood).",
        "",
    ]
    lines += ["| metric | value | counted over |", "|---|---|---|"]
    lines += [f"| {name} | {_num(float(value), 4)} | {counted} |" for _, name, value, counted in _metric_rows(m)]
    if "bound.initial_ppl_token" in m:
        lines += [
            "",
            f"The untrained initial model's bound: {_num(float(m['bound.initial_ppl_token']))} per WordPiece.",
        ]
    if m.get("leaky"):
        lines += [
            "",
            "**The schedule is leaky** (its alpha reads the true sentence): the numbers are not likelihood bounds.",
        ]
    return lines


def _usage_lines(design: str, repo_id: str | None) -> list[str]:
    """The `pipeline.api` snippet, and plain `transformers` for the denoiser alone."""
    where = (
        f'from huggingface_hub import snapshot_download\npath = snapshot_download("{repo_id}")'
        if repo_id
        else 'path = "models/final"  # the export folder `dbert train` writes'
    )
    remote = "" if design == "none" else ", trust_remote_code=True"  # a time design ships its modeling file
    return [
        "Sampling text runs the reverse chain, which lives in this project's `pipeline` package:",
        "",
        f"```python\n{where}\nfrom pipeline.api import load\nmodel = load(path)\n"
        'model.infill("the [MASK*3] sat on the [MASK] ."); model.complete("the weather", length=8); model.generate(num=2)\n```',
        "",
        "The denoiser alone (it predicts the tokens under [MASK]) loads in plain `transformers`:",
        "",
        f"```python\nfrom transformers import AutoModelForMaskedLM\nmodel = AutoModelForMaskedLM.from_pretrained(path{remote})\n```",
    ]


def render_card(
    export_dir: str | Path,
    facts: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """The card's text (front matter + body) for the export in `export_dir` (`repo_id`: where it
    is published, for the usage snippet)."""
    export = _export_facts(Path(export_dir))
    p, final = facts["params"], facts.get("final", {})
    label, _ = _corpus(p)
    design = export["time_design"]
    name = p.get("model.name_or_path")
    base = _base_model(name) or ("none, randomly initialised" if name == "random" else f"a local checkpoint, {name}")
    head = yaml.safe_dump(front_matter(export, facts, metrics), sort_keys=False, allow_unicode=True)
    body = [
        f"# DiffusionBERT denoiser ({'TAD' if design == 'none' else design}, {export['schedule'].get('schedule')} schedule)",
        "",
        "A DiffusionBERT model (He et al., 2022): a pre-trained BERT-style masked LM used as the denoiser of "
        "a discrete diffusion whose forward process replaces tokens by [MASK] (absorbing state); text is "
        "generated by running the reverse chain from an all-[MASK] canvas.",
        "",
        f"- base model: {base} ({export['model_type']}, {export['layers']} layers, hidden size {export['hidden']})",
        f"- noise schedule: {_schedule_text(export['schedule'])}",
        f"- time conditioning: {TIME_DESIGNS.get(design, design)}",
        f"- diffusion steps T = {export['num_timesteps']}",
        f"- training corpus: {label}",
        "",
        "## Training",
        "",
        *_training_lines(p, final),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(metrics, label),
        "",
        "## How to use",
        "",
        *_usage_lines(design, repo_id),
        "",
        "## Intended use and limits",
        "",
        "- A small research model, trained briefly on CPU: for studying diffusion language models, not for",
        "  producing text anyone relies on. Samples are often ungrammatical.",
        "- The numbers above come from one test sample and one evaluation setting; "
        + (
            "LM1B-sample numbers are not LM1B benchmark numbers."
            if "LM1B-sample" in label
            else "compare like with like."
        ),
        "- Only the `ancestral` sampler is the model's own reverse chain, the one the bound is about; the"
        " others (`confidence`: MaskGIT/LLaDA-style unmasking, `gibbs`: BERT-Mouth, `remdm`: remasking) draw"
        " text differently, and the bound says nothing about their samples.",
        "- It inherits the biases of its base model and of news text (LM1B); English only.",
        "",
    ]
    return f"---\n{head}---\n\n" + "\n".join(body)


def _metrics_of(metrics: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any] | None:
    if metrics is None or isinstance(metrics, Mapping):
        return metrics
    return json.loads(Path(metrics).read_text(encoding="utf-8"))


def write_model_card(
    export_dir: str | Path,
    params: Any = None,
    metrics: Mapping[str, Any] | str | Path | None = None,
    training: Mapping[str, Any] | None = None,
    path: str | Path | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the card of `export_dir` to `path` (default `<export_dir>/README.md`); the path.

    With `params` (and the train stage's `training` metrics) the facts are taken from them and,
    when the card goes into the export, saved as `model_card.json`; without, they are read back
    from that file. `metrics`: the evaluate stage's flat metrics, or the path of its metrics.json.
    """
    export_dir = Path(export_dir)
    target = Path(path) if path is not None else export_dir / CARD_FILE
    if params is not None:
        facts = card_facts(params, training)
        if path is None:
            write_json(facts, export_dir / FACTS_FILE)
    elif (export_dir / FACTS_FILE).is_file():
        facts = read_json(export_dir / FACTS_FILE)
    else:
        raise FileNotFoundError(f"{export_dir / FACTS_FILE} not found: pass the params the model was trained with")
    target.write_text(render_card(export_dir, facts, _metrics_of(metrics), repo_id), encoding="utf-8")
    return target
