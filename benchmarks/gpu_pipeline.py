"""The pipeline's own GPU path, end to end: Ray Train on a GPU worker, then the bound (bf16 vs
fp32) and sampling on the GPU, on real LM1B data.

    python benchmarks/gpu_pipeline.py --root PROJECT --out DIR [--steps 300 --batch 128]

PROJECT holds `data/prepared/{train,validation,test}` and `data/token_stats` (what `dbert
prepare` and `dbert token-stats` write). The denoiser is a randomly initialised BERT of
bert-base's shape (12 x 768, 12 heads, 3072 FFN; the MiniLM vocabulary), trained with
`pipeline.train.ray.driver.run_training` exactly as `dbert train` does (no MLflow run: the GPU
machine has no tracking store), 1 Ray Train worker per visible GPU. Prints and writes
`results.json`: tokens/s (non-pad tokens, rank-0 reports), MFU against a bf16 matmul peak
measured on the same GPU, the bound per token in bf16 and fp32 on the same test sentences, and
the sampler's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import matmul_peak, sync  # noqa: E402
from pipeline.artifacts import Layout  # noqa: E402
from pipeline.config import load_params  # noqa: E402

BASE_SHAPE = ("model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.intermediate_size=3072")
TINY_SHAPE = ("model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64")


def flops_per_token(model, seq_len: int) -> float:
    """6 x non-embedding params + 6 x hidden x vocab (the MLM head) + attention, per token."""
    config = model.mlm.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return (
        6 * params
        + 6 * config.hidden_size * config.vocab_size
        + 12 * config.num_hidden_layers * seq_len * config.hidden_size
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="per worker")
    parser.add_argument("--bound-sentences", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny run on the CPU (checks the script)")
    args = parser.parse_args()
    os.environ.setdefault("DBERT_RAY_DASHBOARD", "0")
    gpus = 1 if args.cpu_smoke else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("no CUDA GPU visible")
    device = torch.device("cpu" if args.cpu_smoke else "cuda:0")
    shape = TINY_SHAPE if args.cpu_smoke else BASE_SHAPE
    results: dict = {
        "gpu": "cpu" if args.cpu_smoke else torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)

    from pipeline.train.ray.driver import run_training

    params = load_params(
        None,
        [
            "model.name_or_path=random",
            *shape,
            "data.max_seq_len=64",
            f"train.steps={args.steps}",
            f"train.batch_size={args.batch}",
            "train.lr=3e-4",
            "train.warmup_steps=30",
            f"train.eval_every={max(args.steps // 3, 1)}",
            "train.eval_batches=4",
            f"train.checkpoint_every={args.steps}",
            f"train.num_workers={gpus}",
            f"train.use_gpu={str(not args.cpu_smoke).lower()}",
            "train.precision=auto",
        ],
    )
    layout = Layout(args.root)
    start = time.perf_counter()
    outcome = run_training(params, layout, export_dir=args.out / "model")
    results["train"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "precision": outcome.precision,
        "workers": gpus,
        "history": [
            {k: h[k] for k in ("step", "loss", "val_bound", "tokens_per_s") if k in h} for h in outcome.history
        ],
    }
    tokens_per_s = float(np.median([h["tokens_per_s"] for h in outcome.history[1:]] or [0.0]))

    from pipeline.data.tokenize import TokenizedSplit
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.eval.bound import bound_per_sequence
    from pipeline.eval.generation import generate
    from pipeline.model.export import load_exported
    from pipeline.model.precision import autocast

    model, tokenizer, schedule = load_exported(args.out / "model")
    model.to(device).eval()
    peak = matmul_peak(device, 512 if args.cpu_smoke else 8192)
    mfu = tokens_per_s / gpus * flops_per_token(model, 64) / peak
    results["train"].update(
        tokens_per_s_median=round(tokens_per_s), mfu=round(mfu, 4), bf16_peak_tflops=round(peak / 1e12, 1)
    )

    special = SpecialIds.from_tokenizer(tokenizer)
    test = TokenizedSplit.load(layout.prepared / "test").head(args.bound_sentences)
    split = [test[i] for i in range(len(test))]
    tokens = test.num_content_tokens
    bound = {}
    for precision in ("fp32", "bf16"):
        sync(device)
        tick = time.perf_counter()
        with torch.no_grad(), autocast(device, precision):
            nll = bound_per_sequence(
                model.denoise, split, schedule, special, num_steps=32, seed=0, batch_size=256, device=device
            )
        sync(device)
        bound[precision] = {
            "nats_per_token": float(nll.sum() / tokens),
            "ppl_per_token": float(np.exp(nll.sum() / tokens)),
            "seconds": round(time.perf_counter() - tick, 2),
        }
    bound["sentences"], bound["content_tokens"], bound["chain_steps"] = len(split), tokens, 32
    bound["bf16_vs_fp32_relative"] = bound["bf16"]["nats_per_token"] / bound["fp32"]["nats_per_token"] - 1
    results["bound"] = bound

    lengths = [32] * args.samples
    sampling = {}
    for precision in ("fp32", "bf16"):
        sync(device)
        tick = time.perf_counter()
        with torch.no_grad(), autocast(device, precision):
            out = generate(
                model, tokenizer, schedule, lengths=lengths, steps=128, top_k=30, batch_size=256, device=device
            )
        sync(device)
        seconds = time.perf_counter() - tick
        sampling[precision] = {
            "seconds": round(seconds, 2),
            "sentences_per_s": round(len(lengths) / seconds, 1),
            "first": out.texts[:2],
        }
    sampling["samples"], sampling["length_wordpieces"], sampling["steps"] = len(lengths), 32, 128
    results["sampling"] = sampling
    text = json.dumps(results, indent=1)
    (args.out / "results.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
