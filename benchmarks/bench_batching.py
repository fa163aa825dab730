"""Padded batches against token-budget batches in packed rows, through the real training loop.

    .venv/bin/python benchmarks/bench_batching.py [--steps 12] [--repeats 3] [--sentences 2000]
        [--batch 32] [--row-length 128] [--json benchmarks/results/bench_batching.json]

Same model (the default all-MiniLM-L6-v2 denoiser), same LM1B sentences capped at 64 WordPieces,
same loop (`pipeline.train.loop.train_loop`, precision `auto`). Layout A: padded batches of
`--batch` sentences (length-bucketed, padded to the longest). Layout B: `train.tokens_per_batch`
= the mean real tokens of A's batches over an epoch, laid out as packed rows of `--row-length`
slots, so both do the same real work a step and B computes no padding. The runs alternate
A/B/A/B; each reads real (non-pad) tokens/s from the loop's report after step 1 (steps 2..N:
step 1 and the validation passes are warm-up and not training time). The table shows medians
over the repeats; slots per real token = token slots the encoder computes (padded: B x L a
batch; packed: rows x row length) / real tokens, over the batches the run trained on.

Timing is wall-clock; on a shared machine compare the ratios within one run, not absolute rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LM1B, ROOT, machine
from pipeline.config import Params, load_params
from pipeline.data.sources import load_lm1b_mirror
from pipeline.data.stats import TokenStatistics
from pipeline.data.tokenize import tokenize_lines
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.packing import first_fit_rows
from pipeline.model.loading import load_tokenizer
from pipeline.model.precision import resolve_precision
from pipeline.train.checkpoint import TrainPosition
from pipeline.train.loop import TrainData, train_loop, training_batches

MAX_SEQ_LEN = 64
LAYOUTS = ("padded", "packed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps a run (step 1 is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each layout, interleaved")
    parser.add_argument("--sentences", type=int, default=2000, help="LM1B training sentences")
    parser.add_argument("--batch", type=int, default=32, help="sentences per padded batch")
    parser.add_argument("--row-length", type=int, default=128, help="slots per packed row")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_batching.json")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is not timed)")
    return args


def train_data(sentences: int) -> TrainData:
    """The tiny_data recipe of tests/unit/test_train_loop.py at benchmark size."""
    tokenizer = load_tokenizer("default")
    corpus = load_lm1b_mirror(LM1B, max_sentences=sentences)
    special = SpecialIds.from_tokenizer(tokenizer)
    train = tokenize_lines(corpus.train, tokenizer, MAX_SEQ_LEN)
    validation = tokenize_lines(corpus.validation, tokenizer, MAX_SEQ_LEN)
    stats = TokenStatistics.from_split(train, tokenizer.vocab_size, special.forbidden_outputs)
    return TrainData(train, validation, stats, tokenizer)


def params_for(args: argparse.Namespace, tokens_per_batch: int | None) -> Params:
    layout = [f"train.tokens_per_batch={tokens_per_batch}", f"train.row_length={args.row_length}"]
    return load_params(
        ROOT / "params.yaml",
        [
            "model.name_or_path=default",
            f"data.max_seq_len={MAX_SEQ_LEN}",
            f"train.steps={args.steps}",
            f"train.batch_size={args.batch}",
            "train.warmup_steps=1",
            f"train.eval_every={args.steps + 1}",  # validation at step 1 and the last step only
            "train.eval_batches=1",
            f"train.checkpoint_every={args.steps + 1}",
            "train.precision=auto",
            *(layout if tokens_per_batch is not None else []),
        ],
    )


def batches(data: TrainData, params: Params, count: int | None) -> list[dict]:
    """The first `count` batches the loop trains on (all of epoch 0 when None)."""
    from pipeline.data.batching import num_batches

    tp = params.train
    if count is None:
        count = num_batches(
            data.train,
            tp.batch_size,
            seq_len=MAX_SEQ_LEN,
            drop_last=True,
            tokens_per_batch=tp.tokens_per_batch,
            seed=tp.seed,
        )
    stream = training_batches(data, params, SpecialIds.from_tokenizer(data.tokenizer), TrainPosition(), 0, 1)
    return [next(stream) for _ in range(count)]


def mean_real_tokens(data: TrainData, params: Params) -> int:
    """Mean real tokens of the padded batches of an epoch: the token budget of the packed layout."""
    return round(statistics.mean(int(b["attention_mask"].sum()) for b in batches(data, params, None)))


def slots_per_real_token(data: TrainData, params: Params, steps: int) -> float:
    """Token slots the encoder computes / real tokens, over the batches a run of `steps` trains on."""
    tp = params.train
    slots = real = 0
    for batch in batches(data, params, steps):
        mask = batch["attention_mask"]
        lengths = mask.sum(1).numpy()
        real += int(lengths.sum())
        if tp.tokens_per_batch is None:
            slots += int(mask.numel())  # B x L, padded to the longest
        else:
            rows, _ = first_fit_rows(lengths, tp.row_length)
            slots += (int(np.max(rows)) + 1) * tp.row_length
    return slots / real


def one_run(params: Params, data: TrainData) -> dict:
    """Real tokens/s over steps 2..N (the loop's last report window) and real tokens a step."""
    start = time.perf_counter()
    result = train_loop(params, data)
    last = result.history[-1]
    return {
        "tokens_per_s": float(last["tokens_per_s"]),
        "real_tokens_per_step": last["tokens_seen"] / last["step"],
        "wall_s": time.perf_counter() - start,
    }


def table(rows: dict[str, dict]) -> list[str]:
    base = rows["padded"]["tokens_per_s"]
    base_slots = rows["padded"]["slots_per_real_token"]
    lines = [
        "| layout | batch | real tokens / step | slots / real token | real tokens/s (median) | tokens/s vs padded "
        "| slots vs padded |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['batch']} | {row['real_tokens_per_step']:,.0f} | {row['slots_per_real_token']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / base:.2f}x | "
            f"{row['slots_per_real_token'] / base_slots:.2f}x |"
        )
    return lines


def main() -> None:
    args = parse_args()
    command = "python benchmarks/bench_batching.py " + " ".join(sys.argv[1:])
    data = train_data(args.sentences)
    padded = params_for(args, None)
    budget = mean_real_tokens(data, padded)
    layouts = {"padded": padded, "packed": params_for(args, budget)}
    precision = resolve_precision("auto", "cpu")
    print(f"machine: {machine()}")
    print(
        f"model: default (all-MiniLM-L6-v2); {len(data.train)} LM1B sentences <= {MAX_SEQ_LEN} WordPieces; "
        f"precision {precision}; {args.steps} steps a run (steps 2..{args.steps} timed), "
        f"{args.repeats} run(s) a layout, A/B interleaved",
        flush=True,
    )
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for repeat in range(args.repeats):
        for name in LAYOUTS:
            runs[name].append(one_run(layouts[name], data))
            print(f"  run {repeat + 1} {name}: {runs[name][-1]['tokens_per_s']:,.0f} real tokens/s", flush=True)
    batch_of = {"padded": f"{args.batch} sentences", "packed": f"{budget} tokens, rows of {args.row_length}"}
    rows = {
        name: {
            "batch": batch_of[name],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[name]),
            "real_tokens_per_step": statistics.mean(r["real_tokens_per_step"] for r in runs[name]),
            "slots_per_real_token": slots_per_real_token(data, layouts[name], args.steps),
            "runs": runs[name],
        }
        for name in LAYOUTS
    }
    print()
    print("\n".join(table(rows)))
    print(f"\ncommand: {command}")
    meta = {
        "command": command,
        "machine": machine(),
        "model": "default (all-MiniLM-L6-v2)",
        "precision": precision,
        "sentences": len(data.train),
        "max_seq_len": MAX_SEQ_LEN,
        "steps": args.steps,
        "timed_steps": f"2..{args.steps}",
        "repeats": args.repeats,
        "order": "A/B interleaved (padded, packed, padded, packed, ...)",
        "tokens_per_batch": budget,
        "row_length": args.row_length,
        "counted": "real (non-pad) tokens/s from the loop's report window after step 1; "
        "slots = B x L (padded) or rows x row_length (packed) over the batches trained on",
    }
    ratio = rows["packed"]["tokens_per_s"] / rows["padded"]["tokens_per_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "packed_over_padded": ratio}, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
