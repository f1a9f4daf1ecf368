"""Filters applied while teacher-dump --mode generate writes: each sampled completion gets a
score, and only those that pass reach the shards (rejection sampling, sequence-level KD on
good samples only).

One small pure function per filter scores a completion; `select_rows` turns a prompt's scores
into the rows kept. teacher_dump.run applies them between the engine and the shard writer, so
both executors filter the same way, and records the outcome in the manifest's `filter` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kd_shards.shared.errors import UserError
from kd_shards.shared.scoring import rouge_per_sample
from kd_shards.shared.tasks.gsm8k import gsm8k_correct

FilterName = Literal["none", "answer-match", "rouge-l", "column"]
"""none: keep every completion; answer-match: the completion's final number equals the
reference's (GSM8K's own extraction); rouge-l: ROUGE-L F1 against the references at least
--filter-threshold; column: the completion contains the row's --filter-column value."""

Outcome = Literal["kept", "none_kept", "best_kept"]
"""A prompt's outcome: some completion passed; none passed (no rows); none passed and the best
was kept anyway (--keep-best-of)."""


def answer_match_score(text: str, references: Sequence[str]) -> float:
    """1.0 when the completion's final answer equals the first reference's (shared.tasks.gsm8k's
    extraction: after the last '####', else the last number), else 0.0."""
    return 1.0 if gsm8k_correct(text, references[0]) else 0.0


def rouge_l_score(text: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 of the completion against its best reference (kd-eval's metric)."""
    return rouge_per_sample([text], [list(references)])[0]["rougeL"]


def column_score(text: str, value: str) -> float:
    """1.0 when the completion contains the column's value (both stripped), else 0.0."""
    return 1.0 if value.strip() in text.strip() else 0.0


@dataclass(frozen=True)
class CompletionFilter:
    """A dump's filter, resolved from its config."""

    name: FilterName
    threshold: float
    """The least score a completion keeps (1.0 for the pass/fail filters)."""
    column: str | None
    keep_best_of: bool

    def score(self, text: str, references: Sequence[str], row: dict) -> float:
        """The completion's score; `row` is the prompt's data record (the column filter's)."""
        if self.name == "answer-match":
            return answer_match_score(text, references)
        if self.name == "rouge-l":
            return rouge_l_score(text, references)
        return column_score(text, str(row[self.column]))


def select_rows(rows: list, scores: Sequence[float], threshold: float, keep_best_of: bool):
    """The rows of one prompt that pass (score >= threshold), and the prompt's Outcome. With
    `keep_best_of` and no row passing, the best-scoring row (the first of equals) is kept."""
    kept = [row for row, value in zip(rows, scores, strict=True) if value >= threshold]
    if kept:
        return kept, "kept"
    if keep_best_of and rows:
        best = max(range(len(rows)), key=lambda index: (scores[index], -index))
        return [rows[best]], "best_kept"
    return [], "none_kept"


def check_filter_data(completion_filter: CompletionFilter, requests, records: list[dict]) -> None:
    """Refuse data the filter cannot judge (no references, no such column), before the engine."""
    for request in requests:
        if completion_filter.name in ("answer-match", "rouge-l") and not any(
            reference.strip() for reference in request.references
        ):
            raise UserError(
                f"--filter {completion_filter.name} needs each prompt's reference, and record "
                f"{request.source_index} has none: pass --target-column (the column holding "
                "it) or use --filter column"
            )
        if completion_filter.name == "column":
            row = records[request.source_index]
            if completion_filter.column not in row or row[completion_filter.column] is None:
                raise UserError(
                    f"--filter column: record {request.source_index} has no column "
                    f"{completion_filter.column!r}: pass --filter-column with a column of the data"
                )
