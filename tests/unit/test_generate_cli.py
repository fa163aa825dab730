"""`dbert generate` with prompts, infill templates and request files, as a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_cli import PARAMS, assert_one_line_error, invoke, tiny_model

SAMPLING = ("--steps", "4", "--top-k", "20", "--seed", "1")


def generate(tmp_path, model, *args: str):
    return invoke("generate", "--params", str(PARAMS), "--root", str(tmp_path), "--model", str(model), *args)


def test_prompt_and_infill_keep_the_given_words_for_every_sampler(tmp_path, tiny_model):
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


def test_a_request_file_mixes_prompts_and_templates_and_prints_one_line_each(tmp_path, tiny_model):
    requests = tmp_path / "requests.txt"
    requests.write_text("once upon a time\n\n[MASK*4] , he said .\n")
    result = generate(tmp_path, tiny_model, "--input", str(requests), "--length", "3", *SAMPLING)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("once upon a time") and lines[1].endswith(", he said.")


def test_bad_requests_are_one_line_errors_naming_the_problem(tmp_path, tiny_model):
    assert_one_line_error(generate(tmp_path, tiny_model, "--infill", "no gap here"), "has no gap")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(generate(tmp_path, tiny_model, "--input", str(empty)), "has no requests")
    assert_one_line_error(generate(tmp_path, tiny_model, "--input", str(tmp_path / "nope.txt")), "does not exist")
    long = " ".join(["word"] * 70)
    assert_one_line_error(generate(tmp_path, tiny_model, "--prompt", long), "above the model's")
    assert_one_line_error(generate(tmp_path, tiny_model, "--sampler", "vibes"), "evaluate.sampler")
    assert_one_line_error(generate(tmp_path, tiny_model, "--format", "xml", "--prompt", "hi"), "--format")


def test_the_three_line_api_completes_infills_and_samples(tiny_model):
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


def test_block_decoding_writes_past_the_window_and_keeps_the_prompt(tiny_model):
    from pipeline.api import load
    from pipeline.generation.blocks import generate_blocks

    model = load(tiny_model)
    window = model.model.max_positions - 2
    prompt = model.tokenizer("once upon a time", add_special_tokens=False)["input_ids"]
    out = generate_blocks(
        model.model, model.tokenizer, model.schedule, num=2, length=window + 30, block=24, prompt=prompt, steps=4
    )
    assert out.lengths == [len(prompt) + window + 30] * 2  # longer than the model can see at once
    assert all(ids[: len(prompt)] == prompt for ids in out.content_ids)
    assert all(model.tokenizer.mask_token_id not in ids for ids in out.content_ids)
    assert out.texts[0].startswith("once upon a time")


def test_the_api_writes_long_texts_block_by_block(tiny_model):
    from pipeline.api import load

    model = load(tiny_model)
    [text] = model.complete("once upon a time", length=model.window + 10, steps=4)
    assert text.startswith("once upon a time") and len(model.tokenizer(text)["input_ids"]) > model.window
    assert len(model.generate(2, model.window + 5, steps=4)) == 2


def test_an_open_gap_gets_a_length_from_the_model_and_keeps_the_words(tmp_path, tiny_model):
    result = generate(tmp_path, tiny_model, "--infill", "the [MASK*?] was closed .", "--format", "jsonl", *SAMPLING)
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["text"].replace(" ", "").startswith("the") and row["text"].replace(" ", "").endswith("wasclosed.")
    assert len(row["generated"]) == 1 and row["generated"][0]
