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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from schemas.manifest import read_manifest
from schemas.shard import PAD_ID, SCHEMA_VERSION, describe_schema_mismatch, schema_version_of
from shared.errors import UserError

TRAINING_COLUMNS = ("sample_id", "prompt_ids", "target_ids", "topk_ids", "topk_logprobs")
LENGTH_COLUMNS = ("sample_id", "prompt_ids", "target_ids")
"""Enough to plan batches (count steps) without decoding the top-k."""


@dataclass(frozen=True)
class TrainingRow:
    """One shard row as the trainer needs it (numpy views into the decoded row group)."""

    sample_id: str
    prompt_ids: np.ndarray
    """(P,) int32."""
    target_ids: np.ndarray
    """(T,) int32."""
    topk_ids: np.ndarray | None
    """(T, K) int32, PAD_ID in freed slots; None when only lengths were read."""
    topk_logprobs: np.ndarray | None
    """(T, K) float32, -inf in freed slots; None when only lengths were read."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


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


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int
    rows: int


@dataclass(frozen=True)
class Dump:
    """An opened teacher-dump directory: its manifest and every row group, in manifest order."""

    directory: Path
    manifest: dict
    row_groups: tuple[RowGroup, ...]

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.row_groups)


def open_dump(
    directory: Path | str, *, allow_incomplete: bool = False, flag: str = "--shards"
) -> Dump:
    """Read a dump's manifest and its shards' footers, refusing anything inconsistent.

    Only metadata is read here (fast); row contents are checked as they stream. A full check of
    every byte is `teacher-dump inspect DIR --validate`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"{flag} {directory}: no such directory; pass a teacher-dump --out directory"
        )
    manifest = read_manifest(directory)
    if not manifest.get("complete") and not allow_incomplete:
        totals = manifest.get("totals", {})
        raise UserError(
            f"{flag} {directory}: the dump is incomplete ({totals.get('rows', 0)} of "
            f"{manifest.get('data', {}).get('expected_rows', '?')} rows): rerun its teacher-dump "
            "command to finish it, or pass --set allow_incomplete=true to train on what is there"
        )
    row_groups: list[RowGroup] = []
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        if not path.is_file():
            raise UserError(
                f"{flag} {directory}: shard {entry['name']} is listed in the manifest but missing: "
                "rerun the teacher-dump command to rewrite it"
            )
        if path.stat().st_size != entry["bytes"]:
            raise UserError(
                f"{flag} {directory}: shard {entry['name']} has {path.stat().st_size} bytes, the "
                f"manifest says {entry['bytes']} (truncated or replaced): delete it and rerun the "
                "teacher-dump command"
            )
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:
            raise UserError(
                f"{flag} {directory}: shard {entry['name']} is not readable Parquet "
                f"({str(error)[:100]}): delete it and rerun the teacher-dump command"
            ) from None
        schema = metadata.schema.to_arrow_schema()
        version = schema_version_of(schema)
        mismatch = describe_schema_mismatch(schema)
        if version != SCHEMA_VERSION or mismatch:
            raise UserError(
                f"{flag} {directory}: shard {entry['name']} has schema version {version} "
                f"({mismatch or 'columns ok'}), this kd-shards reads version {SCHEMA_VERSION}: "
                "redo the dump with this release"
            )
        if metadata.num_rows != entry["rows"]:
            raise UserError(
                f"{flag} {directory}: shard {entry['name']} holds {metadata.num_rows} rows, the "
                f"manifest says {entry['rows']}: rerun the teacher-dump command to refresh it"
            )
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:
                row_groups.append(RowGroup(path, index, rows))
    if not row_groups:
        raise UserError(
            f"{flag} {directory}: the dump holds no rows; run teacher-dump with data first"
        )
    return Dump(directory, manifest, tuple(row_groups))


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


def decode_row_group(
    group: RowGroup, columns: tuple[str, ...], top_k: int, vocabulary: int
) -> list[TrainingRow]:
    """Read one row group into TrainingRows, checking what would silently corrupt training."""
    try:
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=list(columns))
    except Exception as error:
        raise UserError(
            f"shard {group.path.name} row group {group.index} is unreadable ({str(error)[:100]}): "
            "check it with teacher-dump inspect --validate and rerun the dump"
        ) from None
    sample_ids = table["sample_id"].to_pylist()

    def flat(column: str) -> tuple[np.ndarray, np.ndarray]:
        array = table[column].combine_chunks()
        return array.flatten().to_numpy(zero_copy_only=False), array.offsets.to_numpy()

    prompt_values, prompt_offsets = flat("prompt_ids")
    target_values, target_offsets = flat("target_ids")
    if ((target_values < 0) | (target_values >= vocabulary)).any():
        raise UserError(
            f"shard {group.path.name}: target ids outside [0, {vocabulary}): the shard does not "
            "match its manifest; run teacher-dump inspect --validate"
        )
    topk_ids = topk_logprobs = None
    if "topk_ids" in columns:
        ids_positions = table["topk_ids"].combine_chunks()
        logprob_positions = table["topk_logprobs"].combine_chunks()
        positions = len(target_values)
        topk_ids = ids_positions.flatten().flatten().to_numpy(zero_copy_only=False)
        topk_logprobs = logprob_positions.flatten().flatten().to_numpy(zero_copy_only=False)
        if len(ids_positions.flatten()) != positions or topk_ids.size != positions * top_k:
            raise UserError(
                f"shard {group.path.name}: top-k lists do not have {top_k} entries at each of "
                "the target positions; run teacher-dump inspect --validate"
            )
        topk_ids = topk_ids.reshape(positions, top_k)
        topk_logprobs = topk_logprobs.reshape(positions, top_k)
        bad_ids = ((topk_ids < 0) & (topk_ids != PAD_ID)) | (topk_ids >= vocabulary)
        bad_logprobs = np.isnan(topk_logprobs) | (topk_logprobs > 0) | np.isposinf(topk_logprobs)
        if bad_ids.any() or bad_logprobs.any():
            raise UserError(
                f"shard {group.path.name}: top-k ids outside the vocabulary or NaN/positive "
                "logprobs; run teacher-dump inspect --validate and redo the dump"
            )
    rows = []
    for row, sample_id in enumerate(sample_ids):
        first, last = target_offsets[row], target_offsets[row + 1]
        rows.append(
            TrainingRow(
                sample_id=sample_id,
                prompt_ids=prompt_values[prompt_offsets[row] : prompt_offsets[row + 1]],
                target_ids=target_values[first:last],
                topk_ids=None if topk_ids is None else topk_ids[first:last],
                topk_logprobs=None if topk_logprobs is None else topk_logprobs[first:last],
            )
        )
    return rows


class ShardStream:
    """One rank's stream of TrainingRows over a dump, with a resumable position.

    `peek()` shows the next row without consuming it, `take()` consumes it, `position` is where
    the stream stands (save it; pass it back as `position=` to continue from there). With
    `epochs=None` the stream cycles forever; otherwise it ends after that many epochs.
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
    ):
        self.dump = dump
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.buffer_rows = seed, shuffle, buffer_rows
        self.epochs = epochs
        self.columns = columns
        self.top_k = int(dump.manifest["top_k"])
        self.vocabulary = int(dump.manifest["tokenizer"]["size"])
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
        rows = [
            row
            for group in groups
            for row in decode_row_group(group, self.columns, self.top_k, self.vocabulary)
        ]
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
