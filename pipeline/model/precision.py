"""Mixed precision: bf16 autocast where the hardware has fast bf16, fp32 elsewhere.

On CPUs with AMX (or AVX512-BF16) a bf16 autocast training step of the default model runs about
2-3x faster than fp32 (benchmarks/); on CUDA GPUs bf16 is the default whenever supported.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.vocab import PRECISIONS


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` -> `bf16` on a bf16-capable GPU or a CPU with AMX / AVX512-BF16, else `fp32`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA GPU when one is visible, else the CPU. A CUDA device that is not
    there is refused by name here, before a model is loaded, rather than deep inside torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible here; use auto or cpu")
        if chosen.index is not None and chosen.index >= visible:
            raise ValueError(f"device {device!r} asked for, but only {visible} CUDA GPU(s) are visible (cuda:0..)")
    return chosen


def autocast(device: torch.device | str, precision: str):
    """Autocast context for a resolved precision (`fp32` -> a no-op context)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def prefer_fast_attention(model, device: torch.device | str) -> None:
    """On CPU, the eager attention kernels beat SDPA for BERT-sized sequences (about 10% of a
    bf16 training step, benchmarks/bench_train.py); on GPU keep SDPA / flash attention."""
    if torch.device(device).type == "cpu" and hasattr(model.mlm, "set_attn_implementation"):
        model.mlm.set_attn_implementation("eager")
