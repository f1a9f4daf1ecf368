"""SST-2: movie-review sentences, negative or positive. GLUE's TSV (`sentence<TAB>label`, label
0/1, with a header); scored by accuracy and macro-F1."""

from kd_shards.shared.tasks.interface import HubSource
from kd_shards.shared.tasks.labelled import labelled_task

LABELS = ("negative", "positive")

TASK = labelled_task("sst2", HubSource("stanfordnlp/sst2", None), "sentence", LABELS)
