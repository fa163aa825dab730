"""Token statistics versus tokenization alone, and bound evaluation throughput.

    .venv/bin/python benchmarks/bench_stats.py [--model models/final]

With --model (an exported, trained model) the bound rows use it; otherwise the untrained default.

Statistics (vectorised bincount, entropy, h(v), summary) should add little to tokenization.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import functools
import operator

from benchmarks.common import lm1b_lines, machine, timed
from pipeline.data.stats import TokenStatistics, length_histogram, summarize
from pipeline.data.tokenize import tokenize_lines
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.schedules import build_schedule
from pipeline.eval.bound import bound_per_sequence
from pipeline.model.loading import build_denoiser, load_tokenizer
from pipeline.model.precision import autocast


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="exported model directory for the bound rows")
    args = parser.parse_args()
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    lines = functools.reduce(operator.iadd, (lm1b_lines(10**6, shard) for shard in (10, 11, 12)), [])
    print(f"machine: {machine()}; {len(lines)} LM1B lines")
    tok_s = timed(lambda: tokenize_lines(lines, tokenizer, 64), 3)
    split = tokenize_lines(lines, tokenizer, 64)

    def tokens_and_stats():
        s = tokenize_lines(lines, tokenizer, 64)
        stats = TokenStatistics.from_split(s, tokenizer.vocab_size, special.forbidden_outputs)
        summarize(stats, tokenizer, len(s))
        length_histogram(s)

    both_s = timed(tokens_and_stats, 3)
    print("| work | seconds | tokens/s | ratio |\n|---|---|---|---|")
    print(f"| tokenization alone | {tok_s:.2f} | {split.num_content_tokens / tok_s:,.0f} | 1.00x |")
    print(
        f"| tokenization + statistics | {both_s:.2f} | {split.num_content_tokens / both_s:,.0f} | {both_s / tok_s:.2f}x |"
    )

    if args.model:
        from pipeline.model.export import load_exported

        model, _, schedule = load_exported(args.model)
    else:
        model = build_denoiser("default", num_timesteps=2048).eval()
        stats = TokenStatistics.from_split(split, tokenizer.vocab_size, special.forbidden_outputs)
        schedule = build_schedule("spindle", 2048, information=torch.as_tensor(stats.centred_information()))
    test = tokenize_lines(lm1b_lines(64, shard=13), tokenizer, 64)
    print(
        "\n| bound evaluation (64 test sentences, 32-step chain, seed 0) | seconds | sequences/s | PPL per token |"
        "\n|---|---|---|---|"
    )
    for precision in ("fp32", "bf16"):
        nll = []

        def run(precision=precision, nll=nll):
            with torch.no_grad(), autocast("cpu", precision):
                nll.append(bound_per_sequence(model.denoise, test, schedule, special, num_steps=32, seed=0))

        seconds = timed(run, 1, warmup=0)
        ppl = math.exp(float(nll[-1].sum()) / test.num_content_tokens)
        print(f"| {precision} | {seconds:.1f} | {len(test) / seconds:.2f} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
