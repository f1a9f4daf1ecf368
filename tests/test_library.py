"""The library door (student_train/library.py): ShardDataset yields exactly student-train's
stream of micro-batches, resumes mid-epoch on the same rows, partitions ranks, and the
documented plain-PyTorch loop (docs/library.md) runs as written on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import open_dump
from kd_shards.student_train.batches import BatchShape, take_micro_batch
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.library import ShardDataset
from kd_shards.student_train.planning import training_stream
from scripts.tiny_models import build_tiny_llama
from tests.synthetic_dumps import write_synthetic_dump, write_synthetic_dump_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    return write_synthetic_dump(tmp_path_factory.mktemp("library") / "dump", 90)


def batch_key(batch) -> tuple:
    return (
        batch.sample_ids,
        batch.input_ids.tolist(),
        batch.topk_ids.tolist(),
        batch.topk_logprobs.tolist(),
    )


def student_train_batches(dump: Path, *, rank: int, world_size: int, seed: int) -> list:
    """The micro-batches student-train's own planning cuts for --micro-batch 4 --epochs 1."""
    config = TrainConfig(
        shards=str(dump), student="unused", out="unused", micro_batch=4, epochs=1,
        shuffle_buffer=20, seed=seed,
    )  # fmt: skip
    context = Distributed(rank=rank, world_size=world_size, device=torch.device("cpu"))
    stream = training_stream(open_dump(dump), config, context)
    shape = BatchShape(rows=config.rows_per_micro_batch, batch_tokens=None, max_length=2048)
    batches = []
    while rows := take_micro_batch(stream, shape):
        batches.append(rows)
    return batches


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_the_dataset_is_student_train_s_stream(dump, rank, world_size):
    dataset = ShardDataset(
        str(dump), rows_per_batch=4, buffer_rows=20, seed=3, rank=rank, world_size=world_size
    )
    ours = list(torch.utils.data.DataLoader(dataset, batch_size=None))
    theirs = student_train_batches(dump, rank=rank, world_size=world_size, seed=3)
    assert [batch.sample_ids for batch in ours] == [
        tuple(row.sample_id for row in rows) for rows in theirs
    ]
    for batch, rows in zip(ours, theirs, strict=True):
        positions = [row for row in rows for _ in range(len(row.target_ids))]
        assert batch.target_tokens == len(positions)
        flat_ids = torch.from_numpy(np.concatenate([row.topk_ids for row in rows]).astype(np.int64))
        assert torch.equal(batch.topk_ids, flat_ids)


def test_ranks_share_an_epoch_without_overlap(dump):
    seen = []
    for rank in range(3):
        dataset = ShardDataset(str(dump), rows_per_batch=5, buffer_rows=20, rank=rank, world_size=3)
        seen += [sample for batch in dataset for sample in batch.sample_ids]
    written = [
        sample for path in sorted(dump.glob("*.parquet"))
        for sample in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    ]  # fmt: skip
    assert len(written) == 90 and sorted(seen) == sorted(written)


def test_a_restored_dataset_continues_with_the_same_batches(dump):
    uninterrupted = [
        batch_key(batch)
        for batch in ShardDataset(str(dump), rows_per_batch=4, buffer_rows=20, epochs=2)
    ]
    first = ShardDataset(str(dump), rows_per_batch=4, buffer_rows=20, epochs=2)
    iterator = iter(first)
    head = [batch_key(next(iterator)) for _ in range(29)]  # into the second epoch
    state = first.state_dict()
    second = ShardDataset(str(dump), rows_per_batch=4, buffer_rows=20, epochs=2)
    second.load_state_dict(state)
    assert head + [batch_key(batch) for batch in second] == uninterrupted
    with pytest.raises(UserError, match="rank 0 of 1 with seed 0, this dataset rank 1 of 2"):
        ShardDataset(str(dump), rank=1, world_size=2).load_state_dict(state)


def test_several_dataloader_workers_are_refused(dump):
    loader = torch.utils.data.DataLoader(ShardDataset(str(dump)), batch_size=None, num_workers=2)
    with pytest.raises(Exception, match="num_workers=2: use num_workers=0 or 1"):
        next(iter(loader))


def test_the_documented_loop_runs_as_written(tmp_path, monkeypatch):
    student = build_tiny_llama(tmp_path / "student", seed=1)
    shards = write_synthetic_dump_for(student, tmp_path / "shards", 40)
    text = (REPO / "docs" / "library.md").read_text(encoding="utf-8")
    loop = next(
        block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "for step" in block
    )
    paths = 'shards, student = "demo/shards/train", "demo/models/student-6-layers"'
    assert paths in loop
    loop = loop.replace(paths, f"shards, student = {str(shards)!r}, {str(student)!r}")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(loop, "docs/library.md", "exec"), {"print": printed.append})
    assert printed[0].startswith("step 1: ce ") and len(printed) == 5  # 40 rows, 8 per batch
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["data"]["position"]["epoch"] == 1
