"""What the GLUE tasks (MRPC, RTE, QQP, CoLA) share: reading GLUE's published TSV files into
the column names of the Hugging Face `glue` export, so that one task reads either (and any
local JSONL/Parquet/CSV file with those columns)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from kd_shards.shared.errors import UserError
from kd_shards.shared.files import sha256_of_file
from kd_shards.shared.records import LoadedRecords, read_table_file


def glue_reader(
    renamed: dict[str, str], columns: tuple[str, ...] | None = None
) -> Callable[[Path], LoadedRecords]:
    """A task's `read`: a .tsv file in GLUE's layout (UTF-8 with or without a byte-order mark,
    no quote processing; `columns` names a header-less file's columns) with its columns renamed
    by `renamed` (e.g. MRPC's '#1 String' -> 'sentence1'); any other file as
    shared.records.read_table_file reads it, columns as they are."""

    def read(path: Path) -> LoadedRecords:
        path = Path(path)
        if path.suffix.lower() != ".tsv":
            return read_table_file(path)
        if not path.is_file():
            raise UserError(f"data file {path} does not exist: pass an existing file")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(
                handle,
                fieldnames=list(columns) if columns else None,
                delimiter="\t",
                quoting=csv.QUOTE_NONE,
            )
            rows = [{renamed.get(key, key): value for key, value in row.items()} for row in reader]
        if not rows:
            raise UserError(f"{path} holds no records: pass a non-empty data file")
        return LoadedRecords(rows=rows, source=str(path), fingerprint=sha256_of_file(path))

    return read
