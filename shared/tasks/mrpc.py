"""MRPC (GLUE): is the second sentence a paraphrase of the first? A sentence-pair task, the two
texts tokenized as a pair. Reads GLUE's TSV (`Quality`, `#1 String`, `#2 String`, with a
byte-order mark) or a file with the glue export's columns `sentence1`, `sentence2`, `label`
(0 = not_equivalent, 1 = equivalent); scored by accuracy and the F1 of `equivalent`, as GLUE
reports it (and macro-F1)."""

import numpy as np

from kd_shards.shared.scoring import positive_f1
from kd_shards.shared.tasks.glue import glue_reader
from kd_shards.shared.tasks.interface import HubSource, MetricColumn
from kd_shards.shared.tasks.labelled import (
    ACCURACY_AND_MACRO_F1,
    classification_score,
    labelled_task,
)

LABELS = ("not_equivalent", "equivalent")
ACCURACY_AND_F1 = (
    ACCURACY_AND_MACRO_F1[0],
    MetricColumn("f1", "F1", "{:.4f}", "F1 (equivalent)"),
)


def f1_of_positive(predicted: np.ndarray, gold: np.ndarray) -> dict:
    return {"f1": positive_f1(predicted, gold, positive=1)}


TASK = labelled_task(
    "mrpc",
    HubSource("nyu-mll/glue", "mrpc"),
    "sentence1",
    LABELS,
    score=classification_score(LABELS, f1_of_positive),
    metrics=ACCURACY_AND_F1,
    pair_column="sentence2",
    read=glue_reader({"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}),
)
