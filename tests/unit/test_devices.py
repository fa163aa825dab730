"""The library on a second device: training step, MLM loss, bound and samplers mix no CPU tensor
into device ops, and give what they give on the CPU.

The device is `tests.support.fake_device`: real CPU data behind tensors that claim `meta`, with every op
that mixes them with a CPU tensor of ndim > 0 (or draws on them with a CPU generator) raising
`DeviceMixError`, as CUDA would. So these tests catch CUDA-only crashes on a CPU machine. With `DBERT_TEST_DEVICE=cuda` the same
tests run on the real accelerator instead (the GPU check in benchmarks/gpu_suite.sh does that),
with float tolerances for its different kernels.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.diffusion.forward import content_mask, q_sample
from pipeline.diffusion.loss import diffusion_loss, mlm_loss, sequence_bound
from pipeline.diffusion.samplers import ancestral_sample, gibbs_sample
from pipeline.diffusion.schedules import grid_for_steps, time_grid
from pipeline.eval.bound import bound_per_sequence
from pipeline.train.loop import train_loop
from pipeline.train.optim import EMA, build_optimizer
from pipeline.vocab import SCHEDULES, TIME_DESIGNS
from tests.support.fake_device import (
    FAKE,
    DeviceMixError,
    FakeDeviceTensor,
    on_fake_device,
    to_cpu,
)
from tests.support.toy import CLS, SEP, SPECIAL, toy_schedule
from tests.unit.test_samplers import tiny_bert
from tests.unit.test_train_loop import tiny_data

REAL_DEVICE = os.environ.get("DBERT_TEST_DEVICE")  # e.g. cuda: run on a real accelerator instead
if REAL_DEVICE and REAL_DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"DBERT_TEST_DEVICE={REAL_DEVICE} but no CUDA device is visible", allow_module_level=True)
DEVICE = torch.device(REAL_DEVICE) if REAL_DEVICE else FAKE
# CPU vs fake device: the same kernels, so near-exact; CPU vs CUDA: other kernels and summation orders
TOL = {"rtol": 2e-4, "atol": 2e-5} if REAL_DEVICE else {"rtol": 1e-6, "atol": 1e-6}
# Weights after an AdamW step (lr 1e-2): Adam divides by sqrt(v), so a near-zero gradient's float
# difference can move a weight by a good part of lr on CUDA (1.5e-4 seen on an H200)
STEP_ATOL = 1e-3 if REAL_DEVICE else 1e-6
fake_only = pytest.mark.skipif(bool(REAL_DEVICE), reason="a property of the fake device itself")


def device_mode():
    return contextlib.nullcontext() if REAL_DEVICE else on_fake_device()


def on_dev(tensor) -> bool:
    """The tensor lives on the device under test."""
    if REAL_DEVICE:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == DEVICE.type
    return isinstance(tensor, FakeDeviceTensor)


def without_dropout(model):
    """Dropout off where the CPU and a real device draw their masks from different generators
    (CUDA's own RNG): what is compared is then the arithmetic, not the random masks."""
    if REAL_DEVICE:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):  # attention dropout, a float in HF
                module.dropout = 0.0
    return model


def is_host(tensor) -> bool:
    """A plain CPU tensor (not a device one in disguise)."""
    return type(tensor) is torch.Tensor and tensor.device.type == "cpu"


T = 64
IDS = torch.tensor(
    [
        [CLS, 4, 5, 6, 4, 5, SEP, 0],
        [CLS, 6, 6, 4, SEP, 0, 0, 0],
        [CLS, 5, 4, 6, 5, 4, 6, SEP],
        [CLS, 4, SEP, 0, 0, 0, 0, 0],
    ]
)
ATTN = IDS != 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every op here is tiny and goes through Python dispatch: intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_device(denoiser):
    """The denoiser, asserting that every tensor it is handed is on the device, as is its output."""

    def run(*args):
        for index, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and not on_dev(arg):
                raise DeviceMixError(f"denoiser argument {index} {tuple(arg.shape)} is on the CPU, not the device")
        out = denoiser(*args)
        assert on_dev(out)
        return out

    return run


# -- the fake device itself -------------------------------------------------------------------


@fake_only
def test_the_fake_device_rejects_what_cuda_rejects_and_allows_what_it_allows():
    with on_fake_device():
        x = torch.arange(6.0).reshape(2, 3).to(FAKE)
        assert isinstance(x, FakeDeviceTensor) and x.device == FAKE
        with pytest.raises(DeviceMixError):
            x + torch.ones(2, 3)  # a CPU tensor of ndim > 0
        with pytest.raises(DeviceMixError):
            x.gather(1, torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(DeviceMixError):
            torch.rand(3, generator=torch.Generator(), device=FAKE)  # a CPU generator for a device draw
        y = x * torch.tensor(2.0) + torch.zeros(3, device=x.device)  # 0-dim CPU scalars are fine
        assert isinstance(y, FakeDeviceTensor)
        assert torch.equal(y.cpu(), torch.arange(6.0).reshape(2, 3) * 2)
        assert type(y.cpu()) is torch.Tensor and int(y.sum()) == 30 and y[0].tolist() == [0.0, 2.0, 4.0]
        assert isinstance(torch.as_tensor([1, 2], device=x.device), FakeDeviceTensor)
        host = torch.zeros(2, 3)
        host.copy_(y)  # device -> host copies are transfers, not mixes
        assert torch.equal(host, y.cpu())
        model = tiny_bert().to(FAKE)
        weights = dict(model.named_parameters())
        assert all(isinstance(p, FakeDeviceTensor) for p in weights.values())
        assert model.mlm.cls.predictions.decoder.weight is model.mlm.bert.embeddings.word_embeddings.weight


@fake_only
def test_the_original_q_sample_bug_is_a_device_mix_here():
    """The original code's bug: the uniforms drawn on the CPU compared with a device alpha."""
    schedule = toy_schedule("linear", T)
    with on_fake_device():
        x0, maskable = IDS.to(FAKE), content_mask(IDS, SPECIAL, ATTN).to(FAKE)
        alpha = schedule.alpha(torch.full((4,), 10.0), x0, maskable)
        assert isinstance(alpha, FakeDeviceTensor)  # schedule output follows the ids' device
        u = torch.rand(x0.shape, dtype=torch.float64)
        with pytest.raises(DeviceMixError):
            maskable & (u >= alpha)


# -- forward process and losses ----------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_q_sample_on_the_device_draws_the_cpu_noise(schedule_name):
    schedule = toy_schedule(schedule_name, T)
    t = torch.tensor([1.0, 20.0, 40.0, 64.0])
    maskable = content_mask(IDS, SPECIAL, ATTN)
    want = q_sample(IDS, t, schedule, maskable, SPECIAL.mask, torch.Generator().manual_seed(3))
    with device_mode():
        got = q_sample(IDS.to(DEVICE), t, schedule, maskable.to(DEVICE), SPECIAL.mask, torch.Generator().manual_seed(3))
        assert all(on_dev(v) for v in got)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_diffusion_loss_on_the_device_equals_the_cpu_loss(schedule_name):
    schedule = toy_schedule(schedule_name, T)
    want = diffusion_loss(tiny_bert().denoise, IDS, ATTN, schedule, SPECIAL, torch.Generator().manual_seed(1), 0.01)
    model = tiny_bert()  # the same weights; a fresh copy, as want's graph holds the CPU ones
    with device_mode():
        model.to(DEVICE)
        got = diffusion_loss(
            on_device(model.denoise),
            IDS.to(DEVICE),
            ATTN.to(DEVICE),
            schedule,
            SPECIAL,
            torch.Generator().manual_seed(1),
            0.01,
        )
        assert on_dev(got.loss)
        assert got.num_masked == want.num_masked > 0
        torch.testing.assert_close(got.loss.cpu(), want.loss, **TOL)


@pytest.mark.parametrize("objective", ["diffusion", "mlm"])
@pytest.mark.parametrize("design", TIME_DESIGNS)
def test_one_training_step_on_the_device(design, objective):
    """Loss, backward, clipping, AdamW and EMA with the model and batch on the device."""
    schedule = toy_schedule("spindle", T)

    def step(device):
        torch.manual_seed(0)  # dropout
        model = without_dropout(tiny_bert(design, T)).to(device).train()
        optimizer = build_optimizer(model, 1e-2, 0.01)
        ema = EMA(model, 0.9)
        gen = torch.Generator().manual_seed(7)
        ids, attn = IDS.to(device), ATTN.to(device)
        forward = on_device(model.denoise) if device == DEVICE else model.denoise
        if objective == "mlm":
            out = mlm_loss(forward, ids, attn, SPECIAL, gen, mask_prob=0.5)
        else:
            out = diffusion_loss(forward, ids, attn, schedule, SPECIAL, gen, 0.01)
        assert out.num_masked > 0
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        with ema.swapped(model):
            pass
        return model, ema, float(out.loss.detach()), float(norm), grads

    cpu_model, _, cpu_loss, cpu_norm, cpu_grads = step("cpu")
    with device_mode():
        model, ema, loss, norm, grads = step(DEVICE)
        for name, p in model.named_parameters():
            assert on_dev(p) and on_dev(ema.shadow[name]), name
    assert loss == pytest.approx(cpu_loss, rel=TOL["rtol"]) and norm == pytest.approx(cpu_norm, rel=10 * TOL["rtol"])
    assert grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=10 * TOL["rtol"], atol=TOL["atol"] / 10)
    for (_, p), (_, q) in zip(model.named_parameters(), cpu_model.named_parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=10 * TOL["rtol"], atol=STEP_ATOL)


def test_train_loop_on_the_device_with_ema_packing_checkpoint_and_resume(tiny_data):
    """pipeline/train/loop.py end to end: packed batches moved to the device (padded ones take
    the same path), EMA, validation bound, a checkpoint written from the device and resumed onto it."""
    from tests.unit.test_train_loop import params

    p = params(
        "train.steps=2",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.ema_decay=0.9",
        "train.warmup_steps=1",
        "train.packed=true",
    )
    saved = []
    cpu = train_loop(p, tiny_data, wrap_model=without_dropout)
    with device_mode():
        straight = train_loop(
            p, tiny_data, device=DEVICE, wrap_model=without_dropout, report=lambda m, c: saved.append(c) if c else None
        )
        resumed = train_loop(p, tiny_data, device=DEVICE, wrap_model=without_dropout, resume_from=saved[0])
    assert straight.progress.step == resumed.progress.step == 2
    for key in ("loss", "val_bound", "grad_norm"):
        assert straight.history[-1][key] == pytest.approx(cpu.history[-1][key], rel=1e-3 if REAL_DEVICE else 1e-4), key
    cpu_weights = dict(cpu.model.named_parameters())
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert on_dev(a) and on_dev(b), name
        if REAL_DEVICE:  # CUDA's backward kernels may sum in another order on each run
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a.cpu(), b.cpu()), name
        torch.testing.assert_close(
            a.detach().cpu(), cpu_weights[name].detach(), rtol=1e-4, atol=STEP_ATOL if REAL_DEVICE else 1e-5
        )


def test_ema_state_loads_onto_the_parameters_device():
    with device_mode():
        model = torch.nn.Linear(3, 2).to(DEVICE)
        ema = EMA(model, 0.5)
        ema.load_state_dict({"decay": 0.5, "shadow": {n: p.detach().cpu() for n, p in model.named_parameters()}})
        assert all(on_dev(v) for v in ema.shadow.values())
        ema.update(model)


# -- bound -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", ["linear", "spindle", "spindle_paper"])
def test_sequence_bound_on_the_device_equals_the_cpu_bound(schedule_name):
    schedule = toy_schedule(schedule_name, T)
    model = tiny_bert()
    grid = grid_for_steps(T, 8)
    want = sequence_bound(model.denoise, IDS, ATTN, schedule, SPECIAL, grid, torch.Generator().manual_seed(2))
    with device_mode():
        model.to(DEVICE)
        got = sequence_bound(
            on_device(model.denoise),
            IDS.to(DEVICE),
            ATTN.to(DEVICE),
            schedule,
            SPECIAL,
            grid,
            torch.Generator().manual_seed(2),
        )
    assert is_host(got) and got.dtype == torch.float64  # a plain CPU tensor
    torch.testing.assert_close(got, want, **TOL)


def test_bound_per_sequence_on_the_device_equals_the_cpu_bound():
    schedule = toy_schedule("spindle", T)
    model = tiny_bert()
    split = [row[: int(n)].numpy() for row, n in zip(IDS, ATTN.sum(1))]
    want = bound_per_sequence(model.denoise, split, schedule, SPECIAL, num_steps=8, seed=4, batch_size=3)
    with device_mode():
        model.to(DEVICE)
        got = bound_per_sequence(
            on_device(model.denoise), split, schedule, SPECIAL, num_steps=8, seed=4, batch_size=3, device=DEVICE
        )
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=TOL["rtol"])


# -- samplers ----------------------------------------------------------------------------------

LENGTHS = [3, 1, 5, 4]
# On CUDA the device-resident samplers draw from CUDA's own generator: other tokens from the same
# law. The exact comparisons with the CPU then take the host path, which also runs on a device.
EXACT = {"resident": False} if REAL_DEVICE else {}


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("schedule_name", ["linear", "spindle"])
def test_ancestral_sampler_on_the_device_returns_the_cpu_tokens(schedule_name, cache):
    schedule = toy_schedule(schedule_name, T)
    model = tiny_bert()
    kw = dict(grid=time_grid(T, 4), top_k=3, top_p=0.9, temperature=0.9, seed=5, cache=cache)
    want = ancestral_sample(model.denoise, schedule, LENGTHS, SPECIAL, CLS, SEP, **kw)
    with device_mode():
        model.to(DEVICE)
        got = ancestral_sample(
            on_device(model.denoise), schedule, LENGTHS, SPECIAL, CLS, SEP, device=DEVICE, **kw, **EXACT
        )
    assert is_host(got.tokens)  # the tokens come back to the host, once, after the chain
    assert torch.equal(got.tokens, want.tokens) and got.trace == want.trace
    if not REAL_DEVICE:
        assert got.model_calls == len(kw["grid"]) - 1  # device-resident: every row every step, no cache


@pytest.mark.parametrize("design", ["prefix", "layerwise", "embedding"])
def test_time_aware_ancestral_sampler_on_the_device(design):
    schedule = toy_schedule("spindle", T)
    model = tiny_bert(design, T)
    kw = dict(grid=time_grid(T, 8), seed=1)
    want = ancestral_sample(model.denoise, schedule, LENGTHS, SPECIAL, CLS, SEP, **kw)
    with device_mode():
        model.to(DEVICE)
        got = ancestral_sample(
            on_device(model.denoise), schedule, LENGTHS, SPECIAL, CLS, SEP, device=DEVICE, **kw, **EXACT
        )
    assert torch.equal(got.tokens, want.tokens)


def test_gibbs_sampler_on_the_device_returns_the_cpu_tokens():
    model = tiny_bert()
    kw = dict(sweeps=2, top_k=3, top_p=0.9, seed=6)
    want = gibbs_sample(model.denoise, LENGTHS, SPECIAL, CLS, SEP, **kw)
    with device_mode():
        model.to(DEVICE)
        got = gibbs_sample(on_device(model.denoise), LENGTHS, SPECIAL, CLS, SEP, device=DEVICE, **kw, **EXACT)
    assert is_host(got.tokens)
    assert torch.equal(got.tokens, want.tokens)


@pytest.mark.parametrize("kind", ["ancestral", "cached", "remdm", "confidence", "gibbs"])
def test_every_sampler_runs_device_resident_and_fills_every_gap(kind):
    """The default on a device: each sampler returns [CLS] content [SEP] padding, no [MASK] left,
    from draws made on the device (on CUDA with CUDA's generator)."""
    from pipeline.diffusion.samplers import confidence_sample
    from tests.support.toy import CONTENT, PAD

    schedule = toy_schedule("spindle", T)
    model = tiny_bert()
    kw = dict(top_k=3, seed=2, device=DEVICE)
    with device_mode():
        model.to(DEVICE)
        denoise = on_device(model.denoise)
        if kind == "gibbs":
            out = gibbs_sample(denoise, LENGTHS, SPECIAL, CLS, SEP, sweeps=1, **kw)
        elif kind == "confidence":
            out = confidence_sample(denoise, schedule, LENGTHS, SPECIAL, CLS, SEP, grid=time_grid(T, 4), **kw)
        else:
            out = ancestral_sample(
                denoise, schedule, LENGTHS, SPECIAL, CLS, SEP, grid=time_grid(T, 4), cache=kind == "cached",
                remask=0.3 if kind == "remdm" else 0.0, **kw,
            )  # fmt: skip
    assert is_host(out.tokens)
    for row, n in enumerate(LENGTHS):
        seq = out.tokens[row]
        assert seq[0] == CLS and seq[n + 1] == SEP and (seq[n + 2 :] == PAD).all()
        assert all(int(v) in CONTENT for v in seq[1 : n + 1]), seq


# -- benchmarks/gpu_check.py -------------------------------------------------------------------


def test_gpu_check_training_step_on_the_device():
    from benchmarks.gpu_check import TorchBert, random_batch
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.diffusion.schedules import build_schedule

    schedule = build_schedule("linear", 2048)
    special = SpecialIds(mask=103, pad=0, never_masked=(0, 101, 102))
    with device_mode():
        torch.manual_seed(0)
        model = TorchBert(1200, 16, 1, 2, 32, positions=32).to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        ids, attn = random_batch(4, 16, 1200, gen, DEVICE)
        out = diffusion_loss(on_device(model), ids, attn, schedule, special, gen, 0.01)
        out.loss.backward()
        optimizer.step()
        assert on_dev(model.words.weight) and np.isfinite(float(out.loss))


# -- the evaluate and samplers stages (evaluate.device) ---------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, lm1b_dir):
    """prepare + token_stats of a few hundred LM1B sentences, in a tmp project."""
    from stages import prepare, token_stats
    from tests.support.env import without_project_env
    from tests.support.tiny import TINY

    mp = without_project_env()
    root = tmp_path_factory.mktemp("device_project")
    params = load_params(
        None,
        [
            *TINY,
            f"data.mirror_dir={lm1b_dir}",
            "data.max_sentences=200",
            "evaluate.precision=fp32",  # autocast has no fake-device kernels; CPU vs CUDA: same arithmetic
            "evaluate.compare_init=true",
            "evaluate.compare_samplers=[ancestral,gibbs]",
            "evaluate.compare_steps=[4]",
        ],
    )
    prepare.run(params, root)
    token_stats.run(params, root)
    mp.undo()
    return root, params


@pytest.mark.integration
@pytest.mark.parametrize("design", ["none", "layerwise"])
def test_the_evaluate_and_samplers_stages_on_the_device_give_the_cpu_numbers(tiny_project, tmp_path, design):
    """`evaluate.device`: the bound (and the untrained model's), the conditional bounds and fills,
    the samples and the sampler comparison run with the model on the device, every batch moved
    there, and give the CPU's numbers."""
    from pipeline.artifacts import Layout
    from pipeline.eval.compare import compare_samplers
    from pipeline.eval.evaluate import evaluate_model
    from tests.support.exports import export_tiny

    root, params = tiny_project
    layout = Layout(root)
    model_dir = export_tiny(tmp_path / "model", time_design=design)
    want = evaluate_model(params, layout, model_dir, device="cpu")
    want_table = compare_samplers(params, layout, model_dir, device="cpu")
    with device_mode():
        got = evaluate_model(params, layout, model_dir, device=DEVICE)
        got_table = compare_samplers(params, layout, model_dir, device=DEVICE)
    assert want["settings"]["device"] == "cpu" and got["settings"]["device"] == str(DEVICE)
    for key in ("ppl_token_mean", "ppl_word_mean"):
        assert got["bound"][key] == pytest.approx(want["bound"][key], rel=TOL["rtol"])
    assert got["bound"]["initial_model"]["ppl_token"] == pytest.approx(
        want["bound"]["initial_model"]["ppl_token"], rel=TOL["rtol"]
    )
    assert want["conditional"].keys() == got["conditional"].keys() == {"prefix", "infill"}
    for task, report in want["conditional"].items():
        assert got["conditional"][task]["ppl_token_mean"] == pytest.approx(report["ppl_token_mean"], rel=TOL["rtol"])
    assert [r["ppl_token"] for r in got_table["steps_table"]] == pytest.approx(
        [r["ppl_token"] for r in want_table["steps_table"]], rel=TOL["rtol"]
    )
    if not REAL_DEVICE:  # the same kernels: the same draws, so the same texts
        assert got["samples"] == want["samples"]
        for task, report in want["conditional"].items():
            fill = {k: v for k, v in report["fill"].items() if k != "seconds_per_sentence"}
            assert {k: got["conditional"][task]["fill"][k] for k in fill} == fill
        assert [r["bleu"] for r in got_table["samplers"]] == [r["bleu"] for r in want_table["samplers"]]


def test_the_python_api_on_the_device_with_an_open_gap_gives_the_cpu_texts(tmp_path):
    """`pipeline.api.load(path, device=...)`: sentences, prompts continued block by block and
    `[MASK*?]` gaps (whose length the model's bound picks) with the model on the device."""
    from pipeline.api import load
    from tests.support.exports import export_tiny

    path = export_tiny(tmp_path / "model")

    def draw(device):
        model = load(path, device=device)
        options = dict(steps=4, seed=3)
        return (
            model.generate(num=2, length=6, **options),
            model.complete("the market", length=40, block=8, **options),
            model.infill(["the [MASK*?] of the year", "he said [MASK*?]"], gap_length="bound", **options),
        )

    want = draw("cpu")
    with device_mode():
        got = draw(DEVICE)
    assert got[2] and all(text for text in got[2])
    if not REAL_DEVICE:  # the same kernels: the same draws, so the same texts
        assert got == want
