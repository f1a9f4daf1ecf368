"""The one interface every task implements: where its data comes from, how a record becomes an
Example, how a model is run on it (its kind) and how the outputs are scored (its metric).

teacher-dump reads a task's Examples; kd-eval runs a model the way the task's kind says and hands
the outputs to the task's `score`. A task is a value of `Task` built in its own module; the
built-in ones are listed once in shared/tasks/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kd_shards.shared.errors import UserError
from kd_shards.shared.records import LoadedRecords

TaskKind = Literal["generate", "text", "classify", "choice"]
"""How a model is run on a task, which fixes what `score(predictions, inputs)` receives:
- generate: one greedy answer per prompt; predictions are the answer strings, inputs the
  Examples.
- text: teacher-forced scoring of raw-text windows; predictions are per-window
  language_model_sums arrays (shared/scoring.py), inputs the windows' token ids.
- classify: one distribution over the task's labels per example; predictions are an (N, L)
  array of log-probabilities in the task's label order, inputs the Examples.
- choice: multiple choice; each Example's `choices` are its options. predictions map a scoring
  name to one (O,) array of option scores per example (higher is better; causal LMs give
  "sum" and "mean" log-probabilities, encoders "choice" logits); the first name is the one
  reported as accuracy. inputs the Examples.
A task of a new kind adds its kind here and its runner to kd-eval; a task of an existing kind
is only its own module."""

Scores = tuple[dict, list[dict]]
"""(metrics over the whole set, one record per sample for the predictions file)."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answers, ready to render."""

    index: int
    """Position of the record in the loaded data (stable across runs: resume keys on it)."""
    prompt: str
    """The user message (before any chat template); classify tasks: the text to label."""
    references: tuple[str, ...]
    """Reference answers; the first one is the teacher-forcing target in score mode. Classify
    tasks: the gold label's name (empty when the record has none). Choice tasks: the gold
    option's index (0-based, as a string)."""
    pair: str | None = None
    """Sentence-pair classification: the second text, tokenized with `prompt` as a pair
    (shared.classification.classifier_input_ids); None for single texts."""
    choices: tuple[tuple[str, str], ...] = ()
    """Choice tasks: one (context, continuation) per option. A language model scores an option
    by the log-probability of its continuation after its context; an encoder reads the two as
    a text pair."""


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the Hugging Face hub (used only when online)."""

    name: str
    config: str | None


@dataclass(frozen=True)
class MetricColumn:
    """One metric as kd-eval's table and chart show it."""

    key: str
    """Key in the task's metrics dict."""
    label: str
    """Column header in the table."""
    format: str
    """Format of the value in the table, e.g. '{:.3f}'."""
    chart_title: str | None = None
    """Title of the metric's chart panel; None: not charted."""


@dataclass(frozen=True)
class Task:
    """A task: data source, record -> Example conversion, kind and metric."""

    name: str
    """The name every command takes (--data NAME)."""
    kind: TaskKind
    """How a model is run on the task (see TaskKind); kd-eval dispatches on it."""
    hub: HubSource
    to_example: Callable[[dict, int], Example]
    """Converts a raw record (and its index) into an Example; raises UserError on bad records."""
    file_names: tuple[str, ...]
    """Candidate file names for a split when --data-path is a directory ('{split}' is filled)."""
    score: Callable[[Sequence[Any], Sequence[Any]], Scores] | None = None
    """(predictions, inputs), as the task's kind defines them -> Scores; None for a task only
    teacher-dump reads (a table mapped with --prompt-column)."""
    metrics: tuple[MetricColumn, ...] = ()
    """The metrics kd-eval's table shows, in order (the first charted ones become panels)."""
    labels: tuple[str, ...] | None = None
    """Classify tasks: the label names, in the task's label order; None otherwise."""
    columns: tuple[str, ...] | None = None
    """Column names of the task's header-less CSV/TSV files (None: the file has a header)."""
    read: Callable[[Path], LoadedRecords] | None = None
    """Reads one local file of the task's own published format (e.g. PhraseBank's
    `sentence@label` lines); None: shared.records.read_table_file."""
    pair_column: str | None = None
    """Sentence-pair classification: the column of the second text (None: single texts)."""

    @property
    def is_classification(self) -> bool:
        return self.kind == "classify"

    @property
    def is_pair(self) -> bool:
        """Sentence-pair classification (each Example has a `pair`)."""
        return self.pair_column is not None


def require_columns(row: dict, index: int, *columns: str) -> list:
    """The values of `columns` in a record, or a UserError naming the missing ones."""
    missing = [column for column in columns if column not in row]
    if missing:
        raise UserError(
            f"record {index} has no column {', '.join(missing)} (it has {', '.join(sorted(row)) or 'none'}): "
            "pass data in the task's format, or map columns with --prompt-column/--target-column"
        )
    return [row[column] for column in columns]


def text_of(value: object) -> str:
    """A record's field as one string (a list of sentences is joined with spaces)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(item).strip() for item in value)
    return "" if value is None else str(value)
