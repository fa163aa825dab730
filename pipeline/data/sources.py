"""Corpus sources: each returns clean train/validation/test sentence lists.

Every source ends in the same `CorpusSplits`, so tokenisation and statistics never care where
the text came from. Bad input (missing file, undecodable bytes, empty corpus, unreachable hub)
raises `CorpusError` with a message that names the file or dataset, so a failing `prepare`
stage tells the user what to fix instead of dying in the tokenizer.
"""

from __future__ import annotations

import glob
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LM1B_SHARD_PATTERN = "news.en.heldout-{i:05d}-of-00050"
LM1B_HUB_NAME = "billion-word-benchmark/lm1b"
LM1B_HUB_CONFIG = "plain_text"
# The Hub repo's main branch holds only a loading script that datasets>=4 refuses to run;
# the parquet conversion lives on this ref.
LM1B_HUB_REVISION = "refs/convert/parquet"
DEFAULT_VALIDATION_FRACTION = 0.05  # same as params.yaml data.validation_fraction


class CorpusError(ValueError):
    """A corpus could not be read or is unusable; the message names the file or dataset."""


@dataclass(frozen=True)
class CorpusSplits:
    """Clean sentences (one per item) of the three splits."""

    train: list[str]
    validation: list[str]
    test: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        """Split name -> lines, in the fixed order train, validation, test."""
        return {"train": self.train, "validation": self.validation, "test": self.test}


def clean_lines(lines: Iterable[str]) -> list[str]:
    """Strip surrounding whitespace and drop empty lines (blank lines are not sentences)."""
    return [stripped for stripped in (line.strip() for line in lines) if stripped]


def read_text_file(path: str | os.PathLike[str]) -> list[str]:
    """Lines of a strict UTF-8 text file (newlines removed, not cleaned).

    Splits on "\\n" only (as `wc -l` counts), so Unicode line separators inside a sentence
    do not cut it in two.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus path is a directory, not a file: {path}") from None
    except OSError as err:
        raise CorpusError(f"cannot read corpus file {path}: {err}") from err
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        raise CorpusError(
            f"corpus file {path} is not valid UTF-8: line {line_no} has undecodable bytes "
            f"{data[err.start:err.end]!r} ({err.reason})"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # trailing newline, not an empty last line
    return [line.removesuffix("\r") for line in lines]


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 <= validation_fraction < 1.0:
        raise CorpusError(f"validation_fraction must be in [0, 1), got {validation_fraction}")


def _split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) row indices; shared by in-memory and hub splitting."""
    _check_fraction(validation_fraction)
    n_val = int(round(n * validation_fraction))
    if validation_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_train_validation(
    lines: Sequence[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Carve a seeded random validation subset; both parts keep the original line order.

    Validation gets round(n * fraction) lines, at least 1 when fraction > 0 and n >= 2, and
    train always keeps at least one line.
    """
    train_idx, val_idx = _split_indices(len(lines), validation_fraction, seed)
    return [lines[i] for i in train_idx], [lines[i] for i in val_idx]


def _check_max_sentences(max_sentences: int | None) -> None:
    if max_sentences is not None and max_sentences < 1:
        raise CorpusError(f"max_sentences must be >= 1 or None, got {max_sentences}")


def _cap(lines: list[str], max_sentences: int | None) -> list[str]:
    return lines if max_sentences is None else lines[:max_sentences]


def _finish(
    what: str,
    train: list[str],
    validation: list[str],
    test: list[str],
    max_sentences: int | None,
) -> CorpusSplits:
    """Refuse empty train/test splits (naming the source), then cap each split."""
    for name, lines in (("train", train), ("test", test)):
        if not lines:
            raise CorpusError(f"{what} corpus is empty: its {name} split has no non-blank lines")
    return CorpusSplits(
        train=_cap(train, max_sentences),
        validation=_cap(validation, max_sentences),
        test=_cap(test, max_sentences),
    )


def load_lm1b_mirror(
    mirror_dir: str | os.PathLike[str],
    train_shards: Sequence[int] = (10, 11, 12),
    test_shards: Sequence[int] = (13,),
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    max_sentences: int | None = None,
) -> CorpusSplits:
    """LM1B from a local directory of `news.en.heldout-XXXXX-of-00050` shards.

    Validation is carved from the train shards; `max_sentences` caps each split afterwards
    (the split itself never depends on the cap).
    """
    _check_max_sentences(max_sentences)
    _check_fraction(validation_fraction)
    mirror = Path(mirror_dir)
    if not mirror.is_dir():
        raise CorpusError(f"LM1B mirror directory not found: {mirror}")

    def read_shards(shards: Sequence[int]) -> list[str]:
        lines: list[str] = []
        for i in shards:
            shard = mirror / LM1B_SHARD_PATTERN.format(i=int(i))
            if not shard.is_file():
                raise CorpusError(f"LM1B shard {i} not found in mirror {mirror}: missing {shard}")
            lines.extend(clean_lines(read_text_file(shard)))
        return lines

    what = f"lm1b_mirror ({mirror})"
    if not train_shards or not test_shards:
        raise CorpusError(f"{what}: train_shards and test_shards must each name a shard")
    train_all, test = read_shards(train_shards), read_shards(test_shards)
    train, validation = split_train_validation(train_all, validation_fraction, seed)
    return _finish(what, train, validation, test, max_sentences)


def _load_hub(name: str, config: str | None, revision: str | None) -> Any:
    """`datasets.load_dataset` with every failure turned into a CorpusError naming the dataset."""
    import datasets  # lazy: importing datasets is slow and not needed by local sources

    where = f"{name!r} (config {config!r}" + (f", revision {revision!r})" if revision else ")")
    try:
        return datasets.load_dataset(name, config, revision=revision)
    except Exception as err:  # noqa: BLE001 - network, auth, missing-dataset errors all differ
        offline = any(
            os.environ.get(key, "").lower() in {"1", "true", "yes", "on"}
            for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else ""
        raise CorpusError(
            f"could not load hub dataset {where}: the Hugging Face Hub is unreachable or "
            f"offline{hint}, or the dataset/config does not exist and is not cached; "
            f"use a local source instead. Cause: {type(err).__name__}: {err}"
        ) from err


def _hub_split(dataset: Any, what: str, split: str) -> Any:
    if split not in dataset:
        raise CorpusError(f"{what} has no split {split!r}; available: {sorted(dataset)}")
    return dataset[split]


def _hub_text(
    rows: Any, what: str, split: str, text_column: str, indices: np.ndarray | None
) -> list[str]:
    if text_column not in rows.column_names:
        raise CorpusError(
            f"{what} split {split!r} has no column {text_column!r}; available: {rows.column_names}"
        )
    if indices is not None:
        rows = rows.select(indices)
    return clean_lines(rows[text_column])


def _capped(indices: np.ndarray, max_sentences: int | None) -> np.ndarray:
    return indices if max_sentences is None else indices[:max_sentences]


def _splits_from_hub(
    dataset: Any,
    what: str,
    text_column: str,
    train_split: str,
    test_split: str,
    validation_split: str | None,
    validation_fraction: float,
    seed: int,
    max_sentences: int | None,
) -> CorpusSplits:
    """Split by row index before materialising text, so a cap never loads all 30M LM1B rows.

    Rows are cleaned after selection, so a capped split may hold slightly fewer lines when the
    dataset contains blank rows.
    """
    train_rows = _hub_split(dataset, what, train_split)
    test_rows = _hub_split(dataset, what, test_split)
    if validation_split is not None:
        val_rows = _hub_split(dataset, what, validation_split)
        train_idx = np.arange(len(train_rows))
        val_idx = np.arange(len(val_rows))
    else:
        val_rows = train_rows
        train_idx, val_idx = _split_indices(len(train_rows), validation_fraction, seed)
    train = _hub_text(train_rows, what, train_split, text_column, _capped(train_idx, max_sentences))
    val_name = validation_split or train_split
    validation = _hub_text(val_rows, what, val_name, text_column, _capped(val_idx, max_sentences))
    test_idx = _capped(np.arange(len(test_rows)), max_sentences)
    test = _hub_text(test_rows, what, test_split, text_column, test_idx)
    return _finish(what, train, validation, test, max_sentences)


def load_lm1b_hub(
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    max_sentences: int | None = None,
) -> CorpusSplits:
    """LM1B from the Hugging Face Hub (parquet conversion; ~30M train / 306k test sentences)."""
    _check_max_sentences(max_sentences)
    _check_fraction(validation_fraction)
    dataset = _load_hub(LM1B_HUB_NAME, LM1B_HUB_CONFIG, LM1B_HUB_REVISION)
    return _splits_from_hub(
        dataset, f"lm1b_hub ({LM1B_HUB_NAME})", "text", "train", "test", None,
        validation_fraction, seed, max_sentences,
    )  # fmt: skip


def load_hub_dataset(
    name: str,
    config: str | None = None,
    text_column: str = "text",
    train_split: str = "train",
    test_split: str = "test",
    validation_split: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    max_sentences: int | None = None,
    revision: str | None = None,
) -> CorpusSplits:
    """Any Hub text dataset; validation is its own split when named, else carved from train."""
    _check_max_sentences(max_sentences)
    _check_fraction(validation_fraction)
    dataset = _load_hub(name, config, revision)
    return _splits_from_hub(
        dataset, f"hub ({name})", text_column, train_split, test_split, validation_split,
        validation_fraction, seed, max_sentences,
    )  # fmt: skip


def _expand(patterns: Sequence[str | os.PathLike[str]], role: str) -> list[Path]:
    """Expand globs; literal paths pass through so a missing one is reported by name."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise CorpusError(f"text_files: no {role} files given")
    paths: set[str] = set()
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = glob.glob(pattern, recursive=True)
            if not matches:
                raise CorpusError(f"text_files: {role} pattern {pattern!r} matches no file")
            paths.update(matches)
        else:
            paths.add(pattern)
    return [Path(p) for p in sorted(paths)]


def _read_files(paths: list[Path]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        lines.extend(clean_lines(read_text_file(path)))
    return lines


def load_text_files(
    train: Sequence[str | os.PathLike[str]],
    test: Sequence[str | os.PathLike[str]],
    validation: Sequence[str | os.PathLike[str]] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    max_sentences: int | None = None,
) -> CorpusSplits:
    """Local UTF-8 text files, one sentence per line; globs allowed, files read in sorted order."""
    _check_max_sentences(max_sentences)
    _check_fraction(validation_fraction)
    train_paths = _expand(train, "train")
    test_paths = _expand(test, "test")
    what = (
        f"text_files (train: {', '.join(map(str, train_paths))}; "
        f"test: {', '.join(map(str, test_paths))})"
    )
    train_lines = _read_files(train_paths)
    if validation is not None:
        val_lines = _read_files(_expand(validation, "validation"))
    else:
        train_lines, val_lines = split_train_validation(train_lines, validation_fraction, seed)
    test_lines = _read_files(test_paths)
    return _finish(what, train_lines, val_lines, test_lines, max_sentences)


SOURCES: dict[str, Callable[..., CorpusSplits]] = {
    "lm1b_mirror": load_lm1b_mirror,
    "lm1b_hub": load_lm1b_hub,
    "text_files": load_text_files,
    "hub": load_hub_dataset,
}


def load_corpus(source: str, **options: Any) -> CorpusSplits:
    """Dispatch to the named source; options are that loader's keyword arguments."""
    if source not in SOURCES:
        raise CorpusError(f"unknown corpus source {source!r}; valid sources: {sorted(SOURCES)}")
    loader = SOURCES[source]
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as err:
        valid = list(inspect.signature(loader).parameters)
        raise CorpusError(
            f"bad options for corpus source {source!r}: {err}; valid: {valid}"
        ) from None
    return loader(**options)
