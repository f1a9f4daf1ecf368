"""TriviaQA (open-domain, no evidence): a question and every alias of its answer. The model's
greedy answer, up to its first line break, is scored against each alias after SQuAD's
normalization (lowercase, punctuation and the articles a/an/the removed, whitespace collapsed):
exact match, and token F1, precision and recall, each the best over the aliases (as SQuAD's
official script takes each metric's max over the references). Reads JSONL with `question` and
`golden_answers` (or `answer.aliases`, as the rc.nocontext export has it)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from kd_shards.shared.errors import UserError
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
    "Answer the question with a short answer only (a name, a number or a few words), on one "
    "line.\n\nQuestion: {question}"
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def to_example(row: dict, index: int) -> Example:
    (question,) = require_columns(row, index, "question")
    aliases = row.get("golden_answers")
    if aliases is None and isinstance(row.get("answer"), dict):
        aliases = row["answer"].get("aliases")
    if not aliases:
        raise UserError(
            f"record {index} has no answer aliases (a `golden_answers` list, or "
            "`answer.aliases`): pass TriviaQA records with their answers"
        )
    aliases = [aliases] if isinstance(aliases, str) else aliases
    return Example(
        index, PROMPT.format(question=text_of(question).strip()), tuple(map(text_of, aliases))
    )


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    """(F1, precision, recall) of the normalized tokens shared by the two (as multisets)."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall), precision, recall


def answer_of(generated: str) -> str:
    """The answer in a generation: its first non-empty line."""
    return next((line.strip() for line in generated.splitlines() if line.strip()), "")


def question_scores(answer: str, aliases: Sequence[str]) -> dict:
    """Exact match, F1, precision and recall of one answer: each the max over the aliases."""
    per_alias = [token_scores(answer, alias) for alias in aliases]
    return {
        "exact_match": float(
            any(normalize_answer(answer) == normalize_answer(alias) for alias in aliases)
        ),
        "f1": max(scores[0] for scores in per_alias),
        "precision": max(scores[1] for scores in per_alias),
        "recall": max(scores[2] for scores in per_alias),
    }


def score(predictions: Sequence[str], examples: Sequence[Example]) -> Scores:
    """Mean exact match, F1, precision and recall over questions, one record per question."""
    answers = [answer_of(text) for text in predictions]
    per_question = [
        question_scores(answer, example.references)
        for answer, example in zip(answers, examples, strict=True)
    ]
    keys = ("exact_match", "f1", "precision", "recall")
    metrics = {
        key: float(np.mean([scores[key] for scores in per_question])) if per_question else 0.0
        for key in keys
    }
    records = [
        {
            "sample_id": str(position),
            "reference": list(examples[position].references),
            "prediction": predictions[position],
            "extracted_answer": answers[position],
            **per_question[position],
        }
        for position in range(len(predictions))
    ]
    return metrics, records


TASK = Task(
    name="triviaqa",
    kind="generate",
    hub=HubSource("mandarjoshi/trivia_qa", "rc.nocontext"),
    to_example=to_example,
    file_names=("{split}500.jsonl", "{split}.jsonl", "{split}.parquet"),
    score=score,
    metrics=(
        MetricColumn("exact_match", "EM", "{:.4f}", "TriviaQA exact match"),
        MetricColumn("f1", "F1", "{:.4f}", "TriviaQA F1"),
        MetricColumn("precision", "precision", "{:.4f}"),
        MetricColumn("recall", "recall", "{:.4f}"),
    ),
)
