"""Shared pieces of the benchmarks: real LM1B batches, the default model, a matmul peak, timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LM1B = Path(os.environ.get("DBERT_LM1B_DIR", ROOT.parent / "shared" / "data" / "lm1b"))

for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(key, "1")


def lm1b_lines(n: int, shard: int = 10) -> list[str]:
    path = LM1B / f"news.en.heldout-{shard:05d}-of-00050"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:n]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, size: int = 1536, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in `dtype` (the machine's practical peak)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = timed(lambda: a @ b, repeats, warmup=2)
    return 2 * size**3 / seconds


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per non-pad token: 6 x non-embedding params + 6 x hidden x vocab (the MLM
    decoder) + attention scores and mixing (12 x layers x L x hidden)."""
    cfg = model.mlm.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    return (
        6 * non_embedding
        + 6 * cfg.hidden_size * cfg.vocab_size
        + 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
    )
