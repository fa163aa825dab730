"""A training step never makes the host wait for the device: no scalar read, no data-dependent
shape, no device -> host copy and no blocking upload between two metric reports.

Counted on the fake device (`tests.support.fake_device.recording_traffic`), which sees every op that a
real accelerator would have to answer to the host. Each waits-list below names the op that waited.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.train.loop import train_loop
from tests.support.fake_device import FAKE, on_fake_device, recording_traffic
from tests.unit.test_train_loop import params, tiny_data

# Steps 1 and 4 report metrics (a validation bound at the first step and every 4th); the work of
# steps 3 and 4 runs after on_step(2) and on_step(3) and before any report.
REPORTS = ("train.steps=4", "train.eval_every=4", "train.checkpoint_every=100", "train.warmup_steps=1")
QUIET_SECTIONS = ("after step 2", "after step 3")


def traffic_of(p, data):
    with on_fake_device(), recording_traffic() as traffic:
        result = train_loop(p, data, device=FAKE, on_step=lambda step: traffic.mark(f"after step {step}"))
    assert result.progress.step == 4
    return traffic


@pytest.mark.parametrize(
    "layout", [(), ("train.tokens_per_batch=160", "train.row_length=64")], ids=["padded", "token_budget"]
)
@pytest.mark.parametrize("design", ["none", "layerwise"])
@pytest.mark.parametrize("objective", ["diffusion", "mlm"])
def test_a_training_step_waits_for_the_device_only_when_metrics_are_due(tiny_data, layout, design, objective):
    p = params(*REPORTS, f"model.time_design={design}", f"train.objective={objective}", *layout)
    traffic = traffic_of(p, tiny_data)
    for section in QUIET_SECTIONS:
        assert traffic.waits(section) == [], section
        uploads = [e for e in traffic.events[section] if e[0] == "upload"]
        assert 0 < len(uploads) <= 13, (section, uploads)  # the prepared batch's tensors, nothing per op
    # the reports themselves do wait (that is where the numbers are read), so the recorder sees them
    assert traffic.waits("after step 1")


def test_the_recorder_sees_a_scalar_read_inside_a_step(tiny_data, monkeypatch):
    """The test above can fail: a per-step `.item()` (as the loop once had) is recorded as a wait."""
    from pipeline.train import loop

    original = loop.bound_loss

    def reading_the_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss.item()
        return out

    monkeypatch.setattr(loop, "bound_loss", reading_the_loss)
    traffic = traffic_of(params(*REPORTS), tiny_data)
    assert [kind for kind, _ in traffic.waits("after step 2")] == ["sync"]


# -- samplers and the bound ------------------------------------------------------------------------


class Marking:
    """A denoiser that starts a new traffic section at every call: what a step does between two
    model calls (truncation, reveal chances, draws, writing the canvas) lands in one section."""

    def __init__(self, denoise, traffic) -> None:
        self.denoise, self.traffic, self.calls = denoise, traffic, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.traffic.mark(f"call {self.calls}")
        return self.denoise(*args, **kwargs)


def sampler_run(kind: str):
    from pipeline.diffusion.samplers import ancestral_sample, confidence_sample, gibbs_sample
    from pipeline.diffusion.schedules import time_grid
    from tests.support.toy import CLS, SEP, SPECIAL, toy_schedule

    schedule, grid = toy_schedule("spindle", 16), time_grid(16, 2)
    truncation = {"top_k": 3, "top_p": 0.9, "temperature": 0.9}
    lengths = [3, 1, 5, 4]

    def run(denoiser, device):
        common = dict(seed=5, device=device, **truncation)
        if kind == "gibbs":
            return gibbs_sample(denoiser, lengths, SPECIAL, CLS, SEP, sweeps=2, **common)
        if kind == "confidence":
            return confidence_sample(denoiser, schedule, lengths, SPECIAL, CLS, SEP, grid=grid, **common)
        remask = 0.3 if kind == "remdm" else 0.0
        cache = kind == "cached"
        return ancestral_sample(
            denoiser, schedule, lengths, SPECIAL, CLS, SEP, grid=grid, cache=cache, remask=remask, **common
        )

    return run


@pytest.mark.parametrize("kind", ["ancestral", "cached", "remdm", "confidence", "gibbs"])
def test_a_sampler_step_on_the_device_never_waits_for_it(kind):
    """Between two model calls nothing goes to or comes from the host; the tokens come back once,
    after the chain, and they are the CPU's (the fake device draws the CPU's stream)."""
    from tests.unit.test_samplers import tiny_bert

    run = sampler_run(kind)
    model = tiny_bert()
    want = run(model.denoise, "cpu")
    with on_fake_device(), recording_traffic() as traffic:
        model.to(FAKE)
        marking = Marking(model.denoise, traffic)
        got = run(marking, FAKE)
    assert torch.equal(got.tokens, want.tokens)
    steps = [f"call {k}" for k in range(1, marking.calls)]  # the last section holds the final read
    assert len(steps) >= 7
    for section in steps:
        assert traffic.events[section] == [], section  # no wait, no copy either way
    assert traffic.waits(f"call {marking.calls}")  # the tokens (and the trace) are read once, at the end


@pytest.mark.parametrize("conditional", [False, True], ids=["bound", "conditional_bound"])
def test_a_bound_step_on_the_device_never_waits_for_it(conditional):
    """Each step of the bound's chain: its noise drawn on the host and its masked positions
    uploaded without blocking; the per-sentence sums read once, at the end."""
    from pipeline.diffusion.loss import sequence_bound
    from pipeline.diffusion.schedules import grid_for_steps
    from tests.support.toy import SPECIAL, toy_schedule
    from tests.unit.test_samplers import tiny_bert

    ids = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 6, 6, 4, 5, 2], [1, 5, 2, 0, 0, 0]])
    attn = ids != 0
    hidden = torch.zeros_like(attn)
    hidden[:, 2:4] = True
    schedule = toy_schedule("spindle", 64)
    grid = grid_for_steps(64, 8)
    model = tiny_bert()
    kw = dict(hidden=hidden if conditional else None)
    want = sequence_bound(model.denoise, ids, attn, schedule, SPECIAL, grid, torch.Generator().manual_seed(2), **kw)
    with on_fake_device(), recording_traffic() as traffic:
        model.to(FAKE)
        marking = Marking(model.denoise, traffic)
        got = sequence_bound(
            marking, ids.to(FAKE), attn.to(FAKE), schedule, SPECIAL, grid, torch.Generator().manual_seed(2), **kw
        )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert marking.calls >= 4
    for section in [f"call {k}" for k in range(1, marking.calls)]:
        assert traffic.waits(section) == [], section
