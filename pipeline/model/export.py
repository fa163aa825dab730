"""The trained model in Hugging Face format (safetensors), with its tokenizer and everything
needed to rebuild its noise schedule, so `dbert generate` needs nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import read_json, write_json
from pipeline.diffusion.schedules import Schedule, build_schedule
from pipeline.model.denoiser import DiffusionBertForDenoising, register_auto_classes

SCHEDULE_FILE = "diffusion_schedule.json"
INFORMATION_FILE = "schedule_information.npy"
COUNTS_FILE = "schedule_counts.npy"


def export_model(
    model: DiffusionBertForDenoising,
    tokenizer,
    schedule: Schedule,
    directory: str | Path,
    information: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_json(schedule.describe(), directory / SCHEDULE_FILE)
    if information is not None:
        np.save(directory / INFORMATION_FILE, np.asarray(information, dtype=np.float64))
    if counts is not None:
        np.save(directory / COUNTS_FILE, np.asarray(counts, dtype=np.int64))
    return directory


def load_schedule(directory: str | Path) -> Schedule:
    directory = Path(directory)
    spec = read_json(directory / SCHEDULE_FILE)
    info = directory / INFORMATION_FILE
    counts = directory / COUNTS_FILE
    return build_schedule(
        spec["schedule"],
        spec["num_timesteps"],
        information=torch.from_numpy(np.load(info)) if info.is_file() else None,
        counts=torch.from_numpy(np.load(counts)) if counts.is_file() else None,
        spindle_lambda=spec.get("spindle_lambda", 0.3),
        eps=spec.get("eps", 1e-3),
    )


def load_exported(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, schedule) from an export directory; a clear error when it is not one."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / SCHEDULE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an exported DiffusionBERT model (run `dbert train` first)")
    register_auto_classes()
    model = DiffusionBertForDenoising.from_pretrained(directory).to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, load_schedule(directory)
