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

from pipeline.assembly.model import model_from_params
from pipeline.assembly.schedule import schedule_for
from pipeline.config import Params
from pipeline.data.batching import iterate_batches, num_batches
from pipeline.data.stats import TokenStatistics
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import bound_loss, cross_entropy_loss, diffusion_loss
from pipeline.diffusion.noising import NoisedBatch, noise_for_diffusion, noise_for_mlm
from pipeline.diffusion.packing import SentenceRows, pack_rows
from pipeline.diffusion.schedules import Schedule
from pipeline.model.denoiser import DiffusionBertForDenoising
from pipeline.model.loading import load_tokenizer
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


def step_seed(seed: int, rank: int, step: int) -> int:
    """Diffusion noise of a step depends on (seed, rank, step) only: resumes replay it exactly."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1)


def micro_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The noise seed of micro-batch `micro` of a step (micro 0 keeps `step_seed`: runs without
    accumulation draw what they always drew)."""
    return (step_seed(seed, rank, step) + micro * 7_919_000_003) % (2**63 - 1)


def global_micro_seed(seed: int, step: int, index: int) -> int:
    """With `train.global_batch_size`: the seed of a step's `index`-th micro-batch in the global
    batch (micro m of rank r is index m x world_size + r, the batch it reads), for its noise and its
    dropout alike. No rank or worker count enters, so the step is the same whatever `num_workers`.
    On one worker it is `micro_seed` (rank 0)."""
    return micro_seed(seed, 0, step, index)


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
            tokens_per_batch=tp.tokens_per_batch,
            start_batch=progress.batch_in_epoch,
            drop_last=True,
            rank=rank,
            world_size=world_size,
            per_step=tp.accumulation_steps(world_size),
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
        total += float(out.bound_sum)
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
    schedule = schedule_for(params, data.stats)
    torch.manual_seed(tp.seed + rank)
    model = model_from_params(params, schedule).to(device)  # type: ignore[arg-type]  # transformers' wrapped .to
    prefer_fast_attention(model, device)
    if tp.tokens_per_batch is not None:  # refuse a family or design that cannot pack before any step
        model.encoder_family.check_packing(model.mlm.config, model.config.time_design)
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
    # Batch shapes vary (sentences, masked positions): one dynamic graph serves them all. The
    # validation bound, a short no-grad pass, runs the eager model rather than a second graph.
    trained = torch.compile(wrapped, dynamic=True) if tp.compile else wrapped

    def forward(x_t, attention_mask, s, positions, **packed):
        return trained(x_t, attention_mask, s, positions, **packed).logits

    def eager_forward(x_t, attention_mask, s, positions):
        return wrapped(x_t, attention_mask, s, positions).logits

    per_epoch = num_batches(
        data.train,
        tp.batch_size,
        packed=tp.packed,
        seq_len=params.data.max_seq_len,
        drop_last=True,
        world_size=world_size,
        tokens_per_batch=tp.tokens_per_batch,
        seed=tp.seed,
        per_step=tp.accumulation_steps(world_size),
    )
    if per_epoch == 0:
        one_batch = f"{tp.tokens_per_batch} tokens" if tp.tokens_per_batch else f"{tp.batch_size} sequences"
        raise ValueError(
            f"the training split ({len(data.train)} sequences) is smaller than one batch of "
            f"{one_batch} x {world_size} workers"
        )
    history: list[dict] = []
    model.train()
    # A step is the mean of its micro-batches' per-token losses: each worker averages its
    # `accumulate` micro-batches and DDP averages the workers, so every one of the global batch's
    # global_batch_size / batch_size micro-batches weighs the same, however they are split.
    accumulate = tp.accumulation_steps(world_size)
    keyed = tp.global_batch_size is not None  # draws keyed by the global batch (`global_micro_seed`)
    stream = training_batches(data, params, special, progress, rank, world_size)
    # Losses and the bound stay on the device and are read (one wait) only when metrics are due.
    window = _Window.start(device)
    while progress.step < tp.steps:
        # one optimizer step over `accumulate` micro-batches
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            batch = next(stream)
            if keyed:
                seed = global_micro_seed(tp.seed, progress.step, micro * world_size + rank)
                torch.manual_seed(seed)  # dropout as well as the noise: the same on any worker
            else:
                seed = micro_seed(tp.seed, rank, progress.step, micro)
            gen = torch.Generator().manual_seed(seed)
            noised, packed = prepare_batch(batch, params, schedule, special, gen, device)
            last_micro = micro == accumulate - 1
            # DDP all-reduces gradients on the last micro-batch only
            sync = contextlib.nullcontext() if last_micro or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with autocast(device, precision):
                    if tp.objective == "mlm":
                        out = cross_entropy_loss(forward, noised, special, packed)
                    else:
                        out = bound_loss(forward, noised, schedule, special, params.diffusion.hybrid_lambda, packed)
                (out.loss / accumulate if accumulate > 1 else out.loss).backward()
            window.add(out, accumulate, int(batch["attention_mask"].sum()))
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tp.grad_clip if tp.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        progress.step += 1
        progress.tokens_seen += window.step_tokens * world_size
        window.end_step()
        if on_step is not None:
            on_step(progress.step)
        evaluate = should_eval(progress.step, tp.steps, tp.eval_every)
        save = should_checkpoint(progress.step, tp.steps, tp.checkpoint_every)
        if evaluate or save:  # metrics are reported at both
            metrics = {
                "step": progress.step,
                **window.read(out, tp.objective, world_size),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_seen": progress.tokens_seen,
                "epoch": progress.epoch,
            }
            if evaluate:
                model.eval()
                with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                    metrics["val_bound"] = validation_bound(
                        eager_forward, data.validation, schedule, special, params, device, precision
                    )
                metrics["val_ppl"] = float(np.exp(min(metrics["val_bound"], 50.0)))
                model.train()
            history.append(metrics)
            checkpoint = None
            if save and report is not None:
                checkpoint = _checkpoint(model, optimizer, scheduler, progress, ema) if rank == 0 else None
            if report is not None:
                report(metrics, checkpoint)
            window = _Window.start(device)  # evaluation and checkpoints are not training time
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return TrainResult(model, schedule, history, progress, precision)


def prepare_batch(
    batch: dict,
    params: Params,
    schedule: Schedule,
    special: SpecialIds,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[NoisedBatch, SentenceRows | None]:
    """A host batch noised on the host (packed into rows under a token budget) and handed to the
    device: from page-locked memory without waiting on a GPU, so the host prepares the next batch
    while the device still computes this one."""
    tp = params.train
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if tp.objective == "mlm":
        noised = noise_for_mlm(ids, attn, special, generator)
    else:
        noised = noise_for_diffusion(ids, attn, schedule, special, generator)
    packed = pack_rows(noised, tp.row_length) if tp.tokens_per_batch is not None else None
    return noised.uploaded(device), None if packed is None else packed.uploaded(device)


@dataclass
class _Window:
    """Training metrics between two reports. Sums of device tensors, so no step waits for them;
    `read` waits once and turns them into numbers."""

    started: float
    loss_sum: torch.Tensor
    steps: int = 0
    tokens: int = 0
    step_tokens: int = 0

    @classmethod
    def start(cls, device: torch.device) -> _Window:
        return cls(time.perf_counter(), torch.zeros((), dtype=torch.float64, device=device))

    def add(self, out, accumulate: int, real_tokens: int) -> None:
        self.loss_sum += out.loss.detach().double() / accumulate  # float64, as a host sum would be
        self.step_tokens += real_tokens

    def end_step(self) -> None:
        self.steps += 1
        self.tokens += self.step_tokens
        self.step_tokens = 0

    def read(self, out, objective: str, world_size: int) -> dict:
        """The window's mean loss, the last micro-batch's bound (or MLM cross-entropy) per token and
        the real (non-pad) tokens per second over all workers."""
        loss = float(self.loss_sum) / max(self.steps, 1)  # waits for the device, once per window
        elapsed = time.perf_counter() - self.started
        if objective == "diffusion":
            last = {"train_bound": float(out.bound_sum) / max(out.num_tokens, 1)}
        else:
            last = {"train_mlm_ce": float(out.bound_sum) / max(out.num_masked, 1)}
        return {"loss": loss, **last, "tokens_per_s": self.tokens * world_size / max(elapsed, 1e-9)}


def _checkpoint(model, optimizer, scheduler, progress: TrainPosition, ema) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="dbert-ckpt-"))
    return save_checkpoint(directory, model, optimizer, scheduler, progress, ema)
