"""The shard schema: the one contract between teacher-dump (writer) and student-train / kd-eval
(readers).

One row per (prompt, completion). Per target position t (0 <= t < T) a row holds the target token,
the teacher's log-probability of it, and the teacher's top-k token ids and log-probabilities at
that position, in rank order (most likely first). Everything is plain Parquet that polars,
pyarrow, duckdb, pandas and `datasets` read without this package.

Conventions that readers must honour (they are part of the contract, see README "Shard format"):
- Log-probabilities are natural-log, "raw" (temperature 1, before top-p/top-k filtering), and
  rounded to multiples of LOGPROB_STEP (2**-10 nats, error <= 4.9e-4), which bounds the number
  of distinct values so they dictionary-encode; readers need no decoding step.
- Token ids are < the manifest's `tokenizer_size` (len(tokenizer)). Where the teacher's top-k at
  a position contained ids of the embedding's padding rows (>= tokenizer_size), those entries are
  dropped, the rest move up, and the freed slots at the end hold PAD_ID with logprob -inf. Their
  mass is thereby part of the tail (1 - sum p).
- Position t of `topk_*` is the distribution that predicted `target_ids[t]`.

Classification dumps (manifest mode "classify") use the same columns with one position per row;
see CLASSIFY_CONVENTIONS below.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
"""Bumped on any change a v1 reader could misread. Readers refuse other versions."""

LOGPROB_STEP = 2.0**-10
"""Stored log-probabilities are rounded to multiples of this (nats)."""

PAD_ID = -1
"""Filler id for top-k slots freed by dropped padding-row ids; its logprob is -inf."""

COLUMNS: dict[str, str] = {
    "sample_id": "Stable unique id of the row: '<source index>' or '<source index>-<sample j>'.",
    "source_index": "Row index of the prompt in the input data (after --limit, before sharding).",
    "completion_index": "j-th sampled completion of the prompt (0 in score/text mode).",
    "prompt_ids": "Token ids given to the teacher before the target (chat template applied).",
    "target_ids": "Token ids that carry loss: the teacher's sample, the reference, or the text.",
    "target_logprobs": "Teacher log-probability of each target token (raw, T=1).",
    "topk_ids": "Per target position, the teacher's k most likely token ids, rank order.",
    "topk_logprobs": "Per target position, their log-probabilities (raw, rounded to 2^-10).",
    "finish_reason": "'stop' | 'length' (generate), 'reference' (score), 'text' (text mode).",
    "prompt_text": "The prompt before templating (empty in text mode).",
    "target_text": "The target decoded with special tokens skipped.",
    "references": "The task's reference answers, when the data has them (empty list otherwise).",
}

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("completion_index", pa.int32(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("target_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_text", pa.string(), nullable=False),
        pa.field("target_text", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
    ],
    metadata={b"kd_shards.schema_version": str(SCHEMA_VERSION).encode()},
)

PARQUET_WRITE_OPTIONS = {
    "compression": "zstd",
    "compression_level": 3,
    # Dictionary encoding on every column: ids come from a bounded vocabulary and rounded
    # logprobs from a bounded grid, so dictionary indices + zstd beat plain encoding (measured on
    # SmolLM2 GSM8K shards at k=20: logprobs 41.9 vs 45.4 B/token; byte-stream-split is not
    # applied by pyarrow to these nested columns).
    "use_dictionary": True,
    "write_statistics": ["source_index", "completion_index"],
}
"""Keyword arguments for pyarrow.parquet.write_table / ParquetWriter."""


CLASSIFY_MODE = "classify"
"""The manifest mode of a dump of class distributions (one row per example)."""

NO_LABEL = -1
"""target_ids value of a classify row whose example has no gold label (its target_logprobs
entry is -inf)."""

HIDDEN_COLUMN = "teacher_hidden"
"""Optional classify column: the teacher's pooled hidden state, list<float16> of the width the
manifest's classify.hidden.width records."""

HIDDEN_FIELD = pa.field(HIDDEN_COLUMN, pa.list_(pa.float16()), nullable=False)

CLASSIFY_CONVENTIONS = {
    "rows": "one row per example: sample_id = '<source index>', completion_index 0",
    "topk_ids": "one position holding ALL L label indices 0..L-1 in rank order (most likely "
    "first), so k = L and nothing is left in a tail; label i is manifest classify.labels[i]",
    "topk_logprobs": "the teacher's log-probabilities of those labels (raw, T=1, rounded to the "
    "storage grid), in the same rank order",
    "target_ids": "[gold label index], or [NO_LABEL = -1] when the example has no gold label",
    "target_logprobs": "[the teacher's log-probability of the gold label], -inf with NO_LABEL",
    "prompt_ids": "empty: class distributions are tokenizer-free and students tokenize the text",
    "prompt_text": "the example's text, as given to the teacher (before any template)",
    "target_text": "the gold label's name ('' without one)",
    "finish_reason": "'label' when the gold label is known, 'unlabelled' otherwise",
    HIDDEN_COLUMN: "optional: the teacher's pooled hidden state (float16), when the dump asked",
}
"""How a classify dump fills the shard columns (the README's "Classification shards")."""


def classify_schema(with_hidden: bool) -> pa.Schema:
    """SCHEMA, plus the teacher_hidden column when the dump stores pooled hidden states."""
    return SCHEMA.append(HIDDEN_FIELD) if with_hidden else SCHEMA


def round_logprobs(values: np.ndarray) -> np.ndarray:
    """Round log-probabilities to the storage grid.

    Args:
        values: float array of any shape, natural-log probabilities (<= 0 up to float error).
    Returns:
        float32 array, same shape, multiples of LOGPROB_STEP, clipped above at 0; -inf stays -inf.
    """
    scaled = np.round(np.asarray(values, dtype=np.float64) / LOGPROB_STEP) * LOGPROB_STEP
    return np.minimum(scaled, 0.0).astype(np.float32)


def max_rounding_error() -> float:
    """The largest absolute change round_logprobs makes to a finite value (half a step)."""
    return LOGPROB_STEP / 2


def schema_version_of(schema: pa.Schema) -> int | None:
    """The schema version a Parquet file was written with, or None if it carries none."""
    raw = (schema.metadata or {}).get(b"kd_shards.schema_version")
    return int(raw) if raw is not None else None


def describe_schema_mismatch(actual: pa.Schema) -> str | None:
    """A one-line description of how `actual` differs from SCHEMA, or None if it conforms."""
    missing = [name for name in SCHEMA.names if name not in actual.names]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    for field in SCHEMA:
        got = actual.field(field.name).type
        if got != field.type:
            return f"column {field.name} has type {got}, expected {field.type}"
        # An extension type pyarrow does not know reads back as its storage type with its name in
        # the field metadata (pyarrow's old pickled Python types among them): not our schema.
        extension = (actual.field(field.name).metadata or {}).get(b"ARROW:extension:name")
        if extension is not None:
            name = extension.decode(errors="replace")[:60]
            return f"column {field.name} declares the Arrow extension type {name!r}"
    if HIDDEN_COLUMN in actual.names and actual.field(HIDDEN_COLUMN).type != HIDDEN_FIELD.type:
        return f"column {HIDDEN_COLUMN} has type {actual.field(HIDDEN_COLUMN).type}, expected {HIDDEN_FIELD.type}"
    return None
