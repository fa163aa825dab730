"""Judge-model metrics: generative perplexity of samples under a causal LM, with their entropy.

The successors (MDLM, SEDD, ReMDM) score samples with a causal LM "judge" (GPT-2 large). Gen-PPL
alone rewards repetitive text (a sample of one repeated token is very likely), so it is always
reported next to the entropy of the samples' own judge tokens, as they do; a judge's name is
recorded with every number, since numbers from different judges are not comparable.

Entropies are in bits, the project's one unit. MDLM/ReMDM report the same per-sample unigram
entropy in nats (``torch.special.entr``): divide bits by log2(e) = 1.4427 to compare.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import first_line
from pipeline.eval.metrics import token_entropy

__all__ = ["JudgeUnavailable", "generative_perplexity", "judge_metrics", "load_judge", "windows"]


class JudgeUnavailable(RuntimeError):
    """The judge cannot be loaded (offline and not cached, a missing folder, no tokenizer): the
    evaluation reports it and goes on, since the judge is an extra, not the paper's metric."""


def load_judge(name_or_path: str, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM judge from a Hub id or a local folder, in eval mode on
    `device`; raises `JudgeUnavailable` with one line when either cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = os.path.expanduser(name_or_path)
    if (os.path.isabs(source) or source.startswith(".")) and not os.path.isdir(source):
        raise JudgeUnavailable(f"judge {name_or_path!r} cannot be loaded: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:  # HF raises OSError (missing/offline), ValueError (bad id)
        raise JudgeUnavailable(f"judge {name_or_path!r} cannot be loaded: {first_line(error)}") from error
    return model.to(device).eval(), tokenizer


@functools.lru_cache(maxsize=1)
def _cached_judge(name_or_path: str, device: str) -> tuple[Any, Any]:
    """One judge kept loaded: the evaluate stage scores several sample sets with the same one."""
    return load_judge(name_or_path, device)


def _context_size(model: Any, max_length: int | None) -> int:
    """The judge's window in tokens: its position limit, or `max_length` when that is smaller."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    sizes = [s for s in (limit, max_length) if s]
    if not sizes:
        raise ValueError("the judge's context size is unknown: pass max_length")
    size = int(min(sizes))
    if size < 2:
        raise ValueError(f"a window must hold at least 2 tokens, got {size}")
    return size


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """`ids` cut into windows of at most `size` tokens, each starting on the last token of the
    one before: every token but the first is a target (predicted from the tokens before it in its
    own window) exactly once, and each window's first target has one token of context."""
    step = size - 1
    return [list(ids[start : start + size]) for start in range(0, max(len(ids) - 1, 1), step)]


def _wrap(tokens: list[int], tokenizer: Any, score_eos: bool) -> list[int]:
    """The judge's convention around a text: BOS first (GPT-2: ``<|endoftext|>``, its BOS and EOS)
    so the first text token is scored; EOS last only when `score_eos`."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = ([start] if start is not None else []) + tokens
    if score_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def _window_nll(batch: list[list[int]], model: Any, pad_id: int) -> tuple[float, int]:
    """Summed NLL (nats) and count of the targets of a batch of windows (right-padded)."""
    device = next(model.parameters()).device
    width = max(len(w) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, W]
    for row, window in enumerate(batch):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, W-1, V]: predicts ids[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, W-1]
    scored = mask[:, 1:].bool()  # a target is a real token (padding only follows real tokens)
    return float(nll[scored].double().sum()), int(scored.sum())


def generative_perplexity(
    texts: Sequence[str],
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    score_eos: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Gen-PPL of `texts` under a causal LM judge, with the entropy of their judge tokens.

    `gen_ppl` = exp(total NLL / total scored tokens), pooled over the samples. Counted: every
    judge token of every text (the text is tokenised without special tokens and the judge's BOS
    is prepended, so the first token is scored too; a judge without BOS or EOS cannot score a
    text's first token, which is then not counted); the prepended BOS is context, never a
    target; EOS is appended and counted only with `score_eos` (MDLM counts the first EOS of its
    samples; ours are unterminated sentences, so off by default). Texts longer than the judge's
    context (or `max_length`) are cut by :func:`windows`: each token is scored once, with the
    context of its own window only. Empty texts (no judge tokens) are skipped and counted in
    `num_empty`.

    `token_entropy_bits`: for each sample, the entropy of the unigram distribution of its judge
    tokens, averaged over the samples (MDLM's/ReMDM's "entropy", here in bits);
    `unigram_entropy_bits`: the same over all samples' tokens pooled. Without a token, the
    numbers are None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = _context_size(model, max_length)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    samples = [list(ids) for ids in encoded if ids]
    all_windows = [w for ids in samples for w in windows(_wrap(ids, tokenizer, score_eos), size)]
    all_windows = [w for w in all_windows if len(w) > 1]  # a lone token has no target
    all_windows.sort(key=len, reverse=True)  # similar lengths together: less padding
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    total_nll, count = 0.0, 0
    for start in range(0, len(all_windows), batch_size):
        nll, n = _window_nll(all_windows[start : start + batch_size], model, pad_id)
        total_nll, count = total_nll + nll, count + n
    return {
        "judge": name if name is not None else getattr(model, "name_or_path", None),
        "gen_ppl": math.exp(total_nll / count) if count else None,
        "nll_per_token": total_nll / count if count else None,
        "num_tokens": count,
        "num_samples": len(samples),
        "num_empty": len(texts) - len(samples),
        "context_size": size,
        "token_entropy_bits": math.fsum(token_entropy([s]) for s in samples) / len(samples) if samples else None,
        "unigram_entropy_bits": token_entropy(samples) if samples else None,
    }


def judge_metrics(
    texts: Sequence[str],
    judge: str | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    max_length: int | None = None,
    score_eos: bool = False,
) -> dict[str, Any]:
    """:func:`generative_perplexity` under the judge named by `evaluate.judge`, with a `status`;
    never raises for a judge that is off (empty) or cannot be loaded: the evaluation goes on and
    the report says why there is no number. The judge stays loaded for the next call."""
    if not judge:
        return {"judge": None, "gen_ppl": None, "status": "off: evaluate.judge is empty"}
    try:
        model, tokenizer = _cached_judge(judge, str(device))
    except JudgeUnavailable as error:
        return {"judge": judge, "gen_ppl": None, "status": f"unavailable: {error}"}
    result = generative_perplexity(
        texts, model, tokenizer, batch_size=batch_size, max_length=max_length, score_eos=score_eos, name=judge
    )
    status = "ok" if result["num_tokens"] else "empty: no sample has a judge token to score"
    return {**result, "status": status}
