"""Params as text: `a.b=c` overrides, experiment files (params.yaml's shape, only what an experiment
changes) turned into overrides, and the one flattening of nested params. No schema here: the schema
(`pipeline.config`) validates what these produce."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A params file or override that does not fit the schema; the message names the key."""


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as `a.b.c` -> value (an empty mapping stays a value): the one flattening
    of params, for `Params.flat` and for MLflow params given as plain mappings."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], c) with c parsed as YAML (so 3e-4, true, [1,2] work)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 3e-4 as a string
    return path, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=c` in a nested dict; an unknown group or key is caught by validation."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"override {item!r}: {part!r} is not a group")
            node = child
        node[path[-1]] = value
    return raw


def experiment_overrides(path: str | Path) -> list[str]:
    """An experiment file (a YAML mapping in params.yaml's shape holding only what the experiment
    changes) as `key=value` overrides, applied before any `--set`. Its values are the params an
    experiment's rows run with, so a row fingerprints the same whether it came from the file or
    from the same `--set` arguments."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"experiment file {p} does not exist")
    loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict) or not loaded:
        raise ParamsError(f"experiment file {p} must hold a mapping of param groups (like params.yaml)")
    overrides = []
    for key, value in flatten(loaded).items():
        if "." not in key:
            raise ParamsError(f"experiment file {p}: {key!r} is not a group of keys (e.g. train: {{steps: 100}})")
        overrides.append(
            f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}"
        )
    return overrides
