"""Token statistics versus tokenization alone, and bound evaluation throughput.

    .venv/bin/python benchmarks/bench_stats.py

Statistics (vectorised bincount, entropy, h(v), summary) should add little to tokenization.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import lm1b_lines, machine, timed  # noqa: E402
from pipeline.data.stats import TokenStatistics, length_histogram, summarize  # noqa: E402
from pipeline.data.tokenize import tokenize_lines  # noqa: E402
from pipeline.diffusion.forward import SpecialIds  # noqa: E402
from pipeline.diffusion.schedules import build_schedule  # noqa: E402
from pipeline.eval.bound import bound_per_sequence  # noqa: E402
from pipeline.model.loading import build_denoiser, load_tokenizer  # noqa: E402
from pipeline.train.precision import autocast  # noqa: E402


def main() -> None:
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    lines = sum((lm1b_lines(10**6, shard) for shard in (10, 11, 12)), [])
    print(f"machine: {machine()}; {len(lines)} LM1B lines")
    tok_s = timed(lambda: tokenize_lines(lines, tokenizer, 64), 3)
    split = tokenize_lines(lines, tokenizer, 64)

    def tokens_and_stats():
        s = tokenize_lines(lines, tokenizer, 64)
        stats = TokenStatistics.from_split(s, tokenizer.vocab_size, special.forbidden_outputs)
        summarize(stats, tokenizer, len(s))
        length_histogram(s)

    both_s = timed(tokens_and_stats, 3)
    print(f"| work | seconds | tokens/s | ratio |\n|---|---|---|---|")
    print(f"| tokenization alone | {tok_s:.2f} | {split.num_content_tokens / tok_s:,.0f} | 1.00x |")
    print(f"| tokenization + statistics | {both_s:.2f} | {split.num_content_tokens / both_s:,.0f} | {both_s / tok_s:.2f}x |")

    model = build_denoiser("default", num_timesteps=2048).eval()
    stats = TokenStatistics.from_split(split, tokenizer.vocab_size, special.forbidden_outputs)
    schedule = build_schedule("spindle", 2048, information=torch.as_tensor(stats.centred_information()))
    test = tokenize_lines(lm1b_lines(64, shard=13), tokenizer, 64)
    print(f"\n| bound evaluation (64 test sentences, 32-step chain) | seconds | sequences/s | tokens/s |\n|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        def run():
            with torch.no_grad(), autocast("cpu", precision):
                bound_per_sequence(model.denoise, test, schedule, special, num_steps=32, seed=0)
        seconds = timed(run, 1, warmup=0)
        print(f"| {precision} | {seconds:.1f} | {len(test) / seconds:.2f} | {test.num_content_tokens * 32 / seconds:,.0f} |")


if __name__ == "__main__":
    main()
