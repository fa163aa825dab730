"""Time the fast per-sample BLEU / Self-BLEU (PAPER §7) against nltk on LM1B-sized inputs.

The protocol is the authors': one nltk ``corpus_bleu`` per sample (against every reference; for
Self-BLEU against the other samples), averaged. nltk rebuilds every reference's n-gram counts in
each call, so its cost is (samples x references); by default it runs on the first
``--nltk-hyps`` samples and the time is scaled up linearly (the scores of those samples are
compared one by one). The fast version runs on everything. Defaults: 1,000 "samples" (lines of
LM1B shard 12) against the whole test split (shard 13, every line), and 1,000 more for Self-BLEU.

    .venv/bin/python benchmarks/bench_bleu.py [--samples 1000] [--refs 0 (= all)] [--nltk-hyps 20]
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from pipeline.eval.metrics import normalize_words, self_sentence_bleus, sentence_bleus

_SHARED_LM1B = Path(__file__).resolve().parents[2] / "shared" / "data" / "lm1b"
LM1B_DIR = Path(os.environ.get("DBERT_LM1B_DIR", _SHARED_LM1B))
DEFAULT_REFS = LM1B_DIR / "news.en.heldout-00013-of-00050"  # the test split
DEFAULT_SAMPLES = LM1B_DIR / "news.en.heldout-00012-of-00050"  # stand-in "samples"


def load_sentences(path: Path, count: int, seed: int) -> list[list[str]]:
    """Real LM1B lines if available (count 0 = all), else random sentences from a Zipf-ish vocabulary."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        count = count or len(lines)
        if len(lines) >= count:
            return [normalize_words(line) for line in lines[:count]]
        print(f"{path} has only {len(lines)} lines; using synthetic sentences")
    else:
        print(f"{path} not found; using synthetic sentences")
    count = count or 6000
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    return [rng.choices(vocab, weights, k=rng.randint(5, 50)) for _ in range(count)]


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def nltk_note(k: int, total: int, seconds: float) -> str:
    """How the nltk time was obtained: measured, or scaled up from k hypotheses."""
    return "measured" if k == total else f"{seconds:.2f} s on {k} hyps x {total / k:.1f}"


def nltk_bleus(hyps, refs):
    return [corpus_bleu([refs], [h]) for h in hyps]


def nltk_self_bleus(samples, k):
    """nltk Self-BLEU of the first k samples, each against all the other samples."""
    return [corpus_bleu([samples[:i] + samples[i + 1 :]], [samples[i]]) for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-file", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--refs-file", type=Path, default=DEFAULT_REFS)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--refs", type=int, default=0, help="0 = every line of --refs-file (the whole test split)")
    parser.add_argument("--nltk-hyps", type=int, default=20, help="samples nltk scores (0 = all: hours)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # nltk warns on zero-count orders

    pool = load_sentences(args.samples_file, 2 * args.samples, args.seed)
    hyps, sb_samples = pool[: args.samples], pool[args.samples :]
    refs = load_sentences(args.refs_file, args.refs, args.seed + 1)
    k = args.samples if args.nltk_hyps <= 0 else min(args.nltk_hyps, args.samples)

    print(f"BLEU-4 (per-sample mean): {len(hyps)} samples x {len(refs)} references")
    fast, t_fast = timed(sentence_bleus, hyps, refs)
    slow, t_nltk_sub = timed(nltk_bleus, hyps[:k], refs)
    t_nltk = t_nltk_sub * len(hyps) / k
    print(f"  fast  {t_fast:8.3f} s  BLEU={sum(fast) / len(fast):.6f}")
    print(f"  nltk  {t_nltk:8.1f} s  ({nltk_note(k, len(hyps), t_nltk_sub)})")
    print(f"  equal on the {k} nltk samples: {fast[:k] == slow}")
    print(f"  speed-up x{t_nltk / t_fast:,.0f}")

    n = len(sb_samples)
    print(f"Self-BLEU-4 (per-sample mean): {n} samples, each against the other {n - 1}")
    fast_sb, t_fast_sb = timed(self_sentence_bleus, sb_samples)
    slow_sb, t_nltk_sb_sub = timed(nltk_self_bleus, sb_samples, k)
    t_nltk_sb = t_nltk_sb_sub * n / k
    print(f"  fast  {t_fast_sb:8.3f} s  Self-BLEU={sum(fast_sb) / n:.6f}")
    print(f"  nltk  {t_nltk_sb:8.1f} s  ({nltk_note(k, n, t_nltk_sb_sub)})")
    print(f"  equal on the {k} nltk samples: {fast_sb[:k] == slow_sb}")
    print(f"  speed-up x{t_nltk_sb / t_fast_sb:,.0f}")


if __name__ == "__main__":
    main()
