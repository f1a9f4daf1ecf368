"""One teacher-dump run: resolve inputs, check them, resume, drive the engine, write shards.

The order matters for the user: everything that can fail on bad input (model dir, tokenizer,
data, prompt lengths, a different config already in --out) fails before the 20-60 s engine
start. Then this rank's remaining prompts stream through the engine and their rows into shards.
What the teacher is asked and how its answers become rows is the mode's (teacher_dump.modes);
this module keeps what every mode shares: resume, identity, manifest and writing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from kd_shards.schemas.manifest import MANIFEST_NAME, corrupt_manifest
from kd_shards.schemas.shard import Storage
from kd_shards.shared.config import config_to_dict
from kd_shards.shared.errors import UserError
from kd_shards.shared.files import remove_stale_temporaries
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.storage import Folder
from kd_shards.shared.tasks import load_records, resolve_task
from kd_shards.shared.tokenizer import tokenizer_fingerprint
from kd_shards.teacher_dump.config import LOCAL_FIELDS, DumpConfig
from kd_shards.teacher_dump.data_parallel import data_parallel_results, rank_environments
from kd_shards.teacher_dump.filters import CompletionFilter, check_filter_data, select_rows
from kd_shards.teacher_dump.modes import MODES
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs, resolve_teacher
from kd_shards.teacher_dump.pipeline import WriterSpec, start_writer
from kd_shards.teacher_dump.ray_dump import ray_results
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ShardRow
from kd_shards.teacher_dump.shards import (
    done_source_indices,
    exclusive_writer,
    refresh_manifest,
    update_manifest,
)
from kd_shards.teacher_dump.tokenizer_files import keep_tokenizer

MODE_FIELDS = frozenset().union(*(mode.OWN_FIELDS for mode in MODES.values()))
"""Fields that shape the rows of one mode only (TeacherMode.OWN_FIELDS): the other modes leave
them out of their identity."""


def identity_of(config: DumpConfig) -> dict:
    """The config fields that define what the dump contains (see LOCAL_FIELDS, MODE_FIELDS)."""
    own = MODES[config.mode].OWN_FIELDS
    return {
        key: value
        for key, value in config_to_dict(config).items()
        if key not in LOCAL_FIELDS and (key not in MODE_FIELDS or key in own)
    }


@dataclass(frozen=True)
class PreparedDump:
    """Everything resolved and checked before the engine starts."""

    inputs: TeacherInputs
    records: LoadedRecords
    planned: ModeRequests
    """The mode's requests: every prompt of the dump (all ranks), in source order."""

    @property
    def model(self):
        return self.inputs.model

    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @property
    def requests(self) -> list[DumpRequest]:
        return self.planned.requests


def prepare(config: DumpConfig) -> PreparedDump:
    """Resolve model, tokenizer and data; build and validate this dump's requests (no engine)."""
    mode = MODES[config.mode]
    inputs = resolve_teacher(config)
    if hasattr(mode, "load_source"):  # a mode whose --data is not a task (rescore: a dump)
        task, records = mode.load_source(config, inputs)
    else:
        task = resolve_task(config.data, config.prompt_column, config.target_column)
        mode.check_task(config, task, inputs)
        data_path = Path(config.data_path) if config.data_path else None
        records = load_records(task, config.data, data_path, config.split)
    planned = mode.requests(config, task, records, inputs)
    completion_filter = filter_of(config)
    if completion_filter is not None:
        check_filter_data(completion_filter, planned.requests, records.rows)
    return PreparedDump(inputs, records, planned)


def filter_of(config: DumpConfig) -> CompletionFilter | None:
    """The dump's completion filter (teacher_dump.filters), None without --filter."""
    if config.filter == "none":
        return None
    return CompletionFilter(
        name=config.filter,
        threshold=1.0 if config.filter_threshold is None else config.filter_threshold,
        column=config.filter_column,
        keep_best_of=config.keep_best_of,
    )


def filter_section(config: DumpConfig) -> dict:
    """The manifest's `filter` before any prompt is dumped (teacher_dump.shards keeps its
    counts in step with the shards)."""
    return {
        "filter": config.filter,
        "threshold": config.filter_threshold,
        "column": config.filter_column,
        "keep_best_of": config.keep_best_of,
        "samples_per_prompt": config.num_samples,
        "prompts_done": 0,
        "generated": 0,
        "kept": 0,
        "none_kept": [],
        "best_kept": [],
    }


def fingerprints_of(prepared: PreparedDump) -> dict:
    """What the dump is made from besides its config: weights, data, tokenizer."""
    return {
        "weights": prepared.model.weights_fingerprint,
        "data": prepared.records.fingerprint,
        "tokenizer": tokenizer_fingerprint(prepared.tokenizer),
    }


def identity_hash(fields: dict, fingerprints: dict) -> str:
    """sha256 of what makes the dump what it is: its identity fields and fingerprints."""
    blob = json.dumps({"config": fields, **fingerprints}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_identity(config: DumpConfig, prepared: PreparedDump) -> str:
    """The dump's identity: its mode's identity fields, weights, data and tokenizer."""
    return identity_hash(identity_of(config), fingerprints_of(prepared))


def teacher_section(config: DumpConfig, prepared: PreparedDump) -> dict:
    """The manifest's teacher: the model as resolved; `dtype` (what ran) is filled in once the
    engine has started."""
    model = prepared.model
    return {
        "model": config.model,
        "directory": str(model.directory),
        "revision": model.revision,
        "weights_fingerprint": model.weights_fingerprint,
        "architectures": model.config.get("architectures"),
        "embedding_rows": model.config.get("vocab_size"),
        "checkpoint_dtype": checkpoint_dtype(model.config),
        "dtype_requested": config.dtype,
        "dtype": None,
        "context": prepared.inputs.context,
    }


def manifest_header(config: DumpConfig, prepared: PreparedDump) -> dict:
    """Everything the manifest records about the dump, except its shards."""
    mode, tokenizer, records = MODES[config.mode], prepared.tokenizer, prepared.records
    now = datetime.now(UTC).isoformat(timespec="seconds")
    header = {
        "schema_version": None,  # this and the other Nones: the mode's manifest_entries
        "kind": "kd-shards teacher dump",
        "identity": dump_identity(config, prepared),
        "created": now,
        "updated": now,
        "mode": config.mode,
        "teacher": teacher_section(config, prepared),
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "size": len(tokenizer),
            "stop_token_ids": prepared.inputs.stop_ids,
            "chat_template_used": prepared.inputs.use_template,
        },
        "top_k": None,
        "logprobs": None,
        "sampling": None,
        "engine": {"name": "vllm", "version": None, "platform": None},
        "data": {
            "task": config.data,
            "source": records.source,
            "fingerprint": records.fingerprint,
            "split": config.split,
            "prompts": len(prepared.requests),
            "skipped_too_long": prepared.planned.skipped,
            # A filtered dump's rows are known once it is complete (teacher_dump.shards).
            "expected_rows": None
            if config.filter != "none"
            else len(prepared.requests) * mode.rows_per_prompt(config),
        },
        "config": config_to_dict(config),
        "shards": [],
        "totals": {"shards": 0, "rows": 0, "target_tokens": 0, "bytes": 0},
        "complete": False,
    }
    header.update(mode.manifest_entries(config, prepared.inputs, prepared.planned))
    if config.filter != "none":
        header["filter"] = filter_section(config)
    return header


def open_output(directory: Folder, header: dict, config: DumpConfig, fingerprints: dict) -> None:
    """Create the manifest, or check that the existing one was made with the same config from
    the same weights, data and tokenizer (`fingerprints`)."""
    directory.make()
    with directory.lock():
        path = directory.location_of(MANIFEST_NAME)
        if not directory.is_file(MANIFEST_NAME):
            directory.write_json(MANIFEST_NAME, header)
            return
        try:
            existing = json.loads(directory.read_text(MANIFEST_NAME))
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = None
        if not isinstance(existing, dict):
            raise corrupt_manifest(path, "is not a JSON object")
        if existing.get("schema_version") != header["schema_version"]:
            raise UserError(
                f"{directory} holds a dump with schema version {existing.get('schema_version')}, "
                f"this teacher-dump writes {header['schema_version']} there: use a new --out "
                "directory (it cannot be resumed with this release; reading and training on it "
                "still work)"
            )
        if existing.get("identity") != header["identity"]:
            old = {
                key: value
                for key, value in existing.get("config", {}).items()
                if key not in LOCAL_FIELDS
            }
            new = identity_of(config)
            changed = [
                f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                for key in sorted(new)
                if old.get(key) != new.get(key)
            ]
            # Dumps written before MODE_FIELDS hashed every field: the same dump when that
            # hash, over its recorded config and today's fingerprints, is the one it holds.
            if not changed and existing.get("identity") == identity_hash(old, fingerprints):
                check_same_storage(directory, existing, header)
                return
            if not changed:
                changed = ["the model weights, tokenizer or data files changed"]
            raise UserError(
                f"{directory} already holds a dump made with a different config ({'; '.join(changed)}): "
                "rerun with the original settings to resume it, or use a new --out directory"
            )
        check_same_storage(directory, existing, header)


def check_same_storage(directory: Folder, existing: dict, header: dict) -> None:
    """Refuse to resume a dump whose shards this release would store differently (the same
    config, an older storage format): one dump's shards all decode with its manifest's record."""
    if existing.get("storage") == header.get("storage") or "storage" not in header:
        return
    old = Storage.from_dict(existing.get("storage") or {"representation": "topk"})
    raise UserError(
        f"{directory} holds shards stored as {old.describe()}; this teacher-dump stores "
        f"{Storage.from_dict(header['storage']).describe()}: use a new --out directory (it "
        "cannot be resumed with this release; reading and training on it still work)"
    )


def run_dump(config: DumpConfig, engine=None) -> dict:
    """Run (or resume) this rank's share of the dump; returns the final manifest.

    `engine` may be an already-built engine for the same model (tests reuse one).
    """
    started = time.perf_counter()
    if config.data_parallel_size > 1:
        rank_environments(config)  # refuses more engines than devices before anything starts
    prepared = prepare(config)
    header = manifest_header(config, prepared)
    directory = Folder(config.out)
    open_output(directory, header, config, fingerprints_of(prepared))
    keep_tokenizer(directory, prepared.tokenizer)
    with exclusive_writer(directory, config.rank, config.world_size):
        return dump_remaining(config, prepared, directory, engine, started)


def dump_remaining(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, started: float
) -> dict:
    """This rank's prompts not yet in a shard, through the engine into shards (the caller holds
    the rank's writer lock); returns the final manifest."""
    if directory.is_local:  # object stores have no temporaries
        remove_stale_temporaries(directory.local)
    done = done_source_indices(directory) | judged_without_rows(directory)
    mine = [
        request
        for request in prepared.requests
        if request.source_index % config.world_size == config.rank
    ]
    todo = [request for request in mine if request.source_index not in done]
    refresh_manifest(directory, [])
    written_tokens, dump_seconds = 0, 0.0
    if todo:
        dump_started = time.perf_counter()
        dump = (
            dump_on_ray
            if config.executor == "ray"
            else dump_data_parallel
            if config.data_parallel_size > 1
            else dump_on_engine
        )
        written_tokens = dump(config, prepared, directory, engine, todo, total=len(mine))
        dump_seconds = time.perf_counter() - dump_started
    manifest = refresh_manifest(directory, [])
    print_summary(
        config, manifest, len(todo), written_tokens, dump_seconds, time.perf_counter() - started
    )
    return manifest


def dump_on_engine(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """The local executor: `todo` through the mode's Teacher (on `engine`, or on one started
    here) into shards; returns the target tokens written."""
    mode = MODES[config.mode]
    teacher = mode.start(config, prepared.inputs, prepared.planned.plan, engine)
    try:
        description = teacher.description()
        update_manifest(directory, lambda manifest: mode.record_engine(manifest, description))
        tokens = write_results(
            config, teacher.rows(todo), total=total, todo=len(todo), directory=directory,
            vocabulary=len(prepared.tokenizer), data_rows=prepared.records.rows,
        )  # fmt: skip
    finally:
        teacher.close()
    update_manifest(directory, teacher.record_rows)
    return tokens


def dump_on_ray(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """--executor ray: `todo` through Ray's actors (each runs the mode's Teacher) into this
    process's shards; returns the target tokens written. (`engine` is unused: every actor
    starts its own.)"""
    return dump_on_engines(ray_results, config, prepared, directory, todo, total=total)


def dump_data_parallel(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """--data-parallel-size N: `todo` through N child processes (each runs the mode's Teacher
    on its own engine) into this process's shards; returns the target tokens written.
    (`engine` is unused: every child starts its own.)"""
    return dump_on_engines(data_parallel_results, config, prepared, directory, todo, total=total)


def dump_on_engines(
    results_of, config: DumpConfig, prepared: PreparedDump, directory: Folder, todo, *, total: int
) -> int:
    """`todo` through an executor of several engines (`results_of`: ray_results or
    data_parallel_results) into this process's shards; returns the target tokens written."""
    mode = MODES[config.mode]
    results = results_of(
        config,
        prepared.model.directory,
        prepared.planned.plan,
        todo,
        on_engine=lambda description: update_manifest(
            directory, lambda manifest: mode.record_engine(manifest, description)
        ),
    )
    return write_results(
        config, results, total=total, todo=len(todo), directory=directory,
        vocabulary=len(prepared.tokenizer), data_rows=prepared.records.rows,
    )  # fmt: skip


def checkpoint_dtype(model_config: dict) -> str | None:
    """The dtype a model's config.json says its weights are stored in (None if unstated)."""
    return model_config.get("dtype") or model_config.get("torch_dtype")


def write_results(
    config: DumpConfig,
    results: Iterator[tuple[DumpRequest, list[ShardRow]]],
    *,
    total: int,
    todo: int,
    directory: Folder,
    vocabulary: int,
    data_rows: list[dict] | None = None,
) -> int:
    """Hand each prompt's rows, as they come, to this rank's shard writer (--writer: beside the
    engine's loop, teacher_dump.pipeline); returns target tokens written. `total`: this rank's
    prompts, `todo`: those not yet dumped (for the progress); `vocabulary`: the tokenizer's size
    (the shard codebook's range); `data_rows`: the data's records (what --filter column reads)."""
    completion_filter = filter_of(config)
    spec = WriterSpec(
        out=directory.text,
        rank=config.rank,
        world_size=config.world_size,
        rows_per_shard=config.rows_per_shard,
        storage=MODES[config.mode].storage(config, vocabulary),
        vocabulary=vocabulary,
        filtering=completion_filter is not None,
    )
    progress = tqdm(
        total=total,
        initial=total - todo,
        unit="prompt",
        desc=f"teacher-dump r{config.rank}/{config.world_size}",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    tokens = 0
    started = time.perf_counter()
    writer = start_writer(spec, config.writer, config.encoding_processes)
    try:
        for request, rows in results:
            judged = None
            if completion_filter is not None:
                judged = {"none_kept": [], "best_kept": []}
                rows = filtered_rows(completion_filter, request, rows, data_rows, judged)
            writer.put(rows, judged)
            tokens += sum(len(row.target_ids) for row in rows)
            progress.update(1)
            progress.set_postfix_str(
                f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False
            )
        writer.finish()
    finally:
        writer.close()
        results.close()
        progress.close()
    return tokens


def filtered_rows(
    completion_filter: CompletionFilter,
    request: DumpRequest,
    rows: list[ShardRow],
    data_rows: list[dict] | None,
    outcomes: dict[str, list[int]],
) -> list[ShardRow]:
    """The rows of one prompt that --filter keeps; a prompt with none kept (or kept only by
    --keep-best-of) is added to `outcomes` under its Outcome."""
    record = data_rows[request.source_index] if data_rows is not None else {}
    scores = [completion_filter.score(row.target_text, request.references, record) for row in rows]
    kept, outcome = select_rows(
        rows, scores, completion_filter.threshold, completion_filter.keep_best_of
    )
    if outcome != "kept":
        outcomes[outcome].append(request.source_index)
    return kept


def judged_without_rows(directory: Folder) -> set[int]:
    """Prompts a filtered dump judged and gave no rows (its manifest's none_kept): a resume does
    not generate them again (their seeds would give the same samples)."""
    manifest = json.loads(directory.read_text(MANIFEST_NAME))
    return set(manifest.get("filter", {}).get("none_kept", []))


def print_summary(
    config: DumpConfig,
    manifest: dict,
    prompts: int,
    tokens: int,
    dump_seconds: float,
    total_seconds: float,
) -> None:
    totals = manifest["totals"]
    bytes_per_token = totals["bytes"] / max(totals["target_tokens"], 1)
    expected = manifest["data"]["expected_rows"]
    state = (
        "complete"
        if manifest["complete"]
        else f"{totals['rows']}/{'?' if expected is None else expected} rows so far"
    )
    print(
        f"teacher-dump: rank {config.rank}/{config.world_size} dumped {prompts} prompts, {tokens:,} target "
        f"tokens in {dump_seconds:.1f}s ({tokens / max(dump_seconds, 1e-9):,.0f} tok/s; {total_seconds:.0f}s with "
        f"start-up); {config.out}: {state}, "
        f"{totals['shards']} shards, {totals['target_tokens']:,} tokens, {bytes_per_token:.1f} B/token",
        file=sys.stderr,
    )
