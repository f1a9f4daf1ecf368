"""AG News: news titles and descriptions in four topics. A header-less TSV (`text<TAB>class
name`); scored by accuracy and macro-F1."""

from kd_shards.shared.tasks.interface import HubSource
from kd_shards.shared.tasks.labelled import labelled_task

LABELS = ("World", "Sports", "Business", "Sci/Tech")

TASK = labelled_task(
    "agnews", HubSource("fancyzhx/ag_news", None), "text", LABELS, columns=("text", "label")
)
