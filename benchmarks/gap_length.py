"""Which way of choosing a `[MASK*?]` gap's length hits the true length? (`pipeline.generation.gap_length`)

On held-out test sentences of at least 6 content WordPieces, hide the evaluation's span (infill: the
word-aligned middle third; prefix: the second half, a gap at the end) of true length m <= --max-gap,
and choose a length among 1..--max-gap with each method:
- context (the default): p(n | WordPieces shown, where the gap sits) under the training length
  histogram; no model call;
- prior: the length histogram alone;
- bound: the model's bound plus the prior (on the first --bound-sentences infill sentences: it costs
  one bound chain per candidate);
and two constant baselines: the most common true length of the training split's spans (a baseline
a user could have), and the most common true length of the test spans themselves (an oracle).
Counted: sentences, exact hits, mean |chosen - m| in WordPieces.

    python -m benchmarks.gap_length --project <a project after make repro> --out benchmarks/results/gap_length.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from pipeline.data.stats import length_log_probs
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.eval.conditional import hidden_span
from pipeline.generation.gap_length import (
    choose_gap_length,
    context_gap_scores,
    gap_length_scores,
    prior_gap_scores,
)
from pipeline.model.export import load_exported
from pipeline.model.loading import load_tokenizer

Span = tuple[list[int], list[int], int]  # (left ids, right ids, true gap length)


def spans(split: TokenizedSplit, task: str, continuation: np.ndarray, max_gap: int, limit: int) -> list[Span]:
    """The task's hidden span of each sentence (in order) whose true length is 1..max_gap."""
    out: list[Span] = []
    for i in range(len(split)):
        if len(out) == limit:
            break
        content = split[i][1:-1].tolist()
        span = hidden_span(content, task, continuation) if len(content) >= 6 else None
        if span is None or span.end - span.start > max_gap:
            continue
        out.append((content[: span.start], content[span.end :], span.end - span.start))
    return out


def summary(chosen: list[int], truth: list[int]) -> dict:
    c, t = np.array(chosen), np.array(truth)
    return {"sentences": len(t), "exact": float((c == t).mean()), "mean_abs_error": float(np.abs(c - t).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="A project after `make repro` (models/final, data/).")
    ap.add_argument("--max-gap", type=int, default=12, help="Candidates 1..max-gap (the generation default, 12).")
    ap.add_argument(
        "--sentences", type=int, default=0, help="Test sentences per task for the model-free methods (0: all)."
    )
    ap.add_argument("--bound-sentences", type=int, default=128, help="Infill sentences the bound scores (0: skip).")
    ap.add_argument("--steps", type=int, default=16, help="Chain steps of each candidate's bound.")
    ap.add_argument("--seeds", type=int, default=2, help="Chain seeds of each candidate's bound.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    tokenizer = load_tokenizer()
    vocab = tokenizer.get_vocab()
    continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
    continuation[[i for token, i in vocab.items() if token.startswith("##")]] = True
    test = TokenizedSplit.load(args.project / "data/prepared/test")
    train = TokenizedSplit.load(args.project / "data/prepared/train")
    prior = length_log_probs(np.load(args.project / "data/token_stats/lengths.npy"), max_length=200)
    candidates = list(range(1, args.max_gap + 1))
    limit = args.sentences or len(test)
    result: dict = {
        "command": "python -m benchmarks.gap_length "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine(),
        "counted": f"test sentences of >= 6 content WordPieces whose hidden span is 1..{args.max_gap} WordPieces; "
        f"candidates 1..{args.max_gap}; exact = share of sentences whose chosen length is the true one",
    }
    for task in ("infill", "prefix"):
        held_out = spans(test, task, continuation, args.max_gap, limit)
        truth = [m for _, _, m in held_out]
        train_mode = Counter(m for _, _, m in spans(train, task, continuation, args.max_gap, 20_000)).most_common(1)[0][
            0
        ]
        test_mode = Counter(truth).most_common(1)[0][0]
        rows = {
            "context": summary(
                [choose_gap_length(context_gap_scores(len(a), len(b), candidates, prior)) for a, b, _ in held_out],
                truth,
            ),
            "prior": summary(
                [choose_gap_length(prior_gap_scores(len(a), len(b), candidates, prior)) for a, b, _ in held_out], truth
            ),
            "train_split_mode": {**summary([train_mode] * len(truth), truth), "length": int(train_mode)},
            "test_mode_oracle": {**summary([test_mode] * len(truth), truth), "length": int(test_mode)},
            "true_length_histogram": dict(sorted(Counter(truth).items())),
        }
        result[task] = rows
        print(task, json.dumps(rows), flush=True)
    if args.bound_sentences:
        model, tokenizer, schedule = load_exported(args.project / "models/final")
        special = SpecialIds.from_tokenizer(tokenizer)
        held_out = spans(test, "infill", continuation, args.max_gap, args.bound_sentences)
        chosen, context, start = [], [], time.perf_counter()
        for number, (left, right, _) in enumerate(held_out):
            scores = gap_length_scores(
                model.denoise, schedule, special, tokenizer.cls_token_id, tokenizer.sep_token_id, left, right,
                candidates, prior, num_steps=args.steps, seeds=tuple(range(args.seeds)),
            )  # fmt: skip
            chosen.append(choose_gap_length(scores))
            context.append(choose_gap_length(context_gap_scores(len(left), len(right), candidates, prior)))
            print(f"bound {number + 1}/{len(held_out)}", flush=True)
        truth = [m for _, _, m in held_out]
        result["bound_on_infill_subset"] = {
            "bound": summary(chosen, truth),
            "context_same_sentences": summary(context, truth),
            "precision": "fp32",
            "seconds_per_sentence": (time.perf_counter() - start) / max(len(held_out), 1),
            "chain": f"{args.steps} steps, {args.seeds} seeds",
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    with torch.no_grad():
        main()
