"""The encoder's attention mask, built by the denoiser instead of by transformers.

Why: given a 2-D padding mask, transformers asks `mask.all()` to decide whether it may drop the
mask, and that question makes an accelerator stop and answer the host at every forward. A
prepared 4-D mask is used as it is. The mask built here is the one transformers builds
(boolean for SDPA, 0 / finfo.min for eager attention), so the numbers do not move; the same
builder gives packed rows their block-diagonal mask (a token sees only its own sentence).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Attention implementations that take a prepared [B, 1, L, L] mask as it is.
PREPARED_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


def takes_prepared_mask(implementation: str | None) -> bool:
    return implementation in PREPARED_MASK_IMPLEMENTATIONS


def attention_mask_4d(
    implementation: str, dtype: torch.dtype, padding: Tensor | None = None, segments: Tensor | None = None
) -> Tensor:
    """[B, 1, L, L] mask from a padding mask [B, L] (every query sees the real keys) or from
    segment ids [B, L] (a query sees the keys of its own segment; 0 = padding sees padding).

    SDPA: boolean, True = attend. Eager: `dtype`, 0 where attended and finfo(dtype).min elsewhere."""
    if segments is not None:
        allowed = segments[:, :, None] == segments[:, None, :]  # [B, L, L]
    elif padding is not None:
        batch, length = padding.shape
        allowed = padding.bool()[:, None, :].expand(batch, length, length)  # [B, L, L]
    else:
        raise ValueError("attention_mask_4d needs a padding mask or segment ids")
    allowed = allowed[:, None]  # [B, 1, L, L]
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.where(allowed, torch.zeros((), device=allowed.device, dtype=dtype), torch.finfo(dtype).min)
    raise ValueError(f"no prepared mask for attention implementation {implementation!r}")
