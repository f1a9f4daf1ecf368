"""Task definitions, written once for teacher-dump, student-train and kd-eval: where the data
comes from, how a record becomes a prompt and references, how a model is run on it and how its
outputs are scored. One module per task (its loading, mapping and metric, behind the interface
in shared/tasks/interface.py); BUILT_IN below lists them, and every command takes a task by the
same name (--data NAME).

Any local JSONL/JSON/Parquet/CSV/TSV file is a task too, given --prompt-column and optionally
--target-column (teacher-dump), or a `text` and `label` column (classification).
"""

from __future__ import annotations

from pathlib import Path

from kd_shards.shared.errors import UserError
from kd_shards.shared.records import (
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    LoadedRecords,
    load_hub_records,
    read_table_file,
    read_text_files,
)
from kd_shards.shared.tasks import (
    agnews,
    aqua_rat,
    cola,
    gsm8k,
    mrpc,
    phrasebank,
    qqp,
    rte,
    social_iqa,
    sst2,
    summ,
    text,
    triviaqa,
    winogrande,
)
from kd_shards.shared.tasks.interface import Example, HubSource, Task, require_columns, text_of
from kd_shards.shared.tasks.labelled import classification_example

__all__ = [
    "TASKS",
    "Example",
    "Task",
    "classification_example",
    "column_task",
    "examples_from_records",
    "load_records",
    "resolve_task",
]

BUILT_IN: tuple[Task, ...] = (
    gsm8k.TASK,
    summ.TASK,
    text.TASK,
    sst2.TASK,
    agnews.TASK,
    mrpc.TASK,
    rte.TASK,
    qqp.TASK,
    cola.TASK,
    phrasebank.TASK,
    phrasebank.ALL_AGREE,
    winogrande.TASK,
    social_iqa.TASK,
    aqua_rat.TASK,
    aqua_rat.LETTER_TASK,
    triviaqa.TASK,
)
"""Every built-in task, in the order help texts list them."""
TASKS: dict[str, Task] = {task.name: task for task in BUILT_IN}

RENAMED = {"lm": "text", "cls": "sst2 or agnews (or a file with text and label columns)"}
"""Old kd-eval task names, with what every command takes instead."""


def column_task(prompt_column: str, target_column: str | None) -> Task:
    """A task for any table: the prompt is one column, the reference (optional) another.
    teacher-dump's --mode says how the teacher runs on it; it has no metric."""

    def to_example(row: dict, index: int) -> Example:
        (prompt,) = require_columns(row, index, prompt_column)
        references: tuple[str, ...] = ()
        if target_column is not None:
            (target,) = require_columns(row, index, target_column)
            items = target if isinstance(target, (list, tuple)) else [target]
            references = tuple(text_of(item) for item in items)
        return Example(index, text_of(prompt), references)

    return Task("columns", "generate", HubSource("", None), to_example, ())


def resolve_task(data: str, prompt_column: str | None, target_column: str | None) -> Task:
    """The task named by --data: a built-in name, or a file used with column mapping."""
    if data in TASKS:
        if prompt_column is not None:
            # Built-in tasks know their columns; a mapping means the user wants a custom file.
            return column_task(prompt_column, target_column)
        return TASKS[data]
    if data in RENAMED and not Path(data).exists():
        raise UserError(f"--data {data} is not a task name: use --data {RENAMED[data]}")
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
    if task.kind == "text" and data_path.suffix.lower() in TEXT_SUFFIXES:
        return read_text_files([data_path])
    if task.read is not None:
        return task.read(data_path)
    return read_table_file(data_path, task.columns)


def examples_from_records(task: Task, records: LoadedRecords, limit: int | None) -> list[Example]:
    """Convert the first `limit` rows (all when None) into Examples."""
    rows = records.rows if limit is None else records.rows[:limit]
    return [task.to_example(row, index) for index, row in enumerate(rows)]
