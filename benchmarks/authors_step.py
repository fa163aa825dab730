"""A training step that does what the original DiffusionBERT code does, for the baseline rows:
one t for the whole batch, dense one-hot q(x_t | x0) sampled with fp32 Gumbel noise, MLM logits
at every position, and D3PM posteriors built as dense [B, L, V] tensors, all in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_style_loss(
    model,
    x0: torch.Tensor,
    attention_mask: torch.Tensor,
    T: int,
    mask_id: int,
    generator: torch.Generator,
    hybrid_lambda: float = 0.01,
) -> torch.Tensor:
    V = model.mlm.config.vocab_size
    t = int(torch.randint(1, T + 1, (1,), generator=generator))  # one t per batch
    alpha_t, alpha_s = 1.0 - t / T, 1.0 - (t - 1) / T
    beta_t = 1.0 / (T - t + 1)
    onehot = F.one_hot(x0, V).float()  # [B, L, V]
    e_mask = F.one_hot(torch.tensor(mask_id), V).float()  # [V]
    q_t = alpha_t * onehot + (1 - alpha_t) * e_mask  # [B, L, V]
    u = torch.rand(q_t.shape, generator=generator).clamp_(1e-30, 1.0)
    gumbel = -torch.log(-torch.log(u))
    x_t = torch.argmax(torch.log(q_t.clamp_min(1e-30)) + gumbel, dim=-1)  # [B, L]
    x_t = torch.where(attention_mask, x_t, x0)
    logits = model.mlm(input_ids=x_t, attention_mask=attention_mask.long()).logits  # [B, L, V]
    p0 = torch.softmax(logits, dim=-1)
    # fact1 = column x_t of Q_t; fact2 = row of Q-bar_{t-1} for x0 (true) or for p0 (model)
    is_mask = (x_t == mask_id).unsqueeze(-1).float()  # [B, L, 1]
    xt_onehot = F.one_hot(x_t, V).float()
    fact1 = is_mask * (beta_t * (1 - e_mask) + e_mask) + (1 - is_mask) * (1 - beta_t) * xt_onehot
    q_post = fact1 * (alpha_s * onehot + (1 - alpha_s) * e_mask)
    q_post = q_post / q_post.sum(-1, keepdim=True).clamp_min(1e-30)
    p_post = fact1 * (alpha_s * p0 + (1 - alpha_s) * e_mask)
    p_post = p_post / p_post.sum(-1, keepdim=True).clamp_min(1e-30)
    kl = (q_post * (torch.log(q_post.clamp_min(1e-30)) - torch.log(p_post.clamp_min(1e-30)))).sum(-1)  # [B, L]
    nll = -(onehot * torch.log(p0.clamp_min(1e-30))).sum(-1)
    per_position = nll if t == 1 else kl
    weight = attention_mask.float()
    loss = (per_position * weight).sum() / weight.sum()
    return loss + hybrid_lambda * (nll * weight).sum() / weight.sum()
