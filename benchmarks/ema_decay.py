"""Which EMA decay should `train.ema_decay` default to? One training run, several EMAs.

    python benchmarks/ema_decay.py --root PROJECT [--steps 3000 --eval-at 300,1000,3000 --device cuda]

Trains the default-shaped denoiser (`model.name_or_path=random`: MiniLM's 6 x 384 shape, spindle
schedule, `train_loop` exactly as the pipeline runs it) once, and keeps an exponential moving
average of the weights for every decay in `--decays` alongside it (updated after every optimizer
step, as `train.ema_decay` would). At each `--eval-at` step it scores the raw weights and every
EMA with the same NLL bound: the first `--sentences` validation sentences, a 32-step chain,
seed 0, reported as nats per content token (WordPieces without [CLS]/[SEP]). One trajectory for
all decays, so the comparison is not confounded by seeds. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.artifacts import Layout
from pipeline.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="holds data/prepared and data/token_stats")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-at", default="300,1000,3000")
    parser.add_argument("--decays", default="0.99,0.999,0.9999")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    eval_at = sorted({int(s) for s in args.eval_at.split(",") if int(s) <= args.steps})
    decays = [float(d) for d in args.decays.split(",")]

    from pipeline.diffusion.forward import SpecialIds
    from pipeline.eval.bound import bound_per_sequence
    from pipeline.model.precision import autocast, resolve_precision
    from pipeline.train.loop import TrainData, train_loop
    from pipeline.train.optim import EMA

    layout = Layout(args.root)
    params = load_params(
        None,
        [
            "model.name_or_path=random",
            f"train.steps={args.steps}",
            f"train.batch_size={args.batch}",
            f"train.lr={args.lr}",
            "train.warmup_steps=100",
            f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}",
            "train.precision=auto",
        ],
    )
    data = TrainData.load(layout.prepared, layout.token_stats, params.model.name_or_path)
    special = SpecialIds.from_tokenizer(data.tokenizer)
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    sentences = [data.validation[i] for i in range(min(args.sentences, len(data.validation)))]
    tokens = sum(len(s) - 2 for s in sentences)
    state: dict = {"emas": None, "model": None, "schedule": None}
    rows: list[dict] = []

    def capture(model):
        state["model"] = model
        state["emas"] = {d: EMA(model, d) for d in decays}
        return model

    def score(model) -> float:
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            nll = bound_per_sequence(
                model.denoise,
                sentences,
                state["schedule"],
                special,
                num_steps=32,
                seed=0,
                batch_size=128,
                device=device,
            )
        model.train()
        return float(nll.sum() / tokens)

    start = time.perf_counter()

    def on_step(step: int) -> None:
        model = state["model"]
        for ema in state["emas"].values():
            ema.update(model)
        if step in eval_at:
            if state["schedule"] is None:
                from pipeline.assembly.schedule import schedule_for

                state["schedule"] = schedule_for(params, data.stats)
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1), "raw": score(model)}
            for decay, ema in state["emas"].items():
                with ema.swapped(model):
                    row[f"ema_{decay:g}"] = score(model)
            rows.append(row)
            print(json.dumps(row), flush=True)

    train_loop(params, data, device=device, wrap_model=capture, on_step=on_step)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "model": "random MiniLM shape (6 x 384, 12 heads)",
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "bound": f"nats per content token, {len(sentences)} validation sentences ({tokens} tokens), 32-step chain",
        "rows": rows,
    }
    print(f"{'step':>6} {'raw':>8} " + " ".join(f"{'ema ' + format(d, 'g'):>11}" for d in decays))
    for row in rows:
        print(f"{row['step']:>6} {row['raw']:>8.4f} " + " ".join(f"{row[f'ema_{d:g}']:>11.4f}" for d in decays))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ema_decay.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
