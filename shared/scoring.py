"""Metric functions that several tasks share: pure functions of model outputs and references.

Each task's `score` (shared/tasks/) is built from these, so teacher, baseline and distilled
students are measured by the same code:
- ROUGE-1/2/L F1 (rouge-score, Porter stemming, best over the references) and corpus BLEU
  (sacrebleu, all references).
- perplexity, next-token accuracy @1 and @5, from the per-position logprobs and top-k.
- accuracy and macro-F1 of predicted labels; GLUE's Matthews correlation (CoLA) and F1 of
  the positive class (MRPC, QQP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rouge_per_sample(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict]:
    """ROUGE-1/2/L F1 of each sample against its best reference (per metric).

    Args:
        predictions: one string per sample. references: one or more strings per sample.
    Returns:
        One {"rouge1", "rouge2", "rougeL"} dict per sample: floats in [0, 1].
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_sample = []
    for prediction, sample_references in zip(predictions, references, strict=True):
        if not sample_references:
            raise ValueError("every sample needs at least one reference")
        scores = [scorer.score(reference, prediction) for reference in sample_references]
        per_sample.append(
            {
                name: max(score[name].fmeasure for score in scores)
                for name in ("rouge1", "rouge2", "rougeL")
            }
        )
    return per_sample


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Mean ROUGE-1/2/L F1 over samples, each sample scored against its best reference.

    Args:
        predictions: one string per sample. references: one or more strings per sample.
    Returns:
        {"rouge1", "rouge2", "rougeL"}: floats in [0, 1].
    """
    per_sample = rouge_per_sample(predictions, references)
    count = max(len(predictions), 1)
    return {
        name: sum(sample[name] for sample in per_sample) / count
        for name in ("rouge1", "rouge2", "rougeL")
    }


def classification_metrics(predicted: np.ndarray, gold: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro-F1 of predicted label indices against gold ones.

    Macro-F1 is the unweighted mean over the labels that occur in `gold` or in `predicted` of
    F1 = 2·TP / (2·TP + FP + FN) (a label never predicted but present scores 0), as
    scikit-learn's f1_score(average="macro") computes it.

    Args:
        predicted, gold: (N,) int label indices in [0, num_labels).
    Returns:
        {"accuracy", "macro_f1"}: floats in [0, 1].
    """
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    scores = []
    for label in range(num_labels):
        true_positive = int(((predicted == label) & (gold == label)).sum())
        false_positive = int(((predicted == label) & (gold != label)).sum())
        false_negative = int(((predicted != label) & (gold == label)).sum())
        if true_positive + false_positive + false_negative == 0:
            continue  # neither present nor predicted: not part of the macro average
        scores.append(2 * true_positive / (2 * true_positive + false_positive + false_negative))
    return {
        "accuracy": float((predicted == gold).mean()) if len(gold) else 0.0,
        "macro_f1": float(np.mean(scores)) if scores else 0.0,
    }


def matthews_correlation(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of two binary labelings (label 1 is the positive class), GLUE's
    CoLA metric: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a factor of the
    denominator is 0 (a constant prediction or gold), as scikit-learn defines it.

    Args:
        predicted, gold: (N,) int labels in {0, 1}.
    """
    predicted, gold = np.asarray(predicted) == 1, np.asarray(gold) == 1
    true_positive = float((predicted & gold).sum())
    true_negative = float((~predicted & ~gold).sum())
    false_positive = float((predicted & ~gold).sum())
    false_negative = float((~predicted & gold).sum())
    denominator = math.sqrt(
        (true_positive + false_positive)
        * (true_positive + false_negative)
        * (true_negative + false_positive)
        * (true_negative + false_negative)
    )
    if denominator == 0:
        return 0.0
    return (true_positive * true_negative - false_positive * false_negative) / denominator


def positive_f1(predicted: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class, 2·TP / (2·TP + FP + FN) (GLUE's F1 for MRPC and QQP); 0 when
    the class is neither predicted nor present.

    Args:
        predicted, gold: (N,) int label indices.
    """
    predicted, gold = np.asarray(predicted) == positive, np.asarray(gold) == positive
    true_positive = int((predicted & gold).sum())
    wrong = int((predicted != gold).sum())
    return 2 * true_positive / (2 * true_positive + wrong) if true_positive + wrong else 0.0


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with every sample's references."""
    import sacrebleu

    width = max((len(sample) for sample in references), default=1)
    # sacrebleu takes reference *streams*; samples with fewer references repeat their first one,
    # which leaves BLEU's clipped counts and closest-length choice unchanged.
    streams = [
        [sample[index] if index < len(sample) else sample[0] for sample in references]
        for index in range(width)
    ]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def language_model_sums(
    target_ids: np.ndarray, target_logprobs: np.ndarray, topk_ids: np.ndarray
) -> np.ndarray:
    """Sums for perplexity and next-token accuracy over scored positions.

    Args:
        target_ids: (N,) int, the actual next tokens. target_logprobs: (N,) float, the model's
            logprob of each. topk_ids: (N, K) int, the model's top-K ids in rank order (K >= 5
            for acc@5).
    Returns:
        (4,) float64: [negative log-likelihood sum, top-1 hits, top-5 hits, positions].
    """
    target_ids = np.asarray(target_ids).reshape(-1, 1)
    hits_at_1 = (np.asarray(topk_ids)[:, :1] == target_ids).any(-1).sum()
    hits_at_5 = (np.asarray(topk_ids)[:, :5] == target_ids).any(-1).sum()
    nll = -np.asarray(target_logprobs, dtype=np.float64).sum()
    return np.array([nll, hits_at_1, hits_at_5, len(target_ids)], dtype=np.float64)


def language_model_metrics(sums: np.ndarray) -> dict:
    """Perplexity, acc@1, acc@5 from language_model_sums (added over chunks)."""
    nll, hits_at_1, hits_at_5, positions = (float(value) for value in sums)
    positions = max(positions, 1.0)
    return {
        "perplexity": math.exp(nll / positions),
        "acc@1": hits_at_1 / positions,
        "acc@5": hits_at_5 / positions,
        "tokens": int(positions),
    }
