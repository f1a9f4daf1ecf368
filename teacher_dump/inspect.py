"""`teacher-dump inspect DIR [--validate]`: what a dump holds, and whether it is intact.

The summary reads the manifest plus a pass over each shard's distributions (finish reasons, the
entries per position, the captured mass) and its footer (bytes per column). `--validate` reads
every shard fully and checks it against the schema and the manifest: checksum, representation,
row/token counts, list lengths, entry counts, id range, finite sorted logprobs, unique sample
ids; the first problem is reported with the shard's name.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import inside_directory, is_classify, storage_of_manifest
from kd_shards.schemas.shard import V1_COLUMNS
from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.shard_reader import (
    checked_columns,
    physical_columns,
    read_codebook,
    read_manifest,
    shard_columns,
)
from kd_shards.shared.storage import Folder, as_folder
from kd_shards.teacher_dump.shards import shards_on_disk


def column_bytes(metadata) -> dict[str, int]:
    """Compressed bytes of each top-level column of a shard, from its Parquet FileMetaData."""
    sizes: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            name = chunk.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    return sizes


def summarize(directory: Path | Folder) -> dict:
    """Statistics of a dump for display (a local directory or an object-storage folder)."""
    folder = as_folder(directory)
    manifest = read_manifest(folder)
    storage = storage_of_manifest(manifest)
    finish_reasons: Counter[str] = Counter()
    mass_sum, entries, positions = 0.0, 0, 0
    sizes: Counter[str] = Counter()
    unreadable = []
    for entry in manifest["shards"]:
        try:
            reader_columns = ("sample_id", "target_ids", "finish_reason", *V1_COLUMNS)
            with open_shard(folder, entry["name"]) as handle:
                parquet = pq.ParquetFile(handle)
                table = parquet.read(columns=physical_columns(reader_columns, storage))
                metadata = parquet.metadata
            codebook = read_codebook(metadata, storage)
            columns = (
                codebook
                if isinstance(codebook, str)
                else shard_columns(table, manifest["top_k"], storage, codebook)
            )
            sizes.update(column_bytes(metadata))
        except Exception:  # reported by --validate with the reason; the summary goes on
            unreadable.append(entry["name"])
            continue
        if isinstance(columns, str):
            unreadable.append(entry["name"])
            continue
        finish_reasons.update(table["finish_reason"].to_pylist())
        mass_sum += float(captured_mass(columns).sum())
        entries += int((columns.topk_ids >= 0).sum())
        positions += len(columns.topk_logprobs)
    totals = manifest["totals"]
    tokens = max(totals["target_tokens"], 1)
    return {
        "manifest": manifest,
        "finish_reasons": dict(finish_reasons.most_common()),
        "mean_captured_mass": mass_sum / positions if positions else float("nan"),
        "entries_per_position": entries / positions if positions else float("nan"),
        "bytes_per_token": totals["bytes"] / tokens,
        "column_bytes_per_token": {name: size / tokens for name, size in sizes.items()},
        "unreadable": unreadable,
    }


def captured_mass(columns) -> np.ndarray:
    """(N,) the teacher's mass on the stored ids: 1 - the stored tail where the dump stores one
    (exact), else the sum of the stored probabilities (schema v1)."""
    stored = np.exp(columns.topk_logprobs.astype(np.float64)).sum(axis=1)
    tail = columns.topk_log_tail.astype(np.float64)
    return np.where(np.isnan(tail), stored, -np.expm1(tail))


def format_summary(directory: Path, summary: dict) -> str:
    manifest = summary["manifest"]
    totals = manifest["totals"]
    teacher = manifest["teacher"]
    engine = manifest.get("engine") or {}
    data = manifest["data"]
    reasons = (
        ", ".join(f"{reason} {count}" for reason, count in summary["finish_reasons"].items())
        or "none"
    )
    storage = storage_of_manifest(manifest)
    sizes = summary["column_bytes_per_token"]
    distribution = storage.columns if storage is not None else V1_COLUMNS
    by_column = ", ".join(f"{name} {sizes.get(name, 0):.1f}" for name in distribution)
    rest = sum(size for name, size in sizes.items() if name not in distribution)
    if is_classify(manifest):
        stored = f"classify: all {manifest['top_k']} labels exactly (schema v1 layout), logprobs on 2^-10"
    elif storage is None:
        stored = f"schema v1: exact top-{manifest['top_k']}, logprobs on 2^-10, no stored tail"
    else:
        stored = storage.describe()
    mass_meaning = (
        "share of the draws on real ids (weights hits/draws)"
        if storage is not None and storage.representation == "sampled"
        else "mean teacher mass on the stored ids"
    )
    lines = [
        f"dump            {directory}",
        f"schema version  {manifest['schema_version']}",
        f"mode            {manifest['mode']}",
        f"teacher         {teacher['model']} (ran in {teacher.get('dtype') or 'not run yet'}; "
        f"--dtype {teacher.get('dtype_requested', '?')}, weights stored as "
        f"{teacher.get('checkpoint_dtype') or '?'}; vllm {engine.get('version')}, {engine.get('platform')})",
        f"tokenizer       {manifest['tokenizer']['fingerprint'][:16]} (size {manifest['tokenizer']['size']})",
        f"storage         {stored} ({manifest['logprobs']['mode']})",
        f"parameters      {json.dumps(storage.to_dict() if storage else {'top_k': manifest['top_k']})}",
        f"data            {data['task']} from {data['source']} ({data['prompts']} prompts, {data['skipped_too_long']} skipped as too long)",
        f"rows            {totals['rows']:,} of {expected_rows(manifest)} expected ({'complete' if manifest['complete'] else 'INCOMPLETE: rerun the same command to finish'})",
        f"shards          {totals['shards']}",
        f"target tokens   {totals['target_tokens']:,}",
        f"bytes           {totals['bytes']:,} ({summary['bytes_per_token']:.1f} B per target token: "
        f"{by_column}, other columns {rest:.1f})",
        f"entries         {summary['entries_per_position']:.1f} per position",
        f"captured mass   {summary['mean_captured_mass']:.4f} ({mass_meaning})",
        f"finish reasons  {reasons}",
    ]
    section = manifest.get("classify")
    if section:
        lines.append(
            f"labels          {', '.join(section['labels'])} (teacher: {section['teacher_kind']}, "
            f"ran in {section.get('backend') or 'not run yet'}"
            + (f": {section['backend_reason']}" if section.get("backend_reason") else "")
            + ")"
        )
        if section.get("hidden"):
            hidden = section["hidden"]
            lines.append(
                f"hidden states   layer {hidden['layer']}, {hidden['pooling']} pooling, width "
                f"{hidden['width']} (float16)"
            )
    if summary["unreadable"]:
        lines.append(
            f"UNREADABLE      {', '.join(summary['unreadable'])} (run inspect --validate for details)"
        )
    if manifest.get("filter"):
        lines.append(filter_line(manifest["filter"]))
    padded = sum(entry.get("padded_topk_entries", 0) for entry in manifest["shards"])
    if padded:
        lines.append(f"padding ids     {padded:,} top-k entries were padding-row ids, stored as -1")
    return "\n".join(lines)


def expected_rows(manifest: dict) -> str:
    """The rows the dump will hold ("?" for a filtered dump until it is complete)."""
    expected = manifest["data"]["expected_rows"]
    return "?" if expected is None else f"{expected:,}"


def filter_line(section: dict) -> str:
    """inspect's line on a filtered dump (teacher_dump.filters)."""
    rule = section["filter"] + (
        f" >= {section['threshold']}" if section.get("threshold") is not None else ""
    )
    if section.get("column"):
        rule += f" (column {section['column']})"
    return (
        f"filter          {rule}: {section['kept']:,} of {section['generated']:,} samples kept "
        f"over {section['prompts_done']:,} prompts; {len(section['none_kept'])} with none kept, "
        f"{len(section['best_kept'])} kept their best (--keep-best-of)"
    )


def validate(directory: Path | Folder) -> list[str]:
    """Every problem found, each naming its shard; empty when the dump is intact."""
    folder = as_folder(directory)
    manifest = read_manifest(folder)
    problems: list[str] = []
    listed = {entry["name"] for entry in manifest["shards"]}
    for name in shards_on_disk(folder):
        if name not in listed:
            problems.append(
                f"{name}: on disk but not in the manifest (rerun the dump command to refresh it)"
            )
    seen_ids: set[str] = set()
    for entry in manifest["shards"]:
        try:
            problem = validate_shard(folder, entry, manifest, seen_ids)
        except UserError as error:
            problem = str(error)
        if problem:
            problems.append(f"{entry['name']}: {problem}")
    return problems


@contextlib.contextmanager
def open_shard(folder: Folder, name: str):
    """What pyarrow reads a shard of the dump from: locally its path (only a file of the dump
    directory itself: see schemas.manifest.inside_directory), else an open fsspec file."""
    if folder.is_local:
        yield str(inside_directory(folder.local, name))
    else:
        with folder.open(name) as handle:
            yield handle


def validate_shard(folder: Folder, entry: dict, manifest: dict, seen_ids: set[str]) -> str | None:
    """The first problem in one shard, or None (the same value checks as the trainer's reader)."""
    name = entry["name"]
    if folder.is_local:
        name = inside_directory(folder.local, name).name  # refuses links leading elsewhere
    if not folder.is_file(name):
        return "listed in the manifest but missing on disk"
    size = folder.size(name)
    if size != entry["bytes"]:
        return f"size {size} differs from the manifest's {entry['bytes']} (truncated or replaced)"
    if folder.sha256(name) != entry["sha256"]:
        return "sha256 differs from the manifest (corrupt or replaced)"
    try:
        with open_shard(folder, name) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read()
    except Exception as error:
        return f"unreadable Parquet ({one_line(error, 120)})"
    if table.num_rows != entry["rows"]:
        return f"{table.num_rows} rows, manifest says {entry['rows']}"
    columns = checked_columns(table, parquet.metadata, manifest)
    if isinstance(columns, str):
        return columns
    if len(columns.target_ids) != entry["target_tokens"]:
        return f"{len(columns.target_ids)} target tokens, manifest says {entry['target_tokens']}"
    for sample_id in columns.sample_ids:
        if sample_id in seen_ids:
            return f"sample_id {sample_id} appears more than once in the dump"
        seen_ids.add(sample_id)
    return None


def run_inspect(directory: Path | str, check: bool) -> int:
    """Print the summary (and validation result); returns the exit status."""
    folder = as_folder(directory)
    if not folder.exists():
        raise UserError(f"{directory} is not a directory: pass a teacher-dump --out directory")
    print(format_summary(folder, summarize(folder)))
    if not check:
        return 0
    problems = validate(folder)
    if problems:
        for problem in problems:
            print(f"INVALID {problem}")
        return 1
    print("valid           every shard matches the schema and the manifest")
    return 0
