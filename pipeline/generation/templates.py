"""Conditional requests as text -> templates (content token ids, None where generated).

- a prompt: its WordPieces, then `length` generated ones;
- an infill template: text where `[MASK]` marks one generated WordPiece and `[MASK*n]` marks n
  (so "the [MASK*3] sat on the [MASK] ." asks for three WordPieces and then one). A template
  that starts or ends with a gap asks for a prefix or a suffix. `[MASK*?]` (one per template, the
  template's only gap) leaves the length to the model: `pipeline.generation.gap_length` picks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GAP = re.compile(r"\[MASK(?:\*(\d+|\?))?\]")
GAP_SYNTAX = "mark each generated WordPiece with [MASK], n of them with [MASK*n], or let the model choose with [MASK*?]"
DEFAULT_CONTINUATION = 16  # WordPieces after a prompt when no length is given


class TemplateError(ValueError):
    """A request that cannot be turned into a template; the message says why."""


@dataclass(frozen=True)
class Request:
    """One conditional request as the user wrote it, and its template."""

    kind: str  # "prompt" or "infill"
    text: str
    template: tuple[int | None, ...]
    auto_gap: int | None = None  # content index of a [MASK*?] gap whose length is still open

    def with_gap(self, length: int) -> Request:
        """This request with its open gap set to `length` WordPieces."""
        if self.auto_gap is None:
            return self
        at = self.auto_gap
        return Request(self.kind, self.text, (*self.template[:at], *([None] * length), *self.template[at:]))


def _wordpieces(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_template(tokenizer, prompt: str, length: int = DEFAULT_CONTINUATION) -> Request:
    """The prompt's WordPieces followed by `length` generated ones."""
    if length < 1:
        raise TemplateError(f"a prompt needs at least 1 WordPiece to generate, got length {length}")
    if "[MASK" in prompt:
        raise TemplateError(f"prompt {prompt!r} contains [MASK]: use it as an infill template instead")
    ids = _wordpieces(tokenizer, prompt)
    if not ids:
        raise TemplateError("the prompt is empty; for unconditional samples leave --prompt out")
    return Request("prompt", prompt, (*ids, *([None] * length)))


def infill_template(tokenizer, text: str) -> Request:
    """The template of `text` with its [MASK] / [MASK*n] gaps."""
    template: list[int | None] = []
    cursor = 0
    auto_gap = None
    for match in GAP.finditer(text):
        template.extend(_wordpieces(tokenizer, text[cursor : match.start()]))
        cursor = match.end()
        if match.group(1) == "?":
            if auto_gap is not None:
                raise TemplateError(f"infill text {text!r} has more than one [MASK*?]; the model chooses one length")
            auto_gap = len(template)
            continue
        count = int(match.group(1)) if match.group(1) is not None else 1
        if count < 1:
            raise TemplateError(f"{match.group(0)} in {text!r} asks for no WordPiece; {GAP_SYNTAX}")
        template.extend([None] * count)
    template.extend(_wordpieces(tokenizer, text[cursor:]))
    if "[MASK" in GAP.sub("", text):
        raise TemplateError(f"infill text {text!r} has a malformed [MASK...] marker; {GAP_SYNTAX}")
    if auto_gap is not None:
        if None in template:
            raise TemplateError(f"infill text {text!r} mixes [MASK*?] with other gaps; [MASK*?] must be the only gap")
        return Request("infill", text, tuple(template), auto_gap)
    if None not in template:
        raise TemplateError(f"infill text {text!r} has no gap; {GAP_SYNTAX}")
    return Request("infill", text, tuple(template))


def request_from_line(tokenizer, line: str, length: int = DEFAULT_CONTINUATION) -> Request:
    """A line of a request file: an infill template when it has a [MASK] gap, else a prompt."""
    return infill_template(tokenizer, line) if "[MASK" in line else prompt_template(tokenizer, line, length)


def check_fits(requests: list[Request], max_content: int) -> None:
    """Refuse, naming the request, any template longer than the model's window allows."""
    for index, request in enumerate(requests):
        if request.auto_gap is not None:
            raise TemplateError(f"request {index + 1} still has an open [MASK*?] gap: choose its length first")
        if len(request.template) > max_content:
            raise TemplateError(
                f"request {index + 1} needs {len(request.template)} WordPieces, above the model's "
                f"{max_content} (its positions minus [CLS] and [SEP]): {request.text[:60]!r}"
            )
