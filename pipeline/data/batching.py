"""Batches for training and evaluation: length-bucketed dynamic padding, or MDLM-style packing.

Bucketing sorts lengths only inside large random chunks, so batches stay random across the
epoch while padding (wasted compute) shrinks. Every order is a pure function of (seed, epoch),
which lets a resumed run skip exactly the batches it already trained on (`start_batch`) and
lets each DDP rank take its own disjoint, equally long share.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.tokenize import TokenizedSplit


def epoch_seed(seed: int, epoch: int) -> int:
    """Mix the epoch into the seed so each epoch has a fresh yet reproducible order."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def length_bucketed_batches(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    bucket_factor: int = 50,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Index batches with similar lengths; every index appears once (unless dropped by drop_last).

    Shuffle, cut into chunks of batch_size * bucket_factor, sort each chunk by length, cut it
    into batches, then shuffle the batch order. bucket_factor=1 gives plain random batches.
    """
    if batch_size < 1 or bucket_factor < 1:
        raise ValueError(
            f"batch_size and bucket_factor must be >= 1, got {batch_size}, {bucket_factor}"
        )
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    chunk = batch_size * bucket_factor
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        idx = perm[start : start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches.extend(idx[i : i + batch_size] for i in range(0, len(idx), batch_size))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    order = rng.permutation(len(batches))
    return [batches[i].astype(np.int64, copy=False) for i in order]


def token_budget_batches(lengths: np.ndarray, tokens_per_batch: int, seed: int, drop_last: bool = False) -> list[np.ndarray]:
    """Index batches of whole sentences in a seeded random order, each holding at most
    `tokens_per_batch` real tokens (a new batch starts where the next sentence would overflow).
    The batch size in sentences varies; the work per step does not. drop_last drops the tail."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, got {tokens_per_batch}")
    if lengths.size and int(lengths.max()) > tokens_per_batch:
        raise ValueError(f"a sentence of {int(lengths.max())} tokens does not fit a batch of {tokens_per_batch} tokens")
    perm = np.random.default_rng(seed).permutation(len(lengths))
    batches: list[np.ndarray] = []
    start, used = 0, 0
    for i, n in enumerate(lengths[perm].tolist()):
        if used + n > tokens_per_batch:
            batches.append(perm[start:i])
            start, used = i, 0
        used += n
    if start < len(perm) and not drop_last:
        batches.append(perm[start:])
    return [b.astype(np.int64, copy=False) for b in batches]


def sorted_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches of near-equal length: indices sorted by length (stable), cut every
    `batch_size`. Deterministic, so a seeded evaluation is reproducible; callers put results back
    in the original order. On LM1B test lines this halves the padded tokens a bound or sampler
    computes (256 lines in batches of 32: 15,904 padded tokens in file order, 8,512 sorted)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].astype(np.int64, copy=False) for i in range(0, len(order), batch_size)]


def pad_batch(sequences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids Long [B, L], attention_mask Bool [B, L])."""
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]  # [B, L]
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)  # [B, L]
    input_ids[mask] = np.concatenate(sequences)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def pack_sequences(split: TokenizedSplit, seq_len: int) -> np.ndarray:
    """Concatenate all [CLS] ... [SEP] sequences and cut into rows: int64 [N, seq_len].

    The tail that does not fill a row is dropped. Rows may start or end mid-sentence (as in
    MDLM's packed LM1B setting), so packed and padded numbers are not comparable.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_rows = len(split.ids) // seq_len
    return np.asarray(split.ids[: n_rows * seq_len], dtype=np.int64).reshape(n_rows, seq_len)


def _batch_index_lists(
    split: TokenizedSplit,
    batch_size: int,
    seed: int,
    epoch: int,
    packed: bool,
    seq_len: int | None,
    bucket_factor: int,
    drop_last: bool,
    rank: int,
    world_size: int,
    tokens_per_batch: int | None = None,
    per_step: int = 1,
) -> list[np.ndarray]:
    """This rank's batches (row indices into the packed matrix, or sequence indices).

    The epoch's batches are dealt round-robin: rank r takes batches r, r + W, r + 2W, ... So with
    `per_step` micro-batches per rank per optimizer step, step n covers the epoch's batches
    n K ... n K + K - 1 (K = W x per_step) whatever the split into ranks and micro-batches. The
    epoch is cut to a multiple of K, so no step straddles two epochs (and no rank runs an extra
    step: DDP would hang)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    mixed = epoch_seed(seed, epoch)
    if packed:
        if seq_len is None:
            raise ValueError("packed batches need seq_len")
        n_rows = len(split.ids) // seq_len
        perm = np.random.default_rng(mixed).permutation(n_rows)
        batches = [perm[i : i + batch_size] for i in range(0, n_rows, batch_size)]
        if drop_last:
            batches = [b for b in batches if len(b) == batch_size]
    elif tokens_per_batch is not None:
        batches = token_budget_batches(split.lengths, tokens_per_batch, mixed, drop_last)
    else:
        batches = length_bucketed_batches(
            split.lengths, batch_size, mixed, bucket_factor, drop_last
        )
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    usable = len(batches) - len(batches) % (world_size * per_step)
    return batches[:usable][rank::world_size]


def num_batches(
    split: TokenizedSplit,
    batch_size: int,
    packed: bool = False,
    seq_len: int | None = None,
    drop_last: bool = False,
    world_size: int = 1,
    tokens_per_batch: int | None = None,
    seed: int = 0,
    per_step: int = 1,
) -> int:
    """Batches per epoch per rank (independent of seed and epoch, except under a token budget,
    where it is epoch 0's count); `per_step` as in `iterate_batches`."""
    group = world_size * per_step
    if tokens_per_batch is not None:
        total = len(token_budget_batches(split.lengths, tokens_per_batch, epoch_seed(seed, 0), drop_last))
        return total // group * per_step
    if packed and seq_len is None:
        raise ValueError("packed batches need seq_len")
    n = len(split.ids) // seq_len if packed and seq_len else len(split)
    # Bucketing leaves a partial batch only at the end of the last chunk: the plain count holds.
    total = n // batch_size if drop_last else -(-n // batch_size)
    return total // group * per_step


def iterate_batches(
    split: TokenizedSplit,
    batch_size: int,
    seed: int,
    epoch: int,
    pad_id: int,
    packed: bool = False,
    seq_len: int | None = None,
    start_batch: int = 0,
    bucket_factor: int = 50,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    tokens_per_batch: int | None = None,
    per_step: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {"input_ids": Long [B, L], "attention_mask": Bool [B, L]} for one epoch.

    Padded mode uses length buckets and pads to the longest in the batch; `tokens_per_batch`
    takes random sentences up to that many tokens (padded here, packed into rows after noising);
    packed mode yields full rows of seq_len. `start_batch` skips batches a resumed run already saw this epoch.
    With `world_size` ranks, rank `rank` takes every world_size-th batch; `per_step` (micro-batches
    per rank per optimizer step) cuts the epoch so that its steps are whole (`_batch_index_lists`).
    """
    batches = _batch_index_lists(
        split, batch_size, seed, epoch, packed, seq_len, bucket_factor, drop_last, rank, world_size, tokens_per_batch,
        per_step,
    )  # fmt: skip
    rows = pack_sequences(split, seq_len) if packed and seq_len is not None else None
    for batch in batches[start_batch:]:
        if rows is not None:
            input_ids = torch.from_numpy(rows[batch])  # [B, seq_len]
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # [B, seq_len]
            yield {"input_ids": input_ids, "attention_mask": attention_mask}
        else:
            input_ids, attention_mask = pad_batch([split[int(i)] for i in batch], pad_id)
            yield {"input_ids": input_ids, "attention_mask": attention_mask}
