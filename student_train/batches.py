"""Micro-batches for training: how many rows of the stream go into each one.

`take_micro_batch` consumes rows from a ShardStream by a fixed row count or a padded-token
budget; a row that does not fit stays in the stream, so the stream's position after each call is
exact (what checkpoints save).
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_shards.shared.collation import fit_row, keep_top_entries
from kd_shards.shared.shard_reader import TrainingRow
from kd_shards.student_train.shard_stream import ShardStream


@dataclass(frozen=True)
class BatchShape:
    """How micro-batches are cut from the stream."""

    rows: int | None
    """A fixed number of rows per micro-batch; None packs by batch_tokens instead."""
    batch_tokens: int | None
    """Pack as many rows as fit in rows x longest row <= batch_tokens (a longer row goes alone)."""
    max_length: int
    """Rows longer than this lose prompt tokens from the left, then target tokens from the end."""
    teacher_top_k: int | None = None
    """Keep only the first N (most likely) teacher top-k entries of every position."""


def take_micro_batch(stream: ShardStream, shape: BatchShape) -> list[TrainingRow]:
    """Consume the next micro-batch's rows from the stream (fewer, or none, at its end)."""
    taken: list[TrainingRow] = []
    longest = 0
    while (row := stream.peek()) is not None:
        row = fit_row(row, shape.max_length)
        if shape.rows is not None and len(taken) == shape.rows:
            break
        too_long = (
            shape.batch_tokens is not None
            and (len(taken) + 1) * max(longest, row.length) > shape.batch_tokens
        )
        if taken and too_long:
            break
        stream.take()
        if shape.teacher_top_k is not None:
            row = keep_top_entries(row, shape.teacher_top_k)
        taken.append(row)
        longest = max(longest, row.length)
    return taken
