"""Summarization: document -> one-sentence summary, scored by ROUGE-1/2/L F1 (best reference per
sample) and corpus BLEU (all references). SciTLDR-shaped rows ({source: [sentences],
target: [tldrs]}) and plain {document, summary} rows are both accepted."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kd_shards.shared.scoring import bleu_score, rouge_per_sample
from kd_shards.shared.tasks.interface import (
    Example,
    HubSource,
    MetricColumn,
    Scores,
    Task,
    require_columns,
    text_of,
)

PROMPT = "Summarize the following text in one sentence.\n\n{document}"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def to_example(row: dict, index: int) -> Example:
    if "source" in row and "target" in row:  # SciTLDR: lists of sentences / of reference TLDRs
        document, targets = row["source"], row["target"]
    elif "document" in row:
        document, targets = row["document"], row.get("summary", [])
    else:
        require_columns(row, index, "document", "summary")
    references = targets if isinstance(targets, (list, tuple)) else [targets]
    references = tuple(
        text_of(reference).strip() for reference in references if text_of(reference).strip()
    )
    return Example(index, PROMPT.format(document=text_of(document).strip()), references)


def score(predictions: Sequence[str], examples: Sequence[Example]) -> Scores:
    """Mean ROUGE-1/2/L F1 and corpus BLEU, with each sample's own ROUGE in its record."""
    predictions = list(predictions)
    references = [example.references for example in examples]
    per_sample = rouge_per_sample(predictions, references)
    metrics = {
        name: float(np.mean([sample[name] for sample in per_sample])) if per_sample else 0.0
        for name in ROUGE_KEYS
    }
    metrics["bleu"] = bleu_score(predictions, references)
    records = [
        {
            "sample_id": str(position),
            "references": list(references[position]),
            "prediction": text,
            **per_sample[position],
        }
        for position, text in enumerate(predictions)
    ]
    return metrics, records


TASK = Task(
    name="summ",
    kind="generate",
    hub=HubSource("allenai/scitldr", "Abstract"),
    to_example=to_example,
    file_names=("{split}.jsonl", "{split}.parquet"),
    score=score,
    metrics=(
        MetricColumn("rouge1", "ROUGE-1", "{:.4f}"),
        MetricColumn("rouge2", "ROUGE-2", "{:.4f}"),
        MetricColumn("rougeL", "ROUGE-L", "{:.4f}", "ROUGE-L F1"),
        MetricColumn("bleu", "BLEU", "{:.2f}", "BLEU"),
    ),
)
