"""The installed package: a wheel built from the checkout, installed into a fresh virtual
environment outside the repository, runs the three commands there.

It checks what an editable install cannot: that everything installs under the one `kd_shards`
namespace (nothing generic such as `shared` or `scripts` at the top of site-packages), that
the wheel carries every module the commands import, and that they run with the working
directory far from the checkout. The new environment borrows the test environment's
third-party packages (torch, transformers, ...) through a .pth file, so nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import numpy
import pyarrow
import pytest
import torch
import transformers

from scripts.tiny_models import build_tiny_bert

# the shards it reads come from the real engine; a venv and a wheel install each run
pytestmark = [pytest.mark.engine, pytest.mark.long]

REPO = Path(__file__).resolve().parents[1]


def run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding only the kd-shards wheel."""
    root = tmp_path_factory.mktemp("wheel")
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", root / "dist", REPO],
        cwd=root,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("kd_shards-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"kd_shards"}
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", venv], cwd=root)
    assert made.returncode == 0, made.stderr[-3000:]
    (site_packages,) = (venv / "lib").glob("python*/site-packages")
    borrowed = {
        Path(module.__file__).resolve().parents[1]
        for module in (torch, transformers, click, numpy, pyarrow)
    }
    (site_packages / "borrowed-packages.pth").write_text(
        "".join(f"{path}\n" for path in sorted(borrowed))
    )
    added = run(
        [venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
         "--ignore-installed", "--quiet", wheel],
        cwd=root,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr[-3000:]
    return venv / "bin"


def test_the_wheel_installs_one_namespace_and_nothing_generic(installed, tmp_path):
    probe = (
        "import importlib.util, kd_shards.student_train.cli as c\n"
        "print(c.__file__)\n"
        "print([n for n in ('shared', 'schemas', 'scripts', 'tests', 'teacher_dump') "
        "if importlib.util.find_spec(n)])\n"
    )
    result = run([installed / "python", "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    where, generic = result.stdout.splitlines()
    assert Path(where).is_relative_to(installed.parent) and generic == "[]"


def test_the_three_commands_run_from_the_wheel(installed, text_shards, student_model, tmp_path):
    inspected = run(
        [installed / "teacher-dump", "inspect", text_shards, "--validate"], cwd=tmp_path
    )
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    trained = run(
        [installed / "student-train", "--shards", text_shards, "--student", student_model,
         "--out", tmp_path / "run", "--max-steps", "2", "--micro-batch", "2", "--no-progress"],
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    classifier = build_tiny_bert(tmp_path / "classifier")
    data = tmp_path / "sst2"
    data.mkdir()
    rows = [("a warm and wise film", 1), ("dull and far too long", 0)] * 3
    (data / "test.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows)
    )
    evaluated = run(
        [installed / "kd-eval", "--task", "sst2", "--data-path", data,
         "--model", f"teacher={classifier}", "--classify-backend", "transformers",
         "--out", tmp_path / "eval", "--no-progress"],
        cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (
        "teacher" in evaluated.stdout
        and (tmp_path / "eval" / "predictions-teacher.jsonl").is_file()
    )
