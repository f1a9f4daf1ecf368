"""Task definitions, written once for teacher-dump and kd-eval: where the data comes from, how a
record becomes a prompt and reference answers.

Built-in tasks:
- gsm8k: question -> worked answer ending in '#### <number>'.
- summ:  document -> one-sentence summary. SciTLDR-shaped rows ({source: [sentences],
         target: [tldrs]}) and plain {document, summary} rows are both accepted.
- text:  raw text, chunked to a token length (handled by the dump's text mode; its rows only
         carry a 'text' field).
- sst2, agnews: classification (text -> one of the task's labels). SST-2 as GLUE's TSV
  (`sentence<TAB>label`, label 0/1), AG News as a header-less TSV (`text<TAB>class name`).
  An Example's prompt is the text and its only reference the label's name.
Any local JSONL/JSON/Parquet/CSV/TSV file is a task too, given --prompt-column and optionally
--target-column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError
from shared.records import (
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    LoadedRecords,
    load_hub_records,
    read_table_file,
    read_text_files,
)


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answers, ready to render."""

    index: int
    """Position of the record in the loaded data (stable across runs: resume keys on it)."""
    prompt: str
    """The user message (before any chat template)."""
    references: tuple[str, ...]
    """Reference answers; the first one is the teacher-forcing target in score mode."""


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the Hugging Face hub (used only when online)."""

    name: str
    config: str | None


@dataclass(frozen=True)
class Task:
    """A built-in task: data source and the record -> Example conversion."""

    name: str
    hub: HubSource
    to_example: Callable[[dict, int], Example]
    """Converts a raw record (and its index) into an Example; raises UserError on bad records."""
    file_names: tuple[str, ...]
    """Candidate file names for a split when --data-path is a directory ('{split}' is filled)."""
    labels: tuple[str, ...] | None = None
    """Classification tasks: the label names, in the task's label order; None otherwise."""
    columns: tuple[str, ...] | None = None
    """Column names of the task's header-less CSV/TSV files (None: the file has a header)."""

    @property
    def is_classification(self) -> bool:
        return self.labels is not None


def _require(row: dict, index: int, *columns: str) -> list:
    missing = [column for column in columns if column not in row]
    if missing:
        raise UserError(
            f"record {index} has no column {', '.join(missing)} (it has {', '.join(sorted(row)) or 'none'}): "
            "pass data in the task's format, or map columns with --prompt-column/--target-column"
        )
    return [row[column] for column in columns]


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(item).strip() for item in value)
    return "" if value is None else str(value)


GSM8K_PROMPT = (
    "Solve the following math problem step by step. "
    "End your answer with a final line of the form '#### <number>'.\n\n{question}"
)


def gsm8k_example(row: dict, index: int) -> Example:
    question, answer = _require(row, index, "question", "answer")
    return Example(
        index, GSM8K_PROMPT.format(question=_text(question).strip()), (_text(answer).strip(),)
    )


SUMMARY_PROMPT = "Summarize the following text in one sentence.\n\n{document}"


def summary_example(row: dict, index: int) -> Example:
    if "source" in row and "target" in row:  # SciTLDR: lists of sentences / of reference TLDRs
        document, targets = row["source"], row["target"]
    elif "document" in row:
        document, targets = row["document"], row.get("summary", [])
    else:
        _require(row, index, "document", "summary")
    references = targets if isinstance(targets, (list, tuple)) else [targets]
    references = tuple(
        _text(reference).strip() for reference in references if _text(reference).strip()
    )
    return Example(index, SUMMARY_PROMPT.format(document=_text(document).strip()), references)


def text_example(row: dict, index: int) -> Example:
    (text,) = _require(row, index, "text")
    return Example(index, "", (_text(text),))


SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def classification_example(text_column: str, labels: tuple[str, ...]):
    """Record -> Example for a classification table: the text, and the label's name as the only
    reference. A label may be written as its name (any case) or as its index in `labels`; an
    empty label means the example has none (references empty)."""
    by_name = {label.lower(): label for label in labels}

    def to_example(row: dict, index: int) -> Example:
        text, label = _require(row, index, text_column, "label")
        raw = _text(label).strip()
        if not raw:
            return Example(index, _text(text).strip(), ())
        name = by_name.get(raw.lower())
        if name is None and raw.isdigit() and int(raw) < len(labels):
            name = labels[int(raw)]
        if name is None:
            raise UserError(
                f"record {index} has label {raw!r}, which is none of {', '.join(labels)} (or "
                f"0..{len(labels) - 1}): fix the record, or pass the right --data"
            )
        return Example(index, _text(text).strip(), (name,))

    return to_example


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        "gsm8k",
        HubSource("openai/gsm8k", "main"),
        gsm8k_example,
        ("{split}.jsonl", "{split}.parquet"),
    ),
    "summ": Task(
        "summ",
        HubSource("allenai/scitldr", "Abstract"),
        summary_example,
        ("{split}.jsonl", "{split}.parquet"),
    ),
    "text": Task(
        "text",
        HubSource("Salesforce/wikitext", "wikitext-2-raw-v1"),
        text_example,
        ("{split}.txt", "wiki.{split}.raw", "{split}.raw", "{split}.jsonl", "{split}.parquet"),
    ),
    "sst2": Task(
        "sst2",
        HubSource("stanfordnlp/sst2", None),
        classification_example("sentence", SST2_LABELS),
        ("{split}.tsv", "{split}.jsonl", "{split}.parquet"),
        labels=SST2_LABELS,
    ),
    "agnews": Task(
        "agnews",
        HubSource("fancyzhx/ag_news", None),
        classification_example("text", AGNEWS_LABELS),
        ("{split}.tsv", "{split}.jsonl", "{split}.parquet"),
        labels=AGNEWS_LABELS,
        columns=("text", "label"),
    ),
}

CLASSIFICATION_TASKS = tuple(name for name, task in TASKS.items() if task.is_classification)


def column_task(prompt_column: str, target_column: str | None) -> Task:
    """A task for any table: the prompt is one column, the reference (optional) another."""

    def to_example(row: dict, index: int) -> Example:
        (prompt,) = _require(row, index, prompt_column)
        references: tuple[str, ...] = ()
        if target_column is not None:
            (target,) = _require(row, index, target_column)
            items = target if isinstance(target, (list, tuple)) else [target]
            references = tuple(_text(item) for item in items)
        return Example(index, _text(prompt), references)

    return Task("columns", HubSource("", None), to_example, ())


def resolve_task(data: str, prompt_column: str | None, target_column: str | None) -> Task:
    """The task named by --data: a built-in name, or a file used with column mapping."""
    if data in TASKS:
        if prompt_column is not None:
            # Built-in tasks know their columns; a mapping means the user wants a custom file.
            return column_task(prompt_column, target_column)
        return TASKS[data]
    if Path(data).suffix.lower() in TABLE_SUFFIXES or Path(data).exists():
        if prompt_column is None:
            raise UserError(
                f"--data {data} is a file, not a task name: also pass --prompt-column "
                f"(and --target-column for score mode), or use a built-in task ({', '.join(TASKS)}) "
                "with --data-path"
            )
        return column_task(prompt_column, target_column)
    raise UserError(
        f"unknown --data {data!r}: use a built-in task ({', '.join(TASKS)}) or a path to a "
        f"{'/'.join(TABLE_SUFFIXES)} file"
    )


def load_records(task: Task, data: str, data_path: Path | None, split: str) -> LoadedRecords:
    """Rows for a task: from --data-path (file or directory), a --data file, or the hub."""
    if task.name == "columns":
        return read_table_file(Path(data_path) if data_path is not None else Path(data))
    if data_path is None:
        return load_hub_records(task.hub.name, task.hub.config, split)
    data_path = Path(data_path)
    if data_path.is_dir():
        for pattern in task.file_names:
            candidate = data_path / pattern.format(split=split)
            if candidate.is_file():
                data_path = candidate
                break
        else:
            expected = ", ".join(pattern.format(split=split) for pattern in task.file_names)
            raise UserError(
                f"--data-path {data_path} has no file for split {split!r} (looked for {expected}): "
                "pass the file itself or a different --split"
            )
    if not data_path.exists():
        raise UserError(
            f"--data-path {data_path} does not exist: pass an existing file or directory"
        )
    if task.name == "text" and data_path.suffix.lower() in TEXT_SUFFIXES:
        return read_text_files([data_path])
    return read_table_file(data_path, task.columns)


def examples_from_records(task: Task, records: LoadedRecords, limit: int | None) -> list[Example]:
    """Convert the first `limit` rows (all when None) into Examples."""
    rows = records.rows if limit is None else records.rows[:limit]
    return [task.to_example(row, index) for index, row in enumerate(rows)]
