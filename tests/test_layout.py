"""The floors of the architecture, enforced on the source (AST, no imports executed).

    scripts/                       top floor: drives the commands (demo, bench); nothing imports it
    teacher_dump/ student_train/ kd_eval/   the three commands; none imports another
    shared/                        ground floor: imports only itself and the contract
    schemas/                       the contract: imports nothing of the project but itself

No floor imports tests/, and no two modules of the project import each other, even lazily
(a lazy import is for a heavy library, not for dodging a cycle).

vLLM is imported in exactly one module, shared/engine.py, Ray in teacher_dump/ray_dump.py, and no ground-floor module changes the
process environment when it is imported.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("teacher_dump", "student_train", "kd_eval")
TOP_FLOOR = ("scripts",)
GROUND_FLOOR = ("shared",)
CONTRACT = ("schemas",)
FLOORS = (*CONTRACT, *GROUND_FLOOR, *COMMANDS, *TOP_FLOOR)
PROJECT = (*FLOORS, "tests")
NAMESPACE = "kd_shards"
ENGINE_MODULE = Path("shared/engine.py")
RAY_MODULE = Path("teacher_dump/ray_dump.py")


def without_namespace(module: str) -> str:
    """`kd_shards.shared.x` is the installed name of `shared.x`: the floors are the same."""
    prefix = NAMESPACE + "."
    return module[len(prefix) :] if module.startswith(prefix) else module


def import_statements(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every absolute import in `path`, at any depth (functions included),
    namespace removed: `import a.b` gives ("a.b", ()), `from a import b, c` ("a", ("b", "c"))."""
    statements = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            statements += [(without_namespace(alias.name), ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = tuple(alias.name for alias in node.names)
            statements.append((without_namespace(node.module), names))
    return statements


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports; for `from package import name` both `package` and
    `package.name` (a submodule or not)."""
    names = set()
    for module, imported in import_statements(path):
        names.add(module)
        names.update(f"{module}.{name}" for name in imported)
    return names


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (functions included)."""
    return {module.split(".")[0] for module in imported_modules(path)}


def sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def layout_violations(root: Path) -> list[str]:
    """Every import that breaks a floor rule under `root`, as 'file: imports X'."""
    problems = []
    for package in FLOORS:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            imported = imported_packages(path)
            if package in CONTRACT:
                forbidden = set(PROJECT) - set(CONTRACT)
            elif package in GROUND_FLOOR:
                forbidden = set(COMMANDS) | set(TOP_FLOOR) | {"tests"}
            elif package in COMMANDS:
                forbidden = (set(COMMANDS) - {package}) | set(TOP_FLOOR) | {"tests"}
            else:
                forbidden = {"tests"}
            problems += [f"{relative}: imports {name}" for name in sorted(imported & forbidden)]
            if "vllm" in imported and relative != ENGINE_MODULE:
                problems.append(f"{relative}: imports vllm (only {ENGINE_MODULE} may)")
            if "ray" in imported and relative != RAY_MODULE:
                problems.append(f"{relative}: imports ray (only {RAY_MODULE} may)")
    return problems


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_project_modules(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports: `from package import name` is an edge to the module
    package.name where that is a module (Python then runs package/__init__.py first anyway,
    as for any submodule), else to the package."""
    names = set()
    for module, imported in import_statements(path):
        submodules = {f"{module}.{name}" for name in imported} & modules
        names |= submodules
        if len(submodules) < len(imported) or not imported:
            names.add(module)
    return names & modules


def import_cycles(root: Path) -> list[list[str]]:
    """Groups of project modules that import each other, directly or through others, counting
    imports inside functions too (strongly connected components of more than one module)."""
    paths = {
        module_name(root, path): path for package in FLOORS for path in sources_under(root, package)
    }
    modules = set(paths)
    graph = {
        module: sorted(imported_project_modules(path, modules) - {module})
        for module, path in paths.items()
    }
    return strongly_connected(graph)


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only the components of two or more nodes, sorted."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = lowest[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = lowest[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph[successor])))
                    advanced = True
                    break
                if successor in on_stack:
                    lowest[node] = min(lowest[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                lowest[work[-1][0]] = min(lowest[work[-1][0]], lowest[node])
            if lowest[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def sources_under(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def test_every_floor_rule_holds():
    assert layout_violations(ROOT) == []


def test_no_two_modules_import_each_other():
    assert import_cycles(ROOT) == []


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(tmp_path):
    (tmp_path / "teacher_dump").mkdir()
    (tmp_path / "teacher_dump" / "run.py").write_text("from teacher_dump.ray import go\n")
    (tmp_path / "teacher_dump" / "ray.py").write_text("def go():\n    import teacher_dump.rows\n")
    (tmp_path / "teacher_dump" / "rows.py").write_text(
        "def f():\n    from teacher_dump import run\n"
    )
    (tmp_path / "teacher_dump" / "alone.py").write_text("import teacher_dump.rows\n")
    # A package that imports its modules, whose modules import their siblings through it:
    # not a cycle (each module depends on its siblings, not on the package's other modules).
    (tmp_path / "teacher_dump" / "modes").mkdir()
    (tmp_path / "teacher_dump" / "modes" / "__init__.py").write_text(
        "from teacher_dump.modes import generate, tokens\n"
    )
    (tmp_path / "teacher_dump" / "modes" / "generate.py").write_text(
        "from teacher_dump.modes import tokens\n"
    )
    (tmp_path / "teacher_dump" / "modes" / "tokens.py").write_text("import numpy\n")
    assert import_cycles(tmp_path) == [
        ["teacher_dump.ray", "teacher_dump.rows", "teacher_dump.run"]
    ]


def test_the_check_catches_each_upward_import(tmp_path):
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "shared" / "helper.py").write_text(
        "def f():\n    from student_train.losses import loss_sums\n"
    )
    (tmp_path / "kd_eval" / "run.py").write_text("import teacher_dump.run\nimport vllm\n")
    (tmp_path / "shared" / "cluster.py").write_text("def f():\n    import ray.data\n")
    (tmp_path / "schemas" / "manifest.py").write_text(
        "from kd_shards.shared.errors import UserError\nfrom schemas.shard import SCHEMA_VERSION\n"
    )
    (tmp_path / "scripts" / "trials.py").write_text("from tests.tiny_models import tiny\n")
    assert sorted(layout_violations(tmp_path)) == [
        "kd_eval/run.py: imports teacher_dump",
        "kd_eval/run.py: imports vllm (only shared/engine.py may)",
        "schemas/manifest.py: imports shared",
        "scripts/trials.py: imports tests",
        "shared/cluster.py: imports ray (only teacher_dump/ray_dump.py may)",
        "shared/helper.py: imports student_train",
    ]


@pytest.mark.parametrize("path", sources(*CONTRACT, *GROUND_FLOOR), ids=lambda path: path.name)
def test_ground_floor_modules_do_not_change_the_environment_at_import(path):
    # Module-level statements only: changing os.environ inside a function is deliberate.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                break
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Assign) else ""
            assert "os.environ" not in text and "putenv" not in text, f"{path}: {text}"


def test_the_installed_packages_are_the_floors_under_one_namespace():
    # The top floor (scripts/) and tests/ are not installed: they run from a checkout.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    installed = (*CONTRACT, *GROUND_FLOOR, *COMMANDS)
    expected = sorted(
        ".".join((NAMESPACE, *path.parent.relative_to(ROOT).parts))
        for package in installed
        for path in (ROOT / package).rglob("__init__.py")
    )
    assert sorted(setuptools["packages"]) == expected
    assert setuptools["package-dir"] == {f"{NAMESPACE}.{name}": name for name in installed}


def test_the_option_tables_in_docs_are_generated_from_the_configs():
    from scripts.reference import PAGES, render

    for command, path in PAGES.items():
        text = path.read_text(encoding="utf-8")
        assert text.count(f"<!-- options: {command} -->") == 1, f"{path.name} lost its table"
        assert render(text) == text, (
            f"{path.name}: stale options table, run python -m scripts.reference"
        )
