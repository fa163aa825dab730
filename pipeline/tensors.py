"""Tensor helpers the model and the diffusion code share (imports nothing of the pipeline)."""

from __future__ import annotations

import torch
from torch import Tensor


def at_positions(values: Tensor, positions: Tensor) -> Tensor:
    """values [B, L, ...] at `positions` (bool [B, L] or flat indices [N] into B * L): [N, ...],
    row-major either way."""
    if positions.dtype == torch.bool:
        return values[positions]
    return values.reshape(-1, *values.shape[2:]).index_select(0, positions)
