"""The streaming loader and collation: rank partition, resumable position, bounded memory,
deterministic order, prompt masking, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_shards.shared.collation import collate, fit_row
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import TrainingRow, open_dump
from kd_shards.student_train.batches import BatchShape, take_micro_batch
from kd_shards.student_train.shard_stream import ShardStream, StreamPosition
from tests.synthetic_dumps import write_synthetic_dump

ROWS = 103


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    directory = write_synthetic_dump(tmp_path_factory.mktemp("synthetic"), ROWS)
    return open_dump(directory)


def sample_ids(stream: ShardStream, limit: int | None = None) -> list[str]:
    taken = []
    while (limit is None or len(taken) < limit) and (row := stream.take()) is not None:
        taken.append(row.sample_id)
    return taken


def test_the_dump_has_many_row_groups(dump):
    assert len(dump.row_groups) == 6 + 6 + 4  # 7-row groups of shards of 40, 40 and 23 rows
    assert dump.rows == ROWS


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("buffer_rows", [1, 10, 1000])
def test_ranks_partition_every_epoch(dump, world_size, buffer_rows):
    for epoch in range(2):
        per_rank = [
            sample_ids(
                ShardStream(
                    dump,
                    rank=rank,
                    world_size=world_size,
                    seed=5,
                    buffer_rows=buffer_rows,
                    epochs=epoch + 1,
                    position=StreamPosition(epoch, 0, 0),
                )
            )
            for rank in range(world_size)
        ]
        every = [sample for ids in per_rank for sample in ids]
        assert sorted(every, key=int) == [str(index) for index in range(ROWS)]  # disjoint, complete
        counts = [len(ids) for ids in per_rank]
        assert max(counts) - min(counts) <= 1


def test_each_epoch_is_one_permutation_of_the_dump(dump):
    stream = ShardStream(dump, seed=1, buffer_rows=20, epochs=3)
    ids = sample_ids(stream)
    epochs = [ids[start : start + ROWS] for start in range(0, 3 * ROWS, ROWS)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(index) for index in range(ROWS)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_order_depends_on_the_seed_only(dump):
    first = sample_ids(ShardStream(dump, seed=7, buffer_rows=30), 250)
    again = sample_ids(ShardStream(dump, seed=7, buffer_rows=30), 250)
    other = sample_ids(ShardStream(dump, seed=8, buffer_rows=30), 250)
    assert first == again and first != other
    unshuffled = sample_ids(ShardStream(dump, shuffle=False, epochs=1))
    assert unshuffled == [str(index) for index in range(ROWS)]


@pytest.mark.parametrize("cut", [0, 1, 13, 51, 102, 103, 150])
def test_restored_position_continues_exactly(dump, cut):
    uninterrupted = ShardStream(dump, rank=1, world_size=2, seed=3, buffer_rows=15)
    expected = sample_ids(uninterrupted, cut + 60)
    first = ShardStream(dump, rank=1, world_size=2, seed=3, buffer_rows=15)
    before = sample_ids(first, cut)
    saved = StreamPosition.from_dict(first.position.to_dict())
    resumed = ShardStream(dump, rank=1, world_size=2, seed=3, buffer_rows=15, position=saved)
    assert before + sample_ids(resumed, 60) == expected


def test_restored_position_gives_identical_micro_batches(dump):
    shape = BatchShape(rows=None, batch_tokens=24, max_length=12)
    reference = ShardStream(dump, seed=2, buffer_rows=9)
    expected = [collate(take_micro_batch(reference, shape)) for _ in range(30)]
    first = ShardStream(dump, seed=2, buffer_rows=9)
    for _ in range(11):
        take_micro_batch(first, shape)
    resumed = ShardStream(dump, seed=2, buffer_rows=9, position=first.position)
    for batch in expected[11:]:
        got = collate(take_micro_batch(resumed, shape))
        assert got.sample_ids == batch.sample_ids
        assert torch.equal(got.input_ids, batch.input_ids)
        assert torch.equal(got.topk_logprobs, batch.topk_logprobs)


def test_memory_is_bounded_by_the_shuffle_buffer(dump):
    stream = ShardStream(dump, seed=0, buffer_rows=10)
    largest = 0
    for _ in range(2 * ROWS):
        stream.take()
        largest = max(largest, stream.held_rows)
    assert largest <= 10 + 7 - 1  # the buffer plus less than one row group


def rows_in_the_files(directory) -> dict[str, dict]:
    """Every row of the dump's shards as pyarrow reads them (Python lists), by sample id."""
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(directory.glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["sample_id"]] = row
    return rows


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_streamed_row_equals_the_parquet_content(dump, world_size):
    written = rows_in_the_files(dump.directory)
    padded = [
        sample_id for sample_id, row in written.items() if any(-1 in ids for ids in row["topk_ids"])
    ]
    assert len(padded) > ROWS // 4  # the comparison covers padded (-1, -inf) slots
    streamed = []
    for rank in range(world_size):
        stream = ShardStream(
            dump, rank=rank, world_size=world_size, seed=4, buffer_rows=10, epochs=1
        )
        for row in stream:
            expected = written[row.sample_id]
            assert row.prompt_ids.tolist() == expected["prompt_ids"], row.sample_id
            assert row.target_ids.tolist() == expected["target_ids"], row.sample_id
            np.testing.assert_array_equal(row.topk_ids, np.array(expected["topk_ids"], np.int32))
            np.testing.assert_array_equal(
                row.topk_logprobs, np.array(expected["topk_logprobs"], np.float32)
            )
            assert row.topk_ids.dtype == np.int32 and row.topk_logprobs.dtype == np.float32
            streamed.append(row.sample_id)
    assert sorted(streamed) == sorted(written)  # every row, each once


def make_row(prompt: list[int], target: list[int], k: int = 2) -> TrainingRow:
    positions = len(target)
    return TrainingRow(
        sample_id="x",
        prompt_ids=np.array(prompt, np.int32),
        target_ids=np.array(target, np.int32),
        topk_ids=np.tile(np.arange(k, dtype=np.int32), (positions, 1)),
        topk_logprobs=np.full((positions, k), -1.0, np.float32),
    )


def test_collate_masks_prompt_positions_and_padding():
    batch = collate([make_row([5, 6, 7], [8, 9]), make_row([1], [2, 3, 4])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Targets 8, 9 are predicted at positions 2, 3 of row 0; 2, 3, 4 at 0, 1, 2 of row 1.
    assert batch.row_index.tolist() == [0, 0, 1, 1, 1]
    assert batch.position.tolist() == [2, 3, 0, 1, 2]
    assert batch.target_ids.tolist() == [8, 9, 2, 3, 4]
    assert batch.input_ids[batch.row_index, batch.position + 1].tolist() == [8, 9, 2, 3, 4]
    assert batch.topk_ids.shape == (5, 2)


def test_fit_row_drops_prompt_from_the_left_then_targets_from_the_end():
    row = make_row([1, 2, 3, 4], [5, 6, 7])
    assert fit_row(row, 7) is row
    shorter = fit_row(row, 5)
    assert shorter.prompt_ids.tolist() == [3, 4] and shorter.target_ids.tolist() == [5, 6, 7]
    shortest = fit_row(row, 3)
    assert shortest.prompt_ids.tolist() == [4] and shortest.target_ids.tolist() == [5, 6]
    assert shortest.topk_ids.shape == (2, 2)


def test_batch_tokens_packing_respects_the_budget(dump):
    stream = ShardStream(dump, seed=0, buffer_rows=50, epochs=1)
    total = 0
    while rows := take_micro_batch(stream, BatchShape(rows=None, batch_tokens=30, max_length=100)):
        longest = max(row.length for row in rows)
        assert len(rows) == 1 or len(rows) * longest <= 30
        total += len(rows)
    assert total == ROWS


def test_incomplete_and_corrupt_dumps_are_refused(tmp_path):
    import json

    directory = write_synthetic_dump(tmp_path / "dump", 20)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="incomplete.*allow_incomplete=true"):
        open_dump(directory)
    assert open_dump(directory, allow_incomplete=True).rows == 20
    shard = directory / manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or replaced"):
        open_dump(directory, allow_incomplete=True)
    with pytest.raises(UserError, match="no such directory"):
        open_dump(tmp_path / "missing")


def test_teacher_top_k_keeps_the_first_entries_of_every_position(dump):
    import pyarrow.parquet as pq

    stored = {}
    for group in dump.row_groups:
        table = pq.ParquetFile(group.path).read_row_group(group.index)
        for sample_id, ids, logprobs in zip(
            table["sample_id"].to_pylist(),
            table["topk_ids"].to_pylist(),
            table["topk_logprobs"].to_pylist(),
            strict=True,
        ):
            stored[sample_id] = (np.array(ids), np.array(logprobs, dtype=np.float32))
    stream = ShardStream(dump, seed=1, buffer_rows=10, epochs=1)
    shape = BatchShape(rows=5, batch_tokens=None, max_length=1000, teacher_top_k=2)
    seen = 0
    while rows := take_micro_batch(stream, shape):
        for row in rows:
            ids, logprobs = stored[row.sample_id]
            np.testing.assert_array_equal(row.topk_ids, ids[:, :2])
            np.testing.assert_array_equal(row.topk_logprobs, logprobs[:, :2])
            seen += 1
    assert seen == ROWS
