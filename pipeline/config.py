"""Typed schema of params.yaml, grouped by stage (overrides and experiment files as text: `pipeline.overrides`).

params.yaml is the single source of truth. Every stage reads it through `load_params`, so an
unknown key, a wrong type or an out-of-range value fails the same way everywhere: one line that
names the key. Overrides use the syntax of `dvc exp run -S` (`train.lr=3e-4`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.limits import max_spindle_lambda
from pipeline.overrides import ParamsError as ParamsError
from pipeline.overrides import apply_overrides
from pipeline.overrides import flatten as flatten
from pipeline.vocab import DEVICE_PATTERN, SAMPLERS, TIME_DESIGNS, Precision, SamplerName, ScheduleName, TimeDesign


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Group):
    """`prepare` stage: where text comes from and how it is cut into sequences."""

    source: Literal["lm1b_mirror", "lm1b_hub", "text_files", "hub"] = "lm1b_mirror"
    mirror_dir: str = "../shared/data/lm1b"
    train_shards: list[int] = Field(default_factory=lambda: [10, 11, 12])
    test_shards: list[int] = Field(default_factory=lambda: [13])
    train_files: list[str] = Field(default_factory=list)
    validation_files: list[str] = Field(default_factory=list)
    test_files: list[str] = Field(default_factory=list)
    hub_name: str | None = None
    hub_config: str | None = None
    text_column: str = "text"
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_sentences: int | None = Field(None, ge=1)
    max_seq_len: int = Field(64, ge=3, le=4096)
    seed: int = 0


class ModelParams(_Group):
    """Which BERT (or other masked-LM encoder) initialises the denoiser, and how the time step
    enters it (PAPER §5)."""

    name_or_path: str = "default"
    time_design: TimeDesign = "none"
    random_init: bool = False
    # Architecture and shape of a randomly initialised encoder (used only when name_or_path ==
    # "random"; a checkpoint's family is its own model_type). The names are
    # pipeline.model.families.FAMILY_NAMES (spelled out here so the schema stays free of torch).
    family: Literal["bert", "roberta", "distilbert", "modernbert"] = "bert"
    hidden_size: int = Field(384, ge=8)
    num_layers: int = Field(6, ge=1)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(1536, ge=8)
    head_init_seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be divisible by model.num_heads")
        return self


class DiffusionParams(_Group):
    """`schedule` stage: the forward process and its noise schedule (PAPER §2-§3)."""

    schedule: ScheduleName = "spindle"
    num_timesteps: int = Field(2048, ge=1, le=1_000_000)
    spindle_lambda: float = Field(0.3, ge=0.0)
    power_gamma: float = Field(1.0, ge=0.0)  # the power schedule's strength (0 = linear; no cap)
    loglinear_eps: float = Field(1e-3, gt=0.0, lt=1.0)
    hybrid_lambda: float = Field(0.01, ge=0.0)


class TrainParams(_Group):
    """`train` stage: optimisation and the Ray Train scaling."""

    objective: Literal["diffusion", "mlm"] = "diffusion"  # mlm: plain BERT fine-tune (BERT-Mouth)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    precision: Precision = "auto"
    packed: bool = False
    # Batches filled to this many real tokens and laid out as packed rows (no compute on padding,
    # the same loss as padded batches); None: batches of `batch_size` padded sentences.
    tokens_per_batch: int | None = Field(None, ge=1)
    row_length: int = Field(128, ge=3)  # slots per packed row (>= data.max_seq_len)
    compile: bool = False  # torch.compile the model for training
    seed: int = 0
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    num_workers: int = Field(0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=0)
    # Sentences per optimizer step over all workers; None: batch_size x workers. Set, the step is
    # the same whatever the worker count: the mean of global / batch_size micro-batches (each a
    # per-token mean), with noise and dropout keyed by the micro-batch's place in the global batch;
    # each worker accumulates global / (batch_size x workers) of them (pipeline.train.loop).
    global_batch_size: int | None = Field(None, ge=1)
    # Where Ray keeps runs and checkpoints: None (<project>/ray_results), a shared path, or a URI.
    storage: str | None = None
    # 0: fail at once when the cluster is too small; > 0: ask the autoscaler and wait this long.
    placement_timeout_s: float = Field(0.0, ge=0.0)
    # How Ray places the workers' bundles: PACK (fewest nodes) or SPREAD (one per node where it can).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _one_packing(self) -> TrainParams:
        if self.packed and self.tokens_per_batch is not None:
            raise ValueError(
                "train.packed (sentences cut into fixed rows) and train.tokens_per_batch (whole sentences in "
                "packed rows) are two different layouts; set one of them"
            )
        if self.global_batch_size is not None and self.tokens_per_batch is not None:
            raise ValueError(
                "train.global_batch_size counts sentences and train.tokens_per_batch counts tokens; with a token "
                "budget each step takes tokens_per_batch x workers tokens: unset train.global_batch_size"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each worker adds up per optimizer step (1 without `global_batch_size`)."""
        if self.global_batch_size is None:
            return 1
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ParamsError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.batch_size="
                f"{self.batch_size} x {world_size} worker(s) = {per_step}; pick a global batch that is, "
                f"or change train.batch_size"
            )
        return self.global_batch_size // per_step


def _every_sampler() -> list[SamplerName]:
    return list(SAMPLERS)


class EvalParams(_Group):
    """`evaluate` stage: the bound on the test split and generation quality (PAPER §7)."""

    full: bool = False
    num_sequences: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)
    bound_steps: int = Field(32, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    num_samples: int = Field(128, ge=2)  # and as many again, disjoint, for Self-BLEU
    sample_length: int = Field(0, ge=0)  # 0: sample lengths from the training histogram
    sample_steps: int = Field(128, ge=1)
    top_k: int = Field(30, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    num_references: int = Field(0, ge=0)  # 0: the whole test split (the authors' protocol)
    sample_seed: int = 0
    table_steps: list[int] = Field(default_factory=lambda: [2, 16, 128])  # steps vs time vs quality
    table_sequences: int = Field(32, ge=1)
    table_samples: int = Field(16, ge=2)
    qd_top_k: list[int] = Field(default_factory=lambda: [1, 10, 30, 0])  # 0 = no truncation
    qd_samples: int = Field(16, ge=2)
    # The samplers stage's rows: the ancestral sampler at every table_steps (the steps table's own
    # samples), the others at every compare_steps (gibbs once: its cost is sweeps, not steps).
    compare_samplers: list[SamplerName] = Field(default_factory=_every_sampler)
    compare_steps: list[int] = Field(default_factory=lambda: [16, 64])
    # ancestral: the model's chain; remdm: ancestral + ReMDM remasking; confidence: MaskGIT/LLaDA
    # confidence-ordered unmasking; gibbs: BERT-Mouth. Only ancestral is the model's chain.
    sampler: SamplerName = "ancestral"
    confidence_score: Literal["prob", "margin", "entropy"] = "prob"  # the confidence sampler's order
    remdm_eta: float = Field(0.04, ge=0.0, le=1.0)  # ReMDM-cap's remasking budget
    gibbs_sweeps: int = Field(2, ge=1)
    precision: Precision = "auto"
    # Where the bound, the samples and the sampler comparison run: auto (a CUDA GPU when visible,
    # else the CPU), cpu, cuda or cuda:N. On a GPU the bound is ~100x faster than on 2 CPU cores.
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    compare_init: bool = False  # also bound the untrained initial model (seed 0) for comparison
    # Prefix completion and infilling on this many test sentences (conditional bound with the
    # first seed, and span fills with the sample settings); 0 = off.
    conditional_sequences: int = Field(64, ge=0)
    # A causal LM (Hub id or local folder) that scores the samples' generative perplexity, reported
    # with their entropy (pipeline/eval/judge.py); "" = off. The successors (MDLM, SEDD, ReMDM) use gpt2-large.
    judge: str = ""


class TuneParams(_Group):
    """`tune` stage (opt-in): Ray Tune over the time design and, when asked, lr and lambda."""

    time_designs: list[TimeDesign] = Field(default_factory=lambda: list(TIME_DESIGNS))
    lrs: list[float] = Field(default_factory=list)
    spindle_lambdas: list[float] = Field(default_factory=list)
    power_gammas: list[float] = Field(default_factory=list)  # with diffusion.schedule: power
    num_samples: int = Field(1, ge=1)
    steps: int = Field(200, ge=1)
    grace_period: int = Field(50, ge=1)
    max_concurrent: int = Field(1, ge=1)


PAPER_ROWS = (  # PAPER §8's table at this scale: the default `ablation.rows`
    "dbert_spindle_tad",
    "dbert_linear_tad",
    "d3pm_linear_tad",
    "dbert_linear_lte",
    "dbert_linear_pte",
    "d3pm_linear_lte",
    "bert_mouth",
    "dbert_spindle_paper_tad",
    "dbert_spindle_tad_packed",
)
# Every row `ablation.rows` may name: the paper's, and the schedule experiment's (`make schedules`):
# the exact power schedule and the successor's recipe (MDLM: log-linear, continuous-time loss).
ABLATION_ROWS = (*PAPER_ROWS, "dbert_power_tad", "mdlm_loglinear_tad")


class AblationParams(_Group):
    """`dbert ablation` (opt-in): the paper's rows (PAPER §8) as configurations, same budget each."""

    rows: list[Literal[ABLATION_ROWS]] = Field(default_factory=lambda: list(PAPER_ROWS))  # type: ignore[valid-type]
    train_steps: int = Field(300, ge=1)  # the per-row training budget (optimizer steps)
    seeds: list[int] = Field(default_factory=lambda: [0, 1])  # training seeds of the repeated rows
    repeat_rows: list[Literal[ABLATION_ROWS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["dbert_spindle_tad", "dbert_linear_tad"]
    )  # spindle vs linear, 2 seeds
    detail_rows: list[Literal[ABLATION_ROWS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["dbert_spindle_tad"]
    )  # also get the steps table and the top-k curve
    table_sequences: int = Field(128, ge=1)  # test sentences per steps-table bound (detail rows)
    detail_samples: int = Field(64, ge=2)  # samples per steps-table row and top-k point (detail rows)
    # The ablation's own evaluation size (every row): the default run scores fewer sentences to stay
    # fast, while the rows keep the protocol they were measured with.
    num_sequences: int = Field(256, ge=1)  # test sentences each row's bound scores
    num_samples: int = Field(128, ge=2)  # samples for BLEU (and as many for Self-BLEU) per row
    bound_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)  # each row's bound: chain seeds
    table_steps: list[int] = Field(default_factory=lambda: [2, 8, 16, 64, 128])  # steps table (detail rows)
    qd_top_k: list[int] = Field(default_factory=lambda: [1, 3, 10, 30, 0])  # top-k curve (detail rows)
    # Where the rows, the state and the report go: another folder keeps a second experiment (the
    # schedule experiment: `make schedules`) apart from the paper's table.
    out: str = "outputs/ablation"
    # A committed folder (e.g. reports/schedules) that gets each finished row's result.json and the
    # report so far as rows land; a checkout without `out` reuses the rows published there (same
    # fingerprint) instead of re-measuring them. "" = off.
    publish: str = ""

    @model_validator(mode="after")
    def _seeds_unique(self) -> AblationParams:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ablation.seeds must be distinct training seeds, got {self.seeds}")
        return self


class TrackingParams(_Group):
    """MLflow: one experiment for every stage."""

    experiment: str = "diffusionbert"
    # The train stage logs its model as an MLflow pyfunc and registers it under this name (the
    # Model Registry); "" = neither.
    registered_model: str = "diffusion-bert"


class Params(_Group):
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    diffusion: DiffusionParams = Field(default_factory=DiffusionParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvalParams = Field(default_factory=EvalParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    ablation: AblationParams = Field(default_factory=AblationParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _spindle_keeps_alpha_monotone(self) -> Params:
        d = self.diffusion
        if d.schedule == "spindle" and d.spindle_lambda > max_spindle_lambda(d.num_timesteps):
            raise ValueError(
                f"diffusion.spindle_lambda={d.spindle_lambda} breaks monotonicity of alpha_t for "
                f"T={d.num_timesteps}: it must be <= {max_spindle_lambda(d.num_timesteps):.4f}"
            )
        return self

    @model_validator(mode="after")
    def _rows_hold_a_sentence(self) -> Params:
        if self.train.tokens_per_batch is not None:
            longest = self.data.max_seq_len
            if self.train.row_length < longest:
                raise ValueError(
                    f"train.row_length={self.train.row_length} is shorter than data.max_seq_len={longest}: "
                    f"a packed row must hold the longest sentence"
                )
            if self.train.tokens_per_batch < longest:
                raise ValueError(
                    f"train.tokens_per_batch={self.train.tokens_per_batch} is below data.max_seq_len={longest}: "
                    f"a batch must hold the longest sentence"
                )
        return self

    def flat(self) -> dict[str, Any]:
        """Flattened `group.key` -> value, for MLflow params and row fingerprints."""
        return flatten(self.model_dump())


def params_from_dict(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_describe(err)) from None


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """`params` with each `group.key` set to its value, validated as a whole like a params file
    (ParamsError naming the key): for values that come from code or options, not `a.b=c` text."""
    raw = params.model_dump()
    for key, value in values.items():
        group, dot, name = key.partition(".")
        if not dot:
            raise ParamsError(f"{key!r} is not a group.key name")
        raw.setdefault(group, {})[name] = value
    return params_from_dict(raw)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml (missing file -> defaults only when path is None)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file {p} does not exist")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ParamsError(f"params file {p} must hold a mapping of stage groups")
        raw = loaded or {}
    return params_from_dict(apply_overrides(raw, list(overrides or [])))


def _describe(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "params"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        given = e.get("input")
        suffix = f" (got {given!r})" if e["type"] != "extra_forbidden" and not isinstance(given, dict) else ""
        lines.append(f"{key}: {msg}{suffix}")
    return "invalid params: " + "; ".join(lines)
