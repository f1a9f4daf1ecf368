"""The task interface: every built-in task maps its records and scores outputs of its kind, each
metric checked against values worked out by hand; old task names get a one-line pointer."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest

from kd_shards.shared.errors import UserError
from kd_shards.shared.tasks import BUILT_IN, TASKS, resolve_task
from kd_shards.shared.tasks.interface import Example, TaskKind


def perfect_predictions(task, examples):
    """What a model that is always right outputs, in the task's kind."""
    if task.kind == "generate":
        return [example.references[0] for example in examples]
    if task.kind == "classify":
        predictions = np.full((len(examples), len(task.labels)), math.log(1e-3))
        for row, example in enumerate(examples):
            predictions[row, task.labels.index(example.references[0])] = 0.0
        return predictions
    if task.kind == "choice":  # the gold option scored highest
        return {"mean": [np.eye(len(e.choices))[int(e.references[0])] for e in examples]}
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
    "mrpc": [
        {"sentence1": "A rose.", "sentence2": "It went up.", "label": "1"},
        {"sentence1": "A fell.", "sentence2": "A rose.", "label": "0"},
    ],
    "rte": [{"sentence1": "A is B.", "sentence2": "B is A.", "label": 0}],
    "qqp": [
        {"question1": "How?", "question2": "How so?", "label": 1},
        {"question1": "Why?", "question2": "When?", "label": 0},
    ],
    "cola": [
        {"sentence": "Cats sleep.", "label": "1"},
        {"sentence": "Sleep cats the.", "label": "0"},
    ],
    "phrasebank": [{"text": "Profit rose.", "label": "positive"}],
    "phrasebank-allagree": [{"text": "Sales fell.", "label": "negative"}],
    "winogrande": [
        {
            "sentence": "Ann paid Bo because _ owed.",
            "option1": "Ann",
            "option2": "Bo",
            "answer": "1",
        }
    ],
    "social-iqa": [
        {
            "context": "Jo won.",
            "question": "How does Jo feel?",
            "answerA": "sad",
            "answerB": "happy",
            "answerC": "tired",
            "label": "2",
        }
    ],
    "aqua-rat": [{"question": "1+1?", "options": ["A)1", "B)2"], "correct": "B"}],
    "aqua-rat-letter": [{"question": "1+1?", "options": ["A)1", "B)2"], "correct": "B"}],
    "triviaqa": [{"question": "Capital of France?", "golden_answers": ["Paris"]}],
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
    metrics.pop("scoring", None)  # choice tasks: the scoring's name
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


def test_kd_eval_runs_a_task_it_has_never_seen_from_the_task_value_alone(
    tiny_model, tmp_path, monkeypatch
):
    """Open QA scored by exact match against aliases (TriviaQA-shaped), declared here as one Task
    value: kd-eval runs it by its kind and reports its metric with no change of its own."""
    import json
    from types import SimpleNamespace

    from kd_shards.kd_eval.config import EvalConfig
    from kd_shards.kd_eval.evaluation import run_evaluation
    from kd_shards.kd_eval.report import markdown_table
    from kd_shards.shared.tasks.interface import HubSource, MetricColumn, Task
    from kd_shards.shared.tokenizer import load_tokenizer

    def to_example(row: dict, index: int) -> Example:
        return Example(index, row["question"], tuple(row["aliases"]))

    def score(predictions, examples):
        hits = [
            prediction.strip().lower() in {alias.lower() for alias in example.references}
            for prediction, example in zip(predictions, examples, strict=True)
        ]
        records = [{"sample_id": str(i), "hit": hit} for i, hit in enumerate(hits)]
        return {"exact_match": sum(hits) / len(hits)}, records

    metric = MetricColumn("exact_match", "EM", "{:.2f}", "exact match")
    task = Task("qa", "generate", HubSource("", None), to_example, (), score, (metric,))
    monkeypatch.setitem(TASKS, "qa", task)
    data = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Capital of France?", "aliases": ["Paris", "City of Light"]},
        {"question": "Two plus two?", "aliases": ["four", "4"]},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tiny_model)
    answers = {0: " Paris", 1: " five"}

    class ScriptedEngine:
        """Answers as scripted (kd-eval's engine door, without vLLM)."""

        def generate(self, requests, **settings):
            for index, _, _ in requests:
                ids = tokenizer.encode(answers[index], add_special_tokens=False)
                yield index, [SimpleNamespace(token_ids=np.asarray(ids))]

    config = EvalConfig(
        data="qa",
        models=(f"m={tiny_model}",),
        data_path=str(data),
        max_model_len=512,
        progress=False,
    )
    report = run_evaluation(config, engines={"m": ScriptedEngine()})
    result = report["models"]["m"]
    assert result["metrics"] == {"exact_match": 0.5, "samples": 2}
    assert [record["hit"] for record in result["predictions"]] == [True, False]
    assert markdown_table(report).splitlines()[0].startswith("| model | params | EM | ms/sample")
