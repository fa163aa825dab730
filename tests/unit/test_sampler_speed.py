"""Sparse top-k bookkeeping: with 0 < top_k < V every sampler works on the K
kept entries after each forward instead of dense [.., V] rows, and returns exactly the tokens of
the dense path for the same seed: cached and uncached, ReMDM, confidence (every score) and Gibbs,
unconditional and from a canvas, linear and token-dependent (spindle) schedules, with top-p,
temperature and ties at the k-th logit.

The world is wider than tests/support/toy.py (V = 64, so top-k really drops entries) and its denoiser is
time-agnostic and context-dependent, so the cache is exact and every step sees new rows.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import gibbs, host_chain, truncation
from pipeline.diffusion.canvas import template_canvas
from pipeline.diffusion.forward import SpecialIds, at_positions
from pipeline.diffusion.reverse import confidence, draw_categorical
from pipeline.diffusion.samplers import ancestral_sample, confidence_sample, gibbs_sample
from pipeline.diffusion.schedules import build_schedule, max_spindle_lambda, time_grid
from pipeline.diffusion.truncation import Kept, draw_token, reveal_chance, sparse_truncation, truncated_probs

V, T = 64, 32
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = SpecialIds(mask=MASK, pad=PAD, never_masked=(PAD, CLS, SEP))
LENGTHS = [7, 3, 9, 5, 1, 8]
N = None
TEMPLATES = [[4, 4, N, N, N, 9], [N, N, 60, 5], [5, N, 6, N, N, 40, N], [N], [6, N, N, 6]]


class ContextDenoiser:
    """Time-agnostic, peaked, context-dependent logits: a position's logits depend on its left and
    right neighbours' tokens and on the position. `ties` rounds them to a coarse grid, so the k-th
    logit is often tied (the dense mask then keeps every tied id)."""

    def __init__(self, ties: bool = False, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.left = torch.randn(V, V, generator=gen) * 2.0  # [token to the left, V]
        self.right = torch.randn(V, V, generator=gen) * 2.0  # [token to the right, V]
        self.position = torch.randn(32, V, generator=gen)  # [L, V]
        self.ties = ties
        self.calls = 0

    def __call__(self, x_t, attention_mask, s, positions):
        self.calls += 1
        left = torch.roll(x_t, 1, dims=1)  # [B, L]
        right = torch.roll(x_t, -1, dims=1)
        logits = self.left[left] + self.right[right] + self.position[: x_t.shape[1]]  # [B, L, V]
        if self.ties:
            logits = torch.round(logits)
        return at_positions(logits, positions)  # [N, V]


def schedule_for(name: str):
    info = torch.rand(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    if name == "linear":
        return build_schedule("linear", T)
    return build_schedule("spindle", T, information=info, spindle_lambda=min(0.5, max_spindle_lambda(T)))


def sample(kind: str, schedule_name: str, conditional: bool, ties: bool, seed: int = 0, **truncation):
    denoiser = ContextDenoiser(ties=ties)
    schedule = schedule_for(schedule_name)
    lengths = None if conditional else LENGTHS
    canvas = template_canvas(TEMPLATES, SPECIAL, CLS, SEP) if conditional else None
    if kind == "gibbs":
        return gibbs_sample(denoiser, lengths, SPECIAL, CLS, SEP, sweeps=2, seed=seed, canvas=canvas, **truncation)
    grid = time_grid(T, 4 if kind == "skipping" else 1)
    cache = kind.endswith("cached")
    if kind.startswith("confidence"):
        score = kind.split("-")[1]
        return confidence_sample(
            denoiser, schedule, lengths, SPECIAL, CLS, SEP, grid=grid, seed=seed, canvas=canvas, score=score,
            cache=cache, **truncation,
        )  # fmt: skip
    return ancestral_sample(
        denoiser, schedule, lengths, SPECIAL, CLS, SEP, grid=grid, seed=seed, canvas=canvas,
        cache=cache, remask=0.3 if kind.startswith("remdm") else 0.0, **truncation,
    )  # fmt: skip


def sample_both_ways(monkeypatch, *args, **kwargs):
    """(sparse output, dense output, widths of the sparse tables) for the same call."""
    widths: list[int] = []
    truncate = truncation.truncate

    def spy(*a, **kw):
        kept = truncate(*a, **kw)
        widths.append(kept.probs.shape[-1] if kept.ids is not None else V)
        return kept

    monkeypatch.setattr(host_chain, "truncate", spy)
    monkeypatch.setattr(gibbs, "truncate", spy)
    sparse = sample(*args, **kwargs)
    sparse_widths = list(widths)
    monkeypatch.setattr(host_chain, "SPARSE_TOP_K", False)
    dense = sample(*args, **kwargs)
    return sparse, dense, sparse_widths


KINDS = [
    "ancestral",
    "cached",
    "skipping",
    "remdm",
    "remdm-cached",
    "confidence-prob",
    "confidence-prob-cached",
    "confidence-margin",
    "confidence-entropy",
    "gibbs",
]
TRUNCATIONS = {
    "top-k": dict(top_k=5),
    "top-k top-p temperature": dict(top_k=12, top_p=0.7, temperature=0.8),
    "top-k of one": dict(top_k=1),
}


@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "canvas"])
@pytest.mark.parametrize("schedule_name", ["linear", "spindle"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_sparse_path_returns_the_dense_tokens(monkeypatch, kind, schedule_name, conditional, truncation):
    for seed in (0, 1):
        sparse, dense, widths = sample_both_ways(
            monkeypatch, kind, schedule_name, conditional, False, seed=seed, **TRUNCATIONS[truncation]
        )
        monkeypatch.undo()
        assert widths and max(widths) < V  # the sparse run never held dense rows
        assert torch.equal(sparse.tokens, dense.tokens), (seed, sparse.tokens, dense.tokens)
        assert sparse.trace == dense.trace and sparse.model_calls == dense.model_calls


@pytest.mark.parametrize("kind", ["ancestral", "cached", "remdm", "confidence-margin", "gibbs"])
@pytest.mark.parametrize("schedule_name", ["linear", "spindle"])
def test_ties_at_the_kth_logit_keep_every_tied_id_and_the_dense_tokens(monkeypatch, kind, schedule_name):
    sparse, dense, widths = sample_both_ways(monkeypatch, kind, schedule_name, False, True, seed=3, top_k=4)
    assert max(widths) > 4  # some forward widened its table for a tie (and later ones were padded)
    assert torch.equal(sparse.tokens, dense.tokens)


def test_the_sparse_path_differs_from_no_truncation():
    """The comparison above is not vacuous: top-k changes the samples."""
    truncated = sample("ancestral", "spindle", False, False, top_k=5)
    full = sample("ancestral", "spindle", False, False)
    assert not torch.equal(truncated.tokens, full.tokens)


def random_logits(rows: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [N, V]


@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature"), [(5, 1.0, 1.0), (20, 0.6, 1.3), (1, 1.0, 0.5), (63, 0.9, 1.0)]
)
def test_kept_probabilities_are_the_dense_rows_bit_for_bit(top_k, top_p, temperature):
    logits = random_logits()
    probs, ids = sparse_truncation(logits, [PAD, MASK], top_k, top_p, temperature)  # [N, K]
    dense = truncated_probs(logits, [PAD, MASK], top_k, top_p, temperature)  # [N, V]
    assert (ids.diff(dim=-1) > 0).all()  # ascending vocabulary ids
    assert torch.equal(dense.gather(-1, ids), probs)
    assert torch.count_nonzero(dense) == torch.count_nonzero(probs)  # nothing outside the kept ids


def test_a_draw_over_the_kept_entries_picks_the_dense_token_even_on_cdf_boundaries():
    logits = random_logits(400)
    reveal = torch.rand(V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probs, ids = sparse_truncation(logits, [PAD, MASK], 8)
    dense = truncated_probs(logits, [PAD, MASK], 8)
    u = torch.rand(400, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Half the uniforms land exactly on (or one ulp around) an interior CDF step of the row.
    cdf = (probs.double() * reveal[ids]).cumsum(-1)
    step = cdf[:, 3] / cdf[:, -1]
    u[:100] = step[:100]
    u[100:200] = torch.nextafter(step[100:200], torch.zeros(100, dtype=torch.float64))
    for weights in (None, reveal):
        sparse_draw = draw_token(Kept(probs, ids), u, weights)
        dense_draw = draw_token(Kept(dense), u, weights)
        assert torch.equal(sparse_draw, dense_draw)
    assert torch.equal(draw_token(Kept(dense), u), draw_categorical(dense, u))


def test_the_sparse_reveal_chance_is_the_dense_one_to_float64_rounding():
    logits = random_logits(300).reshape(3, 100, V)  # [B, L, V]
    reveal = torch.rand(V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    probs, ids = sparse_truncation(logits.reshape(-1, V), [PAD], 10)
    sparse = Kept(probs.reshape(3, 100, -1), ids.reshape(3, 100, -1))
    dense = Kept(truncated_probs(logits.reshape(-1, V), [PAD], 10).reshape(3, 100, V))
    b_idx, l_idx = torch.ones(3, 100, dtype=torch.bool).nonzero(as_tuple=True)
    a = reveal_chance(sparse, b_idx, l_idx, reveal, chunk=64)
    b = reveal_chance(dense, b_idx, l_idx, reveal, chunk=64)
    assert torch.allclose(a, b, rtol=1e-15, atol=0)


def dense_mask_reference(logits, forbidden_ids, top_k, top_p=1.0, temperature=1.0):
    """The dense truncation before sparse top-k (mask every logit below the k-th, softmax over V)."""
    logits = logits.float() / temperature
    logits = logits.index_fill(-1, torch.as_tensor(list(forbidden_ids), dtype=torch.long), float("-inf"))
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        p_sorted = torch.softmax(sorted_logits, -1)
        drop = torch.zeros_like(p_sorted, dtype=torch.bool).scatter(-1, order, p_sorted.cumsum(-1) - p_sorted >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def awkward_logits(top_k: int, forbidden) -> dict[str, torch.Tensor]:
    """Row groups that each stress one part of the kept-set shortcut. [N, V] each"""
    logits = random_logits(250)
    crowded = logits[:50].clone()
    crowded[:, forbidden] = 50.0  # the forbidden ids are the largest logits
    few = logits[50:100].clone()
    few[:, 13:] = float("-inf")  # fewer than k allowed finite logits (ids 4..12 at most)
    # k - 1 clear winners, then ids 10 and 11 one ulp apart at the k-th place: a temperature
    # other than 1 rounds some pairs into a tie.
    ulp = logits[100:200].clone()
    ulp[:, [i for i in range(4, V) if i not in (*forbidden, 10, 11)][: top_k - 1]] = 100.0
    ulp[:, 11] = torch.linspace(42.0, 63.0, 100)
    ulp[:, 10] = torch.nextafter(ulp[:, 11], torch.tensor(float("inf")))
    ties = logits[200:250].clone()
    ties[:, 20:24] = ties[:, 19:20]  # four-way exact ties, somewhere in the order
    plain = logits[100:200].clone()
    plain[:, forbidden] = -20.0  # as after training: no forbidden id anywhere near the top
    return {"plain": plain, "crowded": crowded, "few": few, "ulp": ulp, "ties": ties}


@pytest.mark.parametrize("forbidden", [[PAD, MASK, 7, 8], [PAD, MASK, *range(40, 52)]], ids=["F=4", "F=14"])
@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature"), [(5, 1.0, 1.0), (20, 0.6, 1.3), (3, 1.0, 0.7), (30, 1.0, 1.0)]
)
def test_the_kept_entries_are_the_ones_a_dense_mask_keeps(monkeypatch, top_k, top_p, temperature, forbidden):
    """Against the old dense code, not the shared one: the top k + 1 + min(F, 8) raw logits decide
    the set unless a row is crowded by forbidden ids or tied at the k-th, and then the dense rows do."""
    fallbacks = []
    dense_entries = truncation._dense_top_k_entries
    monkeypatch.setattr(truncation, "_dense_top_k_entries", lambda *a: fallbacks.append(1) or dense_entries(*a))
    for name, logits in awkward_logits(top_k, forbidden).items():
        fallbacks.clear()
        want = dense_mask_reference(logits, forbidden, top_k, top_p, temperature)  # [N, V]
        probs, ids = sparse_truncation(logits, forbidden, top_k, top_p, temperature)  # [N, K]
        got = torch.zeros_like(want).scatter_(-1, ids, probs)
        assert torch.equal(got > 0, want > 0), name
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name
        expect_fallback = {"plain": False, "crowded": len(forbidden) > truncation._MARGIN, "ulp": temperature != 1.0}
        if name in expect_fallback:
            assert bool(fallbacks) == expect_fallback[name], name


def test_a_tie_at_the_kth_logit_keeps_every_tied_id_like_the_dense_mask():
    logits = torch.tensor([[0.0, 5.0, 2.0, 2.0, 2.0, 1.0, 3.0, -1.0], [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    probs, ids = sparse_truncation(logits, [], top_k=3)
    assert ids.shape[-1] == 5  # row 0 keeps 5, 3, 2, 2, 2: the three tied 2.0 logits
    assert ids[0].tolist() == [1, 2, 3, 4, 6] and ids[1, :3].tolist() == [0, 1, 2]
    assert (probs[1, 3:] == 0).all()  # row 1 had no tie: its extra entries carry nothing
    assert torch.equal(truncated_probs(logits, [], top_k=3).gather(-1, ids), probs)


def test_the_margin_of_a_single_kept_entry_is_its_probability():
    assert confidence(torch.tensor([[1.0]]), torch.tensor([0]), "margin").item() == 1.0


def test_a_sampler_keeps_k_entries_per_masked_position_not_the_vocabulary():
    """The speed contract: after each forward the bookkeeping is [.., K], whatever V is."""
    predictions = host_chain.Predictions(
        ContextDenoiser(), SPECIAL, top_k=6, top_p=1.0, temperature=1.0, cache=False, device="cpu"
    )
    x = torch.full((2, 5), MASK)
    x[:, 0], x[:, -1] = CLS, SEP
    table = predictions.refresh(x, torch.ones_like(x), x == MASK, 1.0)
    assert table.probs.shape == table.ids.shape == (2, 5, 6)
