"""Publish an export folder to the Hugging Face Hub (`dbert publish`).

What goes up is the folder as `dbert train` wrote it, except the card: when the export carries
its card facts (`model_card.json`), README.md is rendered afresh with the evaluate stage's
metrics and the repository id, in memory. The export itself is a DVC output of the train stage
and is never changed here (rewriting its README after `dbert evaluate` would make DVC retrain).
Everything goes up in one commit (`HfApi.create_commit`, what `upload_folder` does inside).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import read_json
from pipeline.model.card import CARD_FILE, FACTS_FILE, render_card

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class PublishPlan:
    """What `publish` uploads: `files` (posix paths in the folder, README.md included) from
    `model_dir`, README.md's text `card`, and the metrics file the card quotes (if any)."""

    repo_id: str
    model_dir: Path
    files: tuple[str, ...]
    card: str
    metrics: Path | None

    def size(self) -> int:
        return sum((self.model_dir / name).stat().st_size for name in self.files if name != CARD_FILE) + len(
            self.card.encode("utf-8")
        )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (read now, not when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def folder_files(model_dir: Path) -> list[str]:
    """Every file under `model_dir`, without hidden ones and caches, as sorted posix paths."""
    names = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            names.append(rel.as_posix())
    return names


def plan_publish(model_dir: str | Path, repo_id: str, metrics: str | Path | None = None) -> PublishPlan:
    """Check the folder (an export with its card) and the repo id; what would be uploaded."""
    model_dir = Path(model_dir)
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"--repo-id must be USER/NAME (or ORG/NAME) on the Hugging Face Hub, got {repo_id!r}")
    if not (model_dir / "config.json").is_file() or not (model_dir / "diffusion_schedule.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an exported DiffusionBERT model (run `dbert train` first)")
    if not (model_dir / CARD_FILE).is_file():
        raise FileNotFoundError(
            f"{model_dir} has no model card {CARD_FILE} (`dbert train` writes it; retrain or add one)"
        )
    metrics_path = Path(metrics) if metrics is not None else None
    if metrics_path is not None and not metrics_path.is_file():
        raise FileNotFoundError(f"metrics file {metrics_path} not found (run `dbert evaluate` first)")
    if (model_dir / FACTS_FILE).is_file():
        values = read_json(metrics_path) if metrics_path is not None else None
        card = render_card(model_dir, read_json(model_dir / FACTS_FILE), values, repo_id)
    else:  # a card written by hand: uploaded as it is
        card, metrics_path = (model_dir / CARD_FILE).read_text(encoding="utf-8"), None
    return PublishPlan(repo_id, model_dir, tuple(folder_files(model_dir)), card, metrics_path)


def publish(plan: PublishPlan, private: bool = False, token: str | None = None) -> str:
    """Create the repository (if new) and upload the plan in one commit; the commit's URL."""
    if hub_offline():
        raise OSError("cannot publish while HF_HUB_OFFLINE=1 (offline mode): unset it, or use --dry-run")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(plan.repo_id, private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(name, plan.card.encode("utf-8") if name == CARD_FILE else str(plan.model_dir / name))
        for name in plan.files
    ]
    info = api.create_commit(plan.repo_id, operations, commit_message="Upload DiffusionBERT export (dbert publish)")
    return str(info.commit_url)
