"""Training throughput and model FLOPs utilisation, against an authors'-style step in one run.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--profile]

Same model (the default all-MiniLM-L6-v2 denoiser), same LM1B sentences capped at 64 WordPieces,
batch 32. Tokens/s counts non-pad tokens. MFU = model FLOPs / measured matmul peak of the same
dtype, measured in this run (common.model_flops_per_token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.authors_step import authors_style_loss
from benchmarks.common import lm1b_lines, machine, matmul_peak, model_flops_per_token, timed
from pipeline.data.batching import length_bucketed_batches, pad_batch
from pipeline.data.tokenize import tokenize_lines
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import diffusion_loss
from pipeline.diffusion.schedules import build_schedule
from pipeline.model.loading import build_denoiser, load_tokenizer
from pipeline.model.precision import autocast
from pipeline.train.optim import build_optimizer

BATCH, MAX_LEN, T = 32, 64, 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    parser.add_argument("--profile", action="store_true", help="print where a bf16 step spends its time")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    split = tokenize_lines(lm1b_lines(BATCH * (args.steps + 2) * 4), tokenizer, MAX_LEN)
    batches = length_bucketed_batches(split.lengths, BATCH, seed=0)[: args.steps + 2]
    padded = [pad_batch([split[i] for i in b], special.pad) for b in batches]
    model = build_denoiser("default", num_timesteps=T)
    baseline_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # the authors' plain AdamW
    fused_optimizer = build_optimizer(model, 1e-5, 0.01)  # ours: fused AdamW
    schedule = build_schedule("linear", T)
    forward = lambda x, a, s, p: model(x, a, s, p).logits  # noqa: E731
    counter = iter(range(10**9))

    def run(step_fn, padded_batches, optimizer, attention="sdpa"):
        def one():
            model.mlm.set_attn_implementation(attention)
            k = next(counter)
            ids, attn = padded_batches[k % len(padded_batches)]
            loss = step_fn(ids, attn, torch.Generator().manual_seed(k))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return one

    def ours(precision):
        def step(ids, attn, gen):
            with autocast("cpu", precision):
                return diffusion_loss(forward, ids, attn, schedule, special, gen, 0.01).loss

        return step

    def authors(ids, attn, gen):
        return authors_style_loss(model, ids, attn, T, special.mask, gen)

    def pad_to(width):
        out = []
        for ids, attn in padded:
            extra = width - ids.shape[1]
            out.append(
                (
                    torch.nn.functional.pad(ids, (0, extra), value=special.pad),
                    torch.nn.functional.pad(attn, (0, extra), value=False),
                )
            )
        return out

    tokens = float(np.mean([int(a.sum()) for _, a in padded]))
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops = model_flops_per_token(model, seq_len=int(np.mean([a.shape[1] for _, a in padded])))
    rows = [
        ("authors-style, fp32, padded to 64 (baseline)", run(authors, pad_to(MAX_LEN), baseline_optimizer), "fp32"),
        ("authors-style, fp32, padded to 128", run(authors, pad_to(128), baseline_optimizer), "fp32"),
        ("ours, fp32, dynamic padding, SDPA, plain AdamW", run(ours("fp32"), padded, baseline_optimizer), "fp32"),
        (
            "ours, fp32, dynamic padding, eager attention, fused AdamW (default)",
            run(ours("fp32"), padded, fused_optimizer, "eager"),
            "fp32",
        ),
        (
            "ours, bf16 autocast, dynamic padding, SDPA, plain AdamW",
            run(ours("bf16"), padded, baseline_optimizer),
            "bf16",
        ),
        (
            "ours, bf16 autocast, eager attention, fused AdamW (default)",
            run(ours("bf16"), padded, fused_optimizer, "eager"),
            "bf16",
        ),
    ]
    print(f"machine: {machine()}")
    print(
        f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
        f"{flops / 1e6:.1f} MFLOP per token; {tokens:.0f} non-pad tokens per batch of {BATCH}"
    )
    # Our loss runs the MLM head only at masked positions (half the tokens on average), so the
    # standard model-FLOPs count (head at every token) overstates the work done; the last column counts the head at 50%.
    head = 6 * model.mlm.config.hidden_size * model.mlm.config.vocab_size
    print(
        "| row | s/step | tokens/s | vs baseline | MFU (own dtype peak) | MFU, head at 50% |\n|---|---|---|---|---|---|"
    )
    base = None
    for name, fn, dtype in rows:
        seconds = timed(fn, args.steps, warmup=1)
        rate = tokens / seconds
        base = base or rate
        mfu = rate * flops / peak[dtype]
        mfu_half = rate * (flops - (head / 2 if name.startswith("ours") else 0)) / peak[dtype]
        print(
            f"| {name} | {seconds:.2f} | {rate:.0f} | {rate / base:.2f}x | {mfu:.0%} of {dtype} | {mfu_half:.0%} |",
            flush=True,
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = run(ours("bf16"), padded, fused_optimizer, "eager")
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
