"""Reading input records (rows of a dataset) from local files or the Hugging Face hub.

Local JSONL/JSON/Parquet/CSV/TSV files are read here directly so that a malformed line is
reported with its line number; hub datasets go through `datasets` and fail fast when offline.
Each source also yields a fingerprint (sha256 of the file bytes, or the hub dataset's own
fingerprint) that goes into the manifest and the dump's identity.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import sha256_of_file

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
TEXT_SUFFIXES = (".txt", ".raw", ".md")


@dataclass(frozen=True)
class LoadedRecords:
    """Rows of a dataset plus where they came from."""

    rows: list[dict]
    """One dict per row, in file order."""
    source: str
    """Human-readable origin: a file path or 'hub:<name>/<config>:<split>'."""
    fingerprint: str
    """sha256 of the file bytes, or the hub dataset's fingerprint."""


def read_table_file(path: Path, columns: tuple[str, ...] | None = None) -> LoadedRecords:
    """Rows of a .jsonl/.json/.parquet/.csv/.tsv file; errors name the file (and line).

    `columns`: the column names of a .csv/.tsv file that has no header line (else the first
    line is the header). TSV fields are read without quote processing, as GLUE-style TSVs
    (SST-2) are written: a quote character is text there, not a delimiter."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: pass an existing file with --data-path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_with(path, "[")):
        rows = _read_jsonl(path)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} is not valid JSON ({error.msg} at line {error.lineno}): fix the file"
            ) from None
        if not all(isinstance(row, dict) for row in rows):
            raise UserError(f"{path} must be a JSON array of objects (one per record)")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for corrupt files
            raise UserError(
                f"{path} is not a readable Parquet file ({error}): re-export it"
            ) from None
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            tsv = suffix == ".tsv"
            reader = csv.DictReader(
                handle,
                fieldnames=list(columns) if columns else None,
                delimiter="\t" if tsv else ",",
                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            )
            rows = list(reader)
    else:
        raise UserError(
            f"{path}: unsupported data file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}"
        )
    if not rows:
        raise UserError(f"{path} holds no records: pass a non-empty data file")
    return LoadedRecords(rows=rows, source=str(path), fingerprint=sha256_of_file(path))


def _starts_with(path: Path, character: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith(character)
    return False


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path} line {line_number} is not valid JSON ({error.msg}): fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path} line {line_number} is a JSON {type(row).__name__}, not an object: "
                    "each line must be one {...} record"
                )
            rows.append(row)
    return rows


def read_text_files(paths: list[Path]) -> LoadedRecords:
    """Plain-text files as one 'text' row each, in the given order."""
    digest = hashlib.sha256()
    rows = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(
                f"{path} is not UTF-8 text ({error.reason}): convert it to UTF-8"
            ) from None
        digest.update(path.name.encode() + b"\0" + text.encode())
        rows.append({"text": text})
    if not any(row["text"].strip() for row in rows):
        raise UserError(f"{', '.join(map(str, paths))}: no text found; pass non-empty text files")
    return LoadedRecords(
        rows=rows, source=", ".join(map(str, paths)), fingerprint=digest.hexdigest()
    )


def load_hub_records(name: str, config: str | None, split: str) -> LoadedRecords:
    """A hub dataset split through `datasets`; offline it fails fast with the fix in the message."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError...)
        reason = one_line(error)
        raise UserError(
            f"cannot load dataset {name}{'/' + config if config else ''} split {split!r} from the "
            f"Hugging Face hub ({reason[:200]}): when offline, pass a local file with --data-path"
        ) from None
    label = f"hub:{name}{'/' + config if config else ''}:{split}"
    return LoadedRecords(rows=dataset.to_list(), source=label, fingerprint=dataset._fingerprint)
