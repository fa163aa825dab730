"""generate: sentences from an exported model (not a DVC stage; an interactive command).

Reads  an export directory (default models/final/) - model, tokenizer and schedule - and, when
       the length is 0, data/token_stats/lengths.npy to draw sentence lengths (32 tokens each when
       it does not exist). The sampling settings are params `evaluate.*` (sample_steps, top_k,
       top_p, temperature, sample_seed, sample_length); `dbert generate`'s options set them
       (OPTIONS), validated by the params schema like `--set`.
Writes nothing by default (the caller prints the sentences); `output` writes them to a file,
       one per line, atomically. `track=True` also records an MLflow run.
"""

from __future__ import annotations

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
}
PARAMS = tuple(OPTIONS.values())
INPUTS = ("models/final", "data/token_stats/lengths.npy")
OUTPUTS: tuple[str, ...] = ()  # only --output, when given
DEFAULT_LENGTH = 32


def resolve_lengths(layout: Layout, num: int, length: int, seed: int) -> tuple[list[int], str]:
    """Fixed lengths when `length` > 0; else drawn from the training histogram, or 32 without one."""
    from pipeline.eval.generation import fixed_or_sampled_lengths

    if length > 0:
        return fixed_or_sampled_lengths(num, length, None, seed), f"fixed {length}"
    hist_path = layout.token_stats / "lengths.npy"
    if hist_path.is_file():
        histogram = np.load(hist_path, allow_pickle=False)
        return fixed_or_sampled_lengths(num, 0, histogram, seed), f"sampled from {hist_path}"
    return [DEFAULT_LENGTH] * num, f"fixed {DEFAULT_LENGTH} (no length histogram at {hist_path})"


def run(
    params: Params,
    root: Path,
    *,
    model_dir: Path | None = None,
    num: int = 8,
    output: Path | None = None,
    track: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    from pipeline.eval.generation import generate
    from pipeline.model.export import load_exported

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")  # not a param: the only check here
    flat = params.flat()
    settings = {"num": num, **{name: flat[key] for name, key in OPTIONS.items()}}
    layout = Layout(Path(root))
    model_dir = Path(model_dir) if model_dir is not None else layout.model
    model, tokenizer, schedule = load_exported(model_dir)
    lengths, how = resolve_lengths(layout, num, settings["length"], settings["seed"])

    def sample() -> list[str]:
        out = generate(
            model,
            tokenizer,
            schedule,
            lengths=lengths,
            steps=settings["steps"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            temperature=settings["temperature"],
            seed=settings["seed"],
            progress=tick(progress, "generating", len(lengths)),
        )
        return [text.replace("\n", " ") for text in out.texts]

    if track:
        from pipeline.tracking.log import log_dict_artifact

        with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), model_dir]) as _run:
            texts = sample()
            log_dict_artifact(
                {"settings": settings, "lengths": how, "model": str(model_dir), "samples": texts}, "generate.json"
            )
    else:
        texts = sample()
    if output is not None:
        write_file_atomic(Path(output), "".join(t + "\n" for t in texts))
    return {
        "stage": STAGE,
        "model": str(model_dir),
        "lengths": how,
        "settings": settings,
        "texts": texts,
        "output": None if output is None else str(output),
    }
