"""Tensor helpers the model, the diffusion code and training share (imports nothing of the pipeline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def at_positions(values: Tensor, positions: Tensor) -> Tensor:
    """values [B, L, ...] at `positions` (bool [B, L] or flat indices [N] into B * L): [N, ...],
    row-major either way."""
    if positions.dtype == torch.bool:
        return values[positions]
    return values.reshape(-1, *values.shape[2:]).index_select(0, positions)


def upload(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without making the host wait: page-locked first on CUDA (a copy
    from pageable memory waits for the device), then a non-blocking copy."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


_ID_TENSORS: dict[tuple[tuple[int, ...], str], Tensor] = {}


def id_tensor(ids: Sequence[int], device: torch.device) -> Tensor:
    """`ids` as a long tensor on `device`, uploaded once per (ids, device): a fresh upload from
    pageable host memory at every step would wait for the device."""
    key = (tuple(ids), str(device))
    hit = _ID_TENSORS.get(key)
    if hit is None:
        hit = _ID_TENSORS[key] = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    return hit
