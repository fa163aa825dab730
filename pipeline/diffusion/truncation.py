"""Truncation of p_theta(x0 | x_t) for the host samplers, and the draws on what it keeps.

Sparse top-k: with 0 < top_k < V everything after the forward works on the kept entries only
(`Kept`: probabilities [.., K] at vocabulary ids [.., K], ids ascending). The probabilities are
the ones the dense [.., V] rows hold (`truncated_probs` scatters the same numbers), and a float64
CDF over the kept ids in id order has the dense CDF's values at those ids (the dense one only adds
zeros in between), so the inverse-CDF draw picks the same token. top_k = 0 keeps dense rows.
Truncation (top-k, top-p, temperature) acts on p_theta(x0 | x_t) only, never on the reveal chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.diffusion.reverse import draw_categorical, top_p_mask


@dataclass
class Kept:
    """Truncated p_theta(x0 | x_t): `probs` [.., K] float32 at vocabulary ids `ids` [.., K].

    Sparse: ids ascending along the last dim, K = top_k (more when the k-th logit is tied);
    zero-probability padding (id 0) may follow, which no sum or CDF notices. Dense: ids None,
    K = V, column j is id j."""

    probs: Tensor
    ids: Tensor | None = None

    def at(self, b_idx: Tensor, l_idx: Tensor) -> Kept:
        """Positions (b_idx, l_idx) [M] of a [B, L, K] table: [M, K]. index_select on the flattened
        table, not advanced indexing, which goes through the thread pool (milliseconds a call on a
        busy CPU)."""
        width, k = self.probs.shape[1], self.probs.shape[-1]
        flat = b_idx * width + l_idx  # [M]
        ids = None if self.ids is None else self.ids.view(-1, k).index_select(0, flat)
        return Kept(self.probs.view(-1, k).index_select(0, flat), ids)

    def put(self, b_idx: Tensor, l_idx: Tensor, rows: Kept) -> None:
        """Write rows [M, K] at positions (b_idx, l_idx) [M] of this [B, L, K] table, in place."""
        width, k = self.probs.shape[1], self.probs.shape[-1]
        flat = b_idx * width + l_idx  # [M]
        self.probs.view(-1, k).index_copy_(0, flat, rows.probs)
        if self.ids is not None and rows.ids is not None:
            self.ids.view(-1, k).index_copy_(0, flat, rows.ids)

    def vocab_ids(self, columns: Tensor) -> Tensor:
        """Column of each row [M] -> its vocabulary id [M]."""
        if self.ids is None:
            return columns
        return self.ids.gather(-1, columns[:, None]).squeeze(-1)

    def at_entries(self, per_id: Tensor) -> Tensor:
        """A per-id table [V] read at every entry: [.., K] (dense: the [V] table itself)."""
        return per_id if self.ids is None else per_id.index_select(0, self.ids.reshape(-1)).view(self.ids.shape)


def _scaled_logits(logits: Tensor, forbidden_ids: Sequence[int], temperature: float) -> Tensor:
    """float32 logits / temperature with the forbidden ids at -inf (SUBS). [N, V]"""
    logits = logits.float() / temperature  # a new tensor: the model's output is left alone
    if forbidden_ids:
        logits.index_fill_(-1, torch.as_tensor(list(forbidden_ids), device=logits.device), float("-inf"))
    return logits


# Raw logits taken beyond the k + 1 a top-k needs, to step over forbidden ids among the largest.
_MARGIN = 8


def _top_k_entries(
    logits: Tensor, forbidden_ids: Sequence[int], top_k: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """The entries of `_scaled_logits` that a dense top-k keeps (every one >= the k-th largest):
    (values [N, K], ids [N, K]), ids ascending; K = top_k unless a tie widens it.

    Usually one pass over [N, V]: the top k + 1 + m raw logits (m = min(F, 8), F forbidden ids).
    Scaling is monotone, so when every row has k + 1 allowed ids among them and its k-th and
    (k+1)-th scaled values differ, its k largest are exactly the kept set. Otherwise (a tie, or
    forbidden ids crowding the top) `_dense_top_k_entries` scales the whole rows."""
    vocab = logits.shape[-1]
    forbidden = torch.as_tensor(list(forbidden_ids), dtype=torch.long, device=logits.device)
    raw, ids = torch.topk(logits, min(top_k + 1 + min(len(forbidden), _MARGIN), vocab), dim=-1)  # [N, n]
    banned = torch.zeros(vocab, dtype=torch.bool, device=logits.device).index_fill_(0, forbidden, True)
    is_banned = banned.index_select(0, ids.reshape(-1)).view(ids.shape)  # [N, n]
    values = (raw.float() / temperature).masked_fill(is_banned, float("-inf"))
    values, order = values.sort(dim=-1, descending=True, stable=True)  # n >= k + 1 as top_k < V
    kth = values[:, top_k - 1]  # [N]
    crowded = (~is_banned).sum(-1) <= top_k  # [N] fewer than k + 1 allowed candidates
    tied = (values[:, top_k] == kth) & kth.isfinite()  # [N]
    if bool((crowded | tied).any()):
        return _dense_top_k_entries(_scaled_logits(logits, forbidden_ids, temperature), top_k)
    ids, by_id = ids.gather(-1, order[:, :top_k]).sort(-1)  # [N, k]
    return values[:, :top_k].gather(-1, by_id), ids


def _dense_top_k_entries(scaled: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Every entry of scaled logits [N, V] >= its row's k-th largest, all tied ids included:
    (values [N, K], ids [N, K]), ids ascending; a row's entries beyond its own set are -inf."""
    kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [N, 1]
    counts = (scaled >= kth).sum(-1)  # [N]
    counts = torch.where(kth[:, 0].isfinite(), counts, top_k)  # a -inf k-th: its finite ones fit in k
    values, ids = torch.topk(scaled, int(counts.max()), dim=-1)  # [N, K]
    values = values.masked_fill(values < kth, float("-inf"))
    ids, by_id = ids.sort(-1)
    return values.gather(-1, by_id), ids


def sparse_truncation(
    logits: Tensor, forbidden_ids: Sequence[int], top_k: int, top_p: float = 1.0, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """p_theta(x0 | x_t) after SUBS, temperature, top-k (0 < top_k < V) and then top-p, on the
    kept entries only: (probs [N, K] float32, ids [N, K] ascending)."""
    values, ids = _top_k_entries(logits, forbidden_ids, top_k, temperature)
    if top_p < 1.0:
        values = top_p_mask(values, top_p)
    return torch.softmax(values, dim=-1), ids


def truncated_probs(
    logits: Tensor, forbidden_ids: Sequence[int], top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """p_theta(x0 | x_t) after SUBS, temperature, top-k and top-p. [N, V] float32.

    Under top-k these are `sparse_truncation`'s numbers scattered into zeros, bit for bit.
    Probabilities are accurate to float32 (1e-7 relative); the draws that use them accumulate
    their CDF in float64 (`draw_categorical`), which is what keeps tails from being cut off.
    """
    if top_k and top_k < logits.shape[-1]:
        probs, ids = sparse_truncation(logits, forbidden_ids, top_k, top_p, temperature)  # [N, K] each
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, ids, probs)
    logits = _scaled_logits(logits, forbidden_ids, temperature)
    if top_p < 1.0:
        logits = top_p_mask(logits, top_p)
    return torch.softmax(logits, dim=-1)


def truncate(
    logits: Tensor,
    forbidden_ids: Sequence[int],
    top_k: int,
    top_p: float,
    temperature: float,
    sparse: bool = True,
) -> Kept:
    """Truncated p_theta(x0 | x_t) of one forward, on the host: sparse under top-k (unless
    `sparse` is False), dense otherwise. [N, K]"""
    if sparse and 0 < top_k < logits.shape[-1]:
        probs, ids = sparse_truncation(logits, forbidden_ids, top_k, top_p, temperature)
        return Kept(probs.cpu(), ids.cpu())
    return Kept(truncated_probs(logits, forbidden_ids, top_k, top_p, temperature).cpu())


def draw_token(rows: Kept, uniforms: Tensor, reveal: Tensor | None = None) -> Tensor:
    """A token per row [M] from p(v), or from p(v) a(v) given a per-id `reveal` [V]. [M] ids"""
    weights = rows.probs.double()  # [M, K]
    if reveal is not None:
        reveal_at = rows.at_entries(reveal)  # [M, K] (dense: [V])
        weights = weights * reveal_at
    return rows.vocab_ids(draw_categorical(weights, uniforms))


def reveal_chance(table: Kept, b_idx: Tensor, l_idx: Tensor, reveal: Tensor, chunk: int = 512) -> Tensor:
    """sum_v p(v) a(v) at the masked positions (b_idx, l_idx) of a [B, L, K] table, accumulated
    in float64. [M]

    In float32 a sum over 30,522 ids is off by ~5e-6: a chance that must be 1 comes out below
    it, and a position can stay masked when it must be revealed. Chunks of `chunk` positions
    bound the float64 copy at chunk * K * 8 bytes.
    """
    reveal = reveal.to(torch.float64)
    out = torch.empty(len(b_idx), dtype=torch.float64)
    for start in range(0, len(b_idx), chunk):
        rows = table.at(b_idx[start : start + chunk], l_idx[start : start + chunk])  # [c, K]
        p = rows.probs.double()
        out[start : start + chunk] = p @ reveal if rows.ids is None else (p * rows.at_entries(reveal)).sum(-1)
    return out.clamp_(0.0, 1.0)


def pad_kept(kept: Kept, k: int) -> Kept:
    """Sparse entries [.., K] -> [.., k] (k >= K) by zero-probability entries at id 0."""
    extra = k - kept.probs.shape[-1]
    if extra == 0 or kept.ids is None:
        return kept
    shape = (*kept.probs.shape[:-1], extra)
    return Kept(
        torch.cat([kept.probs, kept.probs.new_zeros(shape)], -1),
        torch.cat([kept.ids, kept.ids.new_zeros(shape)], -1),
    )
