"""AQuA-RAT: algebra word problems with five lettered options (A-E). Two tasks on the same
records (`question`, `options` ["A)...", ...], `correct` letter, `rationale`):
- `aqua-rat` (multiple choice): a language model scores each option's text by its
  log-probability after "Question: ...\\nAnswer:"; an encoder reads (question, option) as a
  pair. Scored by accuracy.
- `aqua-rat-letter` (generation): the question with its lettered options, the model's greedy
  answer, and the letter it names (see answer_letter) against `correct`. Scored by accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kd_shards.shared.errors import UserError
from kd_shards.shared.tasks.choice import ACCURACY, LETTERS, choice_score
from kd_shards.shared.tasks.interface import (
    Example,
    HubSource,
    MetricColumn,
    Scores,
    Task,
    require_columns,
    text_of,
)

LETTER_PROMPT = (
    "{question}\n\nOptions:\n{options}\n\n"
    "Think step by step if you need to, then end with 'The answer is X', where X is the letter "
    "of the correct option."
)
_OPTION = re.compile(r"^\s*\(?([A-Ea-e])\s*[\)\.:]\s*(.*)$", re.DOTALL)
_STATED = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?\s*([A-E])\b", re.IGNORECASE)
_ALONE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")


def option_texts(row: dict, index: int) -> tuple[str, list[str], str]:
    """(question, the options' texts without their letters, gold letter) of a record."""
    question, options, correct = require_columns(row, index, "question", "options", "correct")
    if not isinstance(options, (list, tuple)) or not options:
        raise UserError(f"record {index}: options must be a list like ['A)...', ...]")
    texts = []
    for option in options:
        match = _OPTION.match(text_of(option))
        texts.append(match.group(2).strip() if match else text_of(option).strip())
    letter = text_of(correct).strip().upper()
    if letter not in LETTERS[: len(texts)]:
        raise UserError(
            f"record {index} has correct answer {letter!r}, not one of its options "
            f"{LETTERS[: len(texts)]}: fix the record"
        )
    return text_of(question).strip(), texts, letter


def to_choice_example(row: dict, index: int) -> Example:
    question, texts, letter = option_texts(row, index)
    context = f"Question: {question}\nAnswer:"
    choices = tuple((context, " " + text) for text in texts)
    return Example(index, question, (str(LETTERS.index(letter)),), choices=choices)


def to_letter_example(row: dict, index: int) -> Example:
    question, texts, letter = option_texts(row, index)
    listed = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(texts))
    return Example(index, LETTER_PROMPT.format(question=question, options=listed), (letter,))


def answer_letter(answer: str) -> str | None:
    """The option a generated answer names: the last 'answer is X' / 'answer: X', else the last
    capital A-E standing alone; None when there is none."""
    stated = _STATED.findall(answer)
    if stated:
        return stated[-1].upper()
    alone = _ALONE.findall(answer)
    return alone[-1] if alone else None


def letter_score(predictions: Sequence[str], examples: Sequence[Example]) -> Scores:
    """Accuracy of the named letter against the gold letter, one record per question."""
    letters = [answer_letter(text) for text in predictions]
    correct = [
        letter == example.references[0] for letter, example in zip(letters, examples, strict=True)
    ]
    metrics = {"accuracy": float(np.mean(correct)) if correct else 0.0, "correct": sum(correct)}
    records = [
        {
            "sample_id": str(position),
            "reference": example.references[0],
            "prediction": predictions[position],
            "extracted_answer": letters[position],
            "correct": bool(correct[position]),
        }
        for position, example in enumerate(examples)
    ]
    return metrics, records


TASK = Task(
    name="aqua-rat",
    kind="choice",
    hub=HubSource("deepmind/aqua_rat", "raw"),
    to_example=to_choice_example,
    file_names=("{split}.json", "{split}.jsonl", "{split}.parquet"),
    score=choice_score,
    metrics=ACCURACY,
)
LETTER_TASK = Task(
    name="aqua-rat-letter",
    kind="generate",
    hub=HubSource("deepmind/aqua_rat", "raw"),
    to_example=to_letter_example,
    file_names=("{split}.json", "{split}.jsonl", "{split}.parquet"),
    score=letter_score,
    metrics=(MetricColumn("accuracy", "accuracy", "{:.3f}", "AQuA-RAT accuracy (letter)"),),
)
