"""Running the three commands from the top floor, as a user would type them.

The demo and the quality benchmark are sequences of real CLI commands. Each is printed before it
runs (so every figure can be reproduced by hand) and runs as a module of this Python. Model
preparation (converting the teacher, cutting a student) is reused when already done.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from kd_shards.shared.errors import UserError

MODULES = {
    "teacher-dump": "kd_shards.teacher_dump.cli",
    "student-train": "kd_shards.student_train.cli",
    "kd-eval": "kd_shards.kd_eval.cli",
}


def evaluation_is_current(results: Path, models: dict[str, Path]) -> bool:
    """Whether kd-eval's results.json already scores exactly these models, written after every
    one of them was (a retrained model is newer than the results, so it is scored again)."""
    if not results.is_file():
        return False
    if list(json.loads(results.read_text()).get("models", {})) != list(models):
        return False
    newest = max((Path(path) / "config.json").stat().st_mtime for path in models.values())
    return results.stat().st_mtime > newest


def command_line(name: str, arguments: list) -> str:
    return " ".join([name, *(shlex.quote(str(argument)) for argument in arguments)])


def run_command(
    title: str, name: str, arguments: list, *, log: Path | None = None, show_output: bool = True
) -> float:
    """Run one command, echoing it first; returns its seconds. Output goes to the terminal, or
    to `log` when given (show_output=False drops stdout, e.g. a table printed later)."""
    click.secho(f"\n{title}", bold=True, err=True)
    click.echo(f"$ {command_line(name, arguments)}", err=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", MODULES[name], *map(str, arguments)]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as output:
            result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT)
    else:
        result = subprocess.run(command, stdout=None if show_output else subprocess.DEVNULL)
    if result.returncode != 0:
        where = f"see {log}" if log is not None else "see above"
        raise UserError(f"{title} failed with exit status {result.returncode}: {where}")
    seconds = time.perf_counter() - started
    click.echo(f"    done in {seconds:.0f} s", err=True)
    return seconds


def ensure_teacher(teacher: Path, package: str, title: str) -> Path:
    """The teacher model directory, converted from `package`'s GGUF unless it exists."""
    if (teacher / "config.json").is_file():
        click.secho(f"\n{title}: {teacher} (converted earlier)", bold=True, err=True)
        return teacher
    run_command(f"{title}: convert the GGUF of {package}", "teacher-dump",
                ["convert-gguf", "--package", package, "--out", teacher])  # fmt: skip
    return teacher


def ensure_student(
    teacher: Path, layers: int, student: Path, title: str, keep: str = "evenly"
) -> Path:
    """A student cut from the teacher (`layers` of its layers, chosen as init-student --keep
    says) unless it exists."""
    if (student / "config.json").is_file():
        click.secho(f"\n{title}: {student} (made earlier)", bold=True, err=True)
        return student
    run_command(f"{title}: keep {layers} of the teacher's layers ({keep})", "student-train",
                ["init-student", "--teacher", teacher, "--layers", layers, "--keep", keep,
                 "--out", student])  # fmt: skip
    return student
