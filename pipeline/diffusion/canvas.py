"""The canvas a sampler starts from: [CLS] content [SEP] [PAD]..., where every content position is
either a fixed token (a prompt, a suffix, the words around a gap) or [MASK] (to be generated).

Masked diffusion conditions natively: the forward process never touches a token that is not
[MASK], so a sampler that only ever writes [MASK] positions keeps fixed tokens exactly, and the
caches stay exact (a row's output changes only when one of its [MASK] positions is revealed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.diffusion.forward import SpecialIds

# One request's content: a token id where it is fixed, None where it is generated.
Template = Sequence[int | None]


def initial_canvas(
    lengths: Sequence[int] | Tensor, special: SpecialIds, cls_id: int, sep_id: int
) -> tuple[Tensor, Tensor]:
    """[CLS] [MASK]*n [SEP] [PAD]... for each content length n: (ids [B, L], attention [B, L])."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if (lengths < 1).any():
        raise ValueError("every sample needs a content length >= 1")
    width = int(lengths.max()) + 2
    pos = torch.arange(width)[None, :]  # [1, L]
    ids = torch.full((len(lengths), width), special.pad, dtype=torch.long)
    ids[pos <= lengths[:, None]] = special.mask
    ids[:, 0] = cls_id
    ids[torch.arange(len(lengths)), lengths + 1] = sep_id
    return ids, pos <= lengths[:, None] + 1


def template_canvas(
    templates: Sequence[Template], special: SpecialIds, cls_id: int, sep_id: int
) -> tuple[Tensor, Tensor]:
    """The canvas of conditional requests: [CLS] template [SEP] [PAD]..., None -> [MASK].

    A fixed id may be any token the tokenizer produces but [MASK] and the never-masked specials
    (a fixed [SEP] inside the content would end the sentence early)."""
    if not templates:
        raise ValueError("no requests to sample")
    banned = set(special.never_masked) | {special.mask}
    for index, template in enumerate(templates):
        if len(template) < 1:
            raise ValueError(f"request {index} is empty")
        if all(tok is not None for tok in template):
            raise ValueError(f"request {index} has nothing to generate (no [MASK] position)")
        bad = sorted({tok for tok in template if tok is not None and tok in banned})
        if bad:
            raise ValueError(f"request {index} fixes special token ids {bad}; only content tokens can be fixed")
    lengths = [len(t) for t in templates]
    ids, attention = initial_canvas(lengths, special, cls_id, sep_id)
    for row, template in enumerate(templates):
        fixed = [(i + 1, tok) for i, tok in enumerate(template) if tok is not None]
        if fixed:
            pos, tok = zip(*fixed)
            ids[row, list(pos)] = torch.tensor(tok, dtype=torch.long)
    return ids, attention


def starting_canvas(
    lengths: Sequence[int] | Tensor | None,
    canvas: tuple[Tensor, Tensor] | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
) -> tuple[Tensor, Tensor]:
    """A copy of `canvas` (ids, attention) when given, else the all-[MASK] canvas of `lengths`."""
    if (canvas is None) == (lengths is None):
        raise ValueError("give either lengths (unconditional) or a canvas (conditional), not both")
    if canvas is None:
        assert lengths is not None
        return initial_canvas(lengths, special, cls_id, sep_id)
    ids, attention = canvas
    if ids.shape != attention.shape or ids.dim() != 2:
        raise ValueError(f"canvas ids {tuple(ids.shape)} and attention {tuple(attention.shape)} must be [B, L]")
    return ids.clone().long().cpu(), attention.clone().bool().cpu()
