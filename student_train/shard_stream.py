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

Following a dump in progress (student-train --follow), step 1 of epoch 0 cannot permute row
groups that are not written yet. Epoch 0 therefore takes the row groups in publication order
(the order shards entered the manifest, which only grows), closes a window as soon as it holds
`shuffle_buffer` rows (the last one when the manifest says complete), and shuffles within each
window as above. Windows, their first rows' indices in the epoch and so the rank partition are
then a function of the publication order alone, whatever moment each rank reads the manifest;
a rank that reaches a window not yet closed waits (`DumpFollower`). Later epochs start only
once the dump is complete and are permuted over all row groups as without --follow. The
position stays (epoch, window, offset), so resuming a followed run waits, if needed, for the
window it stopped in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kd_shards.schemas.manifest import MANIFEST_NAME, is_classify, storage_of_manifest
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import (
    TRAINING_COLUMNS,
    Dump,
    RowGroup,
    TrainingRow,
    decode_row_group,
    id_space,
    open_dump,
    refresh_dump,
)
from kd_shards.shared.storage import as_folder


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


def followed_windows(
    row_groups: tuple[RowGroup, ...], *, complete: bool, buffer_rows: int
) -> list[tuple[list[RowGroup], int]]:
    """Epoch 0 of a followed dump: the closed windows of the row groups published so far, in
    publication order (a last window short of `buffer_rows` closes only once complete)."""
    windows = epoch_windows(row_groups, seed=0, epoch=0, shuffle=False, buffer_rows=buffer_rows)
    if windows and not complete and sum(group.rows for group in windows[-1][0]) < buffer_rows:
        windows.pop()
    return windows


class DumpFollower:
    """A dump being written: re-reads its manifest every `poll_seconds` while a reader waits for
    more shards, and gives up after `timeout_seconds` without a new shard (None: never)."""

    def __init__(
        self,
        dump: Dump,
        *,
        poll_seconds: float,
        timeout_seconds: float | None,
        announce: bool = True,
        flag: str = "--shards",
    ):
        self.dump = dump
        self.poll_seconds, self.timeout_seconds = poll_seconds, timeout_seconds
        self.announce, self.flag = announce, flag
        self.waited_seconds = 0.0
        """Time spent waiting for shards so far (in this process)."""
        self._last_growth = time.monotonic()

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        poll_seconds: float,
        timeout_seconds: float | None,
        announce: bool = True,
        flag: str = "--shards",
    ) -> DumpFollower:
        """Open a dump to follow, waiting for its manifest if teacher-dump has not written it
        yet (a trainer may be started before the dump)."""
        started = time.monotonic()
        folder, told = as_folder(directory), False
        while not (folder.exists() and folder.is_file(MANIFEST_NAME)):
            # teacher-dump has not written its manifest yet (a trainer may start first).
            if timeout_seconds is not None and time.monotonic() - started >= timeout_seconds:
                raise UserError(
                    f"--follow: {directory} has no {MANIFEST_NAME} after {timeout_seconds:.0f} s: "
                    "start its teacher-dump, or check --shards"
                )
            if announce and not told:
                print(f"--follow: waiting for {directory}/{MANIFEST_NAME}", file=sys.stderr)
                told = True
            time.sleep(poll_seconds)
        dump = open_dump(directory, flag=flag, follow=True)
        follower = cls(
            dump,
            poll_seconds=poll_seconds,
            timeout_seconds=timeout_seconds,
            announce=announce,
            flag=flag,
        )
        follower.waited_seconds = time.monotonic() - started
        return follower

    def wait(self) -> Dump:
        """Sleep one poll interval and re-read the manifest; the dump as it now stands."""
        idle = time.monotonic() - self._last_growth
        if self.timeout_seconds is not None and idle >= self.timeout_seconds:
            totals = self.dump.manifest.get("totals", {})
            expected = self.dump.manifest.get("data", {}).get("expected_rows", "?")
            raise UserError(
                f"--follow: no new shard in {self.flag} {self.dump.directory} for "
                f"{idle:.0f} s ({totals.get('rows', 0)} of {expected} rows published): check "
                "that its teacher-dump is running, then rerun with --resume (raise "
                "--set follow_timeout=SECONDS to wait longer)"
            )
        started = time.monotonic()
        time.sleep(self.poll_seconds)
        before = (len(self.dump.row_groups), self.dump.complete)
        self.dump = refresh_dump(self.dump, self.flag)
        if (len(self.dump.row_groups), self.dump.complete) != before:
            self._last_growth = time.monotonic()
        self.waited_seconds += time.monotonic() - started
        return self.dump


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
        follower: DumpFollower | None = None,
    ):
        """`read_group(group, columns)` reads one row group; by default from the dump's
        Parquet shards (a labels-only classification dataset passes rows held in memory).
        With a `follower` the dump is one being written (`dump` is ignored): epoch 0 follows its
        publication order and waits for shards (see the module's docstring)."""
        self.follower = follower
        dump = follower.dump if follower is not None else dump
        self.dump = dump
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.buffer_rows = seed, shuffle, buffer_rows
        self.epochs = epochs
        self.columns = columns
        top_k, vocabulary = int(dump.manifest["top_k"]), id_space(dump.manifest)
        classify = is_classify(dump.manifest)
        storage = storage_of_manifest(dump.manifest)
        self.verify = verify
        """Check each shard's checksum before its first row (off only to plan step counts)."""
        # self.verify is read at each call, so a stream can be switched to planning after it
        # is built.
        self.read_group = read_group or (
            lambda group, columns: decode_row_group(
                group, columns, top_k, vocabulary, classify, storage=storage, verify=self.verify
            )
        )
        self._position = position
        self._windows: list[tuple[list[RowGroup], int]] | None = None
        self._windows_key: tuple | None = None
        self._rows: list[TrainingRow] | None = None

    @property
    def position(self) -> StreamPosition:
        return self._position

    def _epoch_windows(self, epoch: int) -> list[tuple[list[RowGroup], int]]:
        followed_epoch = self.follower is not None and epoch == 0
        key = (epoch, len(self.dump.row_groups), self.dump.complete)
        if self._windows_key != key:
            if followed_epoch:
                self._windows = followed_windows(
                    self.dump.row_groups, complete=self.dump.complete, buffer_rows=self.buffer_rows
                )
            else:
                self._windows = epoch_windows(
                    self.dump.row_groups,
                    seed=self.seed,
                    epoch=epoch,
                    shuffle=self.shuffle,
                    buffer_rows=self.buffer_rows,
                )
            self._windows_key = key
        return self._windows

    def _windows_for(self, position: StreamPosition) -> list[tuple[list[RowGroup], int]]:
        """The windows of the position's epoch, once they are known as far as the position
        (following a dump: waits for its window to close, or for a later epoch, for the whole
        dump to be complete)."""
        while True:
            windows = self._epoch_windows(position.epoch)
            if self.follower is not None and self.dump.complete and not self.dump.row_groups:
                raise UserError(
                    f"--follow: {self.dump.directory} is complete and holds no rows: dump some "
                    "data first"
                )
            if self.follower is None or self.dump.complete:
                return windows
            if position.epoch == 0 and position.window < len(windows):
                return windows
            self.dump = self.follower.wait()

    def _load_window(self) -> None:
        """Decode the window the position is in and keep this rank's share of it."""
        position = self._position
        groups, start = self._windows_for(position)[position.window]
        rows = [row for group in groups for row in self.read_group(group, self.columns)]
        if self.shuffle:
            order = np.random.default_rng([self.seed, position.epoch, position.window]).permutation(
                len(rows)
            )
            rows = [rows[index] for index in order]
        first = (self.rank - start) % self.world_size
        self._rows = rows[first :: self.world_size]

    def peek(self) -> TrainingRow | None:
        """The next row, or None when the stream has ended (finite epochs only). Following a
        dump, it waits while the next row is not published yet."""
        while True:
            position = self._position
            if self.epochs is not None and position.epoch >= self.epochs:
                return None
            if position.window >= len(self._windows_for(position)):
                self._position = StreamPosition(position.epoch + 1, 0, 0)  # the epoch is over
                self._rows = None
                continue
            if self._rows is None:
                self._load_window()
            if position.offset < len(self._rows):
                return self._rows[position.offset]
            self._position = StreamPosition(position.epoch, position.window + 1, 0)
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
