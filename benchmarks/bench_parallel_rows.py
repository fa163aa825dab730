"""Training steps per hour of the whole CPU: one process using every core, against N processes of
one thread each (how `make schedules-parallel` runs its two halves).

    .venv/bin/python benchmarks/bench_parallel_rows.py [--steps 8] [--processes 2]

Each configuration trains the default denoiser (all-MiniLM-L6-v2, fp32, eager attention, fused
AdamW) on the same LM1B batches of 32 sentences capped at 64 WordPieces, in fresh processes, one
after the other; the rate is optimizer steps per hour summed over the processes that run at once.
Run it on an otherwise idle machine: it measures how the cores share work, so anything else
running moves every row.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_LEN, BATCH, T = 64, 32, 2048


def child(threads: int, steps: int) -> None:
    """Time `steps` training steps with `threads` torch threads; print seconds per step."""
    import torch

    from benchmarks.common import lm1b_lines
    from pipeline.data.batching import length_bucketed_batches, pad_batch
    from pipeline.data.tokenize import tokenize_lines
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.diffusion.loss import diffusion_loss
    from pipeline.diffusion.schedules import build_schedule
    from pipeline.model.loading import build_denoiser, load_tokenizer
    from pipeline.train.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    split = tokenize_lines(lm1b_lines(BATCH * (steps + 2) * 4), tokenizer, MAX_LEN)
    batches = length_bucketed_batches(split.lengths, BATCH, seed=0)[: steps + 1]
    padded = [pad_batch([split[i] for i in b], special.pad) for b in batches]
    model = build_denoiser("default", num_timesteps=T)
    model.mlm.set_attn_implementation("eager")
    optimizer = build_optimizer(model, 1e-5, 0.01)
    schedule = build_schedule("linear", T)

    def forward(x, a, s, p):
        return model(x, a, s, p).logits

    def step(k: int) -> None:
        ids, attn = padded[k]
        loss = diffusion_loss(forward, ids, attn, schedule, special, torch.Generator().manual_seed(k), 0.01).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for k in range(1, steps + 1):
        step(k)
    print(f"{(time.perf_counter() - start) / steps:.4f}", flush=True)


def concurrent(processes: int, threads: int, steps: int) -> list[float]:
    """Seconds per step of each of `processes` children started together."""
    command = [sys.executable, __file__, "--child-threads", str(threads), "--steps", str(steps)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outputs = [c.communicate()[0] for c in children]
    if any(c.returncode for c in children):
        raise SystemExit("a benchmark child failed")
    return [float(out.strip().splitlines()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process (after one warm-up)")
    parser.add_argument("--processes", type=int, default=2, help="1-thread processes run at once")
    parser.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_threads:
        child(args.child_threads, args.steps)
        return

    import torch

    from benchmarks.common import machine

    cores = torch.get_num_threads()
    rows = [
        (f"1 process x {cores} threads (baseline)", 1, cores),
        ("1 process x 1 thread", 1, 1),
        (f"{args.processes} processes x 1 thread, at once", args.processes, 1),
    ]
    print(f"machine: {machine()}; fp32; batch {BATCH}, <= {MAX_LEN} WordPieces; {args.steps} timed steps each")
    print("| configuration | s/step of each process | steps/hour, all processes | vs baseline |\n|---|---|---|---|")
    base = None
    for name, processes, threads in rows:
        seconds = concurrent(processes, threads, args.steps)
        rate = sum(3600 / s for s in seconds)
        base = base or rate
        each = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"| {name} | {each} | {rate:.0f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
