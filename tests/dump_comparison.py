"""Comparing two dumps row for row: what the executor tests (Ray, data parallel) check against
the single-engine dump of the same prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from kd_shards.shared.shard_reader import iterate_rows, open_dump


def read_rows(directory: Path) -> dict[str, dict]:
    """Every row's columns as pyarrow reads them, plus the teacher's distributions decoded by the
    trainer's reader (topk_ids, topk_logprobs: (T, K) lists, rank order)."""
    rows = {}
    for path in sorted(Path(directory).glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert row["sample_id"] not in rows, f"duplicate sample_id {row['sample_id']}"
            rows[row["sample_id"]] = row
    for row in iterate_rows(open_dump(directory, allow_incomplete=True)):
        rows[row.sample_id]["topk_ids"] = row.topk_ids.tolist()
        rows[row.sample_id]["topk_logprobs"] = row.topk_logprobs.tolist()
    return rows


def assert_same_rows(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for sample_id, row in want.items():
        other = got[sample_id]
        for key in ("prompt_ids", "target_ids", "topk_ids", "finish_reason", "source_index"):
            assert other[key] == row[key], (sample_id, key)
        for key in ("target_logprobs", "topk_logprobs"):
            np.testing.assert_allclose(
                np.array(other[key], dtype=np.float64), np.array(row[key], dtype=np.float64),
                atol=2e-3,
            )  # fmt: skip
