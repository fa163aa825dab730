"""A trained model in three lines, for notebooks and scripts:

    from pipeline.api import load
    model = load("models/final")
    model.infill("the [MASK*3] sat on the [MASK] .")

`generate` samples unconditionally, `complete` continues prompts, `infill` fills the gaps of
templates (`[MASK]` = one generated WordPiece, `[MASK*n]` = n). Fixed words never change. Texts
longer than the model's window are written block by block (semi-autoregressive).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.generation.sampling import SAMPLERS, Generation, generate
from pipeline.generation.templates import DEFAULT_CONTINUATION, check_fits, infill_template, prompt_template


@dataclass
class SamplingOptions:
    """How texts are drawn; the defaults are the evaluate stage's."""

    steps: int = 128
    sampler: str = "ancestral"
    top_k: int = 30
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    confidence_score: str = "prob"
    remdm_eta: float = 0.04
    gibbs_sweeps: int = 2

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class DiffusionBert:
    """An exported model with its tokenizer and noise schedule, ready to sample."""

    def __init__(self, model, tokenizer, schedule, source: str = "", length_histogram: str | None = None) -> None:
        self.model, self.tokenizer, self.schedule, self.source = model, tokenizer, schedule, source
        self.length_histogram = length_histogram  # lengths.npy for [MASK*?] gaps; None = a flat prior

    def __repr__(self) -> str:
        design = self.model.config.time_design
        return f"DiffusionBert({self.source!r}, schedule={self.schedule.describe()['schedule']}, time={design})"

    def _sample(self, templates=None, lengths=None, **options: Any) -> Generation:
        return generate(
            self.model,
            self.tokenizer,
            self.schedule,
            templates=templates,
            lengths=lengths,
            device=self.model.device,
            **asdict(SamplingOptions(**options)),  # its fields are generate's keywords
        )

    @property
    def window(self) -> int:
        """Content WordPieces the model sees at once (its positions minus [CLS] and [SEP])."""
        return int(self.model.max_positions) - 2

    def generate(self, num: int = 4, length: int = 24, block: int | None = None, **options: Any) -> list[str]:
        """`num` unconditional sentences of `length` WordPieces; longer than the window (or with
        `block`), written block by block (`pipeline.generation.blocks`; default block: half the window)."""
        if block is None and length <= self.window:
            return self._sample(lengths=[length] * num, **options).texts
        return self._blocks([], num, length, block, **options)

    def complete(
        self,
        prompts: str | list[str],
        length: int = DEFAULT_CONTINUATION,
        num: int = 1,
        block: int | None = None,
        **options: Any,
    ) -> list[str]:
        """Each prompt followed by `length` generated WordPieces, `num` samples per prompt; block
        by block when prompt + length exceed the window (or with `block`)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = [prompt_template(self.tokenizer, text, length) for text in texts]
        if block is None and all(len(r.template) <= self.window for r in requests):
            return self._run(requests, num, **options).texts
        out: list[str] = []
        for request in requests:
            prompt = [int(tok) for tok in request.template if tok is not None]
            out.extend(self._blocks(prompt, num, length, block, **options))
        return out

    def _blocks(self, prompt: list[int], num: int, length: int, block: int | None, **options: Any) -> list[str]:
        from pipeline.generation.blocks import generate_blocks

        return generate_blocks(
            self.model,
            self.tokenizer,
            self.schedule,
            num=num,
            length=length,
            block=block or max(1, self.window // 2),
            prompt=prompt,
            device=self.model.device,
            **asdict(SamplingOptions(**options)),  # its fields are generate's keywords
        ).texts

    def infill(
        self, templates: str | list[str], num: int = 1, gap_length: str = "context", **options: Any
    ) -> list[str]:
        """Each template with its [MASK] / [MASK*n] gaps filled, `num` samples per template; a
        `[MASK*?]` gap gets its length by `gap_length` (`pipeline.generation.gap_length`)."""
        texts = [templates] if isinstance(templates, str) else list(templates)
        requests = [infill_template(self.tokenizer, text) for text in texts]
        if any(r.auto_gap is not None for r in requests):  # [MASK*?]: its length chosen first
            from pipeline.generation.gap_length import length_prior, resolve_open_gap

            prior = length_prior(self.length_histogram, int(self.model.max_positions))
            requests = [
                resolve_open_gap(r, self.model, self.tokenizer, self.schedule, prior, method=gap_length)
                for r in requests
            ]
        return self._run(requests, num, **options).texts

    def _run(self, requests: list, num: int, **options: Any) -> Generation:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        check_fits(requests, self.model.max_positions - 2)
        return self._sample(templates=[r.template for r in requests for _ in range(num)], **options)


def load(
    path: str | Path = "models/final",
    device: str | torch.device = "cpu",
    length_histogram: str | Path | None = None,
) -> DiffusionBert:
    """The export directory `path` (what `dbert train` writes to models/final), on `device`
    (cpu, cuda, cuda:N, or auto: a CUDA GPU when one is visible). `length_histogram` (the
    project's data/token_stats/lengths.npy) is the length prior that `[MASK*?]` gaps use."""
    from pipeline.model.export import load_exported
    from pipeline.model.precision import resolve_device

    model, tokenizer, schedule = load_exported(
        path, device=resolve_device(device) if isinstance(device, str) else device
    )
    hist = None if length_histogram is None else str(length_histogram)
    return DiffusionBert(model, tokenizer, schedule, source=str(path), length_histogram=hist)
