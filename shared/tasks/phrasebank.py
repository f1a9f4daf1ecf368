"""Financial PhraseBank v1.0: 3-class sentiment of financial news sentences (negative, neutral,
positive). Two tasks, by how many annotators agreed: `phrasebank` (50Agree, 4,846 sentences,
the set scripts/classify_bench.py cuts) and `phrasebank-allagree` (AllAgree, 2,264). Reads the
published `sentence@label` lines (AllAgree is UTF-8, 50Agree latin-1) or a file with `text`
and `label` columns; there is no published split, so every --split reads the whole file.
Scored by accuracy and macro-F1. CC BY-NC-SA 3.0: read it from ../shared/data, never copy it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kd_shards.shared.errors import UserError
from kd_shards.shared.records import TABLE_SUFFIXES, LoadedRecords, read_table_file
from kd_shards.shared.tasks.interface import HubSource
from kd_shards.shared.tasks.labelled import labelled_task

LABELS = ("negative", "neutral", "positive")


def read_phrasebank(path: Path) -> LoadedRecords:
    """{"text", "label"} rows from `sentence@label` lines (the label after the last '@'); a
    table file is read as it is."""
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_table_file(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: pass an existing file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # Sentences_50Agree.txt (and the 66/75 files) are latin-1
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        sentence, separator, label = line.rpartition("@")
        if not separator:
            raise UserError(
                f"{path} line {number} has no '@label' at its end: pass PhraseBank's "
                "`sentence@label` lines, or a file with text and label columns"
            )
        rows.append({"text": sentence.strip(), "label": label.strip()})
    if not rows:
        raise UserError(f"{path} holds no records: pass a non-empty data file")
    return LoadedRecords(rows, str(path), hashlib.sha256(data).hexdigest())


def phrasebank_task(name: str, agreement: str):
    return labelled_task(
        name,
        HubSource("takala/financial_phrasebank", f"sentences_{agreement.lower()}"),
        "text",
        LABELS,
        file_names=(f"Sentences_{agreement}.txt", "{split}.jsonl", "{split}.tsv"),
        read=read_phrasebank,
    )


TASK = phrasebank_task("phrasebank", "50Agree")
ALL_AGREE = phrasebank_task("phrasebank-allagree", "AllAgree")
