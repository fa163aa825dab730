"""Sampler speed, two tables.

    .venv/bin/python benchmarks/bench_sampler.py overhead [--model DIR] [--samples 16] [--length 32]
        [--steps 32] [--top-k 30] [--repeats 2] [--baseline REV] [--json PATH]
    .venv/bin/python benchmarks/bench_sampler.py cache [--samples 32] [--length 32] [--T 512]

`overhead`: for every sampler (ancestral uncached and cached, ReMDM, confidence
and Gibbs) the sampling overhead = total sampling seconds / model-forward seconds (SampleOutput's
`seconds` / `model_seconds`; the forward is the denoiser call only, truncation and everything
after it is overhead), on the dense [.., V] bookkeeping (`host_chain.SPARSE_TOP_K = False`) and on
the sparse one (K = top-k entries per masked position), same seed, same model, in the same run;
with `--baseline REV` also on samplers.py as it was at git revision REV (the code before). Each
cell is the median over `--repeats`; the variants alternate which goes first. The sparse path
must return the dense tokens: the table says so per row. Model: the export in `--model` (default:
the project's models/final when it exists), else a random MiniLM-shaped BERT (hidden 384, 6
layers, the default tokenizer's vocabulary).

`cache`: cached versus uncached and k = 1 versus k = 16 step skipping at T = 512 on the default
model: model calls per sample, wall-clock per sample, total / model time; the cached sampler must
return exactly the uncached tokens.

Timing is wall-clock; on a shared machine compare the ratios within one run, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine
from pipeline.diffusion import host_chain, samplers
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.host_chain import SampleOutput
from pipeline.diffusion.samplers import ancestral_sample
from pipeline.diffusion.schedules import build_schedule, grid_for_steps, time_grid
from pipeline.model.loading import build_denoiser, load_tokenizer, random_bert_config
from pipeline.model.precision import autocast

DEFAULT_EXPORT = ROOT / "models" / "final"


def load_model(path: str, T: int):
    """(denoise, tokenizer, schedule, description): the export at `path`, or a random MiniLM-shaped
    BERT with a linear schedule when `path` is empty."""
    if path:
        from pipeline.model.export import load_exported

        model, tokenizer, schedule = load_exported(path)
        what = f"trained export {path} ({schedule.name} schedule, T={schedule.num_timesteps})"
        return model.denoise, tokenizer, schedule, what
    tokenizer = load_tokenizer("default")
    config = random_bert_config(len(tokenizer), hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)
    model = build_denoiser("random", num_timesteps=T, random_config=config, seed=0).eval()
    return model.denoise, tokenizer, build_schedule("linear", T), f"random MiniLM-shaped BERT, linear T={T}"


def baseline_module(rev: str) -> ModuleType:
    """pipeline/diffusion/samplers.py as it was at git revision `rev`, imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:pipeline/diffusion/samplers.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = ModuleType(f"samplers_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:pipeline/diffusion/samplers.py", "exec"), module.__dict__)
    return module


def sampler_chains(module: ModuleType, denoise, schedule, args, ids) -> dict[str, Callable[[], SampleOutput]]:
    """Every sampler of `module` on the same batch and seed."""
    lengths = [args.length] * args.samples
    grid = grid_for_steps(schedule.num_timesteps, args.steps)
    chain = partial(module.ancestral_sample, denoise, schedule, lengths, *ids, grid=grid, top_k=args.top_k, seed=0)
    confidence = partial(module.confidence_sample, denoise, schedule, lengths, *ids, grid=grid, top_k=args.top_k)
    return {
        "ancestral (uncached)": partial(chain, cache=False),
        "ancestral (cached)": partial(chain, cache=True),
        "remdm (uncached)": partial(chain, cache=False, remask=args.eta),
        "remdm (cached)": partial(chain, cache=True, remask=args.eta),
        "confidence (uncached)": partial(confidence, cache=False, seed=0),
        "confidence (cached)": partial(confidence, cache=True, seed=0),
        "gibbs": partial(module.gibbs_sample, denoise, lengths, *ids, sweeps=args.sweeps, top_k=args.top_k, seed=0),
    }


def overhead(args: argparse.Namespace) -> None:
    path = args.model if args.model is not None else (str(DEFAULT_EXPORT) if DEFAULT_EXPORT.is_dir() else "")
    denoise, tokenizer, schedule, what = load_model(path, args.T)
    ids = (SpecialIds.from_tokenizer(tokenizer), tokenizer.cls_token_id, tokenizer.sep_token_id)
    # (label, module, this tree's host_chain.SPARSE_TOP_K or None); dense and sparse are this tree's two paths.
    variants: list[tuple[str, ModuleType, bool | None]] = [("dense", samplers, False), ("sparse", samplers, True)]
    if args.baseline:
        variants.insert(0, (f"code at {args.baseline}", baseline_module(args.baseline), None))
    print(f"machine: {machine()}")
    print(
        f"model: {what}; {args.samples} samples x {args.length} tokens, {args.steps} steps, top_k={args.top_k}, "
        f"fp32, {args.repeats} repeat(s), median shown",
        flush=True,
    )
    samplers.gibbs_sample(denoise, [args.length] * 2, *ids, sweeps=1, top_k=args.top_k)  # warm-up
    labels = [label for label, _, _ in variants]
    header = " | ".join(f"{label}: total / model" for label in labels)
    before = " same tokens as the code before |" if args.baseline else ""
    print(f"| sampler | model calls | {header} | overhead s dense / sparse | sparse tokens = dense |{before}")
    print("|---|---|" + "---|" * (len(labels) + 2 + bool(args.baseline)))
    rows = []
    for name in sampler_chains(samplers, denoise, schedule, args, ids):
        runs: dict[str, list[SampleOutput]] = {label: [] for label in labels}
        for repeat in range(args.repeats):
            for label, module, sparse in variants if repeat % 2 == 0 else variants[::-1]:
                if sparse is not None:
                    host_chain.SPARSE_TOP_K = sparse
                runs[label].append(sampler_chains(module, denoise, schedule, args, ids)[name]())
        host_chain.SPARSE_TOP_K = True
        ratio = {k: statistics.median(o.seconds / o.model_seconds for o in v) for k, v in runs.items()}
        over = {k: statistics.median(o.seconds - o.model_seconds for o in v) for k, v in runs.items()}
        same = all(torch.equal(d.tokens, s.tokens) for d, s in zip(runs["dense"], runs["sparse"]))
        same_before = args.baseline and all(
            torch.equal(b.tokens, s.tokens) for b, s in zip(runs[labels[0]], runs["sparse"])
        )
        row = {
            "sampler": name,
            "model_calls": runs["sparse"][0].model_calls,
            "ratio": ratio,
            "overhead_seconds": over,
            "sparse_tokens_equal_dense": same,
            "runs": {k: [{"seconds": o.seconds, "model_seconds": o.model_seconds} for o in v] for k, v in runs.items()},
        }
        if args.baseline:
            row["sparse_tokens_equal_code_before"] = same_before
        rows.append(row)
        cells = " | ".join(f"{ratio[label]:.3f}x" for label in labels)
        tail = f" {same_before} |" if args.baseline else ""
        print(
            f"| {name} | {row['model_calls']} | {cells} | {over['dense'] / over['sparse']:.1f}x | {same} |{tail}",
            flush=True,
        )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "model": what,
            "samples": args.samples,
            "length": args.length,
            "steps": args.steps,
            "top_k": args.top_k,
            "precision": "fp32",
            "repeats": args.repeats,
            "counted": "ratio = SampleOutput.seconds / SampleOutput.model_seconds (denoiser calls only)",
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def cache_table(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer("default")
    special = SpecialIds.from_tokenizer(tokenizer)
    model = build_denoiser("default", num_timesteps=args.T).eval()
    schedule = build_schedule("linear", args.T)

    def denoise(*a):
        with autocast("cpu", args.precision):
            return model.denoise(*a)

    print(f"machine: {machine()}; {args.samples} samples x {args.length} tokens, T={args.T}, {args.precision}")
    print("| sampler | k | model calls / sample | s / sample | total / model time | vs uncached k=1 | same tokens |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for k in (1, 16):
        for cache in (False, True):
            out = ancestral_sample(
                denoise,
                schedule,
                [args.length] * args.samples,
                special,
                tokenizer.cls_token_id,
                tokenizer.sep_token_id,
                grid=time_grid(args.T, k),
                top_k=30,
                seed=0,
                cache=cache,
            )
            results[(k, cache)] = out
            base = results[(1, False)].seconds
            same = "-" if not cache else str(torch.equal(out.tokens, results[(k, False)].tokens))
            print(
                f"| {'cached' if cache else 'uncached'} | {k} | {out.row_calls.float().mean():.1f} | "
                f"{out.seconds / args.samples:.3f} | {out.seconds / max(out.model_seconds, 1e-9):.2f}x | "
                f"{base / out.seconds:.2f}x | {same} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", default="overhead", choices=["overhead", "cache"])
    parser.add_argument("--samples", type=int, default=None, help="default 16 (overhead) / 32 (cache)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--T", type=int, default=512, help="random model's / cache table's number of timesteps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="cache table only")
    parser.add_argument("--model", default=None, help="export directory; '' = random MiniLM-shaped BERT")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--eta", type=float, default=0.04, help="ReMDM budget (evaluate.remdm_eta)")
    parser.add_argument("--sweeps", type=int, default=1, help="Gibbs sweeps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default="", help="also time samplers.py as it was at this git revision")
    parser.add_argument("--json", default="", help="write the overhead table's numbers here")
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 16 if args.table == "overhead" else 32
    if args.table == "overhead":
        overhead(args)
    else:
        cache_table(args)


if __name__ == "__main__":
    main()
