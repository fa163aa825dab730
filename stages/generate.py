"""generate: sentences from an exported model (not a DVC stage; an interactive command).

Unconditional by default; conditional with prompts (`--prompt`: generate after the text),
infill templates (`--infill`: `[MASK]` marks one generated WordPiece, `[MASK*n]` n of them), or
a request file (`--input`: one request per line; a line with a gap is an infill template,
any other a prompt). Fixed words are never changed.

Reads  an export directory (default models/final/) - model, tokenizer and schedule - and, when
       the length is 0 and generation is unconditional, data/token_stats/lengths.npy to draw
       sentence lengths (32 tokens each when it does not exist). The sampling settings are
       params `evaluate.*` (sample_steps, top_k, top_p, temperature, sample_seed, sample_length,
       sampler, device: where the model runs); `dbert generate`'s options set them (OPTIONS), validated by the params schema
       like `--set`. For a prompt, `sample_length` is the number of WordPieces generated after
       it (0: 16).
Writes nothing by default (the caller prints the sentences); `output` writes them to a file,
       one per line (or one JSON object per line), atomically. `track=True` also records an
       MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.artifacts import Layout, write_file_atomic
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, stage_run, tick

STAGE = "generate"
# `dbert generate` option -> the param it sets for the run (the schema checks the value).
OPTIONS = {
    "steps": "evaluate.sample_steps",
    "top_k": "evaluate.top_k",
    "top_p": "evaluate.top_p",
    "temperature": "evaluate.temperature",
    "seed": "evaluate.sample_seed",
    "length": "evaluate.sample_length",
    "sampler": "evaluate.sampler",
    "device": "evaluate.device",
}
PARAMS = tuple(OPTIONS.values())
INPUTS = ("models/final", "data/token_stats/lengths.npy")
OUTPUTS: tuple[str, ...] = ()  # only --output, when given
DEFAULT_LENGTH = 32


def resolve_lengths(layout: Layout, num: int, length: int, seed: int) -> tuple[list[int], str]:
    """Fixed lengths when `length` > 0; else drawn from the training histogram, or 32 without one."""
    from pipeline.generation.sampling import fixed_or_sampled_lengths

    if length > 0:
        return fixed_or_sampled_lengths(num, length, None, seed), f"fixed {length}"
    hist_path = layout.token_stats / "lengths.npy"
    if hist_path.is_file():
        histogram = np.load(hist_path, allow_pickle=False)
        return fixed_or_sampled_lengths(num, 0, histogram, seed), f"sampled from {hist_path}"
    return [DEFAULT_LENGTH] * num, f"fixed {DEFAULT_LENGTH} (no length histogram at {hist_path})"


def read_requests(path: Path) -> list[str]:
    """Non-empty lines of a request file; a clear error when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"request file {path} has no requests (one prompt or infill template per line)")
    return lines


def build_requests(tokenizer, prompts: list[str], infills: list[str], lines: list[str], length: int) -> list:
    """The conditional requests, in the order given: prompts, then infills, then the file's lines."""
    from pipeline.generation.templates import DEFAULT_CONTINUATION, infill_template, prompt_template, request_from_line

    new = length if length > 0 else DEFAULT_CONTINUATION
    return [
        *(prompt_template(tokenizer, text, new) for text in prompts),
        *(infill_template(tokenizer, text) for text in infills),
        *(request_from_line(tokenizer, line, new) for line in lines),
    ]


def run(
    params: Params,
    root: Path,
    *,
    model_dir: Path | None = None,
    num: int | None = None,
    prompts: list[str] | None = None,
    infills: list[str] | None = None,
    input_file: Path | None = None,
    output_format: str = "text",
    output: Path | None = None,
    track: bool = False,
    progress: ProgressCallback | None = None,
    gap_length: str = "context",
) -> dict:
    """`num` is the number of sentences (unconditional, default 8) or of samples per request
    (conditional, default 1)."""
    from pipeline.generation.sampling import generate
    from pipeline.generation.templates import check_fits
    from pipeline.model.export import load_exported
    from pipeline.model.precision import resolve_device

    if output_format not in ("text", "jsonl"):
        raise ValueError(f"--format must be text or jsonl, got {output_format!r}")
    lines = read_requests(input_file) if input_file is not None else []
    conditional = bool(prompts or infills or lines)
    num = num if num is not None else (1 if conditional else 8)
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")  # not a param: checked here
    flat = params.flat()
    settings = {"num": num, **{name: flat[key] for name, key in OPTIONS.items()}}
    layout = Layout(Path(root))
    model_dir = Path(model_dir) if model_dir is not None else layout.model
    device = resolve_device(settings["device"])
    model, tokenizer, schedule = load_exported(model_dir, device=device)
    if conditional:
        requests = build_requests(tokenizer, list(prompts or []), list(infills or []), lines, settings["length"])
        if any(r.auto_gap is not None for r in requests):  # [MASK*?]: its length chosen first
            from pipeline.generation.gap_length import length_prior, resolve_open_gap

            hist = layout.token_stats / "lengths.npy"
            prior = length_prior(str(hist) if hist.is_file() else None, model.max_positions)
            requests = [resolve_open_gap(r, model, tokenizer, schedule, prior, method=gap_length) for r in requests]
        check_fits(requests, model.max_positions - 2)
        requests = [r for r in requests for _ in range(num)]
        lengths, how = None, "given by the requests"
    else:
        requests = []
        lengths, how = resolve_lengths(layout, num, settings["length"], settings["seed"])

    def sample() -> list[dict]:
        out = generate(
            model,
            tokenizer,
            schedule,
            lengths=lengths,
            templates=[r.template for r in requests] if conditional else None,
            steps=settings["steps"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            temperature=settings["temperature"],
            seed=settings["seed"],
            sampler=settings["sampler"],
            gibbs_sweeps=flat["evaluate.gibbs_sweeps"],
            confidence_score=flat["evaluate.confidence_score"],
            remdm_eta=flat["evaluate.remdm_eta"],
            device=device,
            progress=tick(progress, "generating", len(requests) or num),
        )
        rows = []
        for index, text in enumerate(out.texts):
            row: dict = {"text": text.replace("\n", " ")}
            if conditional:
                row = {"kind": requests[index].kind, "request": requests[index].text, **row}
                row["generated"] = out.spans[index]
            rows.append(row)
        return rows

    if track:
        from pipeline.tracking.log import log_dict_artifact

        with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), model_dir]) as _run:
            samples = sample()
            log_dict_artifact(
                {"settings": settings, "lengths": how, "model": str(model_dir), "samples": samples}, "generate.json"
            )
    else:
        samples = sample()
    lines_out = [json.dumps(row) if output_format == "jsonl" else row["text"] for row in samples]
    if output is not None:
        write_file_atomic(Path(output), "".join(line + "\n" for line in lines_out))
    return {
        "stage": STAGE,
        "model": str(model_dir),
        "lengths": how,
        "settings": settings,
        "texts": [row["text"] for row in samples],
        "samples": samples,
        "lines": lines_out,
        "output": None if output is None else str(output),
    }
