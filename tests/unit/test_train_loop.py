"""The framework-free training loop: it learns, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from pipeline.assembly.model import model_from_params
from pipeline.assembly.schedule import schedule_for
from pipeline.config import ParamsError, load_params
from pipeline.data.sources import load_lm1b_mirror
from pipeline.data.stats import TokenStatistics
from pipeline.data.tokenize import tokenize_lines
from pipeline.diffusion.forward import SpecialIds
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.loop import TrainData, train_loop
from pipeline.train.optim import EMA, warmup_cosine
from tests.support import tiny

TINY = [*tiny.TINY_MODEL, "train.batch_size=8", "train.eval_batches=1", "train.precision=fp32"]


@pytest.fixture(scope="module")
def tiny_data(lm1b_dir, tokenizer):
    corpus = load_lm1b_mirror(lm1b_dir, max_sentences=120)
    special = SpecialIds.from_tokenizer(tokenizer)
    train = tokenize_lines(corpus.train, tokenizer, 32)
    validation = tokenize_lines(corpus.validation, tokenizer, 32)
    stats = TokenStatistics.from_split(train, tokenizer.vocab_size, special.forbidden_outputs)
    return TrainData(train, validation, stats, tokenizer)


def params(*extra):
    return load_params("params.yaml", TINY + list(extra))


def test_training_lowers_the_validation_bound(tiny_data):
    p = params("train.steps=40", "train.eval_every=40", "train.lr=3e-3", "train.warmup_steps=3")
    result = train_loop(p, tiny_data)
    assert result.progress.step == 40
    assert result.history[-1]["val_bound"] < result.history[0]["val_bound"] - 1.0  # nats per token


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path):
    common = ["train.eval_every=100", "train.checkpoint_every=3", "train.warmup_steps=2"]
    straight = train_loop(params("train.steps=6", *common), tiny_data)
    checkpoints = []
    train_loop(params("train.steps=3", *common), tiny_data, report=lambda m, c: checkpoints.append(c) if c else None)
    # the second half must run with the full-length LR schedule, so steps=6 and resume at 3
    resumed = train_loop(params("train.steps=6", *common), tiny_data, resume_from=checkpoints[-1])
    assert resumed.progress.step == 6
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_checkpoints_restore_optimizer_scheduler_and_data_position(tiny_data):
    saved = []
    p = params("train.steps=4", "train.checkpoint_every=2", "train.eval_every=100")
    train_loop(p, tiny_data, report=lambda m, c: saved.append(c) if c else None)
    schedule_model = model_from_params(p, schedule_for(p, tiny_data.stats))
    progress = load_checkpoint(saved[0], schedule_model)
    assert progress.step == 2 and progress.batch_in_epoch == 2 and progress.tokens_seen > 0


def test_ema_tracks_the_weights_and_swaps_back():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    trained = model.weight.detach().clone()
    with ema.swapped(model):
        assert torch.allclose(model.weight, trained - 0.5)
    assert torch.equal(model.weight, trained)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    values = [warmup_cosine(s, 10, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3) and values == values[:10] + sorted(values[10:], reverse=True)


def test_plain_mlm_objective_trains_for_the_bert_mouth_baseline(tiny_data):
    p = params("train.objective=mlm", "train.steps=3", "train.eval_every=3")
    result = train_loop(p, tiny_data)
    assert "train_mlm_ce" in result.history[-1] and "val_bound" in result.history[-1]


def test_validation_runs_first_every_eval_every_and_last_and_checkpoints_every_checkpoint_every_and_last():
    from pipeline.train.loop import should_checkpoint, should_eval

    assert [s for s in range(1, 26) if should_eval(s, 25, 10)] == [1, 10, 20, 25]
    assert [s for s in range(1, 26) if should_checkpoint(s, 25, 10)] == [10, 20, 25]
    assert [s for s in range(1, 21) if should_checkpoint(s, 20, 10)] == [10, 20]


# -- a global batch over workers and micro-batches ------------------------------------------------


def test_the_global_batch_stays_the_same_whatever_the_worker_count():
    tp = params("train.batch_size=4", "train.global_batch_size=16").train
    assert [tp.accumulation_steps(w) for w in (1, 2, 4)] == [4, 2, 1]
    assert params("train.batch_size=4").train.accumulation_steps(3) == 1  # no global batch: no accumulation
    with pytest.raises(ParamsError, match=r"global_batch_size=16 is not a multiple of train.batch_size=4 x 3"):
        tp.accumulation_steps(3)


def test_an_accumulated_step_has_the_gradient_of_the_mean_loss_over_its_micro_batches(tiny_data):
    """The loop's gradient after one step of 2 micro-batches equals the gradient of the mean of
    the two micro-batch losses (each its own per-token mean: the micro-batches weigh the same, not
    their tokens), computed here in one graph with the same noise and dropout (both keyed by the
    micro-batch's place in the global batch)."""
    from pipeline.assembly.schedule import schedule_for
    from pipeline.diffusion.loss import diffusion_loss
    from pipeline.train.checkpoint import TrainPosition
    from pipeline.train.loop import global_micro_seed, training_batches

    p = params("train.steps=1", "train.batch_size=4", "train.global_batch_size=8", "train.grad_clip=0")
    captured = {}
    train_loop(p, tiny_data, wrap_model=lambda m: captured.setdefault("model", m))
    trained = captured["model"]

    special = SpecialIds.from_tokenizer(tiny_data.tokenizer)
    schedule = schedule_for(p, tiny_data.stats)
    torch.manual_seed(p.train.seed)
    model = model_from_params(p, schedule)
    model.train()
    batches = training_batches(tiny_data, p, special, TrainPosition(), 0, 1)
    losses = []
    for micro in range(2):
        batch = next(batches)
        torch.manual_seed(global_micro_seed(p.train.seed, 0, micro))
        gen = torch.Generator().manual_seed(global_micro_seed(p.train.seed, 0, micro))

        def forward(x, a, s, pos):
            return model(x, a, s, pos).logits

        out = diffusion_loss(forward, batch["input_ids"], batch["attention_mask"], schedule, special, gen, 0.01)
        losses.append(out.loss)
    (sum(losses) / 2).backward()
    for (name, ours), (_, reference) in zip(trained.named_parameters(), model.named_parameters()):
        if reference.grad is None:
            continue
        assert torch.allclose(ours.grad, reference.grad, rtol=1e-4, atol=1e-7), name


def _ddp_rank(rank: int, world_size: int, overrides: list[str], data: TrainData, rendezvous: str, out: str) -> None:
    """One DDP worker over gloo (what Ray Train's prepare_model sets up), in its own process."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        result = train_loop(
            params(*overrides), data, rank=rank, world_size=world_size, wrap_model=DistributedDataParallel
        )
        if rank == 0:
            weights = {name: p.detach().clone() for name, p in result.model.named_parameters()}
            torch.save({"weights": weights, "grad_norm": [h["grad_norm"] for h in result.history]}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_global_batch_gives_the_same_steps_on_one_worker_and_on_two_ddp_workers(tiny_data, tmp_path):
    """train.global_batch_size = 32, batch_size = 8: one worker accumulating 4 micro-batches and two
    DDP workers (gloo, separate processes) accumulating 2 each take the same sentences, noise and
    dropout per step and weigh the micro-batches alike, so they train the same weights (to float
    rounding: DDP adds the gradients in another order). Five steps: the 120 training sentences
    make 15 micro-batches, an odd count, cut to 12 on both so that the epoch ends after step 3."""
    overrides = ["train.steps=5", "train.batch_size=8", "train.global_batch_size=32", "train.eval_every=1",
                 "train.checkpoint_every=100", "train.warmup_steps=1"]  # fmt: skip
    single = train_loop(params(*overrides), tiny_data)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        _ddp_rank, args=(2, overrides, tiny_data, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True
    )
    ddp = torch.load(out)
    assert ddp["grad_norm"] == pytest.approx([h["grad_norm"] for h in single.history], rel=1e-5)
    for name, p in single.model.named_parameters():
        assert torch.allclose(p, ddp["weights"][name], rtol=1e-5, atol=1e-6), name


def test_with_accumulation_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_data):
    common = ["train.eval_every=100", "train.checkpoint_every=2", "train.warmup_steps=1"]
    common += ["train.batch_size=4", "train.global_batch_size=12"]  # 3 micro-batches a step
    straight = train_loop(params("train.steps=4", *common), tiny_data)
    saved = []
    train_loop(params("train.steps=2", *common), tiny_data, report=lambda m, c: saved.append(c) if c else None)
    progress = load_checkpoint(saved[-1], model_from_params(params(*common), straight.schedule))
    assert progress.step == 2 and progress.epoch * 0 + progress.batch_in_epoch == 6  # 2 steps x 3 micro-batches
    resumed = train_loop(params("train.steps=4", *common), tiny_data, resume_from=saved[-1])
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_compiled_training_follows_the_eager_run(tiny_data):
    """train.compile: torch.compile (inductor, here on the CPU) trains the same model. Dropout is
    off, so the first step's loss is the eager one to float tolerance (inductor fuses differently),
    and the run ends close to it."""
    common = ("train.steps=2", "train.eval_every=100", "train.checkpoint_every=100", "train.warmup_steps=1")

    def no_dropout(model):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    eager = train_loop(params(*common), tiny_data, wrap_model=no_dropout)
    compiled = train_loop(params(*common, "train.compile=true"), tiny_data, wrap_model=no_dropout)
    assert compiled.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)
    for (name, a), (_, b) in zip(compiled.model.named_parameters(), eager.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
