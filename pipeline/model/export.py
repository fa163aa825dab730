"""The trained model in Hugging Face format (safetensors), with its tokenizer and everything
needed to rebuild its noise schedule, so `dbert generate` needs nothing else, and so that plain
`transformers` loads it without this repository.

Format 2 (written here; `diffusion_config.json` marks it):
- time design `none` (TAD): the encoder's own `*ForMaskedLM` (`model.mlm`): config.json is its
  config (model_type bert, roberta, ...) and the weights have the standard names, so
  `AutoModelForMaskedLM.from_pretrained(dir)` (or `BertForMaskedLM` for BERT) is the denoiser.
- `embedding`, `layerwise`, `prefix`: the denoiser's own config and weights (`mlm.*` plus the time
  modules) with `auto_map` pointing to `modeling_diffusion_bert.py`, copied into the folder, so
  `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)` loads it; every family works
  (config.json's `encoder_layout` tells the shipped code where the family keeps its parts).
Beside them: `diffusion_config.json` (format version, time design, T, the `diffusion` settings),
the schedule's description and inputs, the tokenizer. No config names an absolute local path.

Format 1 (exports written before): config model_type `diffusion_bert` and weights under `mlm.`
for every design, no `diffusion_config.json`. `load_exported` reads both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import read_json, write_json
from pipeline.diffusion.schedules import Schedule, build_schedule
from pipeline.model import modeling_diffusion_bert
from pipeline.model.denoiser import DiffusionBertConfig, DiffusionBertForDenoising, register_auto_classes
from pipeline.model.families import EncoderFamily, mlm_class

FORMAT_VERSION = 2
SCHEDULE_FILE = "diffusion_schedule.json"
INFORMATION_FILE = "schedule_information.npy"
COUNTS_FILE = "schedule_counts.npy"
DIFFUSION_CONFIG_FILE = "diffusion_config.json"
MODELING_FILE = "modeling_diffusion_bert.py"
AUTO_MAP = {
    "AutoConfig": "modeling_diffusion_bert.DiffusionBertConfig",
    "AutoModel": "modeling_diffusion_bert.DiffusionBertForDenoising",
    "AutoModelForMaskedLM": "modeling_diffusion_bert.DiffusionBertForDenoising",
}


def encoder_layout(family: EncoderFamily) -> dict[str, Any]:
    """Where `family` keeps the parts the shipped modeling file reaches into (its `encoder_layout`)."""
    return {
        "encoder": family.encoder_attr,
        "word_embeddings": family.word_embeddings_path,
        "layers": family.layers_path,
        "head": list(family.head),
        "token_types": family.token_types,
        "positions_after_padding": family.positions_after_padding,
    }


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~"))


def portable(value: Any) -> Any:
    """`value` without the dict entries holding an absolute local path (the `_name_or_path` of a
    model loaded from a directory, e.g. the virtualenv's MiniLM): an export names no machine."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items() if not _is_local_path(v)}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value


def export_model(
    model: DiffusionBertForDenoising,
    tokenizer,
    schedule: Schedule,
    directory: str | Path,
    information: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> Path:
    """Write `model` in format 2 (see the module docstring) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    if model.time_agnostic:
        model.mlm.save_pretrained(directory, safe_serialization=True)
        (directory / MODELING_FILE).unlink(missing_ok=True)  # from an earlier export of another design
        extra: dict[str, Any] = {}
    else:
        model.save_pretrained(directory, safe_serialization=True)
        shutil.copyfile(modeling_diffusion_bert.__file__, directory / MODELING_FILE)
        extra = {"auto_map": AUTO_MAP, "encoder_layout": encoder_layout(model.encoder_family)}
    write_json(portable({**read_json(config_path), **extra}), config_path)
    diffusion = {
        "format_version": FORMAT_VERSION,
        "time_design": model.config.time_design,
        "num_timesteps": model.config.num_timesteps,
        "diffusion": model.config.diffusion,
    }
    write_json(portable(diffusion), directory / DIFFUSION_CONFIG_FILE)
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
        power_gamma=spec.get("power_gamma", 1.0),
        eps=spec.get("eps", 1e-3),
    )


def _load_masked_lm(directory: Path, spec: dict) -> DiffusionBertForDenoising:
    """A format-2 TAD export: the family's `*ForMaskedLM`, wrapped as the denoiser."""
    from transformers import AutoConfig, PreTrainedModel

    mlm: PreTrainedModel
    info: dict[str, Any]
    cls = mlm_class(AutoConfig.from_pretrained(directory))
    mlm, info = cls.from_pretrained(directory, output_loading_info=True)  # type: ignore[misc]
    missing = info.get("missing_keys") or ()
    if missing:
        raise ValueError(f"{directory}: the export lacks weights: {', '.join(sorted(missing)[:5])}")
    config = DiffusionBertConfig(
        bert=mlm.config.to_dict(),
        time_design="none",
        num_timesteps=spec["num_timesteps"],
        diffusion=spec.get("diffusion"),
    )
    return DiffusionBertForDenoising(config, mlm=mlm)


def load_exported(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, schedule) from an export directory of either format; a clear error when
    it is not one."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / SCHEDULE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an exported DiffusionBERT model (run `dbert train` first)")
    spec_path = directory / DIFFUSION_CONFIG_FILE
    spec = read_json(spec_path) if spec_path.is_file() else {"format_version": 1}
    if spec["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{directory} is export format {spec['format_version']}; this pipeline reads up to {FORMAT_VERSION}"
        )
    if spec["format_version"] >= 2 and spec["time_design"] == "none":
        model = _load_masked_lm(directory, spec)
    else:  # format 1, or a time design: the denoiser's own config and weights
        register_auto_classes()
        model = DiffusionBertForDenoising.from_pretrained(directory)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, load_schedule(directory)
