"""Where a classification student's targets come from, besides one classify dump: gold labels
read straight from a dataset (--data), and several teachers' dumps combined into one target
per example (--more-shards).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_shards.schemas.manifest import check_dump_kind, classify_labels
from kd_shards.schemas.shard import CLASSIFY_MODE, NO_LABEL
from kd_shards.shared.classification import gold_index, label_order
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import Dump, RowGroup, TrainingRow, iterate_rows, open_dump
from kd_shards.shared.tasks import TASKS, classification_example, load_records, resolve_task

GROUP_ROWS = 256
"""Rows per in-memory group of a --data dataset (the unit the stream shuffles and resumes by,
as a row group is for shards)."""


def labels_only_source(config) -> tuple[Dump, object]:
    """A --data dataset as the stream reads it: a Dump whose groups are slices of the examples
    held in memory, and the function that reads a group. The examples are the task's texts
    with their gold labels; there is no teacher distribution."""
    data_path = Path(config.data_path) if config.data_path else None
    if config.data in TASKS:
        task = TASKS[config.data]
        if not task.is_classification:
            raise UserError(
                f"--data {config.data} is not a classification task: use one (sst2, agnews, "
                "mrpc, rte, qqp, cola, phrasebank, ...) or a file with text and label columns"
            )
        labels = list(task.labels)
        records = load_records(task, config.data, data_path, config.split)
        examples = [
            task.to_example(row, index) for index, row in enumerate(records.rows[: config.limit])
        ]
    else:
        task = resolve_task(config.data, "text", "label")
        records = load_records(task, config.data, data_path, config.split)
        rows = records.rows[: config.limit]
        labels = sorted({str(row.get("label", "")).strip() for row in rows} - {""})
        to_example = classification_example("text", tuple(labels))
        examples = [to_example(row, index) for index, row in enumerate(rows)]
    training_rows = []
    for example in examples:
        gold = gold_index(example.references, labels, example.index)
        if gold == NO_LABEL:
            raise UserError(
                f"record {example.index} of {records.source} has no label: --data trains on "
                "gold labels, so every record needs one"
            )
        training_rows.append(
            TrainingRow(
                sample_id=str(example.index),
                prompt_ids=np.zeros(0, dtype=np.int32),
                target_ids=np.asarray([gold], dtype=np.int32),
                topk_ids=None,
                topk_logprobs=None,
                text=example.prompt,
                text_pair=example.pair,
            )
        )
    if not training_rows:
        raise UserError(f"--data {config.data}: no examples in {records.source}")
    groups = [
        training_rows[start : start + GROUP_ROWS]
        for start in range(0, len(training_rows), GROUP_ROWS)
    ]
    source = Path(records.source)
    manifest = {
        "mode": CLASSIFY_MODE,
        "identity": records.fingerprint,
        "classify": {"labels": labels, **({"text_pairs": True} if task.is_pair else {})},
        "top_k": len(labels),
        "tokenizer": {"fingerprint": None, "size": len(labels)},
        "data": {"task": config.data, "source": records.source, "split": config.split},
    }
    dump = Dump(
        directory=source,
        manifest=manifest,
        row_groups=tuple(RowGroup(source, index, len(group)) for index, group in enumerate(groups)),
    )
    return dump, lambda group, columns: groups[group.index]


def teacher_distributions(dump: Dump) -> dict[str, np.ndarray]:
    """sample id -> (L,) float64 probabilities in label order, for every row of a classify dump."""
    result = {}
    for row in iterate_rows(dump):
        log_probabilities = label_order(row.topk_ids, row.topk_logprobs)[0]
        result[row.sample_id] = np.exp(log_probabilities.astype(np.float64))
    return result


def combined_teacher_targets(
    dump: Dump, more_shards: tuple[str, ...], weights: tuple[float, ...], allow_incomplete: bool
) -> dict[str, np.ndarray]:
    """Several teachers' dumps of the same examples as one target per example: the weighted
    average of their probabilities, as log-probabilities in label order.

    Refuses dumps of other data, other labels, or other sample ids, naming the difference."""
    dumps = [dump] + [
        open_dump(path, allow_incomplete=allow_incomplete, flag="--more-shards")
        for path in more_shards
    ]
    labels = classify_labels(dump.manifest)
    fingerprint = dump.manifest.get("data", {}).get("fingerprint")
    for other in dumps[1:]:
        where = f"--more-shards {other.directory}"
        check_dump_kind(other.manifest, classify=True, where=where)
        if classify_labels(other.manifest) != labels:
            raise UserError(
                f"{where} has labels {', '.join(classify_labels(other.manifest))} but --shards "
                f"has {', '.join(labels)}: combine dumps of teachers with the same labels in "
                "the same order"
            )
        other_fingerprint = other.manifest.get("data", {}).get("fingerprint")
        if other_fingerprint != fingerprint:
            raise UserError(
                f"{where} was dumped from other data ({other.manifest['data'].get('source')}) "
                f"than --shards ({dump.manifest['data'].get('source')}): dump every teacher on "
                "the same data file"
            )
    distributions = [teacher_distributions(each) for each in dumps]
    reference = set(distributions[0])
    for other, each in zip(dumps[1:], distributions[1:], strict=True):
        if set(each) != reference:
            only_here = sorted(reference - set(each), key=_id_order)
            only_there = sorted(set(each) - reference, key=_id_order)
            example = (only_here or only_there)[0]
            raise UserError(
                f"--more-shards {other.directory} covers {len(each)} samples and --shards "
                f"{len(reference)}, and they differ (e.g. sample {example} is in only one): dump "
                "every teacher with the same --data, --split and --limit"
            )
    weights = np.asarray(weights or [1.0] * len(dumps), dtype=np.float64)
    weights = weights / weights.sum()
    combined = {}
    for sample_id in distributions[0]:
        mixture = sum(
            weight * each[sample_id] for weight, each in zip(weights, distributions, strict=True)
        )
        with np.errstate(divide="ignore"):
            combined[sample_id] = np.log(mixture).astype(np.float32)
    return combined


def _id_order(sample_id: str):
    return (len(sample_id), sample_id)
