"""Dumps in object storage: teacher-dump --out, inspect and student-train --shards take URLs.

fsspec's in-memory filesystem (memory://) stands in for S3/GCS: it has no rename and no locks,
like them, and lives in this process, so each round trip runs in one process. The reference is
the same dump written to a local directory (the local code path): same rows, same training.
file:// URLs go through the command lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import open_dump
from kd_shards.shared.storage import Folder
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.reporting import read_metrics
from kd_shards.student_train.shard_stream import ShardStream
from kd_shards.student_train.train import run_training
from kd_shards.teacher_dump.inspect import summarize, validate
from kd_shards.teacher_dump.run import run_dump
from tests.conftest import REPO, cli_command, dump_config
from tests.conftest import train_config as shared_train_config

pytestmark = pytest.mark.engine  # the dumps come from the real engine

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def memory_url() -> str:
    return f"memory://kd-test-{uuid.uuid4().hex[:8]}/dump"


def rows_by_sample(files) -> dict[str, dict]:
    rows = {}
    for handle in files:
        for row in pq.read_table(handle).to_pylist():
            assert row["sample_id"] not in rows
            rows[row["sample_id"]] = row
    return rows


def memory_rows(url: str) -> dict[str, dict]:
    filesystem = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    names = sorted(path for path in filesystem.ls(root, detail=False) if path.endswith(".parquet"))
    return rows_by_sample(filesystem.open(name, "rb") for name in names)


def local_rows(directory) -> dict[str, dict]:
    return rows_by_sample(sorted(directory.glob("part-*.parquet")))


def text_dump(tiny_model, text_file, out, **overrides):
    options = dict(data="text", mode="text", chunk_tokens=64, limit=12, rows_per_shard=5)
    options.update(overrides)
    return dump_config(tiny_model, text_file, out, **options)


def train_config(shards: str, student, out, **overrides) -> TrainConfig:
    values = dict(max_steps=4, micro_batch=3, shuffle_buffer=6)
    return shared_train_config(shards, student, out, **{**values, **overrides})


def losses(out) -> list[float]:
    return [line["loss"] for line in read_metrics(out / "metrics.jsonl") if "loss" in line]


def test_a_dump_round_trips_through_an_in_memory_object_store(
    tiny_model, text_file, student_model, engine, tmp_path
):
    url = memory_url()
    local = tmp_path / "local"
    manifest = run_dump(text_dump(tiny_model, text_file, url), engine)
    run_dump(text_dump(tiny_model, text_file, local), engine)
    assert manifest["complete"] and manifest["totals"]["rows"] == 12

    # Only the shards, the manifest and the teacher's tokenizer folder: no temporaries and no
    # lock files in an object store.
    names = Folder(url).names()
    shards = [f"part-r00000-w00001-00000{i}.parquet" for i in range(3)]
    assert names == ["manifest.json", *shards, "tokenizer"]
    assert memory_rows(url) == local_rows(local)
    assert validate(Folder(url)) == []
    assert summarize(Folder(url))["manifest"]["totals"] == manifest["totals"]

    # A rerun resumes: nothing left to do, nothing written twice.
    again = run_dump(text_dump(tiny_model, text_file, url), engine)
    assert again["shards"] == manifest["shards"] and Folder(url).names() == names

    # student-train reads the object store as it reads the local copy.
    run_training(train_config(url, student_model, tmp_path / "from-memory"))
    run_training(train_config(str(local), student_model, tmp_path / "from-disk"))
    assert losses(tmp_path / "from-memory") == losses(tmp_path / "from-disk")
    assert len(losses(tmp_path / "from-memory")) == 4

    # A shard changed in the store is refused by inspect --validate and by the trainer.
    filesystem = fsspec.filesystem("memory")
    shard = url.removeprefix("memory://") + "/" + names[2]
    content = bytearray(filesystem.cat_file(shard))
    content[len(content) // 2] ^= 0xFF
    filesystem.pipe_file(shard, bytes(content))
    assert validate(Folder(url)) == [
        f"{names[2]}: sha256 differs from the manifest (corrupt or replaced)"
    ]
    with pytest.raises(UserError, match=f"shard {names[2]} in {url} has sha256"):
        list(ShardStream(open_dump(url), epochs=1))


def test_file_urls_work_on_every_command_line(
    tiny_model, text_file, student_model, engine, tmp_path
):
    directory = tmp_path / "dump"
    url = f"file://{directory}"
    run_dump(text_dump(tiny_model, text_file, url, limit=6), engine)
    assert json.loads((directory / "manifest.json").read_text())["complete"]
    inspect = subprocess.run(
        cli_command("inspect", url, "--validate"),
        capture_output=True,
        text=True,
        timeout=120,
        env=ENVIRONMENT,
        cwd=REPO,
    )
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert "valid           every shard matches" in inspect.stdout
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_shards.student_train.cli",
            "--shards",
            url,
            "--student",
            str(student_model),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--micro-batch",
            "3",
            "--no-progress",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        env=ENVIRONMENT,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(losses(out)) == 2
    assert torch.isfinite(torch.tensor(losses(out))).all()


def test_an_unknown_url_scheme_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no filesystem for this URL"):
        open_dump("nosuchscheme://bucket/dump")
