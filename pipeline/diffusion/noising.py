"""The noise of one training batch, drawn on the host before the step: times, x_t and the masked
positions with their counts.

Why on the host: every quantity whose *size* depends on the draw (how many positions are masked,
which rows they sit in) must be known before the step runs, or the accelerator has to stop and
report it (`nonzero`, boolean indexing, `.item()` each wait for the device). Drawing the noise
with the seeded CPU generator, as the loss always has, and handing the step fixed-size index
tensors keeps the step free of host round trips; the numbers are the ones the loss drew before.
The noise of the next batch is drawn while the device still works on this one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from pipeline.diffusion.forward import SpecialIds, content_mask, q_sample, stratified_continuous_times, stratified_times
from pipeline.diffusion.schedules import Schedule
from pipeline.tensors import upload


@dataclass(frozen=True)
class NoisedBatch:
    """One noised batch in the padded layout [B, L]; the loss reads every field.

    `flat_positions` [N] are the masked positions as indices into the flattened [B * L] layout
    (row-major, the order of `x0[masked]`), `batch_index` [N] their rows; `num_tokens` (content
    tokens, the per-token denominator) and `num_masked` (= N) are host integers.
    """

    x0: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] bool
    x_t: Tensor  # [B, L] long
    t: Tensor  # [B] float64, in steps (continuous schedules: fractional)
    s_frac: Tensor  # [B] float32, t / T: what the denoiser is told
    flat_positions: Tensor  # [N] long
    batch_index: Tensor  # [N] long
    target: Tensor  # [N] long, x0 at the masked positions
    content: Tensor  # [B, L] bool, the maskable positions (the token-dependent schedules' context)
    num_tokens: int
    num_masked: int

    @property
    def device(self) -> torch.device:
        return self.x0.device

    def uploaded(self, device: torch.device | str) -> NoisedBatch:
        """Every tensor on `device`, copied without making the host wait (`pipeline.tensors.upload`):
        the host draws the next batch's noise while the device still computes this one."""
        device = torch.device(device)
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = upload(value, device)
        return replace(self, **moved)


def _noised(
    x0: Tensor, attention_mask: Tensor, x_t: Tensor, masked: Tensor, content: Tensor, t: Tensor, s_frac: Tensor
) -> NoisedBatch:
    """The batch with its masked positions [B, L] as flat indices [N] (row-major) and their rows."""
    flat = masked.reshape(-1).nonzero(as_tuple=True)[0]  # [N]
    return NoisedBatch(
        x0=x0,
        attention_mask=attention_mask,
        x_t=x_t,
        t=t,
        s_frac=s_frac,
        flat_positions=flat,
        batch_index=flat // masked.shape[1],
        target=x0.reshape(-1)[flat],
        content=content,
        num_tokens=int(content.sum()),
        num_masked=int(flat.numel()),
    )


def noise_for_diffusion(
    x0: Tensor, attention_mask: Tensor, schedule: Schedule, special: SpecialIds, generator: torch.Generator | None
) -> NoisedBatch:
    """Stratified times and x_t ~ q(x_t | x0) for a host batch x0 [B, L]; the draws (and their
    order on the generator) are those of `diffusion_loss`."""
    if x0.device.type != "cpu":
        raise ValueError(f"noise is drawn on the host: x0 must be a CPU tensor, got one on {x0.device}")
    batch = x0.shape[0]
    T = schedule.num_timesteps
    attention_mask = attention_mask.bool()
    maskable = content_mask(x0, special, attention_mask)  # [B, L]
    if schedule.continuous:
        t = stratified_continuous_times(batch, T, getattr(schedule, "eps", 1e-3), generator)  # [B]
    else:
        t = stratified_times(batch, T, generator)  # [B] in 1..T
    x_t, masked = q_sample(x0, t.cpu(), schedule, maskable, special.mask, generator)
    return _noised(x0, attention_mask, x_t, masked, maskable, t.cpu(), (t.cpu() / T).to(torch.float32))


def noise_for_mlm(
    x0: Tensor, attention_mask: Tensor, special: SpecialIds, generator: torch.Generator | None, mask_prob: float = 0.15
) -> NoisedBatch:
    """BERT's masking (each content token to [MASK] with `mask_prob`) for the plain MLM fine-tune;
    the denoiser is told s = 1 ("fully noisy"). Same draws as `mlm_loss`."""
    if x0.device.type != "cpu":
        raise ValueError(f"noise is drawn on the host: x0 must be a CPU tensor, got one on {x0.device}")
    attention_mask = attention_mask.bool()
    maskable = content_mask(x0, special, attention_mask)
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device="cpu")
    masked = maskable & (u < mask_prob)
    x_t = torch.where(masked, torch.full_like(x0, special.mask), x0)
    batch = x0.shape[0]
    return _noised(x0, attention_mask, x_t, masked, maskable, torch.ones(batch, dtype=torch.float64), torch.ones(batch))
