"""Faults the commands must survive (issue 11, item 5): a full disk during a shard write and during
a checkpoint write, and several dumps started into one --out.

The full disk is simulated where the library writes: pyarrow's write_table raises what pyarrow
raises on a full device (OSError ENOSPC, measured), after writing part of the file; the
checkpoint's training state is written through a file whose write() raises ENOSPC part-way,
under the real torch.save. `make trials` repeats both on a real full tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from kd_shards.shared.errors import UserError
from tests.conftest import dump_config
from tests.conftest import train_config as shared_train_config
from tests.synthetic_dumps import write_synthetic_dump_for

DISK_FULL = "Error writing bytes to file. Detail: [errno 28] No space left on device"
"""pyarrow's message for a full device (the OSError's errno is ENOSPC)."""


def shard_sample_ids(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("part-*.parquet")):
        ids += pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()
    return ids


@pytest.mark.engine
def test_disk_full_during_a_shard_write_leaves_only_complete_shards(
    tiny_model, gsm8k_file, engine, tmp_path, monkeypatch
):
    from kd_shards.teacher_dump.inspect import validate
    from kd_shards.teacher_dump.run import run_dump

    out = tmp_path / "out"
    # A thread writer: the patched write_table below is this process's (tests/test_pipeline.py
    # fails a writer process).
    config = dump_config(
        tiny_model, gsm8k_file, out, rows_per_shard=3, max_in_flight=2, writer="thread"
    )
    from kd_shards.teacher_dump import shards

    real_write_table = shards.write_table
    writes = []

    def write_table_on_a_full_disk(where, table, footer, storage):
        writes.append(Path(where).name)
        real_write_table(where, table, footer, storage)
        if len(writes) == 2:  # the second shard: part of it reaches the disk, then it is full
            Path(where).write_bytes(Path(where).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, DISK_FULL)

    # The one function that writes a shard's Parquet file (teacher_dump.shards.write_shard).
    monkeypatch.setattr(shards, "write_table", write_table_on_a_full_disk)
    with pytest.raises(UserError) as caught:
        run_dump(config, engine)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"no space left on the device of {out} while writing part-r00000")
    assert "nothing partial was kept" in message and "rerun the same command" in message
    assert writes[1].startswith(".tmp-")  # it was writing a temporary name
    assert [path.name for path in out.glob("part-*.parquet")] == [
        "part-r00000-w00001-000000.parquet"
    ]
    assert not list(out.glob(".tmp-*"))
    assert validate(out) == []  # what is there is complete and listed
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["totals"]["rows"] == 3

    monkeypatch.undo()
    manifest = run_dump(config, engine)
    ids = shard_sample_ids(out)
    assert sorted(ids) == sorted(f"{index}-0" for index in range(12))  # each exactly once
    assert manifest["complete"] and validate(out) == []


class FileOnAFullDisk:
    """A binary file whose write() stores `room` bytes, then raises ENOSPC (as a full device
    does). Everything else is the real file's."""

    def __init__(self, handle, room: int):
        self.handle, self.room, self.written = handle, room, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.room:
            self.handle.write(bytes(data[: self.room - self.written]))
            self.written = self.room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.handle.close()


def train_config(shards: Path, student: Path, out: Path, **overrides):
    values = dict(max_steps=4, save_every=1, micro_batch=4, shuffle_buffer=16)
    return shared_train_config(shards, student, out, **{**values, **overrides})


def test_disk_full_during_a_checkpoint_write_keeps_the_last_complete_one(
    student_model, tmp_path, monkeypatch
):
    from kd_shards.student_train import checkpoints
    from kd_shards.student_train.reporting import read_metrics
    from kd_shards.student_train.train import run_training

    shards = write_synthetic_dump_for(student_model, tmp_path / "dump", 32, top_k=4)
    run_training(train_config(shards, student_model, tmp_path / "uninterrupted"))
    out = tmp_path / "out"
    real_open = open

    def open_on_a_full_disk(path, mode="r", *arguments, **options):
        handle = real_open(path, mode, *arguments, **options)
        if "step-00000003" in str(path) and Path(path).name == checkpoints.STATE_NAME:
            return FileOnAFullDisk(handle, room=4096)
        return handle

    monkeypatch.setattr(checkpoints, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(UserError) as caught:
        run_training(train_config(shards, student_model, out))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"no space left on the device of {out / 'checkpoints'} while writing checkpoint "
        "step-00000003: it was not kept (the newest complete one is step-00000002); free space "
        "there and rerun the same command with --resume"
    )
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"]  # no partial step 3, no temporary
    assert load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    torch.load(out / "checkpoints" / "step-00000002" / "training_state.pt", weights_only=True)

    monkeypatch.undo()
    run_training(train_config(shards, student_model, out, resume=True))

    def losses(run: Path) -> list:
        lines = read_metrics(run / "metrics.jsonl")
        return [(line["step"], line["loss"]) for line in lines if "loss" in line]

    assert losses(out) == losses(tmp_path / "uninterrupted") and len(losses(out)) == 4
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(tmp_path / "uninterrupted" / "final" / "model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_full_disk_is_recognised_however_a_library_reports_it():
    from kd_shards.shared.files import is_disk_full

    try:
        with open(os.devnull, "wb") as handle:
            torch.save({"x": torch.zeros(4096)}, FileOnAFullDisk(handle, room=100))
    except RuntimeError as error:  # what torch.save raises for it: the OSError is its context
        assert "No space left" not in str(error)
        assert is_disk_full(error)
    else:
        raise AssertionError("torch.save did not fail")
    assert is_disk_full(OSError(errno.ENOSPC, DISK_FULL))
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"))


def test_one_writer_per_rank_and_one_world_size_at_a_time(tmp_path):
    from kd_shards.teacher_dump.shards import exclusive_writer

    rank_taken = pytest.raises(UserError, match="another teacher-dump with --rank 0 --world-size 2")
    other_split = pytest.raises(UserError, match="a teacher-dump with --world-size 2 is writing")
    with exclusive_writer(tmp_path, 0, 2):
        with rank_taken, exclusive_writer(tmp_path, 0, 2):
            pass
        # The other rank of the same split is welcome; another split is not.
        with exclusive_writer(tmp_path, 1, 2), other_split, exclusive_writer(tmp_path, 0, 1):
            pass
    with exclusive_writer(tmp_path, 0, 1):  # all released: a rerun, even resplit, may start
        pass


@pytest.mark.long
@pytest.mark.parametrize("different", [True, False], ids=["different-configs", "same-rank"])
def test_two_dumps_started_at_once_into_one_out_one_is_refused(
    tiny_model, gsm8k_file, tmp_path, different
):
    from scripts.kill_trials import (
        TrialsConfig,
        concurrent_start_trial,
        dump_settings,
        write_config,
    )

    settings = write_config(
        tmp_path / "dump.json", dump_settings(tiny_model, gsm8k_file, TrialsConfig())
    )
    trial = concurrent_start_trial(0, settings_file=settings, work=tmp_path, different=different)
    assert trial.passed, (trial.failures, trial.checks)
    assert trial.checks["still_running_when_refused"] == 1
