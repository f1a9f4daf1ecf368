"""Several teachers' token dumps of the same rows as one teacher: --shards A --more-shards B ...

A second teacher's dump of A's rows comes from `teacher-dump --mode rescore --data A` (same
sample ids and, with the same tokenizer, the same target ids). The stream reads A; each of its
rows is joined with the other dumps' row of the same sample id (TeacherLookup: an index of
sample ids, row groups decoded on demand) and the teachers are averaged per position
(average_teachers): p(id) = Σ_t w_t p_t(id) over the union of the stored ids, the tails
likewise. Resume is unchanged: the stream's position is A's, the lookups hold no state.
Classify dumps are combined per example instead (classify_data.combined_teachers).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import storage_of_manifest
from kd_shards.schemas.shard import PAD_ID
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import (
    TRAINING_COLUMNS,
    Dump,
    TrainingRow,
    decode_row_group,
    id_space,
)

CACHED_GROUPS = 8
"""Decoded row groups a lookup keeps (the stream's shuffle visits groups in windows)."""


def average_teachers(rows: list[TrainingRow], weights: list[float]) -> TrainingRow:
    """The weighted average of several teachers' distributions of one row, per position.

    Args:
        rows: one TrainingRow per teacher, with equal target_ids; each (T, K_t) topk arrays in
            rank order (PAD_ID / -inf in freed slots) and optional (T,) log tails (NaN: none
            stored, then 1 − Σp).
        weights: one per teacher, summing to 1.
    Returns:
        rows[0] with (T, K') topk arrays: the union of the stored ids with p(id) =
        Σ_t w_t p_t(id) (0 for a teacher that did not store the id: its mass there is in its
        tail), in decreasing order, K' the widest union; log tail log Σ_t w_t tail_t.
    """
    first = rows[0]
    positions = len(first.target_ids)
    keys, masses = [], []
    tail = np.zeros(positions, dtype=np.float64)
    for row, weight in zip(rows, weights, strict=True):
        ids = row.topk_ids.astype(np.int64)
        real = ids != PAD_ID
        p = np.where(real, np.exp(row.topk_logprobs.astype(np.float64)), 0.0)
        stored_tail = np.full(positions, np.nan) if row.topk_log_tail is None else row.topk_log_tail
        rest = np.clip(1.0 - p.sum(1), 0.0, None)
        tail += weight * np.where(np.isnan(stored_tail), rest, np.exp(stored_tail))
        position = np.broadcast_to(np.arange(positions)[:, None], ids.shape)
        keys.append((position * (1 << 32) + ids)[real])
        masses.append(weight * p[real])
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    mass = np.bincount(inverse, weights=np.concatenate(masses), minlength=len(unique))
    position, token = unique >> 32, unique & ((1 << 32) - 1)
    order = np.lexsort((-mass, position))  # by position, most likely first
    position, token, mass = position[order], token[order], mass[order]
    counts = np.bincount(position, minlength=positions)
    width = max(int(counts.max()) if positions else 1, 1)
    slot = np.arange(len(position)) - np.repeat(np.cumsum(counts) - counts, counts)
    topk_ids = np.full((positions, width), PAD_ID, dtype=np.int32)
    topk_logprobs = np.full((positions, width), -np.inf, dtype=np.float32)
    topk_ids[position, slot] = token
    with np.errstate(divide="ignore"):
        topk_logprobs[position, slot] = np.log(mass)
        log_tail = np.log(tail).astype(np.float32)
    return replace(first, topk_ids=topk_ids, topk_logprobs=topk_logprobs, topk_log_tail=log_tail)


class TeacherLookup:
    """The rows of another teacher's dump by sample id (row groups decoded on demand)."""

    def __init__(self, dump: Dump, flag: str = "--more-shards"):
        self.dump = dump
        self.flag = flag
        self.where: dict[str, tuple[int, int]] = {}
        for number, group in enumerate(dump.row_groups):
            with group.shard.readable() as source:
                table = pq.ParquetFile(source).read_row_group(group.index, columns=["sample_id"])
            for offset, sample_id in enumerate(table["sample_id"].to_pylist()):
                self.where[sample_id] = (number, offset)
        self.cache: OrderedDict[int, list[TrainingRow]] = OrderedDict()

    def row(self, sample_id: str) -> TrainingRow:
        if sample_id not in self.where:
            raise UserError(
                f"{self.flag} {self.dump.directory} has no sample {sample_id} of --shards: "
                "combine dumps of the same rows (teacher-dump --mode rescore --data the --shards "
                "dump)"
            )
        number, offset = self.where[sample_id]
        if number not in self.cache:
            manifest = self.dump.manifest
            self.cache[number] = decode_row_group(
                self.dump.row_groups[number],
                TRAINING_COLUMNS,
                int(manifest["top_k"]),
                id_space(manifest),
                storage=storage_of_manifest(manifest),
            )
            if len(self.cache) > CACHED_GROUPS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(number)
        return self.cache[number][offset]


def fit_target(row: TrainingRow, length: int) -> TrainingRow:
    """`row` with its first `length` target positions only."""
    if len(row.target_ids) <= length:
        return row
    return replace(
        row,
        target_ids=row.target_ids[:length],
        topk_ids=row.topk_ids[:length],
        topk_logprobs=row.topk_logprobs[:length],
        topk_log_tail=None if row.topk_log_tail is None else row.topk_log_tail[:length],
    )


def combined_row(
    row: TrainingRow, lookups: list[TeacherLookup], weights: list[float]
) -> TrainingRow:
    """`row` (of --shards) with every teacher's distribution averaged in."""
    # The stream may have cut the row to --max-length (fit_row: target tokens from the end);
    # the other teachers' rows are cut alike.
    others = [fit_target(lookup.row(row.sample_id), len(row.target_ids)) for lookup in lookups]
    for lookup, other in zip(lookups, others, strict=True):
        if not np.array_equal(other.target_ids, row.target_ids):
            raise UserError(
                f"{lookup.flag} {lookup.dump.directory}: sample {row.sample_id} has other target "
                "tokens than in --shards: combine dumps of the same rows with the same tokenizer "
                "(teacher-dump --mode rescore --data the --shards dump)"
            )
    return average_teachers([row, *others], weights)


class CombinedTeachersObjective:
    """An objective whose rows carry the average of several teachers (everything else is the
    wrapped objective's)."""

    def __init__(self, inner, lookups: list[TeacherLookup], weights: list[float]):
        self.inner = inner
        self.lookups = lookups
        self.weights = weights
        self.unit = inner.unit
        self.modules = inner.modules

    def batch(self, rows: list[TrainingRow]):
        return self.inner.batch([combined_row(row, self.lookups, self.weights) for row in rows])

    def sums(self, model, batch, device):
        return self.inner.sums(model, batch, device)

    def evaluation_sums(self, model, batches, device, bf16: bool):
        return self.inner.evaluation_sums(model, batches, device, bf16)

    def evaluation_metrics(self, sums):
        return self.inner.evaluation_metrics(sums)

    def extra_weights(self):
        return self.inner.extra_weights()


def teacher_lookups(
    dump: Dump, others: list[Dump], weights: tuple[float, ...]
) -> tuple[list[TeacherLookup], list[float]]:
    """Lookups of the --more-shards dumps (same tokenizer as --shards, refused otherwise) and
    the normalized weights of all teachers (default: uniform)."""
    fingerprint = dump.manifest["tokenizer"]["fingerprint"]
    for other in others:
        if other.manifest["tokenizer"]["fingerprint"] != fingerprint:
            raise UserError(
                f"--more-shards {other.directory} was written with another tokenizer than "
                f"--shards {dump.directory}: token dumps are averaged per position under one "
                "tokenizer; train on it alone with --cross-tokenizer uld|hybrid, or re-score "
                "--shards with that teacher (teacher-dump --mode rescore)"
            )
    raw = list(weights) if weights else [1.0] * (1 + len(others))
    total = sum(raw)
    return [TeacherLookup(other) for other in others], [weight / total for weight in raw]
