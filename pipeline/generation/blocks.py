"""Semi-autoregressive (block) decoding: texts longer than the model's window.

The text grows `block` WordPieces at a time; each block is sampled conditioned on the last
`window - block` WordPieces written so far (as a prompt), with any sampler. Each block is the
model's chain given its context (for the ancestral sampler), but the whole text is not a sample
of any one chain, so no bound applies to it (SSD-LM / BD3-LM style; the original DiffusionBERT
cannot write past its 64-WordPiece training window at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.diffusion.samplers import decode
from pipeline.generation.sampling import Generation, generate


def block_plan(length: int, block: int, window: int, prompt_length: int = 0) -> list[tuple[int, int]]:
    """(context WordPieces shown, new WordPieces) for each block, for a text of `length` new
    WordPieces after a prompt of `prompt_length`, in a model window of `window` content slots."""
    if block < 1 or block > window:
        raise ValueError(f"block must lie in 1..{window} (the model's content window), got {block}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    plan, written = [], prompt_length
    remaining = length
    while remaining > 0:
        new = min(block, remaining)
        plan.append((min(written, window - new), new))
        written += new
        remaining -= new
    return plan


def generate_blocks(
    model,
    tokenizer,
    schedule,
    *,
    num: int,
    length: int,
    block: int,
    prompt: Sequence[int] = (),
    seed: int = 0,
    **sampling: Any,
) -> Generation:
    """`num` texts of `length` new WordPieces after `prompt` (content ids), block by block.
    `sampling` goes to `generate` for every block (steps, sampler, top_k, ...)."""
    window = model.max_positions - 2
    if len(prompt) > window:
        raise ValueError(f"the prompt has {len(prompt)} WordPieces, above the model's window of {window}")
    texts_ids = [list(prompt) for _ in range(num)]
    calls = row_calls = 0
    seconds = model_seconds = 0.0
    for index, (shown, new) in enumerate(block_plan(length, block, window, len(prompt))):
        templates = [[*(ids[len(ids) - shown :] if shown else []), *([None] * new)] for ids in texts_ids]
        out = generate(model, tokenizer, schedule, templates=templates, seed=seed * 7919 + index, **sampling)
        for ids, content in zip(texts_ids, out.content_ids):
            ids.extend(content[shown:])
        calls += out.model_calls
        row_calls += out.row_calls
        seconds += out.seconds
        model_seconds += out.model_seconds
    texts = decode(
        torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id] for ids in texts_ids]), tokenizer
    )
    spans = [[decode(torch.tensor([ids[len(prompt) :]]), tokenizer)[0]] for ids in texts_ids]
    lengths = [len(ids) for ids in texts_ids]
    return Generation(texts, lengths, calls, row_calls, seconds, model_seconds, spans, texts_ids)
