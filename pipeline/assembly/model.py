"""The denoiser params describe: built here and nowhere else from a `Params`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.model.loading import build_denoiser, load_tokenizer, random_encoder_config

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Params
    from pipeline.diffusion.schedules import Schedule
    from pipeline.model.denoiser import DiffusionBertForDenoising


def model_from_params(params: Params, schedule: Schedule) -> DiffusionBertForDenoising:
    """The denoiser `params.model` describes, for `schedule` (its description goes into the config).

    `model.family` picks the architecture of a `random` model (over the default model's WordPiece
    vocabulary); a checkpoint's family is its own `model_type`."""
    m = params.model
    random_config = None
    if m.name_or_path == "random":
        random_config = random_encoder_config(
            m.family,
            load_tokenizer("random"),
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.intermediate_size,
            max_positions=max(512, params.data.max_seq_len),
        )
    return build_denoiser(
        m.name_or_path,
        time_design=m.time_design,
        num_timesteps=params.diffusion.num_timesteps,
        max_seq_len=params.data.max_seq_len,
        random_init=m.random_init,
        random_config=random_config,
        seed=m.head_init_seed,
        diffusion={**schedule.describe(), "hybrid_lambda": params.diffusion.hybrid_lambda},
    )
