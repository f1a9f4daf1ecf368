"""Writing shards atomically and keeping the manifest in step with what is on disk.

Several independent processes (ranks) may write into one directory. Each writes only shards
named after its own rank, each shard atomically (temp + fsync + rename). The manifest is
rebuilt under a directory lock from the shards actually on disk, so it always covers every rank
and a crash between a shard's rename and the manifest update is repaired by the next refresh.
Resume reads back which prompts (source indices) the existing shards already hold.

The directory may also be a folder in object storage (shared/storage.py): a shard is then
written in one request under its final name once complete, and published by the manifest;
there are no locks there (what holds instead is stated in shared/storage.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import (
    MANIFEST_NAME,
    SHARD_SUFFIX,
    inside_directory,
    is_safe_shard_name,
    totals,
)
from kd_shards.schemas.shard import (
    HIDDEN_COLUMN,
    MASK_POSITIONS_COLUMN,
    PAIR_COLUMN,
    PARQUET_WRITE_OPTIONS_V1,
    TOKEN_HIDDEN_COLUMN,
    Storage,
    classify_schema,
    masked_lm_schema,
    parquet_write_options,
    shard_schema,
)
from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import (
    atomic_write,
    directory_lock,
    hold_lock,
    sha256_of_file,
)
from kd_shards.shared.storage import Folder, as_folder, parquet_bytes
from kd_shards.teacher_dump.encoding import shard_columns
from kd_shards.teacher_dump.rows import ENTRY_COLUMNS, ShardRow, encoded_row

ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: the unit the training loader reads at a time."""

SHARD_NAME = re.compile(r"^part-r(\d+)-w(\d+)-(\d+)\.parquet$")


WRITER_LOCK = re.compile(r"^\.writer-r(\d+)-w(\d+)\.lock$")


@contextlib.contextmanager
def exclusive_writer(directory: Path | Folder, rank: int, world_size: int) -> Iterator[None]:
    """Hold this rank's writer lock for the whole run.

    Refuses to start while another process writes the same rank, or any rank of another
    --world-size, into the directory: their prompts overlap, so both would write the same
    samples. The lock is a file lock: the kernel releases it when its process ends, even by
    kill -9, so a rerun after a crash is never refused. Object storage has no locks: there
    nothing is checked (one process per rank is the scheduler's promise)."""
    folder = as_folder(directory)
    if not folder.is_local:
        yield
        return
    directory = folder.local
    with directory_lock(directory):
        for path in sorted(directory.glob(".writer-r*-w*.lock")):
            match = WRITER_LOCK.match(path.name)
            if match is None or int(match.group(2)) == world_size:
                continue
            probe = hold_lock(path)
            if probe is None:
                raise UserError(
                    f"--out {directory}: a teacher-dump with --world-size {int(match.group(2))} "
                    "is writing there, and ranks of different world sizes would dump the same "
                    "prompts twice: wait for it to finish, or use the same --world-size"
                )
            probe.close()
        handle = hold_lock(directory / f".writer-r{rank}-w{world_size}.lock")
        if handle is None:
            raise UserError(
                f"--out {directory}: another teacher-dump with --rank {rank} --world-size "
                f"{world_size} is writing there, and two would write every sample twice: wait "
                "for it to finish, or give each process its own --rank"
            )
    try:
        yield
    finally:
        handle.close()


def shard_name(rank: int, world_size: int, sequence: int) -> str:
    return f"part-r{rank:05d}-w{world_size:05d}-{sequence:06d}{SHARD_SUFFIX}"


def shards_on_disk(directory: Path | Folder) -> list[str]:
    """Names of the complete shards in `directory` (temporaries and other files excluded),
    sorted."""
    return [name for name in as_folder(directory).names(SHARD_SUFFIX) if is_safe_shard_name(name)]


PADDED_KEY = b"kd_shards.padded_entries"
"""Parquet footer key: how many engine entries of the shard were padding-row ids (left out)."""


def flat_list(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list column with one list per array (whole-array copies, no per-value Python)."""
    lengths = np.fromiter((len(array) for array in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.array([])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def nested_list(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<list> column from (T, K) arrays, one per row (schema v1's top-k layout)."""
    width = arrays[0].shape[1] if arrays else 0
    positions = np.fromiter((array.shape[0] for array in arrays), dtype=np.int64, count=len(arrays))
    outer = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
    inner = (np.arange(int(positions.sum()) + 1, dtype=np.int64) * width).astype(np.int32)
    values = np.concatenate([array.reshape(-1) for array in arrays]) if arrays else np.array([])
    inner_lists = pa.ListArray.from_arrays(pa.array(inner), pa.array(values, type=value_type))
    return pa.ListArray.from_arrays(pa.array(outer), inner_lists)


def row_columns(rows: list[ShardRow]) -> dict[str, pa.Array]:
    """The columns every token row has, whatever the storage (schemas/shard.py)."""
    return {
        "sample_id": pa.array([row.sample_id for row in rows], pa.string()),
        "source_index": pa.array([row.source_index for row in rows], pa.int64()),
        "completion_index": pa.array([row.completion_index for row in rows], pa.int32()),
        "prompt_ids": flat_list([row.prompt_ids for row in rows], pa.int32()),
        "target_ids": flat_list([row.target_ids for row in rows], pa.int32()),
        "target_logprobs": flat_list([row.target_logprobs for row in rows], pa.float32()),
        "finish_reason": pa.array([row.finish_reason for row in rows], pa.string()),
        "prompt_text": pa.array([row.prompt_text for row in rows], pa.string()),
        "target_text": pa.array([row.target_text for row in rows], pa.string()),
        "references": pa.array([list(row.references) for row in rows], pa.list_(pa.string())),
    }


def rows_to_table(
    rows: list[ShardRow], storage: Storage | None, vocabulary: int
) -> tuple[pa.Table, dict[bytes, bytes]]:
    """An Arrow table in the dump's schema, and the shard's footer metadata (the codebook and
    the padding count), from rows (teacher_dump.encoding finishes the distribution columns).

    `storage` None: a classify dump (schema v1 layout, classify_table)."""
    distributions, footer = (
        shard_columns([row.entries for row in rows], storage, vocabulary)
        if storage is not None
        else ({}, {})
    )
    columns = row_columns(rows)
    if storage is None:
        return classify_table(rows, columns), footer
    for name, arrays in distributions.items():
        columns[name] = flat_list(arrays, pa.int32())
    footer[PADDED_KEY] = str(sum(row.padded_topk_entries for row in rows)).encode()
    schema = shard_schema(storage)
    if rows and rows[0].mask_positions is not None:
        with_hidden = rows[0].token_hidden is not None
        schema = masked_lm_schema(storage, with_hidden)
        columns[MASK_POSITIONS_COLUMN] = flat_list([row.mask_positions for row in rows], pa.int32())
        if with_hidden:
            flat_hidden = [row.token_hidden.reshape(-1) for row in rows]
            columns[TOKEN_HIDDEN_COLUMN] = flat_list(flat_hidden, pa.float16())
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema), footer


def rows_to_transfer_table(rows: list[ShardRow], storage: Storage, vocabulary: int) -> pa.Table:
    """Token rows as an Arrow table to cross a process boundary (teacher_dump.rows
    .rows_from_table is the inverse): the row columns, each row's RowEntries before the
    shard-level coding (ENTRY_COLUMNS; rows still holding the engine's entries are encoded
    first, as `storage` says) and its padding count. Not a shard."""
    rows = [encoded_row(row, storage, vocabulary) for row in rows]
    columns = {
        **row_columns(rows),
        "padded_topk_entries": pa.array([row.padded_topk_entries for row in rows], pa.int64()),
    }
    for name, field in zip(ENTRY_COLUMNS, ("counts", "ids", "values", "tail"), strict=True):
        columns[name] = flat_list([getattr(row.entries, field) for row in rows], pa.int32())
    return pa.table(columns)


def classify_table(rows: list[ShardRow], columns: dict[str, pa.Array]) -> pa.Table:
    """A classify shard's table: schema v1 (schemas.shard.CLASSIFY_SCHEMA_VERSION), every
    label's logprob at the one position of each row, the pooled hidden state and a sentence
    pair's second text when present."""
    columns = {
        **columns,
        "topk_ids": nested_list([row.topk_ids for row in rows], pa.int32()),
        "topk_logprobs": nested_list([row.topk_logprobs for row in rows], pa.float32()),
    }
    with_hidden = bool(rows) and rows[0].hidden is not None
    if with_hidden:
        columns[HIDDEN_COLUMN] = flat_list([row.hidden for row in rows], pa.float16())
    with_pair = bool(rows) and rows[0].text_pair is not None
    if with_pair:
        columns[PAIR_COLUMN] = pa.array([row.text_pair for row in rows], pa.string())
    schema = classify_schema(with_hidden, with_pair)
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def write_table(sink, table: pa.Table, footer: dict[bytes, bytes], storage: Storage | None) -> None:
    """Write a table as one Parquet file (row groups of ROW_GROUP_ROWS), footer keys once; `sink`
    is a path or a writable file."""
    options = parquet_write_options(storage) if storage is not None else PARQUET_WRITE_OPTIONS_V1
    with pq.ParquetWriter(sink, table.schema, **options) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        if footer:
            writer.add_key_value_metadata(footer)


def write_shard(
    path: Path | str,
    rows: list[ShardRow],
    storage: Storage | None,
    vocabulary: int,
    folder: Folder | None = None,
) -> dict:
    """Write rows as one Parquet shard (locally: atomically at `path`; into an object-storage
    `folder`: as the object named `path`, in one request once complete); return its manifest
    entry. `storage` None: a classify dump (schema v1 layout)."""
    table, footer = rows_to_table(rows, storage, vocabulary)

    def write(sink) -> None:
        write_table(sink, table, footer, storage)

    if folder is not None and not folder.is_local:
        data = parquet_bytes(write)
        name = str(path).rsplit("/", 1)[-1]
        folder.write_bytes(name, data)
        size, digest = len(data), hashlib.sha256(data).hexdigest()
    else:
        path = Path(path)
        atomic_write(path, write)
        name, size, digest = path.name, path.stat().st_size, sha256_of_file(path)
    return {
        "name": name,
        "rows": len(rows),
        "target_tokens": int(sum(len(row.target_ids) for row in rows)),
        "bytes": size,
        "sha256": digest,
        "padded_topk_entries": int(sum(row.padded_topk_entries for row in rows)),
    }


def describe_shard(path: Path | str, folder: Folder | None = None) -> dict:
    """The manifest entry of a shard already written (reads it): a local path, or the name of
    an object in an object-storage `folder`."""
    remote = folder is not None and not folder.is_local
    if not remote:
        path = inside_directory(Path(path).parent, Path(path).name)
    name = str(path).rsplit("/", 1)[-1] if remote else path.name
    try:
        if remote:
            with folder.open(name) as handle:
                parquet = pq.ParquetFile(handle)
                lengths = parquet.read(columns=["target_ids"])["target_ids"]
        else:
            parquet = pq.ParquetFile(path)
            lengths = parquet.read(columns=["target_ids"])["target_ids"]
        padded = (parquet.metadata.metadata or {}).get(PADDED_KEY, b"0")
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise UserError(
            f"shard {name} is unreadable ({one_line(error, 120)}): delete it and rerun the same "
            "teacher-dump command to redo its samples"
        ) from None
    return {
        "name": name,
        "rows": parquet.metadata.num_rows,
        "target_tokens": int(pc.sum(pc.list_value_length(lengths)).as_py() or 0),
        "bytes": folder.size(name) if remote else path.stat().st_size,
        "sha256": folder.sha256(name) if remote else sha256_of_file(path),
        "padded_topk_entries": int(padded),
    }


def done_source_indices(directory: Path | Folder) -> set[int]:
    """Source indices of the prompts whose rows are already in complete shards."""
    folder = as_folder(directory)
    done: set[int] = set()
    for name in shards_on_disk(folder):
        try:
            if folder.is_local:
                source = inside_directory(folder.local, name)
                column = pq.read_table(source, columns=["source_index"])["source_index"]
            else:
                with folder.open(name) as handle:
                    column = pq.read_table(handle, columns=["source_index"])["source_index"]
        except UserError:
            raise
        except Exception as error:
            raise UserError(
                f"shard {name} is unreadable ({one_line(error, 120)}): delete it and rerun the "
                "same teacher-dump command to redo its samples"
            ) from None
        done.update(column.to_numpy().tolist())
    return done


def next_sequence(directory: Path | Folder, rank: int, world_size: int) -> int:
    """The next free shard sequence number for this (rank, world size)."""
    sequences = [
        int(match.group(3))
        for name in shards_on_disk(directory)
        if (match := SHARD_NAME.match(name))
        and int(match.group(1)) == rank
        and int(match.group(2)) == world_size
    ]
    return max(sequences, default=-1) + 1


def refresh_manifest(directory: Path | Folder, new_entries: list[dict]) -> dict:
    """Rebuild the manifest's shard list from disk (under the directory lock) and save it.

    Entries already in the manifest are kept when the file's size still matches; `new_entries`
    (just written by this process) are taken as given; any other shard on disk (written by a
    rank that has not refreshed yet) is described by reading it.

    Every entry carries `published`: the order in which shards entered the manifest (0, 1, ...;
    shards that enter in one refresh are numbered in name order). The list itself stays sorted
    by name, so a rank's new shard can land between older ones; a reader that follows a dump in
    progress (student-train --follow) reads shards in `published` order, which only grows.
    """
    folder = as_folder(directory)
    with folder.lock():
        manifest = json.loads(folder.read_text(MANIFEST_NAME))
        known = {entry["name"]: entry for entry in manifest["shards"]}
        published = {name: entry.get("published") for name, entry in known.items()}
        known.update({entry["name"]: entry for entry in new_entries})
        shards = []
        for name in shards_on_disk(folder):
            entry = known.get(name)
            if entry is None or entry["bytes"] != folder.size(name):
                entry = describe_shard(folder.location_of(name), folder)
            shards.append(entry)
        manifest["shards"] = number_publications(shards, published)
        manifest["totals"] = totals(shards)
        if "filter" in manifest:
            count_filtered(manifest, folder)
        else:
            manifest["complete"] = manifest["totals"]["rows"] == manifest["data"]["expected_rows"]
        manifest["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        folder.write_json(MANIFEST_NAME, manifest)
        return manifest


def count_filtered(manifest: dict, folder: Folder) -> None:
    """A filtered dump's counts (teacher_dump.filters), in place: the prompts done are those
    with rows in a shard or listed in none_kept; each generated samples_per_prompt samples and
    kept its rows. Complete once every prompt is done, and then expected_rows is the rows kept."""
    section = manifest["filter"]
    done = done_source_indices(folder) | set(section["none_kept"])
    section["prompts_done"] = len(done)
    section["generated"] = len(done) * section["samples_per_prompt"]
    section["kept"] = manifest["totals"]["rows"]
    manifest["complete"] = len(done) == manifest["data"]["prompts"]
    manifest["data"]["expected_rows"] = manifest["totals"]["rows"] if manifest["complete"] else None


def update_manifest(directory: Folder, change) -> None:
    """Apply `change` (a function that edits the manifest in place) under the lock; write the
    manifest only where it changed."""
    with directory.lock():
        manifest = json.loads(directory.read_text(MANIFEST_NAME))
        before = copy.deepcopy(manifest)
        change(manifest)
        if manifest != before:
            directory.write_json(MANIFEST_NAME, manifest)


def number_publications(shards: list[dict], published: dict[str, int | None]) -> list[dict]:
    """`shards` with each entry's `published` number: the one it had (`published`, by name),
    else the next free number, given in list order (a name keeps its number for good)."""
    numbers = [value for value in published.values() if isinstance(value, int)]
    next_number = max(numbers, default=-1) + 1
    numbered = []
    for entry in shards:
        number = published.get(entry["name"])
        if not isinstance(number, int):
            number, next_number = next_number, next_number + 1
        numbered.append({**entry, "published": number})
    return numbered


class ShardWriter:
    """Buffers rows and writes them as numbered shards of this rank; refreshes the manifest."""

    def __init__(
        self,
        directory: Path | Folder,
        rank: int,
        world_size: int,
        rows_per_shard: int,
        storage: Storage | None = None,
        vocabulary: int = 0,
    ):
        """`storage` None: a classify dump, written in the schema-v1 layout."""
        self.folder = as_folder(directory)
        self.storage = storage
        self.vocabulary = vocabulary
        self.rank = rank
        self.world_size = world_size
        self.rows_per_shard = rows_per_shard
        self.sequence = next_sequence(self.folder, rank, world_size)
        self.buffer: list[ShardRow] = []

    def add_prompt_rows(self, rows: list[ShardRow]) -> None:
        """Add all rows of one prompt; shards only break between prompts, so resume is per prompt.
        Rows still holding the engine's entries are encoded here (the buffer holds only what
        is stored)."""
        self.buffer.extend(encoded_row(row, self.storage, self.vocabulary) for row in rows)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> dict | None:
        if not self.buffer:
            return None
        name = shard_name(self.rank, self.world_size, self.sequence)
        entry = write_shard(
            self.folder.location_of(name), self.buffer, self.storage, self.vocabulary, self.folder
        )
        self.sequence += 1
        self.buffer = []
        refresh_manifest(self.folder, [entry])
        return entry
