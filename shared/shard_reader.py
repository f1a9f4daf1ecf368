"""Reading teacher-dump output: the one place that opens shards and checks their contents.

Every reader goes through here: student-train's stream, the fidelity evaluation of student-train
and kd-eval, and `teacher-dump inspect --validate`. `open_dump` checks the manifest against the
shards' footers (cheap); `decode_row_group` reads one row group and refuses any value that would
silently corrupt training, with one line naming the shard and what to do.

Schema versions 1 and 2 are read. Whatever the representation (schemas.shard), a row reaches the
trainer as (T, K) teacher ids and logprobs in rank order (PAD_ID / -inf after the real entries)
plus, where the representation stores one, the exact log tail mass (shared.shard_codec decodes).

Checksums: a dump can be terabytes, so nothing hashes it at start-up. Instead the first time a
process reads a row group of a shard, the whole shard is hashed and compared with the
manifest's sha256 (and its target-token count), before any of its rows is returned. The result
is remembered per process together with the file's size and modification time, so each shard
is hashed once per process, and a file changed afterwards is checked again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import (
    MANIFEST_NAME,
    classify_labels,
    corrupt_manifest,
    inside_directory,
    is_classify,
    manifest_path,
    missing_manifest_message,
    parse_manifest,
    storage_of_manifest,
)
from kd_shards.schemas.shard import (
    CODEBOOK_KEY,
    HIDDEN_COLUMN,
    MASK_POSITIONS_COLUMN,
    NO_LABEL,
    PAD_ID,
    PAIR_COLUMN,
    PER_POSITION_COLUMNS,
    READABLE_VERSIONS,
    TOKEN_HIDDEN_COLUMN,
    V1_COLUMNS,
    Storage,
    describe_schema_mismatch,
    expected_schema,
    max_rounding_error,
    schema_version_of,
    storage_of,
)
from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import sha256_of_file
from kd_shards.shared.shard_codec import decode_codebook, decode_distributions
from kd_shards.shared.storage import Folder, as_folder


def read_manifest(directory: Path | str | Folder) -> dict:
    """Read and check a dump's manifest: present, JSON, our schema version, safe shard names.

    `directory`: a local directory, or a shared.storage.Folder (object storage)."""
    folder = as_folder(directory)
    if folder.is_local:
        path = manifest_path(folder.local)
        if path.is_file():
            path = inside_directory(folder.local, MANIFEST_NAME)
        present = path.is_file()
    else:
        path = folder.location_of(MANIFEST_NAME)
        present = folder.is_file(MANIFEST_NAME)
    if not present:
        raise UserError(missing_manifest_message(directory))
    try:
        text = (
            path.read_text(encoding="utf-8") if folder.is_local else folder.read_text(MANIFEST_NAME)
        )
    except UnicodeDecodeError as error:
        raise corrupt_manifest(path, f"is not valid JSON ({error})") from None
    return parse_manifest(text, str(path))


TRAINING_COLUMNS = (
    "sample_id",
    "prompt_ids",
    "target_ids",
    "target_logprobs",
    "topk_ids",
    "topk_logprobs",
)
"""What training and the fidelity evaluation read. topk_ids / topk_logprobs name the teacher's
distributions, stored as the dump's representation (physical_columns). target_logprobs carries no loss, but it is read
(a few percent of a row's bytes) so that the trainer refuses every numeric column that
`inspect --validate` refuses, not only the ones it uses."""
LENGTH_COLUMNS = ("sample_id", "prompt_ids", "target_ids")
"""Enough to plan batches (count steps) without decoding the top-k."""
CLASSIFY_COLUMNS = (*TRAINING_COLUMNS, "prompt_text")
"""What a classification student reads: the text, the gold label and the teacher's classes."""
MASKED_LM_COLUMNS = (*TRAINING_COLUMNS, MASK_POSITIONS_COLUMN)
"""What a masked-LM student reads: the masked input, the positions, the originals there and
the teacher's distributions (add TOKEN_HIDDEN_COLUMN for the cosine loss)."""


def id_space(manifest: dict) -> int:
    """The range of the ids a dump stores: its labels (classify) or its tokenizer's size."""
    if is_classify(manifest):
        return len(classify_labels(manifest))
    return int(manifest["tokenizer"]["size"])


def physical_columns(columns: tuple[str, ...], storage: Storage | None) -> list[str]:
    """The Parquet columns to read for these reader columns: topk_ids / topk_logprobs are the
    representation's columns in schema v2."""
    if storage is None or not set(V1_COLUMNS) & set(columns):
        return list(columns)
    return [name for name in columns if name not in V1_COLUMNS] + list(storage.columns)


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
    topk_log_tail: np.ndarray | None = None
    """(T,) float32 log of the teacher's mass outside the stored ids, as stored (-inf: none);
    NaN where the dump stores no tail (schema v1: it is 1 - sum(p) of the stored values)."""
    text: str = ""
    """The prompt text (prompt_text) when read: classify rows' example, which the student
    tokenizes itself; a cross-tokenizer student's prompt."""
    target_text: str = ""
    """The target text (target_text) when read: what a cross-tokenizer student re-tokenizes."""
    hidden: np.ndarray | None = None
    """Classify rows: (H,) float16 pooled teacher hidden state, when the dump stores it.
    Masked-LM rows: (P, H) float16 teacher hidden state per input token, when read."""
    text_pair: str | None = None
    """Classify rows of a sentence-pair dump: the second text (None for single texts)."""
    mask_positions: np.ndarray | None = None
    """Masked-LM rows: (T,) int32 index in prompt_ids of each target position."""

    @property
    def length(self) -> int:
        """Tokens the model reads: prompt + target, or a masked-LM row's window alone."""
        if self.mask_positions is not None:
            return len(self.prompt_ids)
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass(frozen=True)
class ShardFile:
    """One shard as its manifest entry describes it."""

    path: Path | str
    """The real path (inside the dump directory), or its URL in object storage."""
    name: str
    bytes: int
    sha256: str
    target_tokens: int
    folder: Folder | None = None
    """The object-storage folder it is read from (None: a local file, read at `path`)."""

    @property
    def where(self) -> str:
        """The dump it belongs to, for messages."""
        return str(self.folder) if self.folder is not None else str(Path(self.path).parent)

    @contextlib.contextmanager
    def readable(self) -> Iterator[str | BinaryIO]:
        """What pyarrow reads the shard from: its path (a local file: pyarrow's own reader, no
        Python file object), or an open fsspec file (object storage)."""
        if self.folder is None:
            yield str(self.path)
        else:
            with self.folder.open(self.name) as handle:
                yield handle


@dataclass(frozen=True)
class RowGroup:
    """Row group `index` of a shard: the unit the stream reads."""

    shard: ShardFile
    index: int
    rows: int

    @property
    def path(self) -> Path | str:
        return self.shard.path


@dataclass(frozen=True)
class Dump:
    """An opened teacher-dump directory: its manifest and every row group, in manifest order
    (opened to follow a dump in progress: in publication order, see `refresh_dump`)."""

    directory: Path | str
    """The local directory, or the URL of an object-storage folder."""
    manifest: dict
    row_groups: tuple[RowGroup, ...]

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.row_groups)

    @property
    def complete(self) -> bool:
        """Whether the manifest says every expected row is written."""
        return bool(self.manifest.get("complete"))


def open_dump(
    directory: Path | str,
    *,
    allow_incomplete: bool = False,
    flag: str = "--shards",
    follow: bool = False,
) -> Dump:
    """Read a dump's manifest and its shards' footers, refusing anything inconsistent.

    Only metadata is read here (fast); row contents are checked as they stream. A full check of
    every byte is `teacher-dump inspect DIR --validate`. With `follow` the dump may be
    incomplete and even empty, and its row groups come in publication order (the manifest
    entries' `published` numbers), the order in which `refresh_dump` appends new ones. `directory` may be
    a URL of object storage (shared/storage.py).
    """
    folder = as_folder(directory)
    directory = folder.local if folder.is_local else folder.text
    if not folder.exists():
        raise UserError(
            f"{flag} {directory}: no such directory; pass a teacher-dump --out directory"
        )
    manifest = read_manifest(folder)
    if not manifest.get("complete") and not (allow_incomplete or follow):
        totals = manifest.get("totals", {})
        raise UserError(
            f"{flag} {directory}: the dump is incomplete ({totals.get('rows', 0)} of "
            f"{manifest.get('data', {}).get('expected_rows') or '?'} rows): rerun its teacher-dump "
            "command to finish it, or pass --set allow_incomplete=true to train on what is there"
        )
    entries = publication_order(manifest["shards"]) if follow else manifest["shards"]
    row_groups: list[RowGroup] = []
    for entry in entries:
        row_groups += shard_row_groups(folder, entry, manifest, flag)
    if not row_groups and not follow:
        raise UserError(
            f"{flag} {directory}: the dump holds no rows; run teacher-dump with data first"
        )
    return Dump(directory, manifest, tuple(row_groups))


def publication_order(entries: list[dict]) -> list[dict]:
    """Manifest entries in the order they were published (entries of a manifest written before
    publication numbers existed keep their place, first)."""
    indexed = list(enumerate(entries))
    indexed.sort(key=lambda item: (item[1].get("published", -1), item[0]))
    return [entry for _, entry in indexed]


def refresh_dump(dump: Dump, flag: str = "--shards") -> Dump:
    """`dump` (opened with follow=True) with the shards published since, appended in
    publication order; the manifest is re-read. A shard already read must be unchanged (same
    name, size and sha256) and still listed: a dump rewritten under a reader is refused."""
    folder = as_folder(dump.directory)
    manifest = read_manifest(folder)
    entries = {entry["name"]: entry for entry in manifest["shards"]}
    known = {group.shard.name: group.shard for group in dump.row_groups}
    for name, shard in known.items():
        entry = entries.get(name)
        if entry is None or entry["sha256"] != shard.sha256 or entry["bytes"] != shard.bytes:
            raise UserError(
                f"{flag} {dump.directory}: shard {name} was removed or rewritten while being "
                "followed: restart training from the finished dump (with --resume it continues "
                "from the last checkpoint)"
            )
    added: list[RowGroup] = []
    for entry in publication_order(manifest["shards"]):
        if entry["name"] not in known:
            added += shard_row_groups(folder, entry, manifest, flag)
    return Dump(dump.directory, manifest, dump.row_groups + tuple(added))


def shard_row_groups(folder: Folder, entry: dict, manifest: dict, flag: str) -> list[RowGroup]:
    """The non-empty row groups of one manifest entry's shard, read from its footer after
    checking that the file is the one the entry describes (size, schema version, storage and
    columns against its dump's `manifest`, rows)."""
    directory = folder.local if folder.is_local else folder.text
    if folder.is_local:
        try:
            path = inside_directory(folder.local, entry["name"])
        except UserError as error:
            raise UserError(f"{flag} {error}") from None
        present = path.is_file()
    else:
        path = folder.location_of(entry["name"])
        present = folder.is_file(entry["name"])
    if not present:
        raise UserError(
            f"{flag} {directory}: shard {entry['name']} is listed in the manifest but missing: "
            "rerun the teacher-dump command to rewrite it"
        )
    size = path.stat().st_size if folder.is_local else folder.size(entry["name"])
    if size != entry["bytes"]:
        raise UserError(
            f"{flag} {directory}: shard {entry['name']} has {size} bytes, the "
            f"manifest says {entry['bytes']} (truncated or replaced): delete it and rerun the "
            "teacher-dump command"
        )
    shard = ShardFile(
        path=path,
        name=entry["name"],
        bytes=int(entry["bytes"]),
        sha256=entry["sha256"],
        target_tokens=int(entry["target_tokens"]),
        folder=None if folder.is_local else folder,
    )
    try:
        with shard.readable() as source:
            metadata = pq.ParquetFile(source).metadata
    except Exception as error:
        raise UserError(
            f"{flag} {directory}: shard {entry['name']} is not readable Parquet "
            f"({one_line(error, 100)}): delete it and rerun the teacher-dump command"
        ) from None
    problem = shard_format_problem(metadata.schema.to_arrow_schema(), manifest)
    if problem:
        raise UserError(
            f"{flag} {directory}: shard {entry['name']} {problem}: redo the dump with this "
            "release (or rerun the teacher-dump command that wrote the dump)"
        )
    if metadata.num_rows != entry["rows"]:
        raise UserError(
            f"{flag} {directory}: shard {entry['name']} holds {metadata.num_rows} rows, the "
            f"manifest says {entry['rows']}: rerun the teacher-dump command to refresh it"
        )
    groups = []
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        if rows:
            groups.append(RowGroup(shard, index, rows))
    return groups


def shard_format_problem(schema, manifest: dict) -> str | None:
    """How a shard's schema disagrees with its dump's manifest (version, representation,
    columns), or None."""
    version = schema_version_of(schema)
    wanted = manifest.get("schema_version")
    if version not in READABLE_VERSIONS or version != wanted:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        return (
            f"has schema version {version}, the manifest says {wanted} (this kd-shards reads "
            f"versions {readable})"
        )
    storage = storage_of_manifest(manifest)
    if storage is not None and storage_of(schema) != storage:
        found = storage_of(schema)
        return (
            f"stores {found.describe() if found else 'no valid storage record'}, the manifest "
            f"says {storage.describe()}"
        )
    if (
        storage is not None
        and storage.representation != "sampled"
        and storage.top_k != manifest.get("top_k")
    ):
        return f"stores {storage.describe()}, but the manifest's top_k is {manifest.get('top_k')!r}"
    mismatch = describe_schema_mismatch(schema, expected_schema(version, storage))
    return f"does not match schema version {version} ({mismatch})" if mismatch else None


def checked_columns(table, metadata, manifest: dict) -> ShardColumns | str:
    """A whole shard table decoded and checked as the trainer and `inspect --validate` check it
    (schema version and storage against the manifest, structure, values), or the first problem.

    Args:
        table: the shard's pyarrow Table (every column). metadata: its Parquet FileMetaData
            (the footer holds the codebook). manifest: its dump's manifest."""
    problem = shard_format_problem(table.schema, manifest)
    if problem:
        return problem
    storage = storage_of_manifest(manifest)
    codebook = read_codebook(metadata, storage)
    if isinstance(codebook, str):
        return codebook
    columns = shard_columns(table, int(manifest["top_k"]), storage, codebook)
    if isinstance(columns, str):
        return columns
    return value_problem(columns, id_space(manifest), is_classify(manifest)) or columns


@dataclass(frozen=True)
class ShardColumns:
    """A shard table's list columns as flat numpy arrays (N target positions in all, K = k).

    Only the columns that were read are set; the rest are None."""

    sample_ids: list
    target_offsets: np.ndarray
    """(rows + 1,) int: row r's targets are positions target_offsets[r]:target_offsets[r+1]."""
    target_ids: np.ndarray
    """(N,) int32."""
    prompt_offsets: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None
    target_logprobs: np.ndarray | None = None
    """(N,) float32."""
    topk_ids: np.ndarray | None = None
    """(N, K) int32, PAD_ID in freed slots."""
    topk_logprobs: np.ndarray | None = None
    """(N, K) float32, -inf in freed slots."""
    topk_log_tail: np.ndarray | None = None
    """(N,) float32 stored log tail mass (-inf: none), NaN where the dump stores none (v1)."""


def shard_columns(
    table, top_k: int, storage: Storage | None = None, codebook: np.ndarray | None = None
) -> ShardColumns | str:
    """Flatten a shard table (or row group) without Python loops, decoding a schema-v2
    representation, or say why it cannot be.

    Refuses nulls, and lists whose lengths disagree with target_ids row by row or with k (v1),
    or with the per-position entry counts (v2). Returns the ShardColumns, or a description of
    the first structural problem.

    Args:
        top_k: v1's k. storage: how a v2 dump stores its distributions (None: v1).
        codebook: the shard's codebook (adaptive storage with one), else None.
    """
    for name in table.column_names:
        if table[name].null_count:
            return f"column {name} holds {table[name].null_count} null value(s)"

    def flat(column: str) -> tuple[np.ndarray, np.ndarray]:
        array = table[column].combine_chunks()
        offsets = array.offsets.to_numpy()
        values = array.values.to_numpy(zero_copy_only=False)
        return values[offsets[0] : offsets[-1]], offsets - offsets[0]

    target_ids, target_offsets = flat("target_ids")
    target_lengths = np.diff(target_offsets)
    arrays: dict[str, np.ndarray] = {}
    for column in ("target_logprobs", "topk_ids", "topk_logprobs"):
        if column not in table.column_names:
            continue
        values, offsets = flat(column)
        if not np.array_equal(np.diff(offsets), target_lengths):
            rows = np.flatnonzero(np.diff(offsets) != target_lengths)
            return f"column {column} has a different number of positions than target_ids in row {int(rows[0])}"
        if column == "target_logprobs":
            arrays[column] = values
            continue
        inner = table[column].combine_chunks().values
        inner_lengths = np.diff(inner.offsets.to_numpy())[offsets[0] : offsets[-1]]
        if inner_lengths.size and (inner_lengths != top_k).any():
            position = int(np.flatnonzero(inner_lengths != top_k)[0])
            return (
                f"column {column} has {int(inner_lengths[position])} entries at position "
                f"{position}, the manifest says k={top_k}"
            )
        flat_values = inner.values.to_numpy(zero_copy_only=False)
        start = inner.offsets.to_numpy()[offsets[0]]
        arrays[column] = flat_values[start : start + len(target_ids) * top_k].reshape(-1, top_k)
    if storage is not None and storage.columns[0] in table.column_names:
        decoded = _decode_storage(table, storage, codebook, flat, target_lengths)
        if isinstance(decoded, str):
            return decoded
        arrays["topk_ids"], arrays["topk_logprobs"] = decoded.ids, decoded.logprobs
        arrays["topk_log_tail"] = decoded.log_tail
    elif arrays.get("topk_ids") is not None:
        arrays["topk_log_tail"] = np.full(len(target_ids), np.nan, dtype=np.float32)
    prompt_ids = prompt_offsets = None
    if "prompt_ids" in table.column_names:
        prompt_ids, prompt_offsets = flat("prompt_ids")
    return ShardColumns(
        sample_ids=table["sample_id"].to_pylist(),
        target_offsets=target_offsets,
        target_ids=target_ids,
        prompt_offsets=prompt_offsets,
        prompt_ids=prompt_ids,
        target_logprobs=arrays.get("target_logprobs"),
        topk_ids=arrays.get("topk_ids"),
        topk_logprobs=arrays.get("topk_logprobs"),
        topk_log_tail=arrays.get("topk_log_tail"),
    )


def _decode_storage(table, storage: Storage, codebook, flat, target_lengths):
    """The v2 distribution columns of a table: row lengths checked, then decoded."""
    values: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    for name in storage.columns:
        values[name], offsets = flat(name)
        lengths[name] = np.diff(offsets)
    count_name = storage.columns[0]
    for name in storage.columns:
        if name in PER_POSITION_COLUMNS and not np.array_equal(lengths[name], target_lengths):
            row = int(np.flatnonzero(lengths[name] != target_lengths)[0])
            return f"column {name} has a different number of positions than target_ids in row {row}"
    counts = values[count_name].astype(np.int64)
    running = np.concatenate(([0], np.cumsum(counts)))
    row_ends = np.cumsum(target_lengths)
    row_entries = running[row_ends] - running[row_ends - target_lengths]
    for name in storage.columns:
        if name not in PER_POSITION_COLUMNS and not np.array_equal(lengths[name], row_entries):
            row = int(np.flatnonzero(lengths[name] != row_entries)[0])
            return f"column {name} holds a different number of entries than {count_name} says in row {row}"
    if storage.codebook and codebook is None:
        return "the footer has no id codebook, which the manifest's storage says it uses"
    return decode_distributions(values, storage, codebook)


def read_codebook(metadata, storage: Storage | None) -> np.ndarray | None | str:
    """The shard's id codebook from its Parquet footer metadata (None if it uses none), or a
    description of why it cannot be read."""
    if storage is None or not storage.codebook:
        return None
    text = (metadata.metadata or {}).get(CODEBOOK_KEY)
    if text is None:
        return "the footer has no id codebook, which the manifest's storage says it uses"
    try:
        return decode_codebook(text, storage.codebook_dtype)
    except ValueError as error:
        return f"the footer's id codebook is unreadable ({one_line(error, 100)})"


_verified_shards: set[tuple[str, int, int, str]] = set()
"""(real path, size, modification time in ns, expected sha256) of every shard this process has
hashed and found equal to its manifest entry."""


def verify_shard(shard: ShardFile) -> None:
    """Refuse a shard whose bytes differ from its manifest entry; hash it once per process.

    Checks size, sha256 and the number of target tokens. Cheap after the first call for a
    shard (one stat), and repeated when the file's size or modification time has changed.
    """
    fix = "run teacher-dump inspect --validate, delete it and rerun the teacher-dump command"
    try:
        if shard.folder is None:
            status = Path(shard.path).stat()
            size, stamp = status.st_size, status.st_mtime_ns
        else:
            size, stamp = shard.folder.version(shard.name)
    except OSError as error:
        raise UserError(
            f"shard {shard.name} in {shard.where} cannot be read ({error.strerror or error}): "
            "rerun the teacher-dump command to rewrite it"
        ) from None
    key = (str(shard.path), size, stamp, shard.sha256)
    if key in _verified_shards:
        return
    if size != shard.bytes:
        raise UserError(
            f"shard {shard.name} in {shard.where} has {size} bytes, the manifest "
            f"says {shard.bytes} (truncated or replaced): {fix}"
        )
    digest = sha256_of_file(shard.path) if shard.folder is None else shard.folder.sha256(shard.name)
    if digest != shard.sha256:
        raise UserError(
            f"shard {shard.name} in {shard.where} has sha256 {digest[:16]}, the manifest "
            f"says {shard.sha256[:16]} (corrupt or replaced since it was written): {fix}"
        )
    try:
        with shard.readable() as source:
            lengths = pq.read_table(source, columns=["target_ids"])["target_ids"]
        target_tokens = int(pc.sum(pc.list_value_length(lengths)).as_py() or 0)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise UserError(
            f"shard {shard.name} in {shard.where} is unreadable ({one_line(error, 100)}): {fix}"
        ) from None
    if target_tokens != shard.target_tokens:
        raise UserError(
            f"shard {shard.name} in {shard.where} holds {target_tokens} target tokens, the "
            f"manifest says {shard.target_tokens}: {fix}"
        )
    _verified_shards.add(key)


def value_problem(columns: ShardColumns, vocabulary: int, classify: bool = False) -> str | None:
    """The first value that would silently corrupt training or evaluation, or None.

    Ids must lie in [0, vocabulary) (classify: the labels; a target may also be NO_LABEL, with
    a -inf logprob, and every position must hold all labels); a top-k slot is either a real id with a finite logprob <= 0
    or the padding marker (PAD_ID with -inf), padding only after the real slots, each position
    with at least one real id and no id twice; logprobs in rank order (within the rounding).
    """
    targets = columns.target_ids
    unlabelled = (targets == NO_LABEL) if classify else np.zeros(targets.shape, dtype=bool)
    if (((targets < 0) & ~unlabelled) | (targets >= vocabulary)).any():
        return f"target ids outside [0, {vocabulary})"
    prompts = columns.prompt_ids
    if prompts is not None and ((prompts < 0) | (prompts >= vocabulary)).any():
        return f"prompt ids outside [0, {vocabulary})"
    if columns.target_logprobs is not None:
        values = columns.target_logprobs
        finite = np.isfinite(values)
        if (finite == unlabelled).any() or (values[finite] > 0).any():
            return "target logprobs contain NaN, infinite or positive values"
    if columns.topk_ids is None:
        return None
    tails = columns.topk_log_tail
    if tails is not None and ((tails > 0) | np.isposinf(tails)).any():
        return "stored tail masses above 1"
    ids, logprobs = columns.topk_ids, columns.topk_logprobs
    if not ids.size:
        return None
    padding = ids == PAD_ID
    if (((ids < 0) & ~padding) | (ids >= vocabulary)).any():
        return f"top-k ids outside [0, {vocabulary}) other than the padding marker {PAD_ID}"
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any() or (logprobs > 0).any():
        return "top-k logprobs contain NaN, +inf or positive values"
    if (padding != np.isneginf(logprobs)).any():
        return f"top-k slots with id {PAD_ID} and slots with logprob -inf do not coincide"
    if padding[:, 0].any():
        return "a position has no real top-k id (only padding)"
    if (padding[:, :-1] & ~padding[:, 1:]).any():
        return "padding slots are followed by real ids (padding must come last)"
    ranked = np.where(padding, -1e30, logprobs)
    if (np.diff(ranked, axis=1) > 2 * max_rounding_error()).any():
        return "top-k logprobs are not in descending rank order"
    ordered = np.sort(np.where(padding, -1 - np.arange(ids.shape[1]), ids), axis=1)
    if (np.diff(ordered, axis=1) == 0).any():
        return "a top-k id appears twice at one position"
    if classify and padding.any():
        return "a classify position does not hold every label"
    return None


def decode_row_group(
    group: RowGroup,
    columns: tuple[str, ...],
    top_k: int,
    vocabulary: int,
    classify: bool = False,
    *,
    storage: Storage | None = None,
    verify: bool = True,
) -> list[TrainingRow]:
    """Read one row group into TrainingRows, refusing what would silently corrupt training.

    `classify`: the group belongs to a classify dump (vocabulary = its number of labels).
    `storage`: the dump's (schemas.manifest.storage_of_manifest; None for schema v1, which
    classify dumps always are). With `verify` (always, except to plan step counts from row
    lengths), the shard's checksum is checked first (verify_shard: the first time this process
    reads the shard)."""
    if verify:
        verify_shard(group.shard)
    try:
        with group.shard.readable() as source:
            parquet = pq.ParquetFile(source)
            table = parquet.read_row_group(group.index, columns=physical_columns(columns, storage))
            codebook = read_codebook(parquet.metadata, storage)
    except Exception as error:
        raise UserError(
            f"shard {group.shard.name} row group {group.index} is unreadable ({one_line(error, 100)}): "
            "check it with teacher-dump inspect --validate and rerun the dump"
        ) from None
    decoded = (
        codebook if isinstance(codebook, str) else shard_columns(table, top_k, storage, codebook)
    )
    problem = decoded if isinstance(decoded, str) else value_problem(decoded, vocabulary, classify)
    if problem:
        raise UserError(
            f"shard {group.shard.name} row group {group.index}: {problem}: the shard is corrupt or "
            "was not written by teacher-dump; run teacher-dump inspect --validate and redo it"
        )
    target_offsets, prompt_offsets = decoded.target_offsets, decoded.prompt_offsets
    texts = table["prompt_text"].to_pylist() if "prompt_text" in columns else None
    pairs = table[PAIR_COLUMN].to_pylist() if PAIR_COLUMN in columns else None
    target_texts = table["target_text"].to_pylist() if "target_text" in columns else None
    hidden = None
    if HIDDEN_COLUMN in columns:
        array = table[HIDDEN_COLUMN].combine_chunks()
        width = len(array[0]) if len(array) else 0
        hidden = array.values.to_numpy(zero_copy_only=False).reshape(len(array), width)
    masked = masked_lm_columns(table, columns, decoded)
    if isinstance(masked, str):
        raise UserError(
            f"shard {group.shard.name} row group {group.index}: {masked}: the shard is corrupt or "
            "was not written by teacher-dump; run teacher-dump inspect --validate and redo it"
        )
    positions, token_hidden = masked
    if token_hidden is not None:
        hidden = token_hidden
    rows = []
    for row, sample_id in enumerate(decoded.sample_ids):
        first, last = target_offsets[row], target_offsets[row + 1]
        rows.append(
            TrainingRow(
                sample_id=sample_id,
                prompt_ids=decoded.prompt_ids[prompt_offsets[row] : prompt_offsets[row + 1]],
                target_ids=decoded.target_ids[first:last],
                topk_ids=None if decoded.topk_ids is None else decoded.topk_ids[first:last],
                topk_logprobs=(
                    None if decoded.topk_logprobs is None else decoded.topk_logprobs[first:last]
                ),
                topk_log_tail=(
                    None if decoded.topk_log_tail is None else decoded.topk_log_tail[first:last]
                ),
                text=texts[row] if texts is not None else "",
                target_text=target_texts[row] if target_texts is not None else "",
                hidden=hidden[row] if hidden is not None else None,
                text_pair=pairs[row] if pairs is not None else None,
                mask_positions=None if positions is None else positions[first:last],
            )
        )
    return rows


def masked_lm_columns(table, columns: tuple[str, ...], decoded: ShardColumns):
    """(mask positions (N,) int32 or None, per-row (P, H) teacher hidden states or None) of a
    masked-LM row group, or a description of the first structural problem."""
    if MASK_POSITIONS_COLUMN not in columns:
        return None, None
    array = table[MASK_POSITIONS_COLUMN].combine_chunks()
    offsets = array.offsets.to_numpy()
    positions = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    if not np.array_equal(np.diff(offsets), np.diff(decoded.target_offsets)):
        return f"column {MASK_POSITIONS_COLUMN} has a different number of positions than target_ids"
    prompt_lengths = np.diff(decoded.prompt_offsets)
    row_of = np.repeat(np.arange(len(prompt_lengths)), np.diff(decoded.target_offsets))
    if ((positions < 0) | (positions >= prompt_lengths[row_of])).any():
        return f"column {MASK_POSITIONS_COLUMN} points outside prompt_ids"
    if TOKEN_HIDDEN_COLUMN not in columns:
        return positions, None
    hidden_array = table[TOKEN_HIDDEN_COLUMN].combine_chunks()
    hidden_offsets = hidden_array.offsets.to_numpy()
    values = hidden_array.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(hidden_offsets)
    if len(lengths) and (prompt_lengths == 0).any():
        return "a masked-LM row without input tokens"
    widths = lengths // np.maximum(prompt_lengths, 1)
    if len(widths) and ((widths * prompt_lengths != lengths).any() or (widths != widths[0]).any()):
        return f"column {TOKEN_HIDDEN_COLUMN} is not one vector of one width per input token"
    hidden = [
        values[hidden_offsets[row] : hidden_offsets[row + 1]].reshape(prompt_lengths[row], -1)
        for row in range(len(lengths))
    ]
    return positions, hidden


def iterate_rows(
    dump: Dump, *, rank: int = 0, world_size: int = 1, columns: tuple[str, ...] = TRAINING_COLUMNS
) -> Iterator[TrainingRow]:
    """Rank `rank`'s share of the dump's rows in file order (row i goes to rank i mod W), one
    row group in memory at a time."""
    top_k = int(dump.manifest["top_k"])
    vocabulary = id_space(dump.manifest)
    classify = is_classify(dump.manifest)
    storage = storage_of_manifest(dump.manifest)
    index = 0
    for group in dump.row_groups:
        for row in decode_row_group(group, columns, top_k, vocabulary, classify, storage=storage):
            if index % world_size == rank:
                yield row
            index += 1
