"""Small dumps written without an engine: real Parquet in the real schema, random content.

Used where a test needs many rows or row groups fast (loader partition and resume); the tests
that need a teacher's real signal use teacher-dump with the tiny model instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from schemas.manifest import MANIFEST_NAME, totals
from schemas.shard import PARQUET_WRITE_OPTIONS, SCHEMA_VERSION, round_logprobs
from teacher_dump.rows import ShardRow
from teacher_dump.shards import describe_shard, rows_to_table, shard_name


def synthetic_row(index: int, rng: np.random.Generator, top_k: int, vocabulary: int) -> ShardRow:
    prompt_length, target_length = int(rng.integers(1, 6)), int(rng.integers(1, 9))
    topk_ids = np.stack(
        [rng.choice(vocabulary, size=top_k, replace=False) for _ in range(target_length)]
    ).astype(np.int32)
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(top_k + 1), size=target_length))[:, :top_k])
    return ShardRow(
        sample_id=str(index),
        source_index=index,
        completion_index=0,
        prompt_ids=rng.integers(0, vocabulary, size=prompt_length).astype(np.int32),
        target_ids=topk_ids[:, 0].copy(),
        target_logprobs=round_logprobs(logprobs[:, -1]),
        topk_ids=topk_ids,
        topk_logprobs=round_logprobs(logprobs[:, ::-1].copy()),
        finish_reason="text",
        prompt_text="",
        target_text="",
        references=(),
        padded_topk_entries=0,
    )


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
    """Write `rows` rows as shards of `rows_per_shard` with row groups of `row_group_rows`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    all_rows = [synthetic_row(index, rng, top_k, vocabulary) for index in range(rows)]
    entries = []
    for sequence, start in enumerate(range(0, rows, rows_per_shard)):
        path = directory / shard_name(0, 1, sequence)
        table = rows_to_table(all_rows[start : start + rows_per_shard])
        pq.write_table(table, path, row_group_size=row_group_rows, **PARQUET_WRITE_OPTIONS)
        entries.append(describe_shard(path))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "identity": "synthetic",
        "mode": "text",
        "tokenizer": {"fingerprint": fingerprint, "size": vocabulary},
        "top_k": top_k,
        "data": {"expected_rows": rows},
        "shards": entries,
        "totals": totals(entries),
        "complete": True,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory
