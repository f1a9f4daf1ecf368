"""What multiple-choice tasks share (WinoGrande, Social IQa, AQuA-RAT): the accuracy of the
best-scored option, one record per question, and reading a split whose gold answers sit in a
separate `*-labels.lst` file. A task module is how its record becomes (context, continuation)
pairs, one per option (interface.Example.choices)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kd_shards.shared.errors import UserError
from kd_shards.shared.files import sha256_of_file
from kd_shards.shared.records import LoadedRecords, read_table_file
from kd_shards.shared.tasks.interface import Example, MetricColumn, Scores

LETTERS = "ABCDEFGHIJ"
ACCURACY = (MetricColumn("accuracy", "accuracy", "{:.4f}", "accuracy"),)


def gold_option(example: Example) -> int:
    """The gold option's index (references[0]), refused when it names no option."""
    raw = example.references[0] if example.references else ""
    if not str(raw).isdigit() or int(raw) >= len(example.choices):
        raise UserError(
            f"record {example.index} has answer {raw!r}, which is none of its "
            f"{len(example.choices)} options: fix the record"
        )
    return int(raw)


def option_texts(example: Example) -> list[str]:
    """How a prediction record shows the options: the continuations when every option shares
    one context (Social IQa, AQuA-RAT), else each option's whole text (WinoGrande, whose
    options fill a blank in the context)."""
    if len({context for context, _ in example.choices}) == 1:
        return [continuation.strip() for _, continuation in example.choices]
    return [(context + continuation).strip() for context, continuation in example.choices]


def choice_score(scores: Mapping[str, Sequence[np.ndarray]], examples: Sequence[Example]) -> Scores:
    """Accuracy of the highest-scored option (ties: the first), for every scoring in `scores`
    (name -> one (O,) array of option scores per example); "accuracy" is the first scoring's,
    "accuracy_<name>" each one's. One record per question: its options, the gold and predicted
    option, and every scoring's option scores."""
    if not scores:
        raise ValueError("choice_score needs at least one scoring")
    gold = np.asarray([gold_option(example) for example in examples], dtype=np.int64)
    predicted = {
        name: np.asarray([int(np.argmax(row)) for row in rows], dtype=np.int64)
        for name, rows in scores.items()
    }
    first = next(iter(scores))
    metrics: dict = {
        "accuracy": float((predicted[first] == gold).mean()) if len(gold) else 0.0,
        "correct": int((predicted[first] == gold).sum()),
        "scoring": first,
    }
    for name, choice in predicted.items():
        metrics[f"accuracy_{name}"] = float((choice == gold).mean()) if len(gold) else 0.0
    records = []
    for position, example in enumerate(examples):
        chosen = int(predicted[first][position])
        records.append(
            {
                "sample_id": str(position),
                "question": example.prompt,
                "options": option_texts(example),
                "reference": LETTERS[gold[position]],
                "prediction": LETTERS[chosen],
                "correct": bool(chosen == gold[position]),
                "scores": {
                    name: [round(float(value), 6) for value in rows[position]]
                    for name, rows in scores.items()
                },
            }
        )
    return metrics, records


def read_with_labels_file(path: Path, column: str = "label") -> LoadedRecords:
    """A table file; a .jsonl whose records lack `column` takes it from the sibling
    `<stem>-labels.lst` (one label a line, as WinoGrande and Social IQa publish them), and the
    fingerprint then covers both files."""
    records = read_table_file(Path(path))
    labels_file = Path(path).with_name(Path(path).stem + "-labels.lst")
    if all(column in row for row in records.rows) or not labels_file.is_file():
        return records
    labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    if len(labels) != len(records.rows):
        raise UserError(
            f"{labels_file} has {len(labels)} labels for the {len(records.rows)} records of "
            f"{path}: pass the labels file of this split"
        )
    rows = [{**row, column: label} for row, label in zip(records.rows, labels, strict=True)]
    digest = hashlib.sha256((records.fingerprint + sha256_of_file(labels_file)).encode())
    return LoadedRecords(rows, f"{path} + {labels_file.name}", digest.hexdigest())
