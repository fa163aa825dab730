"""Time the fast BLEU / Self-BLEU against nltk's corpus_bleu on LM1B-sized inputs.

nltk's cost is linear in the number of hypotheses for a fixed reference set (each hypothesis
rebuilds every reference's n-gram counts), so by default it runs on the first ``--nltk-hyps``
hypotheses against the *full* reference set and the time is scaled up linearly; the fast
version runs on that same subset (to check equality) and on the full set (to time it).
``--nltk-hyps 0`` runs nltk on everything (minutes).

    .venv/bin/python benchmarks/bench_bleu.py [--lm1b FILE] [--samples 1000] [--refs 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from pipeline.eval.metrics import bleu_tokens, normalize_words, self_bleu_tokens

_SHARED_LM1B = Path(__file__).resolve().parents[2] / "shared" / "data" / "lm1b"
DEFAULT_LM1B = (
    Path(os.environ.get("DBERT_LM1B_DIR", _SHARED_LM1B)) / "news.en.heldout-00013-of-00050"
)


def load_sentences(path: Path, count: int, seed: int) -> list[list[str]]:
    """Real LM1B lines if available, else random sentences from a Zipf-ish vocabulary."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) >= count:
            return [normalize_words(line) for line in lines[:count]]
        print(f"{path} has only {len(lines)} lines; using synthetic sentences")
    else:
        print(f"{path} not found; using synthetic sentences")
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


def nltk_bleu(hyps, refs):
    return corpus_bleu([refs] * len(hyps), hyps)


def nltk_self_bleu_subset(samples, k):
    """nltk Self-BLEU restricted to the first k samples as hypotheses, the others as references."""
    return corpus_bleu([samples[:i] + samples[i + 1 :] for i in range(k)], samples[:k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm1b", type=Path, default=DEFAULT_LM1B)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--refs", type=int, default=1000)
    parser.add_argument("--nltk-hyps", type=int, default=100, help="0 = all (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # nltk warns on zero-count orders

    corpus = load_sentences(args.lm1b, args.samples * 2 + args.refs, args.seed)
    hyps = corpus[: args.samples]
    refs = corpus[args.samples : args.samples + args.refs]
    sb_samples = corpus[args.samples + args.refs :]
    k = args.samples if args.nltk_hyps <= 0 else min(args.nltk_hyps, args.samples)
    scale = args.samples / k

    print(f"BLEU-4: {args.samples} hypotheses x {args.refs} references")
    fast_full, t_fast = timed(bleu_tokens, hyps, refs)
    fast_sub, _ = timed(bleu_tokens, hyps[:k], refs)
    nltk_sub, t_nltk_sub = timed(nltk_bleu, hyps[:k], refs)
    t_nltk = t_nltk_sub * scale
    print(f"  fast  {t_fast:8.3f} s  BLEU={fast_full:.6f}")
    print(f"  nltk  {t_nltk:8.3f} s  ({nltk_note(k, args.samples, t_nltk_sub)})")
    diff = abs(fast_sub - nltk_sub)
    print(f"  equal on the nltk hypotheses: {fast_sub == nltk_sub} (|diff|={diff:.1e})")
    print(f"  speed-up x{t_nltk / t_fast:,.0f}")

    n = len(sb_samples)
    print(f"Self-BLEU-4: {n} samples, each against the other {n - 1}")
    fast_sb, t_fast_sb = timed(self_bleu_tokens, sb_samples)
    nltk_sb_sub, t_nltk_sb_sub = timed(nltk_self_bleu_subset, sb_samples, k)
    t_nltk_sb = t_nltk_sb_sub * n / k
    print(f"  fast  {t_fast_sb:8.3f} s  Self-BLEU={fast_sb:.6f}")
    print(f"  nltk  {t_nltk_sb:8.3f} s  ({nltk_note(k, n, t_nltk_sb_sub)})")
    if k == n:
        print(f"  equal: {fast_sb == nltk_sb_sub} (|diff|={abs(fast_sb - nltk_sb_sub):.1e})")
    print(f"  speed-up x{t_nltk_sb / t_fast_sb:,.0f}")


if __name__ == "__main__":
    main()
