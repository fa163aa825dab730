"""A tiny random DiffusionBERT export (the default tokenizer, a linear schedule), for the tests of
what is built around an export: the model card, publishing and serving."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params, load_params

TINY_EXPORT_PARAMS = (
    "model.name_or_path=random",
    "diffusion.schedule=linear",
    "diffusion.num_timesteps=50",
    "train.steps=4",
    "train.batch_size=8",
)


def tiny_params(*overrides: str) -> Params:
    """The params a tiny export claims to come from (the card reads them)."""
    return load_params(None, [*TINY_EXPORT_PARAMS, *overrides])


def export_tiny(directory: Path, time_design: str = "none") -> Path:
    """Export a 2-layer, 32-wide random BERT denoiser with `time_design` into `directory`."""
    from pipeline.diffusion.schedules import build_schedule
    from pipeline.model.export import export_model
    from pipeline.model.loading import build_denoiser, load_tokenizer, random_bert_config

    tokenizer = load_tokenizer("random")
    config = random_bert_config(tokenizer.vocab_size, 32, 2, 2, 64, max_positions=64)
    model = build_denoiser(
        "random",
        time_design=time_design,
        num_timesteps=50,
        random_config=config,
        seed=0,
        diffusion={"schedule": "linear", "num_timesteps": 50},
    )
    return export_model(model.eval(), tokenizer, build_schedule("linear", 50), directory)
