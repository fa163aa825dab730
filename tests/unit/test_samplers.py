"""The samplers' own behaviour: caching, the reverse chain's reveals, truncation, the device path's
top-k ties. The contract every sampler keeps is tests/unit/test_sampler_contract.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.forward import at_positions
from pipeline.diffusion.reverse import draw_categorical
from pipeline.diffusion.samplers import ancestral_sample, gibbs_sample
from pipeline.diffusion.schedules import grid_for_steps, time_grid
from pipeline.diffusion.truncation import truncated_probs
from pipeline.model.loading import build_denoiser, random_bert_config
from tests.support.toy import CLS, CONTENT, MASK, PAD, SEP, SPECIAL, VOCAB, ConstantDenoiser, toy_schedule

LENGTHS = [3, 1, 5, 4]


def tiny_bert(time_design: str = "none", T: int = 64):
    config = random_bert_config(
        VOCAB, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=16
    )
    return build_denoiser("random", time_design=time_design, num_timesteps=T, random_config=config, seed=0).eval()


def run_sampler(kind: str, denoiser, schedule_name: str = "spindle", seed: int = 0, **kw):
    """`kind` is a sampler; `resident-<kind>` runs it device-resident (here on the CPU)."""
    if kind.startswith("resident-"):
        kind, kw = kind.removeprefix("resident-"), {**kw, "resident": True}
    T = 64
    schedule = toy_schedule(schedule_name, T)
    if kind == "gibbs":
        return gibbs_sample(denoiser, LENGTHS, SPECIAL, CLS, SEP, sweeps=2, seed=seed, **kw)
    grid = {"ancestral": time_grid(T, 1), "cached": time_grid(T, 1), "skipping": time_grid(T, 16)}[kind]
    return ancestral_sample(
        denoiser, schedule, LENGTHS, SPECIAL, CLS, SEP, grid=grid, seed=seed, cache=(kind == "cached"), **kw
    )


@pytest.mark.parametrize("design", ["none"])
@pytest.mark.parametrize("schedule_name", ["linear", "spindle"])
@pytest.mark.parametrize(("T", "k"), [(512, 1), (64, 4)])
def test_cached_sampler_returns_the_uncached_tokens_with_at_most_length_calls_per_row(design, schedule_name, T, k):
    model = tiny_bert(design, T)
    schedule = toy_schedule(schedule_name, T)
    lengths = [6, 2, 9, 4, 7, 1]
    common = dict(grid=time_grid(T, k), top_k=3, temperature=0.9, seed=5)
    plain = ancestral_sample(model.denoise, schedule, lengths, SPECIAL, CLS, SEP, cache=False, **common)
    cached = ancestral_sample(model.denoise, schedule, lengths, SPECIAL, CLS, SEP, cache=True, **common)
    assert torch.equal(plain.tokens, cached.tokens)
    assert (cached.row_calls <= torch.tensor(lengths)).all()
    assert cached.model_calls < plain.model_calls


def test_linear_sampler_with_a_fixed_denoiser_draws_tokens_from_its_distribution():
    probs = torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3], dtype=torch.float64)
    schedule = toy_schedule("linear", 32)
    out = ancestral_sample(
        ConstantDenoiser(probs), schedule, [8] * 500, SPECIAL, CLS, SEP, grid=grid_for_steps(32, 8), seed=0
    )
    content = out.tokens[:, 1:9].reshape(-1)
    freq = torch.bincount(content, minlength=VOCAB).double() / content.numel()
    assert torch.allclose(freq, probs, atol=0.02)


def test_every_step_of_the_chain_reveals_masks_and_the_last_reveals_all():
    schedule = toy_schedule("linear", 16)
    out = ancestral_sample(
        ConstantDenoiser(torch.tensor([0, 0, 0, 0, 1.0, 1.0, 1.0])),
        schedule,
        [10] * 20,
        SPECIAL,
        CLS,
        SEP,
        grid=time_grid(16, 1),
        seed=0,
    )
    assert out.trace[-1] == 0 and out.trace == sorted(out.trace, reverse=True)


def test_spindle_reverse_steps_reveal_frequent_tokens_before_informative_ones():
    from tests.support.toy import centred_information

    h = centred_information()
    rare, frequent = int(h.argmax()), int(torch.tensor([h[c] for c in CONTENT]).argmin()) + CONTENT[0]
    schedule = toy_schedule("spindle", 64)
    t = torch.full((1,), 56.0, dtype=torch.float64)  # early in the reverse process
    a = schedule.reveal_probability(t, t - 8)[0]
    assert a[frequent] > a[rare]


def test_top_k_and_top_p_and_temperature_truncate_the_model_distribution_only():
    logits = torch.log(torch.tensor([[1e-9, 1e-9, 1e-9, 0.9, 0.4, 0.3, 0.2, 0.1]]))
    p = truncated_probs(logits, forbidden_ids=[0, 1, 2, 3], top_k=2)
    assert p[0, 3] == 0 and torch.count_nonzero(p) == 2 and p.sum().item() == pytest.approx(1.0)
    p = truncated_probs(logits, forbidden_ids=[3], top_p=0.35)
    assert torch.count_nonzero(p) == 1 and p[0, 4] == 1.0  # 0.4 alone reaches 0.35
    p = truncated_probs(logits, forbidden_ids=[3], top_p=0.5)
    assert torch.count_nonzero(p) == 2 and p[0, 4] == pytest.approx(0.4 / 0.7)  # the token crossing p stays
    cold = truncated_probs(logits, forbidden_ids=[3], temperature=0.1)
    powered = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64) ** 10
    assert cold[0, 4].item() == pytest.approx(float(powered[0] / powered.sum()), rel=1e-5)


def test_float64_inverse_cdf_draws_hit_every_bin_in_proportion():
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3]], dtype=torch.float64).expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = draw_categorical(weights, u)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[1] == 0 and torch.allclose(freq, weights[0], atol=0.01)


def test_samples_never_contain_mask_even_when_the_model_prefers_it():
    probs = torch.zeros(VOCAB)
    probs[MASK] = 0.98
    probs[4] = 0.02
    out = run_sampler("ancestral", ConstantDenoiser(probs))
    assert not (out.tokens == MASK).any()


def test_spindle_sampler_reveals_every_mask_on_its_last_step_with_a_full_vocabulary():
    """A past defect: sum_v p(v) a(v) over 30,522 ids in float32 came out ~1 - 1e-5 at s = 0,
    so a position could stay masked and sampling raised. Seeds 1103, 1861 and 2424 drew a
    uniform above that float32 chance on this setup (found by replaying the old arithmetic);
    17799 is the seed the review saw fail with the trained model."""
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.diffusion.schedules import build_schedule

    V, rows, n = 30522, 8, 62
    info = torch.rand(V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    schedule = build_schedule("spindle", 2048, information=info, spindle_lambda=0.3)
    special = SpecialIds(mask=103, pad=0, never_masked=(0, 101, 102))
    table = torch.randn(rows, n + 2, V, generator=torch.Generator().manual_seed(1)) * 3  # peaked, like a model

    def denoiser(x_t, attn, s, positions):
        return at_positions(table[: x_t.shape[0]], positions)

    for seed in (1103, 1861, 2424, 17799):
        out = ancestral_sample(denoiser, schedule, [n] * rows, special, 101, 102, grid=[2048, 0], seed=seed)
        assert not (out.tokens == special.mask).any()
        assert out.trace == [0]


def test_device_resident_top_k_keeps_ties_with_the_kth_token_as_the_host_does():
    """Three ids tie for the top: top-k of 1 keeps all three on both paths (same tokens)."""
    probs = torch.tensor([0, 0, 0, 0, 0.3, 0.3, 0.3])
    host = run_sampler("ancestral", ConstantDenoiser(probs), top_k=1, seed=4)
    resident = run_sampler("resident-ancestral", ConstantDenoiser(probs), top_k=1, seed=4)
    assert torch.equal(resident.tokens, host.tokens)
    assert len({int(v) for row, n in enumerate(LENGTHS) for v in host.tokens[row, 1 : n + 1]}) > 1


def test_more_ties_than_the_device_path_keeps_fall_back_to_the_exact_host_path(monkeypatch):
    """A flat model ties every id: the fixed-width device truncation would cut ties, notices it
    on the device, and the call is answered by the host sampler instead (same tokens)."""
    from pipeline.diffusion import resident

    monkeypatch.setattr(resident, "TOP_K_MARGIN", 1)
    flat = torch.tensor([0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3])
    host = run_sampler("ancestral", ConstantDenoiser(flat), top_k=1, seed=9)
    fallback = run_sampler("resident-ancestral", ConstantDenoiser(flat), top_k=1, seed=9)
    assert torch.equal(fallback.tokens, host.tokens)
