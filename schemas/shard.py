"""The shard schema: the one contract between teacher-dump (writer) and student-train / kd-eval
(readers).

One row per (prompt, completion). Per target position t (0 <= t < T) a row holds the target token,
the teacher's log-probability of it, and the teacher's distribution at that position in one of
the REPRESENTATIONS below. Everything is plain Parquet that polars, pyarrow, duckdb, pandas and
`datasets` read without this package; docs/shard-format.md shows the numpy lines that decode
each representation.

Schema version 2 (written) stores the distribution as flat integer lists, one list per row
(entries of all positions of the row laid end to end; `*_count` says how many belong to each
position). Schema version 1 (still read) stored `topk_ids` / `topk_logprobs` as list<list<...>>.

Conventions that readers must honour (part of the contract, see docs/shard-format.md):
- Log-probabilities are natural-log and "raw" (temperature 1, before top-p/top-k filtering).
  `target_logprobs` (and v1 `topk_logprobs`) are rounded to multiples of LOGPROB_STEP.
- Token ids are < the manifest's `tokenizer_size` (len(tokenizer)). Ids of the embedding's
  padding rows (>= tokenizer_size) are never stored; their mass belongs to the tail.
- Position t of every per-position list is the distribution that predicted `target_ids[t]`.
- The tail (mass outside the stored ids) is stored by itself where the representation has one
  (`kd_tail`): readers take it from there, never as 1 - sum(p) of the stored values.

Classification dumps (manifest mode "classify") keep the schema-v1 layout and version: one
position per row holding ALL labels exactly (see CLASSIFY_CONVENTIONS below).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
"""Written by this release. Bumped on any change an older reader could misread."""
READABLE_VERSIONS = (1, 2)
"""Readers accept these schema versions and refuse any other, naming both values."""

LOGPROB_STEP = 2.0**-10
"""target_logprobs (and v1 topk_logprobs) are rounded to multiples of this (nats); the topk
representation stores its values as integer levels on this grid (lossless vs v1)."""

PAD_ID = -1
"""Schema v1 only: filler id for top-k slots freed by dropped padding-row ids (logprob -inf).
Readers hand the trainer (N, K) arrays padded the same way for every version."""

TAIL_STEP = 2.0**-6
"""kd_tail holds round(-log(tail mass) / TAIL_STEP): the tail's relative error is <= 0.8 %."""
TAIL_EMPTY = (1 << 16) - 1
"""kd_tail value meaning: no mass outside the stored ids (finite tails are at most one below)."""

CODEBOOK_KEY = b"kd_shards.id_codebook"
"""Parquet footer key (adaptive with a codebook): base64 of the shard's codebook, a little-endian
integer array (dtype: the representation's `codebook_dtype`); stored code c means token id
codebook[c]. Absent: codes are the ids."""
STORAGE_KEY = b"kd_shards.storage"
"""Arrow schema metadata key: JSON of the shard's Storage (representation and parameters)."""
VERSION_KEY = b"kd_shards.schema_version"

Representation = Literal["topk", "adaptive", "sampled"]
"""topk: the exact top-k in rank order (ids + logprob drops on LOGPROB_STEP, lossless vs v1) and
the exact tail. adaptive: per position, the fewest top entries that meet a fidelity or mass
target (at most k_max), ids sorted and gap-coded, values as sqrt levels, exact tail. sampled
(RS-KD): the unique ids of `draws` draws from the teacher's full distribution, with their hit
counts (weights hits / draws)."""
REPRESENTATIONS: tuple[str, ...] = get_args(Representation)
AdaptiveRule = Literal["parity", "mass"]
"""parity: per row, both fidelity figures no worse than exact top-`top_k` (entries by KL gain);
mass: per position, the fewest entries whose mass reaches `mass_target`."""
ADAPTIVE_RULES: tuple[str, ...] = get_args(AdaptiveRule)

VALUE_SCALE = 24
"""Default S of the adaptive values: level v = round(S·sqrt(p)), decoded p = (max(v, 1/4) / S)²
(error of equal KL cost at every probability, about n / (6 S²) nats over n entries)."""


@dataclass(frozen=True)
class Storage:
    """How a dump stores its distributions: the representation and its parameters.

    Recorded in the manifest (`storage`) and in every shard's Arrow schema metadata
    (STORAGE_KEY); readers decode with these values, never with defaults of their own."""

    representation: Representation
    top_k: int = 0
    """topk: entries stored per position. adaptive: parity's reference k (and the k_max default
    is twice it). sampled: unused (0)."""
    k_max: int = 0
    """adaptive: the most entries any position keeps (the engine is asked for this many)."""
    rule: AdaptiveRule = "parity"
    """adaptive: how entries are chosen."""
    mass_target: float = 0.0
    """adaptive with rule mass: the captured mass each position reaches unless k_max stops it."""
    value_scale: int = VALUE_SCALE
    """adaptive: S of the sqrt levels."""
    codebook: bool = False
    """adaptive: ids are coded by their frequency in the shard (CODEBOOK_KEY in the footer)."""
    codebook_dtype: str = "<u2"
    """adaptive with a codebook: numpy dtype of the footer table (<u2 when the vocabulary fits
    16 bits, else <u4)."""
    top_first: bool = True
    """adaptive: each position's first kd_id_gaps entry is the teacher's most likely id (its
    code, absolute), the other entries follow in ascending order as gaps starting from 0; so the
    exact top-1 decodes first even among entries of equal level. False in adaptive records
    written without this field: every entry ascending, the top-1 not identifiable among ties."""
    draws: int = 0
    """sampled: draws per position (the divisor of the weights)."""
    zstd_level: int = 3
    """zstd level of the distribution columns (the other columns use 3)."""

    def to_dict(self) -> dict:
        """Only the fields the representation uses (what the manifest and footers record)."""
        used = {"representation", "zstd_level", *USED_PARAMETERS[self.representation]}
        if self.representation == "adaptive" and self.rule == "mass":
            used.add("mass_target")
        if self.representation == "adaptive" and self.codebook:
            used.add("codebook_dtype")
        return {key: value for key, value in dataclasses.asdict(self).items() if key in used}

    @classmethod
    def from_dict(cls, values: dict) -> Storage:
        names = {field.name for field in dataclasses.fields(cls)}
        known = {key: value for key, value in values.items() if key in names}
        if known.get("representation") == "adaptive":  # a record without the flag: ascending
            known.setdefault("top_first", False)
        return cls(**known)

    @property
    def columns(self) -> tuple[str, ...]:
        return DISTRIBUTION_COLUMNS[self.representation]

    def describe(self) -> str:
        """One line: the representation and its parameters."""
        if self.representation == "topk":
            return f"topk: exact top-{self.top_k}, rank order, values on 2^-10, exact tail"
        if self.representation == "sampled":
            return f"sampled: {self.draws} draws per position from the full distribution (RS-KD)"
        rule = (
            f"parity with exact top-{self.top_k} per row"
            if self.rule == "parity"
            else f"mass >= {self.mass_target}"
        )
        return (
            f"adaptive: {rule}, at most {self.k_max} entries, sqrt levels S={self.value_scale}, "
            f"{'shard codebook' if self.codebook else 'no codebook'}, exact tail"
            f"{', top-1 first' if self.top_first else ''}"
        )


USED_PARAMETERS = {
    "topk": ("top_k",),
    "adaptive": ("top_k", "k_max", "rule", "value_scale", "codebook", "top_first"),
    "sampled": ("draws",),
}
"""The Storage fields each representation uses (besides zstd_level)."""

COLUMNS: dict[str, str] = {
    "sample_id": "Stable unique id of the row: '<source index>' or '<source index>-<sample j>'.",
    "source_index": "Row index of the prompt in the input data (after --limit, before sharding).",
    "completion_index": "j-th sampled completion of the prompt (0 in score/text mode).",
    "prompt_ids": "Token ids given to the teacher before the target (chat template applied).",
    "target_ids": "Token ids that carry loss: the teacher's sample, the reference, or the text.",
    "target_logprobs": "Teacher log-probability of each target token (raw, T=1, on 2^-10).",
    "finish_reason": "'stop' | 'length' (generate), 'reference' (score), 'text' (text mode).",
    "prompt_text": "The prompt before templating (empty in text mode).",
    "target_text": "The target decoded with special tokens skipped.",
    "references": "The task's reference answers, when the data has them (empty list otherwise).",
    # schema v1
    "topk_ids": "v1: per target position, the teacher's k most likely token ids, rank order.",
    "topk_logprobs": "v1: per target position, their log-probabilities (rounded to 2^-10).",
    # schema v2: topk and adaptive
    "kd_count": "Per target position, the number of entries stored for it (T values).",
    "kd_ids": "topk: the entries' token ids, each position's in rank order (most likely first).",
    "kd_drops": "topk: L_0, L_1 - L_0, ... per position, L_i = round(-logprob_i / 2^-10) >= 0.",
    "kd_id_gaps": "adaptive: each position's ids (codes with a codebook): with top_first, the "
    "most likely id itself, then the others in ascending order as gaps (the first of them the id "
    "itself, then differences to the previous id); without, all of them that way.",
    "kd_levels": "adaptive: round(S * sqrt(p)) of each entry, in the same order as kd_id_gaps.",
    "kd_tail": "Per position, round(-ln(mass outside the stored ids) / 2^-6); 65535 = none.",
    # schema v2: sampled
    "rs_count": "sampled: per position, the number of distinct ids drawn.",
    "rs_id_gaps": "sampled: the distinct drawn ids of each position, ascending, as gaps.",
    "rs_hits": "sampled: how many of the position's draws hit each id (weight = hits / draws).",
    "rs_draws": "sampled: per position, the number of draws (padding-row draws included).",
}

BASE_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("source_index", pa.int64(), nullable=False),
    pa.field("completion_index", pa.int32(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("target_text", pa.string(), nullable=False),
    pa.field("references", pa.list_(pa.string()), nullable=False),
]

DISTRIBUTION_COLUMNS: dict[str, tuple[str, ...]] = {
    "topk": ("kd_count", "kd_ids", "kd_drops", "kd_tail"),
    "adaptive": ("kd_count", "kd_id_gaps", "kd_levels", "kd_tail"),
    "sampled": ("rs_count", "rs_id_gaps", "rs_hits", "rs_draws"),
}
"""The schema-v2 columns of each representation, all list<int32> (one list per row)."""
PER_POSITION_COLUMNS = frozenset({"kd_count", "kd_tail", "rs_count", "rs_draws"})
"""Columns with one value per target position; the others have one value per stored entry."""
V1_COLUMNS = ("topk_ids", "topk_logprobs")

SCHEMA_V1 = pa.schema(
    [
        *BASE_FIELDS[:6],
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        *BASE_FIELDS[6:],
    ],
    metadata={VERSION_KEY: b"1"},
)
"""Schema version 1: read for token dumps; still written for classify dumps (CLASSIFY_MODE)."""

PARQUET_WRITE_OPTIONS_V1 = {
    "compression": "zstd",
    "compression_level": 3,
    # Dictionary encoding on every column: ids come from a bounded vocabulary and rounded
    # logprobs from a bounded grid, so dictionary indices + zstd beat plain encoding (measured on
    # SmolLM2 GSM8K shards at k=20: logprobs 41.9 vs 45.4 B/token; byte-stream-split is not
    # applied by pyarrow to these nested columns).
    "use_dictionary": True,
    "write_statistics": ["source_index", "completion_index"],
}
"""Keyword arguments for pyarrow.parquet.ParquetWriter of a schema-v1 (classify) shard."""


def shard_schema(storage: Storage) -> pa.Schema:
    """The schema-v2 Arrow schema of a dump stored as `storage` (its metadata records both)."""
    fields = [pa.field(name, pa.list_(pa.int32()), nullable=False) for name in storage.columns]
    return pa.schema(
        [*BASE_FIELDS, *fields],
        metadata={
            VERSION_KEY: str(SCHEMA_VERSION).encode(),
            STORAGE_KEY: json.dumps(storage.to_dict(), sort_keys=True).encode(),
        },
    )


def parquet_write_options(storage: Storage) -> dict:
    """Keyword arguments for pyarrow.parquet.ParquetWriter of a v2 shard.

    Row columns are dictionary-encoded (ids come from a bounded vocabulary, rounded logprobs from
    a bounded grid) with zstd 3. The distribution columns are small non-negative integers:
    BYTE_STREAM_SPLIT (their mostly-zero high bytes in planes of their own) beats dictionary
    encoding for every one of them (measured on SmolLM2 shards), with zstd at storage.zstd_level.
    """
    leaf = {name: f"{name}.list.element" for name in storage.columns}
    row_leaves = [
        f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name
        for field in BASE_FIELDS
    ]
    return {
        "compression": "zstd",
        "compression_level": {
            **dict.fromkeys(row_leaves, 3),
            **dict.fromkeys(leaf.values(), storage.zstd_level),
        },
        "use_dictionary": row_leaves,
        "column_encoding": dict.fromkeys(leaf.values(), "BYTE_STREAM_SPLIT"),
        "write_statistics": ["source_index", "completion_index"],
    }


CLASSIFY_MODE = "classify"
"""The manifest mode of a dump of class distributions (one row per example)."""

CLASSIFY_SCHEMA_VERSION = 1
"""Classify dumps are written with schema version 1, whatever SCHEMA_VERSION is: they store
every label's exact logprob (k = L, a few dozen at most, no tail), where the v2 representations
exist to shrink a top-k over a vocabulary of tens of thousands. Nothing to gain, and v1 readers
keep reading them."""

NO_LABEL = -1
"""target_ids value of a classify row whose example has no gold label (its target_logprobs
entry is -inf)."""

HIDDEN_COLUMN = "teacher_hidden"
"""Optional classify column: the teacher's pooled hidden state, list<float16> of the width the
manifest's classify.hidden.width records."""

HIDDEN_FIELD = pa.field(HIDDEN_COLUMN, pa.list_(pa.float16()), nullable=False)

PAIR_COLUMN = "text_pair"
"""Optional classify column of a sentence-pair dump (manifest classify.text_pairs true): the
example's second text, which the student tokenizes with prompt_text as a pair. Dumps of single
texts have no such column and read as before."""

PAIR_FIELD = pa.field(PAIR_COLUMN, pa.string(), nullable=False)

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
    PAIR_COLUMN: "optional: a sentence pair's second text (prompt_text is the first)",
}
"""How a classify dump fills the shard columns (docs/classification.md, "Classification
shards")."""


def classify_schema(with_hidden: bool, with_pair: bool = False) -> pa.Schema:
    """SCHEMA_V1, plus the teacher_hidden column when the dump stores pooled hidden states and
    the text_pair column when its examples are sentence pairs."""
    schema = SCHEMA_V1.append(HIDDEN_FIELD) if with_hidden else SCHEMA_V1
    return schema.append(PAIR_FIELD) if with_pair else schema


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
    raw = (schema.metadata or {}).get(VERSION_KEY)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def storage_of(schema: pa.Schema) -> Storage | None:
    """The Storage a v2 shard's schema metadata records, or None (v1, or unreadable)."""
    raw = (schema.metadata or {}).get(STORAGE_KEY)
    try:
        storage = Storage.from_dict(json.loads(raw)) if raw is not None else None
    except (ValueError, TypeError):
        return None
    if storage is None or storage.representation not in REPRESENTATIONS:
        return None
    return storage


def expected_schema(version: int, storage: Storage | None) -> pa.Schema:
    """The schema a shard of this version (and, for v2, storage) must have."""
    return SCHEMA_V1 if version == 1 else shard_schema(storage)


def describe_schema_mismatch(actual: pa.Schema, expected: pa.Schema) -> str | None:
    """A one-line description of how `actual` differs from `expected`, or None if it conforms."""
    missing = [name for name in expected.names if name not in actual.names]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    for field in expected:
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
    if PAIR_COLUMN in actual.names and actual.field(PAIR_COLUMN).type != PAIR_FIELD.type:
        return f"column {PAIR_COLUMN} has type {actual.field(PAIR_COLUMN).type}, expected {PAIR_FIELD.type}"
    return None


MASKED_LM_MODE = "mlm"
"""The manifest mode of a masked-LM dump (teacher-dump --mode mlm): schema-v2 token rows plus
the optional masked-LM columns below (MASKED_LM_CONVENTIONS)."""

MASK_POSITIONS_COLUMN = "mask_positions"
"""Masked-LM column: per row, the index in prompt_ids of each masked position (list<int32>, one
per target position, ascending)."""
MASK_POSITIONS_FIELD = pa.field(MASK_POSITIONS_COLUMN, pa.list_(pa.int32()), nullable=False)
TOKEN_HIDDEN_COLUMN = "teacher_token_hidden"
"""Optional masked-LM column: the teacher's hidden state at every input token, list<float16>
of len(prompt_ids) x the width the manifest's mlm.hidden.width records, token by token."""
TOKEN_HIDDEN_FIELD = pa.field(TOKEN_HIDDEN_COLUMN, pa.list_(pa.float16()), nullable=False)

MASKED_LM_CONVENTIONS = {
    "rows": "one row per (text window, masking): sample_id = '<source index>-<copy>', "
    "completion_index = the copy (0 .. masks_per_text - 1)",
    "prompt_ids": "the student's input: the window with its special tokens, masked (80% "
    "[MASK], 10% a random token, 10% unchanged at the chosen positions)",
    MASK_POSITIONS_COLUMN: "the index in prompt_ids of each chosen position, ascending",
    "target_ids": "the original token at each chosen position (what the MLM loss predicts)",
    "target_logprobs": "the teacher's log-probability of the original token there",
    "distribution columns": "the teacher's distribution at each chosen position, in the "
    "dump's representation (position t belongs to mask_positions[t])",
    TOKEN_HIDDEN_COLUMN: "optional: the teacher's hidden state at every prompt_ids token "
    "(float16), when the dump asked for it (--hidden-layer)",
    "prompt_text": "empty",
    "finish_reason": "'masked'",
}
"""How a masked-LM dump fills the shard columns (docs/shard-format.md, "Masked-LM shards").
Readers that do not know the mode see valid schema-v2 token rows, so every trainer checks the
manifest's mode (schemas.manifest.check_dump_kind) before training on one."""


def masked_lm_schema(storage: Storage, with_hidden: bool) -> pa.Schema:
    """shard_schema(storage) plus mask_positions (and teacher_token_hidden when stored)."""
    schema = shard_schema(storage).append(MASK_POSITIONS_FIELD)
    return schema.append(TOKEN_HIDDEN_FIELD) if with_hidden else schema
