"""The framework-free training loop: one function that Ray Train workers, local runs and tests
all call. Orchestration (Ray, MLflow) enters only through the `report` callback and
`wrap_model` (DDP), so the loop itself stays plain PyTorch.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config import Params
from pipeline.data.batching import iterate_batches, num_batches
from pipeline.data.stats import TokenStatistics
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import diffusion_loss, mlm_loss
from pipeline.diffusion.schedules import Schedule, schedule_from_params
from pipeline.model.denoiser import DiffusionBertForDenoising
from pipeline.model.loading import build_model, load_tokenizer
from pipeline.model.precision import autocast, prefer_fast_attention, resolve_precision
from pipeline.train.checkpoint import TrainPosition, load_checkpoint, save_checkpoint
from pipeline.train.optim import EMA, build_optimizer, build_scheduler

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

# report(metrics, checkpoint_dir or None); called on every rank at the same steps.
Reporter = Callable[[dict, Path | None], None]


@dataclass
class TrainData:
    train: TokenizedSplit
    validation: TokenizedSplit
    stats: TokenStatistics
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, prepared_dir: Path, stats_dir: Path, model_name: str) -> TrainData:
        return cls(
            TokenizedSplit.load(Path(prepared_dir) / "train"),
            TokenizedSplit.load(Path(prepared_dir) / "validation"),
            TokenStatistics.load(stats_dir),
            load_tokenizer(model_name),
        )


def build_schedule_for(params: Params, stats: TokenStatistics) -> Schedule:
    return schedule_from_params(params.diffusion, information=stats.centred_information(), counts=stats.counts)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Diffusion noise of a step depends on (seed, rank, step) only: resumes replay it exactly."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1)


def micro_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The noise seed of micro-batch `micro` of a step (micro 0 keeps `step_seed`: runs without
    accumulation draw what they always drew)."""
    return (step_seed(seed, rank, step) + micro * 7_919_000_003) % (2**63 - 1)


def training_batches(
    data: TrainData, params: Params, special: SpecialIds, progress: TrainPosition, rank: int, world_size: int
) -> Iterator[dict]:
    """This rank's batches in training order from `progress` on, epoch after epoch; `progress`
    moves past each batch as it is handed out, so a checkpoint records where to continue."""
    tp = params.train
    while True:
        for batch in iterate_batches(
            data.train,
            tp.batch_size,
            seed=tp.seed,
            epoch=progress.epoch,
            pad_id=special.pad,
            packed=tp.packed,
            seq_len=params.data.max_seq_len,
            start_batch=progress.batch_in_epoch,
            drop_last=True,
            rank=rank,
            world_size=world_size,
        ):
            progress.batch_in_epoch += 1
            yield batch
        progress.epoch += 1
        progress.batch_in_epoch = 0


@dataclass
class TrainResult:
    model: DiffusionBertForDenoising
    schedule: Schedule
    history: list[dict] = field(default_factory=list)
    progress: TrainPosition = field(default_factory=TrainPosition)
    precision: str = "fp32"


@torch.no_grad()
def validation_bound(
    forward, split: TokenizedSplit, schedule: Schedule, special: SpecialIds, params: Params, device, precision: str
) -> float:
    """Per-token bound estimate (nats) on the first `eval_batches` validation batches, fixed seed."""
    total, tokens = 0.0, 0
    batches = iterate_batches(
        split,
        params.train.batch_size,
        seed=12345,
        epoch=0,
        pad_id=special.pad,
        packed=params.train.packed,
        seq_len=params.data.max_seq_len,
    )
    for index, batch in enumerate(batches):
        if index >= params.train.eval_batches:
            break
        gen = torch.Generator().manual_seed(777 + index)
        with autocast(device, precision):
            out = diffusion_loss(
                forward, batch["input_ids"].to(device), batch["attention_mask"].to(device), schedule, special, gen
            )
        total += out.bound_sum
        tokens += out.num_tokens
    return total / max(tokens, 1)


def should_eval(step: int, total: int, eval_every: int) -> bool:
    """Validation runs on the first step (a baseline), every `eval_every` steps and at the end."""
    return step == 1 or step % eval_every == 0 or step >= total


def should_checkpoint(step: int, total: int, checkpoint_every: int) -> bool:
    """A checkpoint every `checkpoint_every` steps and at the end (what a resumed run continues from)."""
    return step % checkpoint_every == 0 or step >= total


def train_loop(
    params: Params,
    data: TrainData,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable = lambda model: model,
    report: Reporter | None = None,
    resume_from: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `params.train.steps` optimizer steps (continuing from `resume_from` when given)."""
    tp = params.train
    device = torch.device(device)
    special = SpecialIds.from_tokenizer(data.tokenizer)
    schedule = build_schedule_for(params, data.stats)
    torch.manual_seed(tp.seed + rank)
    model = build_model(params, schedule).to(device)  # type: ignore[arg-type]  # transformers' wrapped .to
    prefer_fast_attention(model, device)
    optimizer = build_optimizer(model, tp.lr, tp.weight_decay)
    scheduler = build_scheduler(optimizer, tp.warmup_steps, tp.steps, tp.min_lr_ratio)
    ema = EMA(model, tp.ema_decay) if tp.ema_decay > 0 else None
    progress = TrainPosition()
    if resume_from is not None:
        progress = load_checkpoint(resume_from, model, optimizer, scheduler, ema)
        # The run may continue with a different step budget: take the LR from this schedule.
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
    precision = resolve_precision(tp.precision, device)
    wrapped = wrap_model(model)

    def forward(x_t, attention_mask, s, positions):
        return wrapped(x_t, attention_mask, s, positions).logits

    per_epoch = num_batches(
        data.train,
        tp.batch_size,
        packed=tp.packed,
        seq_len=params.data.max_seq_len,
        drop_last=True,
        world_size=world_size,
    )
    if per_epoch == 0:
        raise ValueError(
            f"the training split ({len(data.train)} sequences) is smaller than one batch of "
            f"{tp.batch_size} x {world_size} workers"
        )
    history: list[dict] = []
    model.train()
    accumulate = tp.accumulation_steps(world_size)
    stream = training_batches(data, params, special, progress, rank, world_size)
    window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0
    while progress.step < tp.steps:
        # one optimizer step over `accumulate` micro-batches
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        real_tokens, step_loss = 0, 0.0
        for micro in range(accumulate):
            batch = next(stream)
            ids = batch["input_ids"].to(device)  # [B, L]
            attn = batch["attention_mask"].to(device)
            gen = torch.Generator().manual_seed(micro_seed(tp.seed, rank, progress.step, micro))
            last_micro = micro == accumulate - 1
            # DDP all-reduces gradients on the last micro-batch only
            sync = contextlib.nullcontext() if last_micro or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with autocast(device, precision):
                    if tp.objective == "mlm":
                        out = mlm_loss(forward, ids, attn, special, gen)
                    else:
                        out = diffusion_loss(forward, ids, attn, schedule, special, gen, params.diffusion.hybrid_lambda)
                (out.loss / accumulate if accumulate > 1 else out.loss).backward()
            real_tokens += int(attn.sum())
            step_loss += out.loss.item() / accumulate
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tp.grad_clip if tp.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        progress.step += 1
        progress.tokens_seen += real_tokens * world_size
        window_tokens += real_tokens
        window_time += time.perf_counter() - tick
        window_loss += step_loss
        window_steps += 1
        if on_step is not None:
            on_step(progress.step)
        evaluate = should_eval(progress.step, tp.steps, tp.eval_every)
        save = should_checkpoint(progress.step, tp.steps, tp.checkpoint_every)
        if evaluate or save:  # metrics are reported at both
            metrics = {
                "step": progress.step,
                "loss": window_loss / window_steps,
                "train_bound" if tp.objective == "diffusion" else "train_mlm_ce": out.bound_sum
                / max(out.num_tokens if tp.objective == "diffusion" else out.num_masked, 1),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens * world_size / max(window_time, 1e-9),
                "tokens_seen": progress.tokens_seen,
                "epoch": progress.epoch,
            }
            window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0
            if evaluate:
                model.eval()
                with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                    metrics["val_bound"] = validation_bound(
                        forward, data.validation, schedule, special, params, device, precision
                    )
                metrics["val_ppl"] = float(np.exp(min(metrics["val_bound"], 50.0)))
                model.train()
            history.append(metrics)
            checkpoint = None
            if save and report is not None:
                checkpoint = _checkpoint(model, optimizer, scheduler, progress, ema) if rank == 0 else None
            if report is not None:
                report(metrics, checkpoint)
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return TrainResult(model, schedule, history, progress, precision)


def _checkpoint(model, optimizer, scheduler, progress: TrainPosition, ema) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="dbert-ckpt-"))
    return save_checkpoint(directory, model, optimizer, scheduler, progress, ema)
