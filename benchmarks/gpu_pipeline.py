"""The pipeline's own GPU path on real LM1B data, part by part: training through `dbert train`'s
driver (Ray Train, one worker per visible GPU) with token-budget batches, eager and compiled;
then the bound (bf16 vs fp32) and sampling speed on the GPU.

    python benchmarks/gpu_pipeline.py --root PROJECT --out DIR   # every part (data too when PROJECT has
                                                                 # none), then DIR/results.json
    python benchmarks/gpu_pipeline.py --part train --compile off --root PROJECT --out DIR
    python benchmarks/gpu_pipeline.py --part bound --root PROJECT --out DIR       # (or --part sampling)
    python benchmarks/gpu_pipeline.py --part merge --out DIR [--status TSV] [--results PATH]
    python benchmarks/gpu_pipeline.py --part data --root PROJECT --out DIR [--max-sentences N]
    python benchmarks/gpu_pipeline.py --cpu-smoke --root PROJECT --out DIR  # tiny shapes on the CPU

benchmarks/gpu_suite.sh runs each part in a process of its own under its own timeout, so a part
that hangs or fails costs only itself; each part writes DIR/<part>.json and `merge` gathers them.

PROJECT holds `data/prepared/{train,validation,test}` and `data/token_stats` (what `dbert
prepare` and `dbert token-stats` write, and `--part data` writes from the LM1B sample at --lm1b);
training runs and checkpoints land under it.

- train: a randomly initialised BERT of bert-base's shape (12 x 768, 12 heads, 3072 FFN; the
  MiniLM vocabulary), trained with `pipeline.train.ray.driver.run_training` exactly as `dbert
  train` does (no MLflow run: the GPU machine has no tracking store), batches of
  `--tokens-per-batch` real tokens in packed rows of `--row-length` slots (`train.tokens_per_batch`;
  0: padded batches of `--batch` sentences), with `train.compile` off and/or on. Real (non-pad)
  tokens/s is the median of rank 0's report windows after warm-up (the first two reports:
  the first step, compilation and recompiles); MFU counts 6 x non-embedding params + 6 x hidden x
  vocab + attention over data.max_seq_len (a sentence's longest context) per real token, against
  a matmul peak measured in the same process in the training precision (bf16 on a GPU).
  The eager run exports its model to DIR/model for the next parts.
- bound: that export (a random model of the same shape when there is none) on the first
  `--bound-sentences` test sentences, fp32 and bf16 autocast: nats per token and sequences/s.
- sampling: the default model (all-MiniLM-L6-v2) and that export, fp32 and bf16: `--samples`
  samples x `--sample-length` WordPieces x `--sample-steps` steps, top-k 30: samples/s and
  total / forward time (the sampler's `seconds` / `model_seconds`: what is not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import sync

PRECISIONS = ("fp32", "bf16")
TOP_K = 30


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    ffn: int

    def overrides(self) -> list[str]:
        return [
            f"model.hidden_size={self.hidden}",
            f"model.num_layers={self.layers}",
            f"model.num_heads={self.heads}",
            f"model.intermediate_size={self.ffn}",
        ]


BASE = Shape(768, 12, 12, 3072)
TINY = Shape(32, 2, 2, 64)

# Sizes of the GPU run and of the CPU smoke run; a flag given on the command line wins.
GPU_SIZES = {
    "steps": 200,
    "batch": 128,
    "tokens_per_batch": 16384,
    "row_length": 128,
    "eval_batches": 4,
    "bound_sentences": 1024,
    "bound_steps": 32,
    "samples": 256,
    "sample_length": 32,
    "sample_steps": 128,
    "peak_size": 8192,
}
SMOKE_SIZES = {
    "steps": 6,
    "batch": 8,
    "tokens_per_batch": 512,
    "row_length": 64,
    "eval_batches": 1,
    "bound_sentences": 8,
    "bound_steps": 2,
    "samples": 4,
    "sample_length": 8,
    "sample_steps": 4,
    "peak_size": 512,
}
MAX_SEQ_LEN = 64  # what `dbert prepare` cut the sentences to (params.yaml)
REPO = Path(__file__).resolve().parents[1]
LM1B = Path(os.environ.get("DBERT_LM1B_DIR", REPO.parent / "shared" / "data" / "lm1b"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["all", "data", "train", "bound", "sampling", "merge"])
    parser.add_argument("--root", type=Path, default=None, help="project with data/prepared and data/token_stats")
    parser.add_argument("--out", type=Path, required=True, help="where each part writes <part>.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"], help="train.compile runs")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: visible GPUs)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sentences per padded batch (and validation)")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="real tokens per batch; 0: padded")
    parser.add_argument("--row-length", type=int, default=None, help="slots per packed row")
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--bound-sentences", type=int, default=None)
    parser.add_argument("--bound-steps", type=int, default=None, help="the bound's chain steps")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--sample-length", type=int, default=None, help="WordPieces per sample")
    parser.add_argument("--sample-steps", type=int, default=None)
    parser.add_argument("--peak-size", type=int, default=None, help="square matmul side for the peak")
    parser.add_argument("--lm1b", type=Path, default=LM1B, help="data: the LM1B sample (default: %(default)s)")
    parser.add_argument("--max-sentences", type=int, default=None, help="data: per split (smoke: 200)")
    parser.add_argument("--status", type=Path, default=None, help="merge: the suite's parts.tsv")
    parser.add_argument("--results", type=Path, default=None, help="merge: output (default OUT/results.json)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE_SIZES if args.cpu_smoke else GPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cpu_smoke and args.max_sentences is None:
        args.max_sentences = 200
    if args.part in ("all", "data", "train", "bound") and args.root is None:
        parser.error(f"--part {args.part} needs --root")
    return args


def device_of(args: argparse.Namespace) -> torch.device:
    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible (--cpu-smoke runs on the CPU)")
    return torch.device("cuda:0")


def describe_device(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    return {"name": name, "gpus": count, "torch": torch.__version__}


def write_part(args: argparse.Namespace, name: str, result: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({name: summary_of(result)}, indent=1), flush=True)


def summary_of(result: dict) -> dict:
    """The part's numbers without its long lists (history, sample texts)."""
    skip = {"history", "first"}
    return {k: summary_of(v) if isinstance(v, dict) else v for k, v in result.items() if k not in skip}


def timed_on(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds), the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


# ---------------------------------------------------------------- data


def part_data(args: argparse.Namespace) -> None:
    """data/prepared and data/token_stats under --root from the LM1B sample: the code of `dbert
    prepare` and `dbert token-stats` (MLflow runs included) in one process, which saves a start."""
    from pipeline.config import load_params
    from stages import prepare, token_stats

    sets = [f"data.mirror_dir={args.lm1b.resolve()}", f"data.max_seq_len={MAX_SEQ_LEN}"]
    if args.max_sentences is not None:
        sets.append(f"data.max_sentences={args.max_sentences}")
    params = load_params(REPO / "params.yaml", sets)
    args.root.mkdir(parents=True, exist_ok=True)
    print(prepare.run(params, args.root))
    print(token_stats.run(params, args.root))


# ---------------------------------------------------------------- training


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`: the practical peak MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _, seconds = timed_on(device, lambda: [a @ b for _ in range(repeats)])
    return repeats * 2 * size**3 / seconds


def base_config(shape: Shape):
    """The BertConfig that `model.name_or_path=random` builds at `shape` (the default vocabulary)."""
    from pipeline.model.loading import load_tokenizer, random_bert_config

    return random_bert_config(len(load_tokenizer("default")), shape.hidden, shape.layers, shape.heads, shape.ffn)


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per real token: 6 x non-embedding params + 6 x hidden x vocab (the tied MLM
    decoder) + attention (12 x layers x seq_len x hidden); counted on a meta-device model."""
    from transformers import BertForMaskedLM

    with torch.device("meta"):
        mlm = BertForMaskedLM(config)
    embedding = sum(p.numel() for n, p in mlm.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in mlm.parameters()) - embedding
    return (
        6 * non_embedding
        + 6 * config.hidden_size * config.vocab_size
        + 12 * config.num_hidden_layers * seq_len * config.hidden_size
    )


def train_overrides(args: argparse.Namespace, shape: Shape, compiled: bool, workers: int) -> list[str]:
    layout = (
        [f"train.tokens_per_batch={args.tokens_per_batch}", f"train.row_length={args.row_length}"]
        if args.tokens_per_batch > 0
        else []
    )
    return [
        "model.name_or_path=random",
        *shape.overrides(),
        f"data.max_seq_len={MAX_SEQ_LEN}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        *layout,
        f"train.compile={str(compiled).lower()}",
        "train.lr=3e-4",
        f"train.warmup_steps={min(30, max(args.steps // 5, 1))}",
        f"train.eval_every={max(args.steps // 5, 2)}",
        f"train.eval_batches={args.eval_batches}",
        f"train.checkpoint_every={args.steps}",
        f"train.num_workers={workers}",
        f"train.use_gpu={str(not args.cpu_smoke).lower()}",
        "train.precision=auto",
    ]


def steady_rates(history: list[dict]) -> list[float]:
    """Real tokens/s of the report windows after warm-up: the first report (step 1: the first
    step, compilation) and the second (shapes step 1 did not have recompile) are left out while
    later ones exist."""
    rates = [float(h["tokens_per_s"]) for h in history if "tokens_per_s" in h]
    return rates[2:] or rates[1:] or rates


def train_once(args: argparse.Namespace, compiled: bool, device: torch.device) -> dict:
    """One training run through the pipeline's driver; the eager run exports DIR/model."""
    from pipeline.artifacts import Layout
    from pipeline.config import load_params
    from pipeline.train.ray.driver import run_training

    workers = args.workers if args.workers is not None else (0 if args.cpu_smoke else torch.cuda.device_count())
    shape = TINY if args.cpu_smoke else BASE
    params = load_params(None, train_overrides(args, shape, compiled, workers))
    export = None if compiled else args.out / "model"
    start = time.perf_counter()
    outcome = run_training(params, Layout(args.root), export_dir=export)
    seconds = time.perf_counter() - start
    devices = max(workers, 1)
    dtype = torch.bfloat16 if outcome.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype, args.peak_size)
    flops = flops_per_token(base_config(shape), MAX_SEQ_LEN)
    rates = steady_rates(outcome.history)
    tokens_per_s = statistics.median(rates)
    last = outcome.history[-1]
    return {
        "compile": compiled,
        "device": describe_device(device),
        "shape": vars(shape),
        "workers": workers,
        "precision": outcome.precision,
        "layout": (
            {"tokens_per_batch": args.tokens_per_batch, "row_length": args.row_length}
            if args.tokens_per_batch > 0
            else {"batch_size": args.batch}
        ),
        "steps": last["step"],
        "seconds": round(seconds, 1),
        "real_tokens_per_step": last["tokens_seen"] / last["step"],
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_windows": rates,
        "mfu": tokens_per_s / devices * flops / peak,
        "peak_tflops": peak / 1e12,
        "peak_dtype": str(dtype).removeprefix("torch."),
        "mflop_per_token": flops / 1e6,
        "last_loss": float(last["loss"]),
        "history": [
            {k: h[k] for k in ("step", "loss", "val_bound", "tokens_per_s", "tokens_seen") if k in h}
            for h in outcome.history
        ],
    }


def part_train(args: argparse.Namespace) -> None:
    device = device_of(args)
    os.environ.setdefault("DBERT_RAY_DASHBOARD", "0")
    runs = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in runs:
        write_part(args, "train_compiled" if compiled else "train_eager", train_once(args, compiled, device))


# ---------------------------------------------------------------- bound and sampling


def trained_model(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer, schedule, description): the eager run's export, else a random model of
    its shape (speed does not depend on the weights)."""
    from pipeline.diffusion.schedules import build_schedule
    from pipeline.model.export import load_exported
    from pipeline.model.loading import build_denoiser, load_tokenizer

    export = args.out / "model"
    if (export / "config.json").is_file():
        model, tokenizer, schedule = load_exported(export)
        what = f"trained export ({schedule.name}, T={schedule.num_timesteps})"
    else:
        shape = TINY if args.cpu_smoke else BASE
        tokenizer = load_tokenizer("default")
        model = build_denoiser("random", random_config=base_config(shape), seed=0)
        schedule = build_schedule("linear", model.config.num_timesteps)
        what = "random (no export found), linear schedule"
    return model.to(device).eval(), tokenizer, schedule, f"{'tiny' if args.cpu_smoke else 'bert-base'} shape, {what}"


def default_model(device: torch.device):
    """The default denoiser (all-MiniLM-L6-v2, untrained diffusion head) with a linear schedule."""
    from pipeline.diffusion.schedules import build_schedule
    from pipeline.model.loading import build_denoiser, default_model_dir, load_tokenizer

    what = "default model (all-MiniLM-L6-v2)"
    if (default_model_dir() / "model.safetensors").is_file():
        model = build_denoiser("default")
    else:  # a site bundle carries the tokenizer and config only: speed depends on the shape alone
        from transformers import BertConfig

        config = BertConfig.from_pretrained(default_model_dir())
        model = build_denoiser("random", random_config=config, seed=0)
        what = "default model's shape, random weights (its weights did not travel)"
    schedule = build_schedule("linear", model.config.num_timesteps)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    return model, load_tokenizer("default"), schedule, what


def part_bound(args: argparse.Namespace) -> None:
    from pipeline.data.tokenize import TokenizedSplit
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.eval.bound import bound_per_sequence
    from pipeline.model.precision import autocast

    device = device_of(args)
    model, tokenizer, schedule, what = trained_model(args, device)
    special = SpecialIds.from_tokenizer(tokenizer)
    test = TokenizedSplit.load(args.root / "data" / "prepared" / "test").head(args.bound_sentences)
    tokens = test.num_content_tokens

    def bound(precision: str):
        with torch.no_grad(), autocast(device, precision):
            return bound_per_sequence(
                model.denoise,
                test,
                schedule,
                special,
                num_steps=args.bound_steps,
                seed=0,
                batch_size=256,
                device=device,
            )

    result: dict[str, Any] = {"device": describe_device(device), "model": what}
    for precision in PRECISIONS:
        nll, seconds = timed_on(device, partial(bound, precision))
        result[precision] = {
            "nats_per_token": float(nll.sum() / tokens),
            "seconds": seconds,
            "sequences_per_s": len(test) / seconds,
        }
    result.update(sentences=len(test), content_tokens=tokens, chain_steps=args.bound_steps)
    result["bf16_vs_fp32_relative"] = result["bf16"]["nats_per_token"] / result["fp32"]["nats_per_token"] - 1
    write_part(args, "bound", result)


def sampling_rows(args: argparse.Namespace, model, tokenizer, schedule, device: torch.device) -> dict:
    """fp32 and bf16 rows for one model, each after a short warm-up chain on a GPU (kernels, allocator)."""
    from pipeline.generation.sampling import generate
    from pipeline.model.precision import autocast

    def run(precision: str, samples: int, steps: int):
        with torch.no_grad(), autocast(device, precision):
            return generate(
                model,
                tokenizer,
                schedule,
                lengths=[args.sample_length] * samples,
                steps=steps,
                top_k=TOP_K,
                batch_size=256,
                device=device,
            )

    rows = {}
    for precision in PRECISIONS:
        if device.type == "cuda":
            run(precision, 2, 2)
        out, seconds = timed_on(device, partial(run, precision, args.samples, args.sample_steps))
        rows[precision] = {
            "seconds": seconds,
            "samples_per_s": args.samples / seconds,
            "model_seconds": out.model_seconds,
            "total_over_forward": out.seconds / max(out.model_seconds, 1e-9),
            "model_calls": out.model_calls,
            "first": out.texts[:2],
        }
    return rows


def part_sampling(args: argparse.Namespace) -> None:
    device = device_of(args)
    result: dict[str, Any] = {
        "device": describe_device(device),
        "samples": args.samples,
        "length_wordpieces": args.sample_length,
        "steps": args.sample_steps,
        "top_k": TOP_K,
    }
    for key, load in (("default_model", default_model), ("base_shape", partial(trained_model, args))):
        model, tokenizer, schedule, what = load(device)
        result[key] = {"model": what, **sampling_rows(args, model, tokenizer, schedule, device)}
        del model
        write_part(args, "sampling", result)  # after each model: a timeout keeps what finished


# ---------------------------------------------------------------- merge


def read_status(path: Path | None) -> dict:
    """The suite's parts.tsv (name, exit status, seconds per line) as {name: {...}}."""
    if path is None or not path.is_file():
        return {}
    status = {}
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split()
        status[name] = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds)}
    return status


def device_tests(path: Path) -> dict | None:
    """Counts from pytest's JUnit XML report (`--junitxml`)."""
    if not path.is_file():
        return None
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    if suite is None:
        return None
    counts: dict[str, float] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = float(suite.get("time", 0.0))
    return counts


def load_part(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def merge(args: argparse.Namespace) -> dict:
    """results.json: every part's numbers that exist, and how each part of the suite ended."""
    parts = {name: load_part(args.out, name) for name in ("train_eager", "train_compiled", "bound", "sampling")}
    device = next((p["device"] for p in parts.values() if p is not None), None)
    train = {"eager": parts["train_eager"], "compiled": parts["train_compiled"]}
    if train["eager"] and train["compiled"]:
        train["compiled_over_eager_tokens_per_s"] = train["compiled"]["tokens_per_s"] / train["eager"]["tokens_per_s"]
    results = {
        "device": device,
        "parts": read_status(args.status),
        "device_tests": device_tests(args.out / "device_tests.xml"),
        "train": train,
        "bound": parts["bound"],
        "sampling": parts["sampling"],
        "gpu_check": load_part(args.out, "gpu_check"),
    }
    target = args.results or args.out / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=1) + "\n")
    return results


def run_all(args: argparse.Namespace) -> None:
    """Every part in this process, each one kept going past a failure of another."""
    failed = []
    if not (args.root / "data" / "prepared" / "train").is_dir():
        part_data(args)
    for name, part in (("train", part_train), ("bound", part_bound), ("sampling", part_sampling)):
        try:
            part(args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(json.dumps(summary_of(merge(args)), indent=1))
    if failed:
        raise SystemExit(f"failed parts: {', '.join(failed)}")


def main() -> None:
    args = parse_args()
    {
        "all": run_all,
        "data": part_data,
        "train": part_train,
        "bound": part_bound,
        "sampling": part_sampling,
        "merge": merge,
    }[args.part](args)


if __name__ == "__main__":
    main()
