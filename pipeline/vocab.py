"""The project's closed vocabularies, each defined once.

`params.yaml` validation (`pipeline.config`), the model, the schedules and the CLI all read these,
so adding a time design or a schedule is one edit here plus its implementation. This module
imports nothing heavy: `dbert --help` and the params schema load it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

# How the diffusion time step enters BERT (PAPER §4): none (time-agnostic), prefix (a time token),
# layerwise (added to every layer's input), embedding (added once to the token embeddings).
TimeDesign = Literal["none", "prefix", "layerwise", "embedding"]
TIME_DESIGNS: tuple[TimeDesign, ...] = get_args(TimeDesign)

# Noise schedules (pipeline.diffusion.schedules); spindle_paper is the original code's leaky one.
ScheduleName = Literal["linear", "cosine", "loglinear", "spindle", "spindle_paper", "power"]
SCHEDULES: tuple[ScheduleName, ...] = get_args(ScheduleName)

# Samplers of `dbert generate`, the evaluate stage and the comparison (pipeline.generation.sampling):
# the model's reverse chain, ReMDM remasking, confidence-ordered unmasking, BERT-Mouth Gibbs.
SamplerName = Literal["ancestral", "remdm", "confidence", "gibbs"]
SAMPLERS: tuple[SamplerName, ...] = get_args(SamplerName)
# How a `[MASK*?]` gap gets its length (`pipeline.generation.gap_length`).
GapLengthMethod = Literal["context", "bound", "prior"]
GAP_LENGTH_METHODS: tuple[GapLengthMethod, ...] = get_args(GapLengthMethod)

# Floating-point precision of training and evaluation; auto picks bf16 where it is fast.
Precision = Literal["auto", "fp32", "bf16"]
# Where evaluation runs: auto (the first CUDA GPU when one is visible, else the CPU), cpu, cuda, cuda:N.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

# progress(task, advance, total): advance the bar called `task` by `advance` of `total` units
# (total None: unknown). Library functions take one and the CLI draws it.
ProgressCallback = Callable[[str, int, "int | None"], None]
