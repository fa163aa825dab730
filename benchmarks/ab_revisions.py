"""The default CPU path at another git revision against this checkout: the same numbers, and how
long each part takes, in one run.

    .venv/bin/python benchmarks/ab_revisions.py --baseline REV [--steps 12] [--repeats 2]

Each side trains the default model (all-MiniLM-L6-v2 denoiser, fp32 or --precision, batch 32, LM1B sentences
capped at 64 WordPieces) for `--steps` steps through `pipeline.train.loop.train_loop`, scores the
bound of 64 test sentences (32-step chain, seed 0) and generates 16 samples (32 steps, top-k 30),
with the same seeds. REV is checked out into a temporary git worktree and imported from there
(PYTHONPATH) by this venv's python; the runs alternate baseline / this checkout. Prints the
seconds of each part and md5s of the trained weights and the samples, which must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import hashlib, json, sys, time
from pathlib import Path
import torch
from pipeline.config import load_params
from pipeline.data.sources import load_lm1b_mirror
from pipeline.data.stats import TokenStatistics
from pipeline.data.tokenize import tokenize_lines
from pipeline.diffusion.forward import SpecialIds
from pipeline.eval.bound import perplexity_bound
try:
    from pipeline.generation.sampling import generate
except ImportError:  # a revision before pipeline.generation
    from pipeline.eval.generation import generate
from pipeline.model.loading import load_tokenizer
from pipeline.train.loop import TrainData, train_loop

root, steps, lm1b, precision = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
tokenizer = load_tokenizer("default")
corpus = load_lm1b_mirror(lm1b, max_sentences=2000)
special = SpecialIds.from_tokenizer(tokenizer)
train = tokenize_lines(corpus.train, tokenizer, 64)
data = TrainData(train, tokenize_lines(corpus.validation, tokenizer, 64),
                 TokenStatistics.from_split(train, tokenizer.vocab_size, special.forbidden_outputs), tokenizer)
test = tokenize_lines(corpus.test[:64], tokenizer, 64)
params = load_params(str(root / "params.yaml"), [f"train.steps={steps}", "train.eval_every=1000",
    "train.checkpoint_every=1000", f"train.precision={precision}", "train.batch_size=32", "train.warmup_steps=2"])
out = {}
tick = time.perf_counter(); result = train_loop(params, data); out["train_s"] = time.perf_counter() - tick
tick = time.perf_counter()
bound = perplexity_bound(result.model.denoise, test, result.schedule, special, num_steps=32, seeds=(0,))
out["bound_s"] = time.perf_counter() - tick
tick = time.perf_counter()
samples = generate(result.model, tokenizer, result.schedule, lengths=[20, 25, 30, 12] * 4, steps=32, top_k=30)
out["generate_s"] = time.perf_counter() - tick
out["ppl_token"] = bound["ppl_token_mean"]
out["last_loss"] = result.history[-1]["loss"]
out["weights_md5"] = hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
out["samples_md5"] = hashlib.md5("\n".join(samples.texts).encode()).hexdigest()
print(json.dumps(out))
"""


def run_side(source: Path, steps: int, lm1b: str, precision: str = "fp32") -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(source), str(steps), lm1b, precision],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="training autocast")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--lm1b", default=os.environ.get("DBERT_LM1B_DIR", str(ROOT.parent / "shared" / "data" / "lm1b"))
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dbert-ab-") as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "-q", str(old), args.baseline], check=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "this checkout": []}
            for _ in range(args.repeats):
                runs["baseline"].append(run_side(old, args.steps, args.lm1b, args.precision))
                runs["this checkout"].append(run_side(ROOT, args.steps, args.lm1b, args.precision))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(
        f"baseline {args.baseline}; {args.steps} training steps ({args.precision}); {args.repeats} alternating runs each"
    )
    print("| side | train s | bound s | generate s | PPL/token | last loss | weights md5 | samples md5 |")
    print("|---|---|---|---|---|---|---|---|")
    for side, results in runs.items():
        cells = [", ".join(f"{r[key]:.1f}" for r in results) for key in ("train_s", "bound_s", "generate_s")]
        last = results[-1]
        print(
            f"| {side} | {' | '.join(cells)} | {last['ppl_token']:.6f} | {last['last_loss']:.9f} | "
            f"{last['weights_md5'][:12]} | {last['samples_md5'][:12]} |"
        )
    for key in ("train_s", "bound_s", "generate_s"):
        ratio = statistics.median(r[key] for r in runs["this checkout"]) / statistics.median(
            r[key] for r in runs["baseline"]
        )
        print(f"{key}: this checkout / baseline = {ratio:.2f}x (medians)")
    same = all(
        a[key] == b[key]
        for a, b in zip(runs["baseline"], runs["this checkout"])
        for key in ("weights_md5", "samples_md5", "ppl_token", "last_loss")
    )
    print("identical numbers:", same)


if __name__ == "__main__":
    main()
