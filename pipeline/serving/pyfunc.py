"""The exported model as an MLflow pyfunc, so `mlflow models serve` answers text requests.

Why a pyfunc and not MLflow's transformers flavor: sampling is the reverse diffusion chain of
`pipeline.api`, not a `transformers` pipeline, so the served model is this class; the export
folder travels as its artifact `export` and the `pipeline` package as its code (`code_paths`), so
a serving process needs only the installed dependencies, not this checkout.

A request is a table (a pandas DataFrame, or a list of dicts; `dataframe_records` over HTTP), one
request per row:
- `prompt`: text continued by `length` generated WordPieces (default 16), or
- `infill`: a template whose `[MASK]` / `[MASK*n]` gaps are generated, or
- neither: an unconditional sample of `length` WordPieces (default 24);
- `num`: samples per row (default 1);
- sampler options `steps`, `sampler`, `top_k`, `top_p`, `temperature`, `seed`: per row, or for
  every row through MLflow's `params`; a row's own value wins.
The answer has one row per sample: `row` (the request's index), `request` (its text), `text`.
Each row is sampled on its own, so its answer does not depend on the other rows of the batch.
The serving process puts the model on `$DBERT_DEVICE` (default auto: a CUDA GPU when one is
visible, else the CPU; or cpu, cuda, cuda:N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

EXPORT_ARTIFACT = "export"
ENV_DEVICE = "DBERT_DEVICE"  # where a serving process puts the model (pipeline.model.precision.resolve_device)
UNCONDITIONAL_LENGTH = 24  # pipeline.api's default for generate()
# Sampler options a request may set, with their MLflow type; defaults are pipeline.api's.
OPTIONS = {
    "steps": "long",
    "sampler": "string",
    "top_k": "long",
    "top_p": "double",
    "temperature": "double",
    "seed": "long",
}
OPTION_DEFAULTS: dict[str, Any] = {
    "steps": 128,
    "sampler": "ancestral",
    "top_k": 30,
    "top_p": 1.0,
    "temperature": 1.0,
    "seed": 0,
}


@dataclass(frozen=True)
class TextRequest:
    """One row of a request table, validated."""

    kind: str  # "prompt", "infill" or "generate"
    text: str
    length: int | None
    num: int
    options: dict[str, Any] = field(default_factory=dict)


def _missing(value: Any) -> bool:
    """None, NaN (a blank cell of a mixed DataFrame) or an empty string."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _int(value: Any, name: str, row: int) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"row {row}: {name} must be a whole number, got {value!r}")
    return int(number)


def _records(model_input: Any) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        return list(model_input.to_dict(orient="records"))
    if isinstance(model_input, dict):
        return [model_input]
    return [dict(r) for r in model_input]


def parse_requests(model_input: Any, params: dict[str, Any] | None = None) -> list[TextRequest]:
    """Rows of `model_input` as requests; a ValueError naming the row for a bad one."""
    shared = {k: v for k, v in (params or {}).items() if k in OPTIONS and not _missing(v)}
    requests = []
    for i, record in enumerate(_records(model_input)):
        prompt, infill = record.get("prompt"), record.get("infill")
        if not _missing(prompt) and not _missing(infill):
            raise ValueError(f"row {i}: give a prompt or an infill template, not both")
        kind, text = ("prompt", prompt) if not _missing(prompt) else ("infill", infill)
        if _missing(text):
            kind, text = "generate", ""
        length = None if _missing(record.get("length")) else _int(record["length"], "length", i)
        if kind == "infill" and length is not None:
            raise ValueError(f"row {i}: an infill template sets its own length with [MASK*n]; drop length")
        num = 1 if _missing(record.get("num")) else _int(record["num"], "num", i)
        options = {**OPTION_DEFAULTS, **shared}
        options.update({k: record[k] for k in OPTIONS if not _missing(record.get(k))})
        for name, kind_of in OPTIONS.items():
            value = options[name]
            options[name] = (
                _int(value, name, i) if kind_of == "long" else (float(value) if kind_of == "double" else str(value))
            )
        requests.append(TextRequest(kind, str(text), length, num, options))
    return requests


def answer(model, requests: list[TextRequest]) -> list[dict[str, Any]]:
    """One record (row, request, text) per sample, in request order; `model` a `pipeline.api.DiffusionBert`."""
    out: list[dict[str, Any]] = []
    for i, req in enumerate(requests):
        if req.kind == "prompt":
            texts = model.complete(req.text, length=req.length or 16, num=req.num, **req.options)
        elif req.kind == "infill":
            texts = model.infill(req.text, num=req.num, **req.options)
        else:
            texts = model.generate(num=req.num, length=req.length or UNCONDITIONAL_LENGTH, **req.options)
        out.extend({"row": i, "request": req.text, "text": text} for text in texts)
    return out


class DiffusionBertPyfunc(PythonModel):
    """`load_context` loads the export artifact with `pipeline.api.load`; `predict` answers a
    request table (see the module docstring) with a DataFrame of samples."""

    def load_context(self, context) -> None:
        import os

        from pipeline.generation.api import load

        self.model = load(context.artifacts[EXPORT_ARTIFACT], device=os.environ.get(ENV_DEVICE, "auto"))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        records = answer(self.model, parse_requests(model_input, params))
        return pd.DataFrame(records, columns=["row", "request", "text"])


def signature():
    """Optional request columns, the sampler options also as params, and the answer's columns."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    columns: list[Any] = [ColSpec("string", "prompt", required=False), ColSpec("string", "infill", required=False)]
    # Numbers as `any`: a blank cell of a mixed table is NaN, so a partly filled integer column
    # arrives as float64, which MLflow refuses for `long`, and it refuses int64 for `double`;
    # parse_requests checks the values (whole numbers where they must be).
    numeric = ["length", "num", *(name for name, kind in OPTIONS.items() if kind != "string")]
    columns += [ColSpec(AnyType(), name, required=False) for name in numeric]
    columns += [ColSpec("string", name, required=False) for name, kind in OPTIONS.items() if kind == "string"]
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([ColSpec("long", "row"), ColSpec("string", "request"), ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec(name, kind, OPTION_DEFAULTS[name]) for name, kind in OPTIONS.items()]),
    )


def input_example() -> pd.DataFrame:
    """A prompt row and an infill row, with few steps: MLflow runs it once when it logs the model."""
    return pd.DataFrame(
        [
            {"prompt": "the weather today is", "infill": None, "length": 4, "num": 1, "steps": 8, "seed": 0},
            {
                "prompt": None,
                "infill": "the [MASK*2] sat on the mat .",
                "length": None,
                "num": 1,
                "steps": 8,
                "seed": 0,
            },
        ]
    )
