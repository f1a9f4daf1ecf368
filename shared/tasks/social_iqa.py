"""Social IQa: a short situation, a question about it and three answers. A language model scores
each answer by its log-probability after the situation and question; an encoder reads (situation
and question, answer) as a pair. Reads the published JSONL (`context`, `question`, `answerA`,
`answerB`, `answerC`, with the labels 1/2/3 in `<split>-labels.lst` or a `label` column); scored
by accuracy."""

from __future__ import annotations

from kd_shards.shared.tasks.choice import ACCURACY, choice_score, read_with_labels_file
from kd_shards.shared.tasks.interface import Example, HubSource, Task, require_columns, text_of


def to_example(row: dict, index: int) -> Example:
    context, question, *answers, label = require_columns(
        row, index, "context", "question", "answerA", "answerB", "answerC", "label"
    )
    prompt = f"{text_of(context).strip()} {text_of(question).strip()}"
    choices = tuple((prompt, " " + text_of(answer).strip()) for answer in answers)
    label = text_of(label).strip()
    gold = str(int(label) - 1) if label in ("1", "2", "3") else label
    return Example(index, prompt, (gold,), choices=choices)


TASK = Task(
    name="social-iqa",
    kind="choice",
    hub=HubSource("allenai/social_i_qa", None),
    to_example=to_example,
    file_names=("{split}.jsonl", "{split}.parquet"),
    score=choice_score,
    metrics=ACCURACY,
    read=read_with_labels_file,
)
