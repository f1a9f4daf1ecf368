"""kd-eval on a classification task: sequence classifiers side by side on labelled texts.

Every model reads the same texts (each tokenized by its own tokenizer, truncated to its own
context) through the same engine door (shared.engine.ClassifierEngine, same backend choice and
batching), its class probabilities are put in the data's label order (by label name), and it is
scored by the task's own `score` (shared/tasks/). With --teacher-shards (a
classify dump of the same data) each model's distribution is also compared with the teacher's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_shards.kd_eval.config import EvalConfig
from kd_shards.schemas.manifest import check_dump_kind, classify_labels
from kd_shards.shared.classification import (
    align_labels,
    classifier_input_ids,
    label_order,
    model_labels,
)
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import ResolvedModel, context_length
from kd_shards.shared.tasks import TASKS, classification_example, load_records, resolve_task
from kd_shards.shared.tasks.interface import Example, HubSource, Task
from kd_shards.shared.tasks.labelled import gold_labels, labelled_task


@dataclass(frozen=True)
class ClassificationInputs:
    """What every classifier is given and scored against."""

    examples: tuple[Example, ...]
    """The labelled texts (prompt: the text, references: the gold label as written)."""
    task: Task | None
    """The task whose `score` rates the classifiers (None for a file until its labels, the
    first model's, are known: with_labels)."""
    source: str
    fingerprint: str

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(example.prompt for example in self.examples)

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The data's label names, in the order scores and distributions use."""
        return None if self.task is None else self.task.labels


def load_classification_inputs(config: EvalConfig) -> ClassificationInputs:
    data_path = Path(config.data_path) if config.data_path else None
    if config.data in TASKS:
        task = TASKS[config.data]
        records = load_records(task, config.data, data_path, config.split)
        examples = [
            task.to_example(row, index) for index, row in enumerate(records.rows[: config.limit])
        ]
    else:
        task = None
        records = load_records(
            resolve_task(config.data, "text", "label"), config.data, data_path, config.split
        )
        rows = records.rows[: config.limit]
        names = tuple(sorted({str(row.get("label", "")).strip() for row in rows} - {""}))
        examples = [classification_example("text", names)(row, i) for i, row in enumerate(rows)]
    missing = [example.index for example in examples if not example.references]
    if missing:
        raise UserError(
            f"record {missing[0]} of {records.source} has no label, which scoring needs: pass "
            "labelled data"
        )
    return ClassificationInputs(tuple(examples), task, records.source, records.fingerprint)


def with_labels(inputs: ClassificationInputs, labels: list[str]) -> ClassificationInputs:
    """A file's inputs once the label names are known (the first model's)."""
    task = labelled_task("file", HubSource("", None), "text", tuple(labels))
    gold_labels(inputs.examples, task.labels)  # refuses a label the models do not have
    return ClassificationInputs(inputs.examples, task, inputs.source, inputs.fingerprint)


def run_classifier(
    config: EvalConfig,
    name: str,
    resolved: ResolvedModel,
    tokenizer,
    inputs: ClassificationInputs,
    engine=None,
) -> dict:
    """One classifier: predictions, accuracy, macro-F1 and cost (whole request stream)."""
    from kd_shards.shared.engine import ClassifierEngine, classifier_settings

    names = align_labels(model_labels(resolved.config), inputs.labels, f"--model {name}")
    # Output j of the model is data label order[j]: put every model in the data's order.
    order = np.asarray([inputs.labels.index(label) for label in names])
    context = config.max_model_len or context_length(resolved.config) or 512
    token_ids = [
        classifier_input_ids(tokenizer, example.prompt, example.pair, context)[0]
        for example in inputs.examples
    ]
    owns_engine = engine is None
    if owns_engine:
        engine = ClassifierEngine(
            classifier_settings(
                config, resolved.directory, max_model_len=context, batch_size=config.batch_size
            )
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log_probabilities = np.zeros((len(token_ids), len(names)), dtype=np.float32)
    try:
        started = time.perf_counter()
        for batch in engine.classify(
            enumerate(token_ids), max_in_flight=config.max_in_flight, pad_id=pad_id
        ):
            log_probabilities[batch.keys] = batch.log_probabilities
        seconds = time.perf_counter() - started
    finally:
        if owns_engine:
            engine.close()
    in_data_order = np.empty_like(log_probabilities)
    in_data_order[:, order] = log_probabilities
    metrics, predictions = inputs.task.score(in_data_order, inputs.examples)
    samples = len(inputs.examples)
    return {
        "metrics": {**metrics, "samples": samples},
        "cost": {
            "seconds": seconds,
            "ms_per_sample": 1000.0 * seconds / max(samples, 1),
            "samples_per_second": samples / max(seconds, 1e-9),
        },
        "backend": {"name": engine.backend, "reason": engine.fallback_reason},
        "log_probabilities": in_data_order,
        "predictions": predictions,
    }


def teacher_log_probabilities(config: EvalConfig, inputs: ClassificationInputs) -> np.ndarray:
    """(N, L) the --teacher-shards classify dump's distributions in the data's label order,
    by sample id, refusing a dump of other data or labels."""
    from kd_shards.shared.shard_reader import CLASSIFY_COLUMNS, iterate_rows, open_dump

    dump = open_dump(config.teacher_shards, flag="--teacher-shards")
    where = f"--teacher-shards {config.teacher_shards}"
    check_dump_kind(dump.manifest, classify=True, where=where)
    if dump.manifest["data"].get("fingerprint") != inputs.fingerprint:
        raise UserError(
            f"{where} was dumped from {dump.manifest['data'].get('source')}, not from "
            f"{inputs.source}: dump the teacher on the evaluation data (same --split)"
        )
    labels = classify_labels(dump.manifest)
    if sorted(labels) != sorted(inputs.labels):
        raise UserError(
            f"{where} has labels {', '.join(labels)} but the data {', '.join(inputs.labels)}: "
            "use a dump of a teacher for these labels"
        )
    order = np.asarray([inputs.labels.index(label) for label in labels])
    result = np.full((len(inputs.texts), len(labels)), np.nan, dtype=np.float64)
    for row in iterate_rows(dump, columns=CLASSIFY_COLUMNS):
        index = int(row.sample_id)
        if index < len(result):
            result[index, order] = label_order(row.topk_ids, row.topk_logprobs)[0]
    if np.isnan(result).any():
        missing = int(np.flatnonzero(np.isnan(result).any(axis=1))[0])
        raise UserError(
            f"{where} has no row for sample {missing} of the evaluation data: dump the whole "
            "split (without a smaller --limit)"
        )
    return result


def classification_fidelity(teacher: np.ndarray, model: np.ndarray) -> dict:
    """KL(teacher ‖ model) over the labels at T = 1 (mean over samples) and the share of
    samples where both pick the same label.

    Args:
        teacher, model: (N, L) log-probabilities in the same label order.
    """
    teacher = teacher - np.logaddexp.reduce(teacher, axis=1, keepdims=True)
    model = model.astype(np.float64) - np.logaddexp.reduce(model, axis=1, keepdims=True)
    kl = (np.exp(teacher) * (teacher - model)).sum(axis=1)
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((teacher.argmax(1) == model.argmax(1)).mean()),
    }
