"""QQP (GLUE): do two Quora questions ask the same thing? A sentence-pair task, the two texts
tokenized as a pair. Not in ../shared/data: reads a local file with the glue export's columns
`question1`, `question2`, `label` (0 = not_duplicate, 1 = duplicate), or GLUE's TSV (its
`is_duplicate` column is the label); scored by accuracy and the F1 of `duplicate`, as GLUE
reports it."""

from kd_shards.shared.tasks.glue import glue_reader
from kd_shards.shared.tasks.interface import HubSource, MetricColumn
from kd_shards.shared.tasks.labelled import (
    ACCURACY_AND_MACRO_F1,
    classification_score,
    labelled_task,
)
from kd_shards.shared.tasks.mrpc import f1_of_positive

LABELS = ("not_duplicate", "duplicate")

TASK = labelled_task(
    "qqp",
    HubSource("nyu-mll/glue", "qqp"),
    "question1",
    LABELS,
    score=classification_score(LABELS, f1_of_positive),
    metrics=(ACCURACY_AND_MACRO_F1[0], MetricColumn("f1", "F1", "{:.4f}", "F1 (duplicate)")),
    pair_column="question2",
    read=glue_reader({"is_duplicate": "label"}),
)
