"""Does the model's bound pick the true length of a hidden span? (`pipeline.generation.gap_length`)

On test sentences of at least 6 content WordPieces, hide a word-aligned middle span of true
length m (the infill task's span, capped at `--max-gap`), score every candidate length 1..max-gap
with the bound on the shown words plus the length prior, and compare the argmin with m. Two
baselines from the same sentences: always the most common true length (mode), and the length
prior alone (argmin of -log p_len(L)); and the bound without the prior. Counted: sentences, exact hits, mean |chosen - m|.

    python -m benchmarks.gap_length --project /tmp/fc2/X --sentences 48 --out benchmarks/results/gap_length.json
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
from pipeline.generation.gap_length import choose_gap_length, gap_length_scores
from pipeline.model.export import load_exported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="A project after `make repro` (models/final, data/).")
    ap.add_argument("--sentences", type=int, default=48)
    ap.add_argument("--max-gap", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16, help="Chain steps of each candidate's bound.")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model, tokenizer, schedule = load_exported(args.project / "models/final")
    special = SpecialIds.from_tokenizer(tokenizer)
    test = TokenizedSplit.load(args.project / "data/prepared/test")
    prior = length_log_probs(np.load(args.project / "data/token_stats/lengths.npy"), max_length=200)
    vocab = tokenizer.get_vocab()
    continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
    continuation[[i for token, i in vocab.items() if token.startswith("##")]] = True
    candidates = list(range(1, args.max_gap + 1))
    rows, start = [], time.perf_counter()
    for i in range(len(test)):
        if len(rows) == args.sentences:
            break
        content = test[i][1:-1].tolist()
        span = hidden_span(content, "infill", continuation) if len(content) >= 6 else None
        if span is None or span.end - span.start > args.max_gap:
            continue
        left, right = content[: span.start], content[span.end :]
        scores = gap_length_scores(
            model.denoise, schedule, special, tokenizer.cls_token_id, tokenizer.sep_token_id, left, right,
            candidates, prior, num_steps=args.steps, seeds=tuple(range(args.seeds)),
        )  # fmt: skip
        prior_only = {n: -float(prior[len(left) + n + len(right)]) for n in candidates}
        bound_only = {n: scores[n] - prior_only[n] for n in candidates}
        rows.append(
            {
                "true": span.end - span.start,
                "bound": choose_gap_length(scores),
                "prior": choose_gap_length(prior_only),
                "bound_without_prior": choose_gap_length(bound_only),
            }
        )
    seconds = time.perf_counter() - start
    truth = np.array([r["true"] for r in rows])
    mode = Counter(truth.tolist()).most_common(1)[0][0]

    def summary(chosen: np.ndarray) -> dict:
        return {"exact": float((chosen == truth).mean()), "mean_abs_error": float(np.abs(chosen - truth).mean())}

    result = {
        "command": "python -m benchmarks.gap_length "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine(),
        "precision": "fp32",
        "counted": f"{len(rows)} test sentences (infill span, true length 1..{args.max_gap} WordPieces), "
        f"candidates 1..{args.max_gap}, {args.steps}-step bound, {args.seeds} seeds",
        "bound_plus_prior": summary(np.array([r["bound"] for r in rows])),
        "prior_only": summary(np.array([r["prior"] for r in rows])),
        "bound_without_prior": summary(np.array([r["bound_without_prior"] for r in rows])),
        "always_the_mode": {**summary(np.full_like(truth, mode)), "mode": int(mode)},
        "true_length_histogram": dict(sorted(Counter(truth.tolist()).items())),
        "seconds_per_sentence": seconds / max(len(rows), 1),
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    with torch.no_grad():
        main()
