"""What classification tasks share: the record -> Example mapping of a labelled table and the
accuracy/macro-F1 metric. A classification task module (sst2.py, agnews.py) is its labels, its
text column and its files; one with another metric passes its own `score`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kd_shards.shared.classification import gold_index
from kd_shards.shared.errors import UserError
from kd_shards.shared.scoring import classification_metrics
from kd_shards.shared.tasks.interface import (
    Example,
    HubSource,
    MetricColumn,
    Scores,
    Task,
    require_columns,
    text_of,
)

ACCURACY_AND_MACRO_F1 = (
    MetricColumn("accuracy", "accuracy", "{:.4f}", "accuracy"),
    MetricColumn("macro_f1", "macro-F1", "{:.4f}", "macro-F1"),
)


def classification_example(
    text_column: str,
    labels: tuple[str, ...],
    pair_column: str | None = None,
    label_column: str = "label",
):
    """Record -> Example for a classification table: the text (and with `pair_column` the
    second text of a pair), and the label's name as the only reference. A label may be written
    as its name (any case) or as its index in `labels`; an empty label means the example has
    none (references empty). A pair task's record without its second column is refused."""
    by_name = {label.lower(): label for label in labels}
    wanted = (text_column, label_column) + ((pair_column,) if pair_column else ())

    def to_example(row: dict, index: int) -> Example:
        text, label, *second = require_columns(row, index, *wanted)
        pair = text_of(second[0]).strip() if second else None
        raw = text_of(label).strip()
        if not raw:
            return Example(index, text_of(text).strip(), (), pair)
        name = by_name.get(raw.lower())
        if name is None and raw.isdigit() and int(raw) < len(labels):
            name = labels[int(raw)]
        if name is None:
            raise UserError(
                f"record {index} has label {raw!r}, which is none of {', '.join(labels)} (or "
                f"0..{len(labels) - 1}): fix the record, or pass the right --data"
            )
        return Example(index, text_of(text).strip(), (name,), pair)

    return to_example


def gold_labels(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray:
    """(N,) int: each example's gold label index in `labels`."""
    return np.asarray(
        [gold_index(example.references, labels, example.index) for example in examples],
        dtype=np.int64,
    )


def classification_score(
    labels: tuple[str, ...],
    more_metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None,
) -> Callable[..., Scores]:
    """A `score` for `labels`: accuracy and macro-F1 of the most probable label (plus what
    `more_metrics(predicted, gold)` adds, e.g. Matthews correlation), with one record per
    example (its text or text pair, gold and predicted label, and the label probabilities)."""

    def score(log_probabilities: np.ndarray, examples: Sequence[Example]) -> Scores:
        gold = gold_labels(examples, labels)
        predicted = np.asarray(log_probabilities).argmax(axis=1)
        metrics = classification_metrics(predicted, gold, len(labels))
        if more_metrics is not None:
            metrics.update(more_metrics(predicted, gold))
        records = [
            {
                "sample_id": str(position),
                "text": example.prompt,
                **({"text_pair": example.pair} if example.pair is not None else {}),
                "reference": labels[int(gold[position])],
                "prediction": labels[int(predicted[position])],
                "correct": bool(predicted[position] == gold[position]),
                "probabilities": {
                    label: round(float(np.exp(log_probabilities[position, column])), 6)
                    for column, label in enumerate(labels)
                },
            }
            for position, example in enumerate(examples)
        ]
        return metrics, records

    return score


def labelled_task(
    name: str,
    hub: HubSource,
    text_column: str,
    labels: tuple[str, ...],
    file_names: tuple[str, ...] = ("{split}.tsv", "{split}.jsonl", "{split}.parquet"),
    columns: tuple[str, ...] | None = None,
    score: Callable[..., Scores] | None = None,
    metrics: tuple[MetricColumn, ...] = ACCURACY_AND_MACRO_F1,
    pair_column: str | None = None,
    label_column: str = "label",
    read: Callable | None = None,
) -> Task:
    """A classification task over a table with a text column (and for sentence pairs a second
    one) and a label column, scored by accuracy and macro-F1 unless it brings its own `score`
    (and the `metrics` it shows)."""
    return Task(
        name=name,
        kind="classify",
        hub=hub,
        to_example=classification_example(text_column, labels, pair_column, label_column),
        file_names=file_names,
        score=score or classification_score(labels),
        metrics=metrics,
        labels=labels,
        columns=columns,
        read=read,
        pair_column=pair_column,
    )
