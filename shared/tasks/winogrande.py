"""WinoGrande 1.1: a sentence with a blank (`_`) and two options that could fill it. A language
model scores each option by the log-probability of the rest of the sentence after the blank
filled with it (the "partial" scoring of the WinoGrande paper and lm-evaluation-harness); an
encoder reads (sentence up to the blank with the option, the rest) as a pair. Reads the
published JSONL (`sentence`, `option1`, `option2`, `answer` 1/2; a split without `answer` takes
it from `<split>-labels.lst`); scored by accuracy."""

from __future__ import annotations

from kd_shards.shared.errors import UserError
from kd_shards.shared.tasks.choice import ACCURACY, choice_score, read_with_labels_file
from kd_shards.shared.tasks.interface import Example, HubSource, Task, require_columns, text_of


def to_example(row: dict, index: int) -> Example:
    sentence, first, second, answer = require_columns(
        row, index, "sentence", "option1", "option2", "answer"
    )
    sentence = text_of(sentence)
    blank = sentence.find("_")
    if blank < 0:
        raise UserError(f"record {index} has no blank '_' in its sentence: fix the record")
    rest = " " + sentence[blank + 1 :].strip()
    choices = tuple(
        (sentence[:blank] + text_of(option).strip(), rest) for option in (first, second)
    )
    answer = text_of(answer).strip()
    gold = str(int(answer) - 1) if answer in ("1", "2") else answer
    return Example(index, sentence, (gold,), choices=choices)


TASK = Task(
    name="winogrande",
    kind="choice",
    hub=HubSource("allenai/winogrande", "winogrande_xl"),
    to_example=to_example,
    file_names=("{split}.jsonl", "{split}.parquet"),
    score=choice_score,
    metrics=ACCURACY,
    read=lambda path: read_with_labels_file(path, "answer"),
)
