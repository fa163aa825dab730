"""Sampler speed: cached versus uncached and k = 1 versus k = 16 step skipping at T = 512.

    .venv/bin/python benchmarks/bench_sampler.py [--samples 32] [--length 32]

Same seed in every row: the cached sampler must return exactly the uncached tokens. Reports
model calls per sample (forwards each sequence took part in), wall-clock per sample and the
share of the time spent outside the model (sampling overhead = total / model-forward time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from pipeline.diffusion.forward import SpecialIds  # noqa: E402
from pipeline.diffusion.samplers import ancestral_sample  # noqa: E402
from pipeline.diffusion.schedules import build_schedule, time_grid  # noqa: E402
from pipeline.model.loading import build_denoiser, load_tokenizer  # noqa: E402
from pipeline.model.precision import autocast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    model = build_denoiser("default", num_timesteps=args.T).eval()
    schedule = build_schedule("linear", args.T)

    def denoise(*a):
        with autocast("cpu", args.precision):
            return model.denoise(*a)

    print(f"machine: {machine()}; {args.samples} samples x {args.length} tokens, T={args.T}, {args.precision}")
    print("| sampler | k | model calls / sample | s / sample | total / model time | vs uncached k=1 | same tokens |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for k in (1, 16):
        for cache in (False, True):
            out = ancestral_sample(
                denoise,
                schedule,
                [args.length] * args.samples,
                special,
                tokenizer.cls_token_id,
                tokenizer.sep_token_id,
                grid=time_grid(args.T, k),
                top_k=30,
                seed=0,
                cache=cache,
            )
            results[(k, cache)] = out
            base = results[(1, False)].seconds
            same = "-" if not cache else str(torch.equal(out.tokens, results[(k, False)].tokens))
            print(
                f"| {'cached' if cache else 'uncached'} | {k} | {out.row_calls.float().mean():.1f} | "
                f"{out.seconds / args.samples:.3f} | {out.seconds / max(out.model_seconds, 1e-9):.2f}x | "
                f"{base / out.seconds:.2f}x | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
