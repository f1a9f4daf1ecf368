"""Small dumps written without an engine: real Parquet in the real schemas, random content.

Used where a test needs many rows or row groups fast (loader partition and resume); the tests
that need a teacher's real signal use teacher-dump with the tiny model instead. Schema version 1
(what older releases wrote, still read) is written here from plain arrays, independently of the
v2 writer; version 2 goes through teacher-dump's own writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import MANIFEST_NAME, totals
from kd_shards.schemas.shard import (
    PAD_ID,
    PARQUET_WRITE_OPTIONS_V1,
    SCHEMA_V1,
    SCHEMA_VERSION,
    Storage,
    parquet_write_options,
    round_logprobs,
    storage_of,
)
from kd_shards.shared.files import sha256_of_file
from kd_shards.teacher_dump.encoding import encode_row
from kd_shards.teacher_dump.rows import ShardRow
from kd_shards.teacher_dump.shards import describe_shard, shard_name, write_table
from kd_shards.teacher_dump.shards import rows_to_table as v2_table

V1_WRITE_OPTIONS = PARQUET_WRITE_OPTIONS_V1
"""How schema-v1 shards were written."""

PADDED_POSITION_SHARE = 0.3
"""Share of positions whose top-k ends in freed padding slots (PAD_ID, -inf), as real dumps of a
teacher with a padded vocabulary have them."""


def synthetic_arrays(index: int, rng: np.random.Generator, top_k: int, vocabulary: int) -> dict:
    """One row's fields: random prompt/target, a top-k (rank order) of a random distribution
    over top_k + 1 outcomes (so a tail is left), unrounded float32 logprobs; at about
    PADDED_POSITION_SHARE of the positions (when k > 1) 1..k-1 trailing padding slots (PAD_ID,
    -inf), the freed slots of dropped padding-row ids, whose mass joins the tail."""
    prompt_length, target_length = int(rng.integers(1, 6)), int(rng.integers(1, 9))
    topk_ids = np.stack(
        [rng.choice(vocabulary, size=top_k, replace=False) for _ in range(target_length)]
    ).astype(np.int32)
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(top_k + 1), size=target_length))[:, :top_k])
    topk_logprobs = logprobs[:, ::-1].astype(np.float32)
    if top_k > 1:
        for position in np.flatnonzero(rng.random(target_length) < PADDED_POSITION_SHARE):
            freed = int(rng.integers(1, top_k))
            topk_ids[position, top_k - freed :] = PAD_ID
            topk_logprobs[position, top_k - freed :] = -np.inf
    return {
        "sample_id": str(index),
        "source_index": index,
        "prompt_ids": rng.integers(0, vocabulary, size=prompt_length).astype(np.int32),
        "target_ids": topk_ids[:, 0].copy(),
        "target_logprobs": round_logprobs(logprobs[:, -1]),
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
    }


def v1_table(rows: list[dict]) -> pa.Table:
    """A schema-v1 table: topk_* as list<list<...>>, logprobs rounded to 2^-10 (PAD_ID / -inf
    in freed slots are kept as given)."""

    def nested(arrays: list[np.ndarray]) -> list:
        return [array.tolist() for array in arrays]

    rounded = [
        np.where(row["topk_ids"] == PAD_ID, -np.inf, round_logprobs(row["topk_logprobs"]))
        for row in rows
    ]
    columns = {
        "sample_id": [row["sample_id"] for row in rows],
        "source_index": [row["source_index"] for row in rows],
        "completion_index": [0] * len(rows),
        "prompt_ids": nested([row["prompt_ids"] for row in rows]),
        "target_ids": nested([row["target_ids"] for row in rows]),
        "target_logprobs": nested([row["target_logprobs"] for row in rows]),
        "topk_ids": nested([row["topk_ids"] for row in rows]),
        "topk_logprobs": nested(rounded),
        "finish_reason": ["text"] * len(rows),
        "prompt_text": [""] * len(rows),
        "target_text": [""] * len(rows),
        "references": [[] for _ in rows],
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA_V1)


def write_v1_dump(
    directory: Path,
    rows: list[dict],
    *,
    top_k: int,
    vocabulary: int,
    fingerprint: str,
    rows_per_shard: int = 40,
    row_group_rows: int = 7,
) -> Path:
    """Write rows (synthetic_arrays fields) as a schema-v1 dump with its manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for sequence, start in enumerate(range(0, len(rows), rows_per_shard)):
        path = directory / shard_name(0, 1, sequence)
        table = v1_table(rows[start : start + rows_per_shard])
        pq.write_table(table, path, row_group_size=row_group_rows, **V1_WRITE_OPTIONS)
        entries.append(describe_shard(path))
    manifest = synthetic_manifest(
        entries, len(rows), top_k, vocabulary, fingerprint, complete=True, storage=None
    )
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def synthetic_shard_rows(rows: list[dict], storage: Storage, vocabulary: int) -> list[ShardRow]:
    """Rows (synthetic_arrays fields) as teacher-dump's writer takes them, stored as `storage`
    (teacher_dump.encoding.encode_row)."""
    return [
        ShardRow(
            sample_id=row["sample_id"],
            source_index=row["source_index"],
            completion_index=0,
            prompt_ids=row["prompt_ids"],
            target_ids=row["target_ids"],
            target_logprobs=row["target_logprobs"],
            entries=encode_row(row["topk_ids"], row["topk_logprobs"], storage, vocabulary),
            finish_reason="text",
            prompt_text="",
            target_text="",
            references=(),
            padded_topk_entries=int((row["topk_ids"] == PAD_ID).sum()),
        )
        for row in rows
    ]


def write_v2_dump(
    directory: Path,
    rows: list[dict],
    storage: Storage,
    *,
    vocabulary: int,
    fingerprint: str,
    rows_per_shard: int = 40,
) -> Path:
    """Write rows (synthetic_arrays fields) with teacher-dump's v2 writer as `storage`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard_rows = synthetic_shard_rows(rows, storage, vocabulary)
    entries = []
    for sequence, start in enumerate(range(0, len(rows), rows_per_shard)):
        path = directory / shard_name(0, 1, sequence)
        table, footer = v2_table(shard_rows[start : start + rows_per_shard], storage, vocabulary)
        write_table(path, table, footer, storage)
        entries.append(describe_shard(path))
    manifest = synthetic_manifest(
        entries, len(rows), 0, vocabulary, fingerprint, complete=True, storage=storage
    )
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def write_synthetic_dump(
    directory: Path,
    rows: int,
    *,
    rows_per_shard: int = 40,
    row_group_rows: int = 7,
    top_k: int = 4,
    vocabulary: int = 50,
    seed: int = 0,
    fingerprint: str = "synthetic",
) -> Path:
    """Write `rows` random rows as a schema-v1 dump: shards of `rows_per_shard`, row groups of
    `row_group_rows`."""
    rng = np.random.default_rng(seed)
    arrays = [synthetic_arrays(index, rng, top_k, vocabulary) for index in range(rows)]
    return write_v1_dump(
        directory,
        arrays,
        top_k=top_k,
        vocabulary=vocabulary,
        fingerprint=fingerprint,
        rows_per_shard=rows_per_shard,
        row_group_rows=row_group_rows,
    )


def write_synthetic_dump_for(model_directory: Path, directory: Path, rows: int, **options) -> Path:
    """A synthetic dump whose manifest names `model_directory`'s tokenizer (fingerprint and size),
    so that student-train accepts that model as the student and goes on to read the shards."""
    from kd_shards.shared.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(model_directory)
    return write_synthetic_dump(
        directory,
        rows,
        vocabulary=len(tokenizer),
        fingerprint=tokenizer_fingerprint(tokenizer),
        **options,
    )


def write_options(schema: pa.Schema) -> dict:
    """The Parquet options teacher-dump writes a shard of this schema with (v2 or v1)."""
    storage = storage_of(schema)
    return parquet_write_options(storage) if storage is not None else PARQUET_WRITE_OPTIONS_V1


def rewrite_shard(directory: Path, name: str, table, *, update_manifest: bool = True) -> None:
    """Replace shard `name` with `table` (row groups of 7 rows). With update_manifest, its
    manifest entry is recomputed from the new file, so that the manifest agrees with it and only
    the table's own content can be wrong."""
    directory = Path(directory)
    path = directory / name
    pq.write_table(table, path, row_group_size=7, **write_options(table.schema))
    if not update_manifest:
        return
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        if entry["name"] != name:
            continue
        entry.update(rows=table.num_rows, bytes=path.stat().st_size, sha256=sha256_of_file(path))
        if pa.types.is_list(table.schema.field("target_ids").type):
            entry["target_tokens"] = int(
                pc.sum(pc.list_value_length(table["target_ids"])).as_py() or 0
            )
    manifest["totals"] = totals(manifest["shards"])
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def publish_synthetic_dump(
    directory: Path,
    rows: int,
    *,
    rows_per_shard: int,
    pause_seconds: float,
    vocabulary: int = 50,
    fingerprint: str = "synthetic",
    top_k: int = 4,
    seed: int = 0,
    writers: int = 1,
    log_path: Path | None = None,
    hold_until: Path | None = None,
) -> None:
    """Write a dump the way teacher-dump does, over time (schema v2, exact top-k storage): the
    manifest first (incomplete), then one shard every `pause_seconds` through teacher-dump's own
    ShardWriter (atomic shard, then
    the manifest refreshed under its lock). With `writers` > 1 the shards come from that many
    ranks in turn (rank r writes rows r, r + writers, ...), so publication order differs from
    the manifest's name order. `log_path` gets one JSON line per shard when it is published:
    {"shard": name, "time": unix seconds}. With `hold_until`, the shards after the first wait
    until that file has content (at most 300 s), e.g. until a trainer has logged its first step."""
    import time

    from kd_shards.shared.files import atomic_write_json
    from kd_shards.teacher_dump.shards import ShardWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    storage = Storage("topk", top_k=top_k)  # what teacher-dump --store topk writes
    arrays = [synthetic_arrays(index, rng, top_k, vocabulary) for index in range(rows)]
    all_rows = synthetic_shard_rows(arrays, storage, vocabulary)
    manifest = synthetic_manifest(
        [], rows, top_k, vocabulary, fingerprint, complete=False, storage=storage
    )
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    shard_writers = [
        ShardWriter(directory, rank, writers, rows_per_shard, storage, vocabulary)
        for rank in range(writers)
    ]
    shares = [all_rows[rank::writers] for rank in range(writers)]
    turn = 0
    while any(shares):
        rank = turn % writers
        turn += 1
        if not shares[rank]:
            continue
        chunk, shares[rank] = shares[rank][:rows_per_shard], shares[rank][rows_per_shard:]
        time.sleep(pause_seconds)
        if turn > 1 and hold_until is not None:
            deadline = time.monotonic() + 300
            # Non-empty, not merely existing: the trainer creates its metrics files (empty) at
            # start-up, long before its first step on a loaded machine.
            while not has_content(Path(hold_until)) and time.monotonic() < deadline:
                time.sleep(0.05)
        shard_writers[rank].add_prompt_rows(chunk)
        entry = shard_writers[rank].flush() if shard_writers[rank].buffer else None
        if log_path is not None:
            name = (
                entry["name"]
                if entry
                else shard_name(rank, writers, shard_writers[rank].sequence - 1)
            )
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"shard": name, "time": time.time()}) + "\n")


def has_content(path: Path) -> bool:
    """Whether `path` exists and is not empty."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def synthetic_manifest(
    entries: list[dict],
    rows: int,
    top_k: int,
    vocabulary: int,
    fingerprint: str,
    *,
    complete: bool,
    storage: Storage | None,
) -> dict:
    """A text-mode manifest over shard `entries` of a synthetic dump of `rows` rows: schema v1
    (top_k: its k) with `storage` None, else schema v2 with that storage record (top_k as
    teacher-dump records it: the storage's k, or its draws)."""
    manifest = {
        "schema_version": 1 if storage is None else SCHEMA_VERSION,
        "identity": "synthetic",
        "mode": "text",
        "tokenizer": {"fingerprint": fingerprint, "size": vocabulary},
        "top_k": top_k if storage is None else storage.top_k or storage.draws,
        "data": {"expected_rows": rows},
        "shards": entries,
        "totals": totals(entries),
        "complete": complete,
    }
    if storage is not None:
        manifest["storage"] = storage.to_dict()
    return manifest
