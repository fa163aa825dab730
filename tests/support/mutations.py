"""Mutation check: tests that could not fail for their bug are found here.

Each mutation below is a bug put back into the library: one an independent review could apply
while the whole suite still passed (keys 1-7b), an earlier defect (d1-d5), a claims bug (c1), and
so on for each group of keys. This script copies pipeline/, tests/ and pyproject.toml into a temporary
directory, applies one mutation there by exact text replacement (asserting that the original text
is found exactly once and that the result still compiles), runs the tests that must catch it with
this venv's python and PYTHONPATH = the copy, and reports caught / NOT caught. It first checks that
the unmutated copy passes the same tests. It never writes to the real working tree.

    .venv/bin/python tests/support/mutations.py            # all mutations; exit 1 if any is not caught
    .venv/bin/python tests/support/mutations.py 2a 3       # only these
    .venv/bin/python tests/support/mutations.py --show     # run every selected test, print pytest's output
    .venv/bin/python tests/support/mutations.py --all      # run the whole of every named test file

Exit status: 0 all caught; 1 some mutation not caught, or no longer applies (the source changed
and its anchor text must be updated here); 2 the unmutated copy fails its tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: `tests` is importable from the repository root
    sys.path.insert(0, str(ROOT))

from tests.support.env import OFFLINE  # noqa: E402

SAMPLERS = "pipeline/diffusion/samplers.py"
GIBBS = "pipeline/diffusion/gibbs.py"
GAP = "pipeline/generation/gap_length.py"
GAP_TEST = "tests/unit/test_gap_length.py"
OUTAGE = "tests/integration/test_tracking_outage.py"
REVERSE = "pipeline/diffusion/reverse.py"
TRUNCATION = "pipeline/diffusion/truncation.py"
LOSS = "pipeline/diffusion/loss.py"
FORWARD = "pipeline/diffusion/forward.py"

GUARDS = "tests/unit/test_mutation_guards.py"
CHAIN = f"{GUARDS}::test_ancestral_sampler_draws_x0_from_the_exact_reverse_chain_distribution"
REVEALS = f"{GUARDS}::test_each_reverse_step_reveals_the_share_of_masks_the_schedule_asks_for"
CACHE = f"{GUARDS}::test_cached_sampler_returns_the_uncached_tokens_for_a_context_dependent_denoiser"
BOUND = f"{GUARDS}::test_sequence_bound_on_a_skipping_grid_is_the_bound_of_that_chain"
CONTRACTS = "tests/unit/test_diffusion_contracts.py"
STRATA = [
    f"{CONTRACTS}::test_stratified_times_take_every_stratum_once_in_a_random_row_order",
    f"{CONTRACTS}::test_training_loss_draws_stratified_times_uncorrelated_with_sentence_length",
]
LAST_STEP = (
    "tests/unit/test_samplers.py::test_spindle_sampler_reveals_every_mask_on_its_last_step_with_a_full_vocabulary"
)
TOKENIZE = "pipeline/data/tokenize.py"
METRICS = "pipeline/eval/metrics.py"
BLEU = "pipeline/eval/bleu.py"
DEVICE_LOSS = "tests/unit/test_devices.py::test_diffusion_loss_on_the_device_equals_the_cpu_loss"
WORD_COUNTS = (
    "tests/unit/test_data.py::test_a_line_over_max_seq_len_is_cut_at_a_word_boundary_and_counts_only_the_words_kept"
)
PER_SAMPLE = "tests/unit/test_metrics.py::test_the_headline_is_the_per_sample_mean_not_the_pooled_corpus_bleu"
ENTROPY = "tests/unit/test_metrics.py::test_unigram_entropy_is_exact_on_tiny_cases"

HOST_SYNC = "tests/unit/test_host_sync.py::test_a_training_step_waits_for_the_device_only_when_metrics_are_due"
PACKED_LOSS = "tests/unit/test_packing.py::test_packed_rows_give_the_padded_batchs_loss"
NEIGHBOURS = "tests/unit/test_packing.py::test_a_sentence_in_a_packed_row_does_not_see_its_neighbours"
SAMPLER_SYNC = "tests/unit/test_host_sync.py::test_a_sampler_step_on_the_device_never_waits_for_it"
BOUND_SYNC = "tests/unit/test_host_sync.py::test_a_bound_step_on_the_device_never_waits_for_it"
RESIDENT = "pipeline/diffusion/resident.py"
LOOP = "pipeline/train/loop.py"
DENOISER = "pipeline/model/denoiser.py"
STATISTICS = "pipeline/ablation/statistics.py"
SCHEDULES = "pipeline/diffusion/schedules.py"
COVERAGE = "tests/unit/test_intervals.py::test_welch_intervals_cover_95_percent_at_three_seeds_and_unequal_spreads"
WELCH = "tests/integration/test_ablation.py::test_difference_interval_is_the_welch_t_interval"
CONTINUOUS = "tests/unit/test_continuous_loss.py"
PRECISION = "tests/unit/test_schedule_precision.py"
REMASKS = "test_remdm_remasks_each_position_as_often_as_its_sigma_says"
REMDM_EXACT = "test_remdm_sigma_is_the_cap_and_its_reveal_chance_keeps_the_marginal_exactly"
ACCUMULATED = (
    "tests/unit/test_train_loop.py::test_an_accumulated_step_has_the_gradient_of_the_mean_loss_over_its_micro_batches"
)
DDP_STEPS = (
    "tests/unit/test_train_loop.py::test_a_global_batch_gives_the_same_steps_on_one_worker_and_on_two_ddp_workers"
)

ENV = {
    **OFFLINE,
    "PYTHONDONTWRITEBYTECODE": "1",
    # the copy lives in a temporary folder: point its tests at the real LM1B sample
    "DBERT_LM1B_DIR": os.environ.get("DBERT_LM1B_DIR", str(ROOT.parent / "shared" / "data" / "lm1b")),
}


@dataclass(frozen=True)
class Edit:
    """Replace `anchor` (which must occur exactly once in `path`) by `new`; with `line=True` the
    whole line holding the anchor is replaced by `new` at the same indentation (short anchors stay
    valid while the rest of the line is edited by others)."""

    path: str
    anchor: str
    new: str
    line: bool = False


@dataclass(frozen=True)
class Mutation:
    key: str
    what: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "1",
        "cached sampler: no cache refresh after a reveal",
        (Edit(SAMPLERS, "predictions.changed(hb)", "pass  # MUTANT: the cache is never refreshed", line=True),),
        (CACHE, CHAIN),
    ),
    Mutation(
        "2a",
        "spindle sampler: token drawn proportionally to p, not p a",
        (Edit(TRUNCATION, "weights = weights * reveal", "weights = weights  # MUTANT: no a(v) weighting", line=True),),
        (CHAIN, REVEALS),
    ),
    Mutation(
        "2b",
        "spindle sampler: reveal chance mean(a) instead of sum_v p(v) a(v)",
        (
            Edit(
                SAMPLERS,
                "# sum_v p(v) a(v), float64",  # the ancestral sampler's line
                "chance = reveal.mean().expand(len(b_idx))  # MUTANT",
                line=True,
            ),
        ),
        (CHAIN, REVEALS),
    ),
    Mutation(
        "3",
        "sampler: nothing revealed until s = 0 (one-step generation)",
        (Edit(SAMPLERS, "if hit.any():", "if s_step == 0 and hit.any():  # MUTANT", line=True),),
        (CHAIN, REVEALS),
    ),
    Mutation(
        "4a",
        "sequence_bound: a skipping step t -> s as k one-step KLs (k = t - s)",
        (
            Edit(
                LOSS,
                "reveal = schedule.reveal_probability(t, s, context)",
                "reveal = schedule.reveal_probability(t, t - 1, context)  # MUTANT",
                line=True,
            ),
            Edit(LOSS, "kl = position_kl(", "kl = (t_step - s_step) * position_kl("),
        ),
        (BOUND,),
    ),
    Mutation(
        "4b",
        "sequence_bound: the one-step chain's KLs whatever the grid",
        (Edit(LOSS, "itertools.pairwise(grid)", "zip(range(T, 0, -1), range(T - 1, -1, -1))"),),
        (BOUND,),
    ),
    Mutation(
        "5",
        "stratified times: every row shares one t",
        (Edit(FORWARD, "return (u + strata) / batch", "return (u + strata[:1].expand(batch)) / batch"),),
        tuple(STRATA),
    ),
    Mutation(
        "6",
        "spindle sampler: float32 reveal chance on the last step",
        (
            Edit(SAMPLERS, "if s_step == 0:", "if False:  # MUTANT", line=True),
            Edit(
                SAMPLERS,
                "# sum_v p(v) a(v), float64",
                "rows = table.at(b_idx, l_idx); chance = (rows.probs @ reveal.to(rows.probs.dtype)).double()  # MUTANT",
                line=True,
            ),
        ),
        (LAST_STEP,),
    ),
    Mutation(
        "7",
        "stratified times: no permutation of the strata",
        (
            Edit(
                FORWARD,
                "strata = torch.randperm(",
                "strata = torch.arange(batch, dtype=torch.float64)  # MUTANT",
                line=True,
            ),
        ),
        tuple(STRATA),
    ),
    Mutation(
        "7b",
        "stratified times: no permutation, same random stream (randperm drawn, unused)",
        (
            Edit(
                FORWARD,
                "strata = torch.randperm(",
                "strata = torch.arange(batch, dtype=torch.float64) + 0 * torch.randperm(",
            ),
        ),
        tuple(STRATA),
    ),
    # Earlier defects of the bound, sampler, data and metrics, put back (d<N>).
    Mutation(
        "d1",
        "q_sample draws its uniforms on the CPU next to device data (every GPU run crashed)",
        (
            Edit(
                FORWARD,
                "u = torch.rand(x0.shape",
                "u = torch.rand(x0.shape, generator=generator, dtype=torch.float64)  # MUTANT",
                line=True,
            ),
        ),
        (DEVICE_LOSS, "tests/unit/test_devices.py::test_q_sample_on_the_device_draws_the_cpu_noise"),
    ),
    Mutation(
        "d3",
        "a line cut at max_seq_len keeps the word count of the whole raw line",
        (
            Edit(
                TOKENIZE,
                "encoded[i], words[i], cut[i] = _cut_at_word_boundary(",
                "pass  # MUTANT: hard cut, whole-line words",
                line=True,
            ),
        ),
        (WORD_COUNTS,),
    ),
    Mutation(
        "d4",
        "BLEU headline = one corpus BLEU of pooled counts, not the per-sample mean",
        (Edit(BLEU, "mean=sum(scores) / len(scores),", "mean=_pooled(stats, max_n),  # MUTANT", line=True),),
        (PER_SAMPLE,),
    ),
    Mutation(
        "d5",
        "entropy in nats labelled bits",
        (Edit(METRICS, "math.log2(c / total)", "math.log(c / total)"),),
        (ENTROPY,),
    ),
    # Claims: claim 3 with LTE/PTE trained once (make schedules).
    Mutation(
        "c1",
        "a row trained once is compared as if it were the mean of as many seeds as the repeated row",
        (
            Edit(
                "pipeline/ablation/claims.py",
                "math.sqrt(1 / sa[2] + 1 / sb[2])",
                "math.sqrt(1 / max(sa[2], sb[2]) + 1 / max(sa[2], sb[2]))  # MUTANT",
            ),
        ),
        (
            "tests/unit/test_ablation_claims.py::test_claim_3_with_lte_trained_once_borrows_the_tad_training_seed_spread",
        ),
    ),
    # The GPU path: host round trips put back into a training step, and packed rows that are not
    # the padded batch.
    Mutation(
        "g1",
        "training step: the bound read on the host every micro-batch",
        (Edit(LOOP, "window.add(out, accumulate,", "float(out.bound_sum); window.add(out, accumulate,"),),
        (HOST_SYNC,),
    ),
    Mutation(
        "g2",
        "training step: the masked positions handed to the model as a bool mask (a nonzero inside)",
        (
            Edit(
                LOSS,
                "return denoiser(noised.x_t, noised.attention_mask, noised.s_frac, noised.flat_positions)",
                "return denoiser(noised.x_t, noised.attention_mask, noised.s_frac, torch.zeros(noised.x_t.numel(), "
                "dtype=torch.bool, device=noised.device).index_fill_(0, noised.flat_positions, True).view_as(noised.x_t))",
            ),
        ),
        (HOST_SYNC,),
    ),
    Mutation(
        "g3",
        "denoiser: transformers builds the attention mask from the 2-D padding mask (mask.all() each forward)",
        (Edit(DENOISER, "prepared = takes_prepared_mask(implementation) and", "prepared = False and"),),
        (HOST_SYNC,),
    ),
    Mutation(
        "g4",
        "loss: the forbidden ids uploaded from pageable memory at every step",
        (
            Edit(
                LOSS,
                "logits = logits.index_fill(-1, id_tensor(forbidden_ids, logits.device),",
                "logits = logits.index_fill(-1, torch.as_tensor(list(forbidden_ids), device=logits.device),",
            ),
        ),
        (HOST_SYNC,),
    ),
    Mutation(
        "g5",
        "uploads to the device made with a blocking copy",
        (
            Edit(
                "pipeline/tensors.py",
                "return tensor.to(device, non_blocking=True)",
                "return tensor.to(device, non_blocking=False)",
            ),
        ),
        (HOST_SYNC,),
    ),
    Mutation(
        "g6",
        "packed rows: a sentence attends to every real token of its row",
        (
            Edit(
                "pipeline/model/attention.py",
                "allowed = segments[:, :, None] == segments[:, None, :]  # [B, L, L]",
                "allowed = (segments[:, None, :] > 0).expand(-1, segments.shape[1], -1)  # MUTANT",
            ),
        ),
        (PACKED_LOSS, NEIGHBOURS),
    ),
    Mutation(
        "g7",
        "packed rows: position ids count along the row instead of restarting in each sentence",
        (
            Edit(
                "pipeline/diffusion/packing.py",
                "position_ids[dest] = l_idx",
                "position_ids[dest] = offset[b_idx] + l_idx",
            ),
        ),
        (PACKED_LOSS,),
    ),
    Mutation(
        "g8",
        "packed rows: every token gets the first sentence's time features",
        (Edit(DENOISER, "return table[segments]  # [R, P, d]", "return table[segments.clamp(max=1)]  # MUTANT"),),
        (PACKED_LOSS,),
    ),
    Mutation(
        "g9",
        "device sampler: whether anything was revealed read on the host every step",
        (
            Edit(
                RESIDENT,
                "hit = still & (slots.read(u_reveal) < chance)",
                "hit = still & (slots.read(u_reveal) < chance); bool(hit.any())",
            ),
        ),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g10",
        "device sampler: the truncated table copied to the host and back",
        (
            Edit(
                RESIDENT,
                "self.overflow |= overflow.any()",
                "self.overflow |= overflow.any(); probs = probs.cpu().to(self.device)",
            ),
        ),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g11",
        "device sampler: the top-k overflow flag checked every step",
        (Edit(RESIDENT, "self.overflow |= overflow.any()", "self.overflow |= bool(overflow.any())"),),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g12",
        "device sampler: the forward timed by waiting for its result",
        (
            Edit(
                RESIDENT,
                "self.wall += time.perf_counter() - tick",
                "logits.sum().item(); self.wall += time.perf_counter() - tick",
            ),
        ),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g13",
        "device confidence sampler: the reveal counts read on the host",
        (
            Edit(
                RESIDENT,
                "keep = masked & (rank < counts[:, None])",
                "keep = masked & (rank < torch.tensor(counts.tolist(), device=device)[:, None])",
            ),
        ),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g14",
        "Gibbs on the device: its uniforms drawn on the host",
        (
            Edit(
                GIBBS,
                "u = torch.rand(batch, generator=gen, dtype=torch.float64, device=here)",
                "u = torch.rand(batch, dtype=torch.float64).to(here)",
            ),
        ),
        (SAMPLER_SYNC,),
    ),
    Mutation(
        "g15",
        "bound: the masked positions handed to the model as a device bool mask",
        (
            Edit(
                LOSS,
                "logits = denoiser(x_t, attention_mask, (t / T).float(), flat)",
                "logits = denoiser(x_t, attention_mask, (t / T).float(), masked.to(device))",
            ),
        ),
        (BOUND_SYNC,),
    ),
    Mutation(
        "g16",
        "device sampler: the spindle token drawn from p, not p a",
        (Edit(RESIDENT, "per_id = reveal if reveal.shape[-1] != 1 else None", "per_id = None  # MUTANT"),),
        (CHAIN,),
    ),
    Mutation(
        "g17",
        "device sampler: reveal chance mean(a) instead of sum_v p(v) a(v)",
        (
            Edit(
                RESIDENT,
                "else reveal_chances(probs, ids, reveal)\n            hit",
                "else reveal.mean().expand(slots.count)\n            hit",
            ),
        ),
        (CHAIN, REVEALS),
    ),
    Mutation(
        "s1",
        "report intervals: Welch's standard error at the pooled df n_a + n_b - 2 (too narrow)",
        (Edit(STATISTICS, "df = welch_df(sa * sa, na, sb * sb, nb) if max(na, nb) >= 2 else 0.0", "df = na + nb - 2"),),
        (COVERAGE, WELCH),
    ),
    Mutation(
        "s2",
        "MDLM loss: the 1/s weight replaced by 1",
        (
            Edit(
                LOSS,
                "weight = -schedule.dalpha_vocab(t, context) / schedule.masked_vocab(t, context).clamp_min(1e-12)",
                "weight = torch.ones_like(schedule.masked_vocab(t, context))  # MUTANT",
                line=True,
            ),
        ),
        (f"{CONTINUOUS}::test_the_mdlm_loss_is_the_one_over_s_weighted_masked_cross_entropy",),
    ),
    Mutation(
        "s3",
        "continuous loss: the token-dependent middle term dropped",
        (
            Edit(
                LOSS,
                "return -w_x0 * lp_x0 + (log_probs.exp() * weight).sum(-1) - w_x0",
                "return -w_x0 * lp_x0  # MUTANT",
                line=True,
            ),
        ),
        (
            f"{CONTINUOUS}::test_a_token_dependent_continuous_loss_keeps_its_middle_term",
            f"{CONTINUOUS}::test_the_continuous_integrand_is_the_discrete_kl_per_unit_time_in_the_small_step_limit",
        ),
    ),
    Mutation(
        "s4",
        "ReMDM: sigma halved, a' recomputed from it (the forward marginals still hold)",
        (
            Edit(
                REVERSE,
                "sigma = cap.clamp(max=eta).clamp_min(0.0)",
                "sigma = 0.5 * cap.clamp(max=eta).clamp_min(0.0)  # MUTANT",
                line=True,
            ),
        ),
        (f"tests/unit/test_conditioning.py::{REMASKS}", f"{PRECISION}::{REMDM_EXACT}"),
    ),
    Mutation(
        "s5",
        "schedules: a(v) = (alpha_s - alpha_t) / (1 - alpha_t) again (1 where alpha_t rounds to 1)",
        (
            Edit(
                SCHEDULES,
                "return self._reveal(self._fraction(t, context), self._fraction(s, context), context).clamp(0.0, 1.0)",
                "return torch.where(self.alpha_vocab(t, context) < 1, (self.alpha_vocab(s, context) - "
                "self.alpha_vocab(t, context)) / (1 - self.alpha_vocab(t, context)).clamp_min(1e-300), "
                "torch.ones_like(self.alpha_vocab(t, context))).clamp(0.0, 1.0)  # MUTANT",
                line=True,
            ),
        ),
        (f"{PRECISION}::test_power_reveal_chance_is_exact_where_alpha_rounds_to_one",),
    ),
    Mutation(
        "s6",
        "accumulation: micro-batches weighted by their tokens, not equally",
        (
            Edit(
                LOOP,
                "(out.loss / accumulate if accumulate > 1 else out.loss).backward()",
                "(out.loss * out.num_tokens / 60.0).backward()  # MUTANT",
                line=True,
            ),
        ),
        (ACCUMULATED, DDP_STEPS),
    ),
    Mutation(
        "s7",
        "global batch: noise and dropout keyed by (rank, micro) again, not the place in the global batch",
        (Edit(LOOP, "keyed = tp.global_batch_size is not None", "keyed = False  # MUTANT", line=True),),
        (ACCUMULATED, DDP_STEPS),
    ),
    Mutation(
        "s8",
        "global batch: the epoch not cut to whole steps (a step straddles epochs differently per worker count)",
        (Edit(LOOP, "per_step=tp.accumulation_steps(world_size),\n        ):", "\n        ):"),),
        (DDP_STEPS,),
    ),
    Mutation(
        "k1",
        "ReMDM: fixed canvas tokens (and the specials) may be sent back to [MASK]",
        (Edit(SAMPLERS, "decoded = free & ~masked", "decoded = ~masked & attn  # MUTANT", line=True),),
        ("tests/unit/test_sampler_contract.py::TestEverySampler::test_fixed_canvas_tokens_are_never_changed",),
    ),
    Mutation(
        "k2",
        "samplers: truncation options no longer checked",
        (Edit("pipeline/diffusion/sampler.py", "    check_truncation(top_k, top_p, temperature)\n", ""),),
        (
            "tests/unit/test_sampler_contract.py::TestEverySampler::test_bad_truncation_is_refused_by_name_before_any_model_call",
        ),
    ),
    Mutation(
        "k3",
        "blocks: the context shown before a block is not cut to the window",
        (
            Edit(
                "pipeline/diffusion/block_sampler.py",
                "shown = min(at, window - new)",
                "shown = at  # MUTANT",
                line=True,
            ),
        ),
        (
            "tests/unit/test_sampler_contract.py::test_blocks_never_show_the_model_more_than_its_window_and_write_every_mask",
        ),
    ),
    Mutation(
        "k4",
        "blocks: a block's fixed tokens are sampled over",
        (
            Edit(
                "pipeline/diffusion/block_sampler.py",
                "templates.append([None if tok == special.mask else tok for tok in piece])",
                "templates.append([None] * len(piece))  # MUTANT",
            ),
        ),
        ("tests/unit/test_sampler_contract.py::TestEverySampler::test_fixed_canvas_tokens_are_never_changed",),
    ),
    Mutation(
        "m1",
        "open gaps: a gap at the end taken for the middle third (and the other way round)",
        (
            Edit(
                GAP,
                "shown, at_end = left + right, left == 0 or right == 0",
                "shown, at_end = left + right, left > 0 and right > 0  # MUTANT",
            ),
        ),
        (GAP_TEST,),
    ),
    Mutation(
        "m2",
        "open gaps: the context method scores a gap by the prior's length (the shown count ignored)",
        (
            Edit(
                GAP,
                "if abs(seen - shown) <= width and 1 <= hidden < len(weight):",
                "if 1 <= hidden < len(weight):  # MUTANT",
            ),
        ),
        (GAP_TEST,),
    ),
    Mutation(
        "t1",
        "tracking: a failure to log is an exception again (the finished model is lost with it)",
        (
            Edit(
                "pipeline/tracking/failures.py",
                "        if _FAILED:\n            return None\n        try:\n            return fn(*args, **kwargs)",
                "        if True:  # MUTANT\n            return fn(*args, **kwargs)\n        try:\n            return fn(*args, **kwargs)",
            ),
        ),
        (OUTAGE + "::test_a_server_killed_mid_training_costs_one_warning_not_the_model",),
    ),
    Mutation(
        "t2",
        "tracking: no preflight of the server (MLflow's own retries, minutes, then a traceback)",
        (
            Edit(
                "pipeline/tracking/store.py",
                "    check_tracking_server(uri)\n    local = _is_local_store(uri)",
                "    local = _is_local_store(uri)",
            ),
        ),
        (OUTAGE + "::test_a_server_that_does_not_answer_stops_a_stage_in_seconds_with_one_line",),
    ),
    Mutation(
        "l1",
        "layering: the model imports the generation front (an upward import)",
        (
            Edit(
                "pipeline/model/export.py",
                "from pipeline.model import modeling_diffusion_bert",
                "from pipeline.model import modeling_diffusion_bert\nfrom pipeline.generation import api as _upward  # noqa: F401",
            ),
        ),
        ("tests/unit/test_tooling.py::test_pipeline_imports_run_one_way_down_its_layers_with_no_circle",),
    ),
]


class AnchorError(RuntimeError):
    pass


def copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("pipeline", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "params.yaml"):  # tests load the default params from the root
        shutil.copy2(ROOT / name, dest / name)


def apply(edit: Edit, dest: Path) -> None:
    path = dest / edit.path
    text = path.read_text()
    count = text.count(edit.anchor)
    if count != 1:
        raise AnchorError(f"{edit.path}: anchor {edit.anchor!r} found {count} times (expected once)")
    if edit.line:
        start = text.rfind("\n", 0, text.index(edit.anchor)) + 1
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        indent = re.match(r"[ \t]*", text[start:end]).group(0)
        text = text[:start] + indent + edit.new + text[end:]
    else:
        text = text.replace(edit.anchor, edit.new)
    compile(text, str(path), "exec")  # a mutant that does not even parse would be "caught" for nothing
    path.write_text(text)


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_pytest(dest: Path, tests: list[str], first_failure: bool = False) -> tuple[int, str, float]:
    env = {**os.environ, **ENV, "PYTHONPATH": str(dest)}
    cmd = [
        python(),
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        "-rfE",
        *(["-x"] if first_failure else []),
        *tests,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def check_imports_the_copy(dest: Path) -> None:
    env = {**os.environ, **ENV, "PYTHONPATH": str(dest)}
    code = "import pipeline.diffusion.samplers as m, tests.support.toy as t; print(m.__file__); print(t.__file__)"
    out = subprocess.run([python(), "-c", code], cwd=dest, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.split():
        if not Path(line).resolve().is_relative_to(dest.resolve()):
            raise RuntimeError(f"the copy imports {line}, not a file under {dest}")


def selection(mutation: Mutation, whole_files: bool) -> list[str]:
    if not whole_files:
        return list(mutation.tests)
    return sorted({t.split("::")[0] for t in mutation.tests})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "keys", nargs="*", help="mutations to run (default: all): " + ", ".join(m.key for m in MUTATIONS)
    )
    parser.add_argument(
        "--show", action="store_true", help="print pytest's output for every run (and run every selected test)"
    )
    parser.add_argument("--all", action="store_true", help="run the whole test files, not just the named tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.keys or m.key in args.keys]
    if args.keys and len(chosen) != len(set(args.keys)):
        parser.error(f"unknown mutation among {args.keys}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dbert-mutations-") as tmp:
        base = Path(tmp) / "base"
        copy_repo(base)
        check_imports_the_copy(base)
        baseline = sorted({t for m in chosen for t in selection(m, args.all)})
        rc, out, secs = run_pytest(base, baseline)
        print(f"unmutated copy: {'passes' if rc == 0 else 'FAILS'} ({len(baseline)} selections, {secs:.0f} s)")
        if args.show or rc != 0:
            print(out)
        if rc != 0:
            return 2

        missed, broken = [], []
        for mutation in chosen:
            dest = Path(tmp) / f"mutant-{mutation.key}"
            copy_repo(dest)
            try:
                for edit in mutation.edits:
                    apply(edit, dest)
            except (AnchorError, SyntaxError) as err:
                print(f"[{mutation.key}] {mutation.what}: does NOT apply: {err}")
                broken.append(mutation.key)
                continue
            # Stop at the first failing test unless every statistic is wanted (--show / --all).
            rc, out, secs = run_pytest(dest, selection(mutation, args.all), first_failure=not (args.show or args.all))
            failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
            errors = re.findall(r"^ERROR (\S+)", out, flags=re.M)
            caught = rc == 1 and bool(failed)  # rc 2+ (collection error, crash) proves nothing
            print(f"[{mutation.key}] {mutation.what}: {'caught' if caught else 'NOT caught'} ({secs:.0f} s)")
            for test in failed:
                print(f"      failed: {test}")
            for test in errors:
                print(f"      error:  {test}")
            if args.show or not caught:
                print(out)
            if not caught:
                missed.append(mutation.key)
            shutil.rmtree(dest, ignore_errors=True)
    print(
        f"{len(chosen) - len(missed) - len(broken)} of {len(chosen)} mutations caught "
        f"in {time.perf_counter() - start:.0f} s"
        + (f"; NOT caught: {', '.join(missed)}" if missed else "")
        + (f"; not applicable: {', '.join(broken)}" if broken else "")
    )
    return 1 if missed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
