"""Texts longer than the model's window, block by block (semi-autoregressive): the text front of
`pipeline.diffusion.block_sampler`, which any sampler runs under."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.generation.sampling import Generation, generate


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
    """`num` texts of `length` new WordPieces after `prompt` (content ids), `block` new WordPieces
    at a time, each block seeing the last WordPieces written as its context (as many as the model's
    window holds beside the block). `sampling` goes to `generate` (steps, sampler, top_k, ...)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    window = model.max_positions - 2
    if len(prompt) > window:
        raise ValueError(f"the prompt has {len(prompt)} WordPieces, above the model's window of {window}")
    template = [*prompt, *([None] * length)]
    return generate(model, tokenizer, schedule, templates=[template] * num, seed=seed, block=block, **sampling)
