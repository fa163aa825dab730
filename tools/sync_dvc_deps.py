"""Rewrite the code deps of every stage in dvc.yaml as the stage's static import closure.

`dvc.yaml` lists, per stage, exactly the source files `stages.common.code_deps` finds (a test
checks it). After moving code between modules run `python tools/sync_dvc_deps.py` (or
`make deps`); `--check` only reports and exits 1 when dvc.yaml is out of date. Comments, data
deps, params and outs are left as they are.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common import code_deps  # noqa: E402

STAGE = re.compile(r"^  (\w+):\s*$")
CODE_DEP = re.compile(r"^      - (pipeline|stages)/\S+\.py\s*$")


def synced(text: str) -> str:
    out: list[str] = []
    stage = None
    for line in text.splitlines(keepends=True):
        match = STAGE.match(line)
        if match:
            stage = match.group(1)
        if stage and line.strip() == "deps:":
            out.append(line)
            own = f"stages/{stage}.py"
            rest = [p for p in code_deps(f"stages.{stage}") if p != own]
            out.extend(f"      - {path}\n" for path in (own, *rest))
            continue
        if stage and CODE_DEP.match(line):
            continue  # replaced above
        out.append(line)
    return "".join(out)


def main(argv: list[str]) -> int:
    path = ROOT / "dvc.yaml"
    old = path.read_text(encoding="utf-8")
    new = synced(old)
    if "--check" in argv:
        if new != old:
            print("dvc.yaml code deps are out of date: run `make deps`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new, encoding="utf-8")
        print("dvc.yaml: code deps updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
