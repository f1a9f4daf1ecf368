"""CoLA (GLUE): is the sentence grammatically acceptable? Reads the published header-less TSV
(source, label, original mark, sentence; label 0 = unacceptable, 1 = acceptable), or a file
with `sentence` and `label` columns; scored by Matthews correlation, as GLUE reports it (and
accuracy, macro-F1)."""

import numpy as np

from kd_shards.shared.scoring import matthews_correlation
from kd_shards.shared.tasks.glue import glue_reader
from kd_shards.shared.tasks.interface import HubSource, MetricColumn
from kd_shards.shared.tasks.labelled import (
    ACCURACY_AND_MACRO_F1,
    classification_score,
    labelled_task,
)

LABELS = ("unacceptable", "acceptable")
TSV_COLUMNS = ("source", "label", "original_mark", "sentence")


def matthews(predicted: np.ndarray, gold: np.ndarray) -> dict:
    return {"matthews": matthews_correlation(predicted, gold)}


TASK = labelled_task(
    "cola",
    HubSource("nyu-mll/glue", "cola"),
    "sentence",
    LABELS,
    file_names=("in_domain_{split}.tsv", "{split}.tsv", "{split}.jsonl", "{split}.parquet"),
    score=classification_score(LABELS, matthews),
    metrics=(
        MetricColumn("matthews", "MCC", "{:.4f}", "Matthews correlation"),
        ACCURACY_AND_MACRO_F1[0],
    ),
    read=glue_reader({}, columns=TSV_COLUMNS),
)
