"""Raw text (WikiText-2 by default): chunked to a token length, scored by perplexity and
next-token accuracy @1/@5. teacher-dump's text mode reads its rows (each carries only a 'text'
field); kd-eval scores every window teacher-forced."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kd_shards.shared.scoring import language_model_metrics
from kd_shards.shared.tasks.interface import (
    Example,
    HubSource,
    MetricColumn,
    Scores,
    Task,
    require_columns,
    text_of,
)


def to_example(row: dict, index: int) -> Example:
    (text,) = require_columns(row, index, "text")
    return Example(index, "", (text_of(text),))


def score(predictions: Sequence[np.ndarray], windows: Sequence[np.ndarray]) -> Scores:
    """Perplexity and acc@1/@5 over all windows, and per window.

    Args:
        predictions: one language_model_sums array per window. windows: the windows' token ids
            (the first 8 go into each record, to tell windows apart).
    """
    total = np.zeros(4, dtype=np.float64)
    for sums in predictions:
        total += sums
    metrics = language_model_metrics(total)
    records = []
    for position, sums in enumerate(predictions):
        window = language_model_metrics(sums)
        records.append(
            {
                "sample_id": str(position),
                "first_tokens": windows[position][:8].tolist(),
                "tokens": window["tokens"],
                "nll": float(sums[0] / max(window["tokens"], 1)),
                "perplexity": window["perplexity"],
                "acc@1": window["acc@1"],
                "acc@5": window["acc@5"],
            }
        )
    return metrics, records


TASK = Task(
    name="text",
    kind="text",
    hub=HubSource("Salesforce/wikitext", "wikitext-2-raw-v1"),
    to_example=to_example,
    file_names=(
        "{split}.txt",
        "wiki.{split}.raw",
        "{split}.raw",
        "{split}.jsonl",
        "{split}.parquet",
    ),
    score=score,
    metrics=(
        MetricColumn("perplexity", "perplexity", "{:.2f}", "perplexity (lower is better)"),
        MetricColumn("acc@1", "acc@1", "{:.3f}", "next-token acc@1"),
        MetricColumn("acc@5", "acc@5", "{:.3f}"),
    ),
)
