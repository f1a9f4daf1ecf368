"""RTE (GLUE): does the first sentence entail the second? A sentence-pair task, the two texts
tokenized as a pair. Reads the glue export's Parquet (or any file) with `sentence1`,
`sentence2`, `label` (0 = entailment, 1 = not_entailment), or GLUE's TSV (`sentence1`,
`sentence2`, `label` as names); scored by accuracy and macro-F1."""

from kd_shards.shared.tasks.glue import glue_reader
from kd_shards.shared.tasks.interface import HubSource
from kd_shards.shared.tasks.labelled import labelled_task

LABELS = ("entailment", "not_entailment")

TASK = labelled_task(
    "rte",
    HubSource("nyu-mll/glue", "rte"),
    "sentence1",
    LABELS,
    pair_column="sentence2",
    read=glue_reader({}),
)
