"""The task interface: every built-in task maps its records and scores outputs of its kind, each
metric checked against values worked out by hand; old task names get a one-line pointer."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest

from shared.errors import UserError
from shared.tasks import BUILT_IN, TASKS, resolve_task
from shared.tasks.interface import Example, TaskKind


def perfect_predictions(task, examples):
    """What a model that is always right outputs, in the task's kind."""
    if task.kind == "generate":
        return [example.references[0] for example in examples]
    if task.kind == "classify":
        predictions = np.full((len(examples), len(task.labels)), math.log(1e-3))
        for row, example in enumerate(examples):
            predictions[row, task.labels.index(example.references[0])] = 0.0
        return predictions
    return [np.array([0.0, 3.0, 3.0, 3.0])]  # text: 3 positions, each certain and right


RECORDS = {
    "gsm8k": [
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        {"question": "2*3?", "answer": "#### 6"},
    ],
    "summ": [{"document": "The cat sat on the mat all day.", "summary": "A cat sat."}],
    "text": [{"text": "Plain text."}],
    "sst2": [{"sentence": "Great.", "label": "1"}, {"sentence": "Awful.", "label": "0"}],
    "agnews": [{"text": "Goal!", "label": "Sports"}, {"text": "Stocks fell.", "label": "2"}],
}


@pytest.mark.parametrize("task", BUILT_IN, ids=lambda task: task.name)
def test_every_built_in_task_scores_a_perfect_model_as_perfect(task):
    assert TASKS[task.name] is task and task.kind in get_args(TaskKind)
    examples = [task.to_example(row, index) for index, row in enumerate(RECORDS[task.name])]
    windows = [np.arange(4)]
    metrics, records = task.score(
        perfect_predictions(task, examples), windows if task.kind == "text" else examples
    )
    assert {column.key for column in task.metrics} <= set(metrics)
    assert [record["sample_id"] for record in records] == [
        str(i) for i in range(len(windows if task.kind == "text" else examples))
    ]
    best = {"perplexity": 1.0, "bleu": 100.0, "correct": len(examples), "tokens": 3}
    for key, value in metrics.items():
        assert value == pytest.approx(best.get(key, 1.0)), key


def test_gsm8k_scores_the_final_number():
    task = TASKS["gsm8k"]
    examples = [task.to_example(row, index) for index, row in enumerate(RECORDS["gsm8k"])]
    metrics, records = task.score(["so it is 2", "#### 7"], examples)
    assert metrics == {"accuracy": 0.5, "correct": 1}
    assert [(r["extracted_answer"], r["expected_answer"]) for r in records] == [
        ("2", "2"),
        ("7", "6"),
    ]


def test_classification_accuracy_macro_f1_and_probabilities_by_hand():
    task = TASKS["sst2"]
    rows = [{"sentence": "a", "label": "0"}, {"sentence": "b", "label": "1"}]
    rows.append({"sentence": "c", "label": "positive"})
    examples = [task.to_example(row, index) for index, row in enumerate(rows)]
    # Predicted: negative, negative, positive against gold negative, positive, positive.
    predictions = np.log([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    metrics, records = task.score(predictions, examples)
    # F1 negative: 2·1/(2·1+1+0) = 2/3; positive: 2·1/(2·1+0+1) = 2/3.
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(2 / 3)
    assert [r["prediction"] for r in records] == ["negative", "negative", "positive"]
    assert [r["correct"] for r in records] == [True, False, True]
    assert records[1]["probabilities"] == {"negative": 0.6, "positive": 0.4}


def test_text_perplexity_and_accuracy_over_windows_by_hand():
    # Two windows of 2 positions: NLL 2 and 4 nats, top-1 hits 1 and 0, top-5 hits 1 and 1.
    sums = [np.array([2.0, 1.0, 1.0, 2.0]), np.array([4.0, 0.0, 1.0, 2.0])]
    metrics, records = TASKS["text"].score(sums, [np.arange(10), np.arange(10, 20)])
    assert metrics["perplexity"] == pytest.approx(math.exp(6 / 4))
    assert (metrics["acc@1"], metrics["acc@5"], metrics["tokens"]) == (0.25, 0.5, 4)
    assert [r["nll"] for r in records] == [1.0, 2.0]
    assert records[1]["first_tokens"] == list(range(10, 18))


@pytest.mark.parametrize(("old", "new"), [("lm", "--data text"), ("cls", "--data sst2")])
def test_an_old_task_name_points_to_the_new_one(old, new):
    with pytest.raises(UserError, match=new):
        resolve_task(old, None, None)


def test_examples_carry_the_mapping_of_each_task():
    assert TASKS["agnews"].to_example(RECORDS["agnews"][1], 1) == Example(
        1, "Stocks fell.", ("Business",)
    )
    assert TASKS["text"].to_example({"text": "x"}, 0).references == ("x",)
