"""A training step never makes the host wait for the device: no scalar read, no data-dependent
shape, no device -> host copy and no blocking upload between two metric reports.

Counted on the fake device (`tests.fake_device.recording_traffic`), which sees every op that a
real accelerator would have to answer to the host. Each waits-list below names the op that waited.
"""

from __future__ import annotations

import pytest

from pipeline.train.loop import train_loop
from tests.fake_device import FAKE, on_fake_device, recording_traffic
from tests.test_train_loop import params, tiny_data  # noqa: F401  (fixture)

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
