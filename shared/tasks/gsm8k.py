"""GSM8K: grade-school math word problems. Question -> worked answer ending in '#### <number>';
scored by exact match of the final number."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from kd_shards.shared.tasks.interface import (
    Example,
    HubSource,
    MetricColumn,
    Scores,
    Task,
    require_columns,
    text_of,
)

PROMPT = (
    "Solve the following math problem step by step. "
    "End your answer with a final line of the form '#### <number>'.\n\n{question}"
)

_MARKED_ANSWER = re.compile(r"####\s*(-?\$?\s*-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?|-?\$?\s*-?\.\d+")


def to_example(row: dict, index: int) -> Example:
    question, answer = require_columns(row, index, "question", "answer")
    return Example(
        index, PROMPT.format(question=text_of(question).strip()), (text_of(answer).strip(),)
    )


def normalize_number(text: str) -> str | None:
    """Canonical form of a number as written in an answer: '$1,000.50' -> '1000.5', '7.0' -> '7'.

    Returns None when `text` is not a number.
    """
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_number(answer: str) -> str | None:
    """The answer's final number: after the last '#### ', else the last number in the text."""
    marked = _MARKED_ANSWER.findall(answer)
    if marked:
        return normalize_number(marked[-1])
    numbers = _NUMBER.findall(answer)
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def gsm8k_correct(prediction: str, reference: str) -> bool:
    """Exact match of the final numbers (a prediction without a number is wrong)."""
    predicted = final_number(prediction)
    return predicted is not None and predicted == final_number(reference)


def score(predictions: Sequence[str], examples: Sequence[Example]) -> Scores:
    """Final-answer accuracy against each example's first reference, with one record per answer
    (its extracted and expected numbers) so a user can audit every score."""
    references = [example.references[0] for example in examples]
    correct = [
        gsm8k_correct(text, reference)
        for text, reference in zip(predictions, references, strict=True)
    ]
    metrics = {"accuracy": float(np.mean(correct)), "correct": int(sum(correct))}
    records = [
        {
            "sample_id": str(position),
            "reference": references[position],
            "prediction": text,
            "extracted_answer": final_number(text),
            "expected_answer": final_number(references[position]),
            "correct": bool(correct[position]),
        }
        for position, text in enumerate(predictions)
    ]
    return metrics, records


TASK = Task(
    name="gsm8k",
    kind="generate",
    hub=HubSource("openai/gsm8k", "main"),
    to_example=to_example,
    file_names=("{split}.jsonl", "{split}.parquet"),
    score=score,
    metrics=(MetricColumn("accuracy", "accuracy", "{:.3f}", "GSM8K accuracy"),),
)
