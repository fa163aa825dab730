"""Training checkpoints: model, optimizer, LR scheduler, EMA, step, RNG and data position.

Model weights go to safetensors; the rest to a torch file read back with weights_only=True.
Keys never carry DDP's `module.` prefix: the unwrapped model is what is saved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "progress.json"


@dataclass
class TrainPosition:
    """Where training stands: what a resumed run continues from (saved as progress.json)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed (the data position)
    tokens_seen: int = 0


def save_checkpoint(directory: str | Path, model, optimizer, scheduler, progress: TrainPosition, ema=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / MODEL_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng_torch": torch.get_rng_state(),  # dropout; diffusion noise is seeded per step
    }
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | Path, model, optimizer=None, scheduler=None, ema=None) -> TrainPosition:
    directory = Path(directory)
    missing = [f for f in (MODEL_FILE, STATE_FILE, META_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} lacks {', '.join(missing)}")
    load_model(model, str(directory / MODEL_FILE))
    # On the CPU whatever device saved it: the optimizer and the EMA move their state to the
    # parameters' device, and the RNG state must be a CPU tensor.
    state = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng_torch"])
    return TrainPosition(**json.loads((directory / META_FILE).read_text()))
