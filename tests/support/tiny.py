"""The tiny model and budgets the integration tests train and evaluate, defined once.

Each test file adds its own deltas after these (`load_params` applies overrides in order, so a
later `key=value` wins): the DVC test shrinks further, the Ray tests allow retries.
"""

from __future__ import annotations

TINY_MODEL = (
    "model.name_or_path=random",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.max_seq_len=32",
    "diffusion.num_timesteps=100",
)
TINY_TRAIN = (
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.precision=fp32",
    "train.num_workers=0",
)
TINY_EVALUATE = (
    "evaluate.num_sequences=16",
    "evaluate.batch_size=8",
    "evaluate.bound_steps=4",
    "evaluate.seeds=[0]",
    "evaluate.num_samples=4",
    "evaluate.sample_steps=8",
    "evaluate.num_references=50",
    "evaluate.table_steps=[2,4]",
    "evaluate.table_sequences=4",
    "evaluate.table_samples=2",
    "evaluate.qd_top_k=[1,0]",
    "evaluate.qd_samples=2",
    "evaluate.conditional_sequences=8",  # the default (128) alone took a third of every tiny evaluation
)
TINY = (*TINY_MODEL, *TINY_TRAIN, *TINY_EVALUATE)
