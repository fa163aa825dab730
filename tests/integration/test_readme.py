"""The README's Python example runs as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_readme_python_example_runs_and_prints_a_bound_and_sentences(lm1b_dir, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    block = block.replace('"../shared/data/lm1b"', repr(str(lm1b_dir)))
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PPL bound per token" in out.stdout
    sentences = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the printed list of two strings
    assert len(sentences) == 2 and all(len(s.split()) >= 5 for s in sentences)


def guides() -> list[Path]:
    """The user-facing text: the README, docs/, the reports' READMEs and the changelog."""
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "reports").glob("**/README.md"))]  # fmt: skip


def test_every_relative_link_in_the_guides_resolves():
    broken = []
    for path in guides():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_stays_a_short_guide_without_issue_numbers():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 320
    for path in guides():
        assert not re.search(r"\bissues? #?\d+\b", path.read_text(), re.I), path
