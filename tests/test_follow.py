"""student-train --follow: training on a dump while another process writes it.

The references are independent of the following: the same stream opened on the finished dump
(what a reader that never waited sees), and, for training, an uninterrupted run on the finished
dump. The writer is teacher-dump's own ShardWriter (tests/synthetic_dumps.py), in a thread or in
another process, publishing shards over time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import open_dump
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.reporting import read_metrics
from kd_shards.student_train.shard_stream import DumpFollower, ShardStream, StreamPosition
from kd_shards.student_train.train import run_training
from tests.conftest import torchrun_student_train
from tests.synthetic_dumps import publish_synthetic_dump

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_writer(directory: Path, rows: int, **options) -> threading.Thread:
    thread = threading.Thread(
        target=publish_synthetic_dump, args=(directory, rows), kwargs=options, daemon=True
    )
    thread.start()
    return thread


def follow_stream(directory: Path, rank: int, world_size: int, **options) -> ShardStream:
    follower = DumpFollower.open(
        str(directory), poll_seconds=0.005, timeout_seconds=30, announce=False
    )
    return ShardStream(
        None,
        rank=rank,
        world_size=world_size,
        seed=4,
        buffer_rows=options.pop("buffer_rows", 10),
        follower=follower,
        **options,
    )


def take_ids(stream: ShardStream, count: int | None = None) -> list[str]:
    taken = []
    while (count is None or len(taken) < count) and (row := stream.take()) is not None:
        taken.append(row.sample_id)
    return taken


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_followed_stream_equals_the_stream_of_the_finished_dump(tmp_path, world_size):
    rows = 61
    directory = tmp_path / "dump"
    # Two writing ranks: publication order (r0, r1, r0, ...) differs from name order.
    writer = start_writer(directory, rows, rows_per_shard=6, pause_seconds=0.01, writers=2)
    streams = [follow_stream(directory, rank, world_size, epochs=2) for rank in range(world_size)]
    followed = [[] for _ in range(world_size)]
    # Round-robin, a few rows at a time, so that the readers catch up with the writer and wait.
    while any(stream.peek() is not None for stream in streams):
        for rank, stream in enumerate(streams):
            followed[rank] += take_ids(stream, 2)
    writer.join()
    assert streams[0].follower.waited_seconds > 0  # it did follow: it waited for shards
    finished = [
        take_ids(follow_stream(directory, rank, world_size, epochs=2)) for rank in range(world_size)
    ]
    assert followed == finished
    epoch_rows = [[] for _ in range(2)]
    for rank in range(world_size):
        per_epoch = (rows - rank + world_size - 1) // world_size
        epoch_rows[0] += followed[rank][:per_epoch]
        epoch_rows[1] += followed[rank][per_epoch:]
    for ids in epoch_rows:  # every sample exactly once per epoch, over the ranks
        assert sorted(ids, key=int) == [str(index) for index in range(rows)]
    # Epoch 0 follows publication order window by window; epoch 1 is permuted over the dump.
    manifest = json.loads((directory / "manifest.json").read_text())
    by_publication = sorted(manifest["shards"], key=lambda entry: entry["published"])
    assert [entry["name"] for entry in by_publication] != sorted(
        entry["name"] for entry in manifest["shards"]
    )


@pytest.mark.parametrize("cut", [0, 5, 17, 40, 61, 75])
def test_a_followed_stream_resumes_exactly_from_a_saved_position(tmp_path, cut):
    rows = 61
    directory = tmp_path / "dump"
    writer = start_writer(directory, rows, rows_per_shard=7, pause_seconds=0.01)
    first = follow_stream(directory, 1, 2, epochs=2)
    before = take_ids(first, cut)
    saved = StreamPosition.from_dict(first.position.to_dict())
    resumed = follow_stream(directory, 1, 2, epochs=2, position=saved)
    after = take_ids(resumed)
    writer.join()
    assert before + after == take_ids(follow_stream(directory, 1, 2, epochs=2))


def test_a_dump_that_stops_growing_ends_with_one_line(tmp_path):
    directory = tmp_path / "dump"
    publish_synthetic_dump(directory, 30, rows_per_shard=10, pause_seconds=0)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["data"]["expected_rows"] = 40  # a teacher-dump that died before its last shard
    manifest["complete"] = False
    (directory / "manifest.json").write_text(json.dumps(manifest))
    follower = DumpFollower.open(
        str(directory), poll_seconds=0.01, timeout_seconds=0.2, announce=False
    )
    stream = ShardStream(None, buffer_rows=5, follower=follower)
    assert len(take_ids(stream, 30)) == 30
    with pytest.raises(UserError, match=r"no new shard .* \(30 of 40 rows published\)"):
        stream.take()


def test_a_shard_rewritten_under_a_follower_is_refused(tmp_path):
    directory = tmp_path / "dump"
    publish_synthetic_dump(directory, 20, rows_per_shard=10, pause_seconds=0)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["complete"] = False
    (directory / "manifest.json").write_text(json.dumps(manifest))
    follower = DumpFollower.open(
        str(directory), poll_seconds=0.01, timeout_seconds=5, announce=False
    )
    manifest["shards"][0]["sha256"] = "0" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="removed or rewritten while being followed"):
        follower.wait()


# Training ---------------------------------------------------------------------------------------


def follow_config(shards: Path, student: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        shards=str(shards),
        student=str(student),
        out=str(out),
        epochs=2,
        micro_batch=4,
        lr=3e-3,
        shuffle_buffer=8,
        chunk_tokens=50,
        progress=False,
        follow=True,
        follow_poll=0.05,
        follow_timeout=120,
        log_samples=True,
    )
    values.update(overrides)
    return TrainConfig(**values)


def writer_process(directory: Path, student: Path, rows: int, pause: float, log: Path, hold: Path):
    """teacher-dump's shard writer in another process: the first shard, then (once `hold`
    exists: the trainer has taken a step) the rest, one every `pause` seconds."""
    code = (
        "import sys; from pathlib import Path; "
        "from shared.tokenizer import load_tokenizer, tokenizer_fingerprint; "
        "from tests.synthetic_dumps import publish_synthetic_dump; "
        "tokenizer = load_tokenizer(sys.argv[2]); "
        "publish_synthetic_dump(Path(sys.argv[1]), int(sys.argv[3]), rows_per_shard=8, "
        "pause_seconds=float(sys.argv[4]), vocabulary=len(tokenizer), "
        "fingerprint=tokenizer_fingerprint(tokenizer), log_path=Path(sys.argv[5]), "
        "hold_until=Path(sys.argv[6]))"
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(directory),
            str(student),
            str(rows),
            str(pause),
            str(log),
            str(hold),
        ],
        cwd=REPO,
        env=ENVIRONMENT,
    )


def samples_by_step(out: Path, rank: int = 0) -> list[dict]:
    return read_metrics(out / f"samples-rank{rank}.jsonl")


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [
        (line["step"], line["loss"])
        for line in read_metrics(out / "metrics.jsonl")
        if "loss" in line
    ]


@pytest.mark.long
def test_follow_trains_on_a_dump_written_by_another_process_and_resumes_exactly(
    student_model, tmp_path
):
    rows = 40
    shards, log = tmp_path / "shards", tmp_path / "published.jsonl"
    stopped = tmp_path / "stopped"
    writer = writer_process(shards, student_model, rows, 0.5, log, stopped / "samples-rank0.jsonl")
    try:
        # Started before the dump exists; stopped at step 3 while it is being written.
        summary = run_training(follow_config(shards, student_model, stopped, stop_at_step=3))
        assert summary["stopped_early"] and summary["steps"] == 3
        resumed = run_training(follow_config(shards, student_model, stopped, resume=True))
        assert writer.wait(timeout=120) == 0
    finally:
        writer.kill()
    assert resumed["steps"] == resumed["total_steps"] == 20  # 2 epochs x 40 rows / 4
    published = [json.loads(line) for line in log.read_text().splitlines()]
    steps = samples_by_step(stopped)
    # It trained while the dump was being written: its first steps came before the last shard.
    assert steps[0]["time"] < published[-1]["time"]
    seen = [sample for line in steps for sample in line["samples"]]
    for epoch in (seen[:rows], seen[rows:]):
        assert sorted(epoch, key=int) == [str(index) for index in range(rows)]
    metrics = [line for line in read_metrics(stopped / "metrics.jsonl") if "loss" in line]
    assert max(line["waited_seconds"] for line in metrics) > 0

    # The same run on the finished dump, never interrupted and never waiting: same losses,
    # same weights, same data order.
    reference = tmp_path / "reference"
    run_training(follow_config(shards, student_model, reference))
    assert train_losses(stopped) == train_losses(reference)
    assert [line["samples"] for line in samples_by_step(reference)] == [
        line["samples"] for line in steps
    ]
    got = load_file(stopped / "final" / "model.safetensors")
    want = load_file(reference / "final" / "model.safetensors")
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.long
def test_follow_under_torchrun_sees_every_sample_once_per_epoch(student_model, tmp_path):
    rows = 36
    shards, log, out = tmp_path / "shards", tmp_path / "published.jsonl", tmp_path / "ddp"
    writer = writer_process(shards, student_model, rows, 0.5, log, out / "samples-rank0.jsonl")
    try:
        result = torchrun_student_train(
            "--shards", str(shards), "--student", str(student_model), "--out", str(out),
            "--follow", "--epochs", "2", "--micro-batch", "3", "--lr", "1e-3",
            "--set", "log_samples=true", "--set", "shuffle_buffer=8",
            "--set", "follow_poll=0.1", "--set", "follow_timeout=120",
        )  # fmt: skip
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    per_epoch = rows // 2
    epochs = [[], []]
    for rank in (0, 1):
        seen = [sample for line in samples_by_step(out, rank) for sample in line["samples"]]
        assert len(seen) == 2 * per_epoch
        epochs[0] += seen[:per_epoch]
        epochs[1] += seen[per_epoch:]
    for ids in epochs:
        assert sorted(ids, key=int) == [str(index) for index in range(rows)]
    published = [json.loads(line) for line in log.read_text().splitlines()]
    assert samples_by_step(out)[0]["time"] < published[-1]["time"]
    steps = [line for line in read_metrics(out / "metrics.jsonl") if "loss" in line]
    assert len(steps) == 12  # 2 epochs x 18 rows per rank / 3
    assert (out / "final" / "model.safetensors").is_file()
    assert open_dump(shards).complete


def test_a_follower_waits_for_the_manifest_but_not_on_a_broken_dump(tmp_path):
    with pytest.raises(UserError, match=r"has no manifest.json after 0 s"):
        DumpFollower.open(
            str(tmp_path / "missing"), poll_seconds=0.01, timeout_seconds=0.1, announce=False
        )
    directory = tmp_path / "dump"
    publish_synthetic_dump(directory, 10, rows_per_shard=10, pause_seconds=0)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (directory / "manifest.json").write_text(json.dumps(manifest))
    started = time.monotonic()
    with pytest.raises(UserError, match="schema version 999"):  # at once, not after waiting
        DumpFollower.open(str(directory), poll_seconds=0.01, timeout_seconds=10)
    assert time.monotonic() - started < 5
