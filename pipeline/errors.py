"""One-line summaries of errors, for MLflow tags, result tables and CLI messages.

Ray wraps a worker's exception in a multi-line traceback, and a table cell or a tag holds one line.
"""

from __future__ import annotations


def first_line(error: BaseException, *, with_type: bool = True) -> str:
    """`Type: first line of the message`; without the type, the first line, or the type's name
    when the message is empty."""
    lines = str(error).strip().splitlines()
    head = lines[0] if lines else ""
    if with_type:
        return f"{type(error).__name__}: {head}"
    return head or type(error).__name__
