"""Streaming teacher-dump shards into training rows: bounded memory, deterministic, rank-sharded
and resumable.

The unit of reading is a Parquet row group (teacher-dump writes 256 rows per group). Each epoch:
1. all row groups of the dump are put in an order (a permutation seeded by (seed, epoch), or
   file order without shuffling);
2. consecutive row groups are grouped into windows of at least `shuffle_buffer` rows;
3. a window is read, its rows are permuted (seeded by (seed, epoch, window)), and rank r keeps
   the rows whose index in the epoch is congruent to r modulo world_size.
So memory is one window, every rank sees a disjoint part of each epoch whose union is the whole
dump (rank row counts differ by at most one), and the stream is a pure function of
(seed, epoch, window, offset). That triple is the position saved in checkpoints: resuming reads
the one window the position is in and skips to the offset, without replaying the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from schemas.manifest import is_classify
from shared.shard_reader import (
    TRAINING_COLUMNS,
    Dump,
    RowGroup,
    TrainingRow,
    decode_row_group,
    id_space,
)


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream stands: the next row is row `offset` of this rank's share of
    window `window` of epoch `epoch`."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset}

    @classmethod
    def from_dict(cls, values: dict) -> StreamPosition:
        return cls(int(values["epoch"]), int(values["window"]), int(values["offset"]))


def epoch_windows(
    row_groups: tuple[RowGroup, ...], *, seed: int, epoch: int, shuffle: bool, buffer_rows: int
) -> list[tuple[list[RowGroup], int]]:
    """The epoch's windows: (row groups, index in the epoch of the window's first row)."""
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(row_groups))
        if shuffle
        else np.arange(len(row_groups))
    )
    windows: list[tuple[list[RowGroup], int]] = []
    current: list[RowGroup] = []
    current_rows, start = 0, 0
    for index in order:
        current.append(row_groups[index])
        current_rows += row_groups[index].rows
        if current_rows >= buffer_rows:
            windows.append((current, start))
            start += current_rows
            current, current_rows = [], 0
    if current:
        windows.append((current, start))
    return windows


class ShardStream:
    """One rank's stream of TrainingRows over a dump, with a resumable position.

    `peek()` shows the next row without consuming it, `take()` consumes it, `position` is where
    the stream stands (save it; pass it back as `position=` to continue from there). With
    `epochs=None` the stream cycles forever; otherwise it ends after that many epochs. With
    `verify` (the default) each shard's checksum is checked the first time the process reads it,
    before any of its rows is returned.
    """

    def __init__(
        self,
        dump: Dump,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 1024,
        epochs: int | None = None,
        columns: tuple[str, ...] = TRAINING_COLUMNS,
        position: StreamPosition = StreamPosition(),
        read_group: Callable[[RowGroup, tuple[str, ...]], list[TrainingRow]] | None = None,
        verify: bool = True,
    ):
        """`read_group(group, columns)` reads one row group; by default from the dump's
        Parquet shards (a labels-only classification dataset passes rows held in memory)."""
        self.dump = dump
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.buffer_rows = seed, shuffle, buffer_rows
        self.epochs = epochs
        self.columns = columns
        top_k, vocabulary = int(dump.manifest["top_k"]), id_space(dump.manifest)
        classify = is_classify(dump.manifest)
        self.verify = verify
        self.read_group = read_group or (
            lambda group, columns: decode_row_group(
                group, columns, top_k, vocabulary, classify, verify=self.verify
            )
        )
        self._position = position
        self._windows: list[tuple[list[RowGroup], int]] | None = None
        self._windows_epoch = -1
        self._rows: list[TrainingRow] | None = None

    @property
    def position(self) -> StreamPosition:
        return self._position

    def _epoch_windows(self, epoch: int) -> list[tuple[list[RowGroup], int]]:
        if self._windows_epoch != epoch:
            self._windows = epoch_windows(
                self.dump.row_groups,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                buffer_rows=self.buffer_rows,
            )
            self._windows_epoch = epoch
        return self._windows

    def _load_window(self) -> None:
        """Decode the window the position is in and keep this rank's share of it."""
        position = self._position
        groups, start = self._epoch_windows(position.epoch)[position.window]
        rows = [row for group in groups for row in self.read_group(group, self.columns)]
        if self.shuffle:
            order = np.random.default_rng([self.seed, position.epoch, position.window]).permutation(
                len(rows)
            )
            rows = [rows[index] for index in order]
        first = (self.rank - start) % self.world_size
        self._rows = rows[first :: self.world_size]

    def peek(self) -> TrainingRow | None:
        """The next row, or None when the stream has ended (finite epochs only)."""
        while True:
            position = self._position
            if self.epochs is not None and position.epoch >= self.epochs:
                return None
            if self._rows is None:
                self._load_window()
            if position.offset < len(self._rows):
                return self._rows[position.offset]
            window_count = len(self._epoch_windows(position.epoch))
            if position.window + 1 < window_count:
                self._position = StreamPosition(position.epoch, position.window + 1, 0)
            else:
                self._position = StreamPosition(position.epoch + 1, 0, 0)
            self._rows = None

    def take(self) -> TrainingRow | None:
        """Consume and return the next row (None at the end)."""
        row = self.peek()
        if row is not None:
            position = self._position
            self._position = StreamPosition(position.epoch, position.window, position.offset + 1)
        return row

    def __iter__(self):
        while (row := self.take()) is not None:
            yield row

    @property
    def held_rows(self) -> int:
        """Rows of the current window held in memory (bounded by the shuffle buffer)."""
        return 0 if self._rows is None else len(self._rows)
