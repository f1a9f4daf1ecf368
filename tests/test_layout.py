"""The floors of the architecture, enforced on the source (AST, no imports executed).

    scripts/                       top floor: drives the commands (demo, bench); nothing imports it
    teacher_dump/ student_train/ kd_eval/   the three commands; none imports another
    shared/                        ground floor: imports no command and no top floor
    schemas/                       the contract: imports nothing above the ground floor

vLLM is imported in exactly one module, shared/engine.py, Ray in teacher_dump/ray_dump.py, and no ground-floor module changes the
process environment when it is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("teacher_dump", "student_train", "kd_eval")
TOP_FLOOR = ("scripts",)
GROUND_FLOOR = ("shared", "schemas")
ENGINE_MODULE = Path("shared/engine.py")
RAY_MODULE = Path("teacher_dump/ray_dump.py")


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def layout_violations(root: Path) -> list[str]:
    """Every import that breaks a floor rule under `root`, as 'file: imports X'."""
    problems = []
    for package in (*GROUND_FLOOR, *COMMANDS, *TOP_FLOOR):
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            imported = imported_packages(path)
            if package in GROUND_FLOOR:
                forbidden = set(COMMANDS) | set(TOP_FLOOR)
            elif package in COMMANDS:
                forbidden = (set(COMMANDS) - {package}) | set(TOP_FLOOR)
            else:
                forbidden = set()
            problems += [f"{relative}: imports {name}" for name in sorted(imported & forbidden)]
            if "vllm" in imported and relative != ENGINE_MODULE:
                problems.append(f"{relative}: imports vllm (only {ENGINE_MODULE} may)")
            if "ray" in imported and relative != RAY_MODULE:
                problems.append(f"{relative}: imports ray (only {RAY_MODULE} may)")
    return problems


def test_every_floor_rule_holds():
    assert layout_violations(ROOT) == []


def test_the_check_catches_a_ground_floor_module_importing_a_command(tmp_path):
    for package in (*GROUND_FLOOR, *COMMANDS, *TOP_FLOOR):
        (tmp_path / package).mkdir()
    (tmp_path / "shared" / "helper.py").write_text(
        "def f():\n    from student_train.losses import loss_sums\n"
    )
    (tmp_path / "kd_eval" / "run.py").write_text("import teacher_dump.run\nimport vllm\n")
    (tmp_path / "shared" / "cluster.py").write_text("def f():\n    import ray.data\n")
    assert sorted(layout_violations(tmp_path)) == [
        "kd_eval/run.py: imports teacher_dump",
        "kd_eval/run.py: imports vllm (only shared/engine.py may)",
        "shared/cluster.py: imports ray (only teacher_dump/ray_dump.py may)",
        "shared/helper.py: imports student_train",
    ]


@pytest.mark.parametrize("path", sources(*GROUND_FLOOR), ids=lambda path: path.name)
def test_ground_floor_modules_do_not_change_the_environment_at_import(path):
    # Module-level statements only: changing os.environ inside a function is deliberate.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                break
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Assign) else ""
            assert "os.environ" not in text and "putenv" not in text, f"{path}: {text}"


def test_the_packages_of_the_layout_are_the_installed_ones():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for package in (*GROUND_FLOOR, *COMMANDS, *TOP_FLOOR):
        assert f'"{package}"' in pyproject
        assert (ROOT / package / "__init__.py").is_file()


def test_the_option_tables_in_docs_are_generated_from_the_configs():
    from scripts.reference import PAGES, render

    for command, path in PAGES.items():
        text = path.read_text(encoding="utf-8")
        assert text.count(f"<!-- options: {command} -->") == 1, f"{path.name} lost its table"
        assert render(text) == text, (
            f"{path.name}: stale options table, run python -m scripts.reference"
        )
