"""The sampler comparison draws each sample set once: rows that ask for the same samples (the
ancestral rows and the steps table, the curve's point at evaluate.top_k) share one draw."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.eval.compare as compare
from pipeline.config import load_params
from pipeline.diffusion.forward import SpecialIds
from tests.support.exports import export_tiny


@pytest.fixture(scope="module")
def ctx_factory(tmp_path_factory):
    from pipeline.model.export import load_exported

    model, tokenizer, schedule = load_exported(export_tiny(tmp_path_factory.mktemp("tiny")))

    def make(*overrides: str) -> compare.Comparison:
        params = load_params(
            None,
            [
                "evaluate.table_steps=[2, 4]",
                "evaluate.compare_steps=[4]",
                "evaluate.compare_samplers=[ancestral, confidence]",
                "evaluate.qd_top_k=[5, 30]",
                "evaluate.sample_steps=4",
                "evaluate.table_samples=2",
                "evaluate.qd_samples=2",
                *overrides,
            ],
        )
        return compare.Comparison(
            model=model,
            tokenizer=tokenizer,
            schedule=schedule,
            special=SpecialIds.from_tokenizer(tokenizer),
            denoise=model.denoise,
            test=None,  # the steps table's bound is not run here
            histogram=np.array([0, 0, 1, 1, 1], dtype=np.float64),
            references=["the cat sat on the mat .", "a dog ran ."],
            params=params,
        )

    return make


def counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = compare.generate

    def wrapped(*args, **kwargs):
        calls.append(kwargs["sampler"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "generate", wrapped)
    return calls


def test_sampler_rows_draw_each_sample_set_once_and_reuse_the_steps_tables(ctx_factory, monkeypatch):
    ctx = ctx_factory()
    calls = counting(monkeypatch)
    ev = ctx.params.evaluate
    table = [ctx.samples_quality(n=ev.table_samples, steps=s, top_k=ev.top_k) for s in ev.table_steps]
    assert calls == ["ancestral", "ancestral"]
    rows = compare.sampler_rows(ctx)
    assert calls == ["ancestral", "ancestral", "confidence"]  # the ancestral rows cost nothing more
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ancestral", 2), ("ancestral", 4), ("confidence", 4)]
    assert [r["bleu"] for r in rows[:2]] == [t["bleu"] for t in table]
    curve = compare.quality_diversity_curve(ctx)
    assert calls == ["ancestral", "ancestral", "confidence", "ancestral"]  # top-k 30 at 4 steps is drawn
    assert curve[1]["self_bleu"] == rows[1]["self_bleu"]


def test_rows_that_ask_for_other_samples_are_drawn_anew(ctx_factory, monkeypatch):
    ctx = ctx_factory("evaluate.qd_samples=3")  # the curve's n differs from the table's
    calls = counting(monkeypatch)
    compare.sampler_rows(ctx)
    compare.quality_diversity_curve(ctx)
    assert calls == ["ancestral", "ancestral", "confidence", "ancestral", "ancestral"]
    assert compare.comparison_size(ctx.params) == 2 + 2 + 3
