"""`dbert generate` with prompts, infill templates and request files, as a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import PARAMS, assert_one_line_error, invoke, tiny_model  # noqa: F401 - fixture

SAMPLING = ("--steps", "4", "--top-k", "20", "--seed", "1")


def generate(tmp_path, model, *args: str):
    return invoke("generate", "--params", str(PARAMS), "--root", str(tmp_path), "--model", str(model), *args)


def test_prompt_and_infill_keep_the_given_words_for_every_sampler(tmp_path, tiny_model):  # noqa: F811
    for sampler in ("ancestral", "remdm", "confidence", "gibbs"):
        result = generate(
            tmp_path,
            tiny_model,
            "--prompt",
            "the president said",
            "--infill",
            "the [MASK*3] was closed on [MASK] .",
            "--length",
            "5",
            "--num",
            "2",
            "--format",
            "jsonl",
            "--sampler",
            sampler,
            *SAMPLING,
        )
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["kind"] for r in rows] == ["prompt", "prompt", "infill", "infill"], sampler
        for row in rows[:2]:
            assert row["text"].startswith("the president said"), row
            assert len(row["generated"]) == 1
        for row in rows[2:]:
            # A generated WordPiece may be a continuation (##xx) that joins the fixed word before
            # it when decoded: compare without spaces.
            squashed = row["text"].replace(" ", "")
            assert squashed.startswith("the") and "wasclosedon" in squashed, row
            assert squashed.endswith(".") and len(row["generated"]) == 2
            assert "[MASK]" not in row["text"]


def test_a_request_file_mixes_prompts_and_templates_and_prints_one_line_each(tmp_path, tiny_model):  # noqa: F811
    requests = tmp_path / "requests.txt"
    requests.write_text("once upon a time\n\n[MASK*4] , he said .\n")
    result = generate(tmp_path, tiny_model, "--input", str(requests), "--length", "3", *SAMPLING)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("once upon a time") and lines[1].endswith(", he said.")


def test_bad_requests_are_one_line_errors_naming_the_problem(tmp_path, tiny_model):  # noqa: F811
    assert_one_line_error(generate(tmp_path, tiny_model, "--infill", "no gap here"), "has no gap")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(generate(tmp_path, tiny_model, "--input", str(empty)), "has no requests")
    assert_one_line_error(generate(tmp_path, tiny_model, "--input", str(tmp_path / "nope.txt")), "does not exist")
    long = " ".join(["word"] * 70)
    assert_one_line_error(generate(tmp_path, tiny_model, "--prompt", long), "above the model's")
    assert_one_line_error(generate(tmp_path, tiny_model, "--sampler", "vibes"), "evaluate.sampler")
    assert_one_line_error(generate(tmp_path, tiny_model, "--format", "xml", "--prompt", "hi"), "--format")


def test_the_three_line_api_completes_infills_and_samples(tiny_model):  # noqa: F811
    from pipeline.api import load

    model = load(tiny_model)
    filled = model.infill(["the [MASK*2] said .", "[MASK] york"], num=2, steps=4, seed=3)
    assert len(filled) == 4 and all(t.replace(" ", "").endswith("said.") for t in filled[:2])
    assert all(t.replace(" ", "").endswith("york") for t in filled[2:])
    assert model.infill(["the [MASK*2] said .", "[MASK] york"], num=2, steps=4, seed=3) == filled  # seeded
    assert model.complete("once upon", length=3, steps=4)[0].startswith("once upon")
    assert len(model.generate(3, 5, steps=4, sampler="confidence")) == 3
    with pytest.raises(ValueError, match="unknown sampler"):
        model.generate(1, 5, sampler="vibes")
