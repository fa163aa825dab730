"""Rows of several whole sentences that cannot see each other: the encoder spends no compute on
padding, and every sentence is encoded exactly as it would be alone in a padded batch.

A padded batch [B, L] of sentences of lengths n_b spends B * L token slots on sum(n_b) tokens;
LM1B sentences are short and uneven, so a token budget filled with padding is largely wasted.
Here the sentences of a noised batch are laid end to end in rows of `row_length` slots
(first-fit decreasing), each one with its own position ids (0, 1, ... as if it stood alone) and
a segment id that keeps attention inside the sentence (a block-diagonal mask). Only the tail of
each row is padding. The masked positions keep the padded layout's order, so the loss reads the
same [N, V] logits, row for row, as from the padded batch: the bound is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from pipeline.diffusion.noising import NoisedBatch
from pipeline.tensors import upload


@dataclass(frozen=True)
class SentenceRows:
    """A noised batch re-laid as R rows of P slots. Segment 0 is padding; segment k >= 1 is the
    batch's sentence k - 1."""

    input_ids: Tensor  # [R, P] long, x_t
    segments: Tensor  # [R, P] long
    position_ids: Tensor  # [R, P] long, each token's index inside its sentence (0 on padding)
    flat_positions: Tensor  # [N] long, the masked positions in R * P, in the padded layout's order

    def uploaded(self, device: torch.device | str) -> SentenceRows:
        """Every tensor on `device`, copied without making the host wait (`pipeline.tensors.upload`)."""
        device = torch.device(device)
        return replace(self, **{f.name: upload(getattr(self, f.name), device) for f in fields(self)})

    @property
    def slots(self) -> int:
        """Token slots the encoder computes (real tokens + row-tail padding)."""
        return int(self.input_ids.numel())


def first_fit_rows(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign sentences of `lengths` [B] to rows of `row_length` slots, longest first, each to the
    first row it fits in: (row [B], offset in the row [B]). Deterministic (ties keep batch order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > row_length:
        raise ValueError(f"a sentence of {int(lengths.max())} tokens does not fit a row of {row_length} slots")
    row = np.zeros(len(lengths), dtype=np.int64)
    offset = np.zeros(len(lengths), dtype=np.int64)
    filled: list[int] = []
    for b in np.argsort(-lengths, kind="stable"):
        n = int(lengths[b])
        for r, used in enumerate(filled):
            if used + n <= row_length:
                row[b], offset[b] = r, used
                filled[r] += n
                break
        else:
            row[b], offset[b] = len(filled), 0
            filled.append(n)
    return row, offset


def pack_rows(noised: NoisedBatch, row_length: int) -> SentenceRows:
    """The sentences of a host batch [B, L] in rows of `row_length` slots (see the module doc)."""
    if noised.device.type != "cpu":
        raise ValueError(f"rows are packed on the host, got a batch on {noised.device}")
    batch, width = noised.x_t.shape
    lengths = noised.attention_mask.sum(1).numpy()  # [B] (padding is always at the right)
    row, offset = first_fit_rows(lengths, row_length)
    num_rows = int(row.max()) + 1 if batch else 0
    real = noised.attention_mask.numpy()  # [B, L]
    b_idx, l_idx = np.nonzero(real)  # every real token, row-major
    dest = row[b_idx] * row_length + offset[b_idx] + l_idx  # [tokens] slot in R * P
    ids = np.zeros(num_rows * row_length, dtype=np.int64)
    segments = np.zeros_like(ids)
    position_ids = np.zeros_like(ids)
    ids[dest] = noised.x_t.numpy()[b_idx, l_idx]
    segments[dest] = b_idx + 1
    position_ids[dest] = l_idx
    flat = noised.flat_positions.numpy()  # [N] in B * L
    fb, fl = flat // width, flat % width
    packed_flat = row[fb] * row_length + offset[fb] + fl  # [N] in R * P

    def rows_of(values: np.ndarray) -> Tensor:
        return torch.from_numpy(values.reshape(num_rows, row_length))

    return SentenceRows(
        input_ids=rows_of(ids),
        segments=rows_of(segments),
        position_ids=rows_of(position_ids),
        flat_positions=torch.from_numpy(packed_flat),
    )
