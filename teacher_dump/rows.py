"""Pure conversions from the engine's per-position arrays to shard rows.

No I/O and no engine here: inputs are numpy arrays, outputs are `ShardRow`s whose arrays follow
the schema in schemas/shard.py (ids < tokenizer size, target logprobs rounded to the storage
grid, the teacher's distributions encoded as the dump's representation: teacher_dump.encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kd_shards.schemas.shard import NO_LABEL, PAD_ID, Storage, round_logprobs
from kd_shards.shared.errors import UserError
from kd_shards.teacher_dump.encoding import RowEntries, encode_row
from kd_shards.teacher_dump.requests import DumpRequest


@dataclass(frozen=True)
class EngineEntries:
    """One row's distributions as the engine gave them, padding-row ids dropped, before stage 1
    of teacher_dump.encoding (encode_row's arguments)."""

    ids: np.ndarray
    """(T, K) int32, rank order, PAD_ID after the real entries."""
    logprobs: np.ndarray
    """(T, K) float32 unrounded engine values, -inf after the real entries."""


@dataclass(frozen=True)
class ShardRow:
    """One row of a shard (see schemas.shard.COLUMNS for the meaning of each field)."""

    sample_id: str
    source_index: int
    completion_index: int
    prompt_ids: np.ndarray
    """(P,) int32."""
    target_ids: np.ndarray
    """(T,) int32."""
    target_logprobs: np.ndarray
    """(T,) float32."""
    entries: RowEntries | EngineEntries | None
    """The teacher's distribution at each target position: as the dump stores it (RowEntries,
    stage 1 of teacher_dump.encoding; the shard's writer finishes the coding), or still as the
    engine gave it (EngineEntries: the shard's writer encodes them, off the engine's loop:
    encoded_row). None in classify rows, which keep every label exactly in topk_ids /
    topk_logprobs (schema v1)."""
    finish_reason: str
    prompt_text: str
    target_text: str
    references: tuple[str, ...]
    padded_topk_entries: int
    """Engine entries that were padding-row ids (>= tokenizer size), left out."""
    topk_ids: np.ndarray | None = None
    """Classify rows only (schema v1 layout, entries None): (1, L) every label index, rank order."""
    topk_logprobs: np.ndarray | None = None
    """Classify rows only: (1, L) float32 their logprobs, rounded to the storage grid."""
    hidden: np.ndarray | None = None
    """(H,) float16 pooled teacher hidden state (classify dumps that ask for it), else None."""
    text_pair: str | None = None
    """Classify rows of sentence pairs: the second text, else None."""
    mask_positions: np.ndarray | None = None
    """Masked-LM rows only: (T,) int32 index in prompt_ids of each target position."""
    token_hidden: np.ndarray | None = None
    """Masked-LM rows that ask for it: (P, H) float16 teacher hidden state per input token."""


def drop_padding_ids(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, tokenizer_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Remove ids >= tokenizer_size from each position's top-k, keeping rank order.

    Args:
        topk_ids: (T, K) int32 in rank order. topk_logprobs: (T, K) float32.
    Returns:
        (ids, logprobs, dropped): the valid entries moved to the front of each row, freed slots
        filled with PAD_ID / -inf, and how many entries were dropped.
    """
    invalid = (topk_ids >= tokenizer_size) | (topk_ids < 0)
    dropped = int(invalid.sum())
    if dropped == 0:
        return topk_ids, topk_logprobs, 0
    # A stable sort on the invalid flag moves valid entries first without reordering them.
    order = np.argsort(invalid, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids, order, axis=1).copy()
    logprobs = np.take_along_axis(topk_logprobs, order, axis=1).copy()
    freed = np.take_along_axis(invalid, order, axis=1)
    ids[freed] = PAD_ID
    logprobs[freed] = -np.inf
    return ids, logprobs, dropped


def check_finite(logprobs: np.ndarray, sample_id: str) -> None:
    """Refuse NaN/inf teacher logprobs (numerical overflow) before they reach a shard."""
    if not np.isfinite(logprobs).all():
        raise UserError(
            f"the teacher returned NaN/inf logprobs for sample {sample_id} (numerical overflow): "
            "rerun with --dtype float32, or check the model's weights"
        )


@dataclass(frozen=True)
class ScoredTarget:
    """One target sequence of a request and the engine's (T, K+1) arrays for its positions.

    Column 0 of the position arrays is the target token itself (vLLM's layout), columns 1..K
    the top-K in rank order (sampled storage: K draws from the full distribution).
    """

    sample_id: str
    completion_index: int
    """Which of the request's completions (0 for a teacher-forced target)."""
    target_ids: np.ndarray
    """(T,) the target tokens."""
    position_ids: np.ndarray
    """(T, K+1) ids at each target position."""
    position_logprobs: np.ndarray
    """(T, K+1) their logprobs."""
    finish_reason: str
    target_text: str


def make_row(
    request: DumpRequest,
    target: ScoredTarget,
    tokenizer_size: int,
    storage: Storage | None = None,
) -> ShardRow:
    """Build the row of `request`'s `target`: ids >= tokenizer_size left out, the distributions
    encoded as `storage` says (stage 1 of teacher_dump.encoding), or, with `storage` None (what
    the token modes pass), kept as the engine's entries for the shard writer to encode beside
    the engine (encoded_row; teacher_dump.pipeline)."""
    sample_id, target_ids = target.sample_id, target.target_ids
    if not np.array_equal(target.position_ids[:, 0], target_ids):
        raise RuntimeError(f"engine logprobs are misaligned with the targets of sample {sample_id}")
    check_finite(target.position_logprobs, sample_id)
    topk_ids, topk_logprobs, dropped = drop_padding_ids(
        np.ascontiguousarray(target.position_ids[:, 1:]),
        np.ascontiguousarray(target.position_logprobs[:, 1:]),
        tokenizer_size,
    )
    row = ShardRow(
        sample_id=sample_id,
        source_index=request.source_index,
        completion_index=target.completion_index,
        prompt_ids=np.asarray(request.prompt_ids, dtype=np.int32),
        target_ids=np.asarray(target_ids, dtype=np.int32),
        target_logprobs=round_logprobs(target.position_logprobs[:, 0]),
        entries=EngineEntries(topk_ids, topk_logprobs),
        finish_reason=target.finish_reason,
        prompt_text=request.prompt_text,
        target_text=target.target_text,
        references=request.references,
        padded_topk_entries=dropped,
    )
    return row if storage is None else encoded_row(row, storage, tokenizer_size)


def encoded_row(row: ShardRow, storage: Storage | None, tokenizer_size: int) -> ShardRow:
    """`row` with its EngineEntries encoded as `storage` says (stage 1 of
    teacher_dump.encoding); a row already encoded (or a classify row) as it is."""
    if not isinstance(row.entries, EngineEntries):
        return row
    entries = encode_row(row.entries.ids, row.entries.logprobs, storage, tokenizer_size)
    return replace(row, entries=entries)


def first_invalid_position(token_ids: np.ndarray, tokenizer_size: int) -> int | None:
    """Index of the first sampled id that is not a real token (a padding row), if any."""
    invalid = np.flatnonzero((token_ids >= tokenizer_size) | (token_ids < 0))
    return int(invalid[0]) if invalid.size else None


def make_classification_row(
    *,
    source_index: int,
    log_probabilities: np.ndarray,
    gold: int,
    text: str,
    labels: list[str],
    hidden: np.ndarray | None,
    text_pair: str | None = None,
) -> ShardRow:
    """The row of one classified example (schemas.shard.CLASSIFY_CONVENTIONS).

    Args:
        log_probabilities: (L,) the teacher's log-probabilities over all labels, label order.
        gold: the gold label's index, or NO_LABEL.
        hidden: (H,) pooled hidden state, or None.
        text_pair: a sentence pair's second text, or None.
    """
    sample_id = str(source_index)
    log_probabilities = np.asarray(log_probabilities, dtype=np.float64).reshape(1, -1)
    check_finite(log_probabilities, sample_id)
    # Ties keep label order (a stable sort), so equal probabilities are stored reproducibly.
    order = np.argsort(-log_probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(log_probabilities, order, axis=1)
    has_gold = gold != NO_LABEL
    return ShardRow(
        sample_id=sample_id,
        source_index=source_index,
        completion_index=0,
        prompt_ids=np.zeros(0, dtype=np.int32),
        target_ids=np.asarray([gold], dtype=np.int32),
        target_logprobs=(
            round_logprobs(log_probabilities[:, gold])
            if has_gold
            else np.asarray([-np.inf], dtype=np.float32)
        ),
        entries=None,
        finish_reason="label" if has_gold else "unlabelled",
        prompt_text=text,
        target_text=labels[gold] if has_gold else "",
        references=(labels[gold],) if has_gold else (),
        padded_topk_entries=0,
        topk_ids=order.astype(np.int32),
        topk_logprobs=round_logprobs(ranked),
        hidden=None if hidden is None else np.asarray(hidden, dtype=np.float16),
        text_pair=text_pair,
    )


ENTRY_COLUMNS = ("entry_counts", "entry_ids", "entry_values", "entry_tail")
"""The columns that carry a row's RowEntries across a process boundary (list<int32> each),
beside the shard's row columns (teacher_dump.shards.rows_to_transfer_table)."""


def rows_from_table(table) -> list[ShardRow]:
    """The ShardRows of a transfer table (the inverse of
    teacher_dump.shards.rows_to_transfer_table): token rows that crossed a process boundary as
    Arrow, e.g. from the Ray executor's actors, with their stored distributions still before
    the shard-level coding (the writer's shard decides the codebook)."""
    columns = {name: table[name].to_pylist() for name in table.column_names}

    def int32(name: str, index: int) -> np.ndarray:
        return np.asarray(columns[name][index], dtype=np.int32)

    rows = []
    for index in range(table.num_rows):
        rows.append(
            ShardRow(
                sample_id=columns["sample_id"][index],
                source_index=columns["source_index"][index],
                completion_index=columns["completion_index"][index],
                prompt_ids=int32("prompt_ids", index),
                target_ids=int32("target_ids", index),
                target_logprobs=np.asarray(columns["target_logprobs"][index], dtype=np.float32),
                entries=RowEntries(*(int32(name, index) for name in ENTRY_COLUMNS)),
                finish_reason=columns["finish_reason"][index],
                prompt_text=columns["prompt_text"][index],
                target_text=columns["target_text"][index],
                references=tuple(columns["references"][index]),
                padded_topk_entries=columns["padded_topk_entries"][index],
            )
        )
    return rows
