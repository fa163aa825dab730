"""The export's model card (README.md with Hugging Face front matter) and `dbert publish`:
the card's fields, its metrics once evaluated, and a publish that lists its files or stops in
one line offline, never touching the export."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.artifacts import write_json
from pipeline.model.card import CARD_FILE, FACTS_FILE, write_model_card
from pipeline.model.publish import plan_publish
from stages.cli import app
from tests.support.exports import export_tiny, tiny_params

TRAINING = {"step": 4, "val_bound": 6.5, "val_ppl": 665.1, "precision": "fp32", "run_name": "r", "mlflow_run_id": "x"}
METRICS = {
    "bound.ppl_token_mean": 812.25,
    "bound.ppl_token_std": 3.0,
    "bound.ppl_word_mean": 2400.5,
    "bound.num_tokens": 1200,
    "bound.num_words": 950,
    "generation.bleu": 0.0123,
    "generation.self_bleu": 0.2,
    "generation.num_samples": 4,
    "generation.num_references": 50,
    "generation.num_self_bleu_samples": 4,
    "conditional.prefix.ppl_token": 700.5,
    "conditional.prefix.ppl_word": 1500.0,
    "conditional.prefix.num_hidden_tokens": 300,
    "conditional.prefix.token_accuracy": 0.05,
    "conditional.infill.ppl_token": 650.0,
    "conditional.infill.ppl_word": 1400.0,
    "conditional.infill.num_hidden_tokens": 280,
    "conditional.infill.token_accuracy": 0.07,
    "leaky": False,
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    directory = export_tiny(tmp_path_factory.mktemp("card") / "final")
    write_model_card(directory, tiny_params(), training=TRAINING)
    return directory


def digest(directory: Path) -> str:
    h = hashlib.md5()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_the_card_is_hub_front_matter_and_a_body_that_says_what_the_model_is(export):
    text = (export / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert {"diffusion", "masked-diffusion", "text-generation"} <= set(meta["tags"])
    assert meta["datasets"] == ["lm1b"]
    assert "license" not in meta and "base_model" not in meta  # unknown licence; a random encoder has no base
    assert "model-index" not in meta  # no numbers before evaluate
    for words in ("DiffusionBERT", "linear", "T = 50", "LM1B-sample", "| optimizer steps | 4 |", "fp32"):
        assert words in text, words
    assert "Validation bound at step 4: 6.5000" in text
    assert "Not evaluated yet" in text
    assert "from pipeline.api import load" in text and "AutoModelForMaskedLM.from_pretrained(path)" in text
    assert "Only the `ancestral` sampler is the model's own reverse chain" in text
    assert (export / FACTS_FILE).is_file()


def test_metrics_go_into_the_model_index_and_the_evaluation_table(export, tmp_path):
    card = write_model_card(export, metrics=METRICS, path=tmp_path / "card.md")  # facts read back from the export
    text = card.read_text()
    results = front_matter(text)["model-index"][0]["results"][0]
    assert results["dataset"] == {"type": "lm1b", "name": "LM1B-sample (held-out LM1B shards)"}
    values = {m["name"]: m["value"] for m in results["metrics"]}
    assert values["PPL bound per WordPiece"] == 812.25 and values["PPL bound per word"] == 2400.5
    assert values["prefix PPL bound per hidden WordPiece"] == 700.5 and values["infill fill accuracy"] == 0.07
    assert values["BLEU-4 of samples"] == 0.0123 and values["Self-BLEU-4"] == 0.2
    assert "| PPL bound per WordPiece | 812.2500 | 1200 content WordPieces, 950 words |" in text
    assert "| infill PPL bound per hidden word | 1400.0000 | 280 hidden WordPieces |" in text
    assert "Not evaluated yet" not in text


def test_the_card_is_rendered_byte_identically_and_a_metrics_file_works_too(export, tmp_path):
    first = write_model_card(export, metrics=METRICS, path=tmp_path / "a.md").read_bytes()
    write_json(METRICS, tmp_path / "metrics.json")
    assert write_model_card(export, metrics=tmp_path / "metrics.json", path=tmp_path / "b.md").read_bytes() == first


def test_a_time_design_and_the_default_base_model_change_the_loading_snippet_and_metadata(tmp_path):
    directory = export_tiny(tmp_path / "embedding", time_design="embedding")
    write_model_card(directory, tiny_params("model.name_or_path=default", "data.source=text_files"))
    text = (directory / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "pipeline_tag" not in meta and "datasets" not in meta  # not a plain fill-mask model; not LM1B
    assert "trust_remote_code=True" in text and "a time embedding added to the token embeddings" in text


def test_without_params_or_saved_facts_the_card_names_what_is_missing(tmp_path):
    directory = export_tiny(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=FACTS_FILE):
        write_model_card(directory)


runner = CliRunner()


def publish(*args: str):
    return runner.invoke(app, ["publish", *args])


def test_publish_dry_run_lists_the_files_and_quotes_the_metrics_without_touching_the_export(export, tmp_path):
    write_json(METRICS, tmp_path / "metrics.json")
    before = digest(export)
    result = publish(
        "--repo-id", "me/dbert-tiny", "--model", str(export), "--metrics", str(tmp_path / "metrics.json"), "--dry-run"
    )
    assert result.exit_code == 0, result.output
    files = result.stdout.splitlines()
    assert files == sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file())
    assert {"README.md", "model_card.json", "config.json", "model.safetensors", "diffusion_schedule.json"} <= set(files)
    assert f"card metrics from {tmp_path / 'metrics.json'}" in result.stderr
    plan = plan_publish(export, "me/dbert-tiny", tmp_path / "metrics.json")
    assert "812.2500" in plan.card and 'snapshot_download("me/dbert-tiny")' in plan.card  # the uploaded card
    assert digest(export) == before  # models/final is a DVC output: never rewritten


def test_publish_offline_is_one_error_line(export, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = publish("--repo-id", "me/dbert-tiny", "--model", str(export))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HF_HUB_OFFLINE" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("repo_id", "model", "message"),
    [
        ("no-slash", None, "USER/NAME"),
        ("me/x", "missing", "not an exported DiffusionBERT model"),
        ("me/x", "no-card", "no model card README.md"),
    ],
)
def test_publish_refuses_a_bad_repo_id_a_missing_export_or_one_without_card(tmp_path, export, repo_id, model, message):
    if model == "no-card":
        model_dir = export_tiny(tmp_path / "no-card")
    else:
        model_dir = export if model is None else tmp_path / model
    result = publish("--repo-id", repo_id, "--model", str(model_dir), "--dry-run")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
