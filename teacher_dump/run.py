"""One teacher-dump run: resolve inputs, check them, resume, drive the engine, write shards.

The order matters for the user: everything that can fail on bad input (model dir, tokenizer,
data, prompt lengths, a different config already in --out) fails before the 20-60 s engine
start. Then this rank's remaining prompts stream through the engine and their rows into shards.
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
from typing import TYPE_CHECKING

from tqdm import tqdm

from schemas.manifest import CORRUPT_MANIFEST_FIX, MANIFEST_NAME
from schemas.shard import CLASSIFY_SCHEMA_VERSION, LOGPROB_STEP, SCHEMA_VERSION, Storage
from shared.config import config_to_dict
from shared.errors import UserError
from shared.files import remove_stale_temporaries
from shared.models import ResolvedModel, context_length, resolve_model
from shared.records import LoadedRecords
from shared.storage import Folder
from shared.tasks import examples_from_records, load_records, resolve_task
from shared.tokenizer import (
    has_chat_template,
    load_tokenizer,
    stop_token_ids,
    tokenizer_fingerprint,
)
from teacher_dump.classify import (
    ClassificationPlan,
    build_classifier_engine,
    classification_requests,
    dump_classification,
    engine_record,
    manifest_section,
)
from teacher_dump.config import LOCAL_FIELDS, DumpConfig
from teacher_dump.requests import (
    DumpRequest,
    check_lengths,
    prompt_requests,
    sample_seed,
    text_requests,
)
from teacher_dump.rows import ShardRow, first_invalid_position, make_row
from teacher_dump.shards import (
    ShardWriter,
    done_source_indices,
    exclusive_writer,
    refresh_manifest,
)

if TYPE_CHECKING:  # shared.engine imports vllm where it starts an engine
    from shared.engine import TeacherEngine


MODE_FIELDS = {
    "max_new_tokens": "generate",
    "temperature": "generate",
    "top_p": "generate",
    "num_samples": "generate",
    "chunk_tokens": "text",
}
"""Fields that shape the rows of one mode only. The other modes leave them out of their
identity, so that another value (or a changed default) of, say, --temperature does not refuse
the resume of a score or text dump, whose rows it cannot change."""


def identity_of(config: DumpConfig) -> dict:
    """The config fields that define what the dump contains (see LOCAL_FIELDS, MODE_FIELDS)."""
    return {
        key: value
        for key, value in config_to_dict(config).items()
        if key not in LOCAL_FIELDS and MODE_FIELDS.get(key, config.mode) == config.mode
    }


@dataclass(frozen=True)
class PreparedDump:
    """Everything resolved and checked before the engine starts."""

    model: ResolvedModel
    tokenizer: object
    records: LoadedRecords
    requests: list[DumpRequest]
    """Every prompt of the dump (all ranks), in source order."""
    skipped: int
    """Prompts left out because they do not fit the context (--skip-too-long)."""
    use_template: bool
    """Whether prompts were wrapped in the teacher's chat template."""
    context: int
    """The engine's context length."""
    classification: ClassificationPlan | None = None
    """Classify mode: the labels and the kind of teacher; None in the token modes."""


def prepare(config: DumpConfig) -> PreparedDump:
    """Resolve model, tokenizer and data; build and validate this dump's requests (no engine)."""
    model = resolve_model(config.model, config.revision, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(model.directory, trust_remote_code=config.trust_remote_code)
    model_context = context_length(model.config)
    context = config.max_model_len or model_context
    if context is None:
        raise UserError(
            f"--model {config.model} does not state its context length: pass --max-model-len"
        )
    if config.mode != "classify" and config.store != "sampled" and config.top_k > len(tokenizer):
        raise UserError(
            f"--top-k {config.top_k} is above the vocabulary size {len(tokenizer)}: lower it"
        )
    if model_context is not None and context > model_context:
        raise UserError(
            f"--max-model-len {context} exceeds the model's context of {model_context} tokens: lower it"
        )
    task = resolve_task(config.data, config.prompt_column, config.target_column)
    if config.mode == "text" and task.name not in ("text", "columns"):
        raise UserError(
            f"--mode text needs raw text: use --data text (or a file with --prompt-column), not {config.data}"
        )
    if config.mode != "text" and task.name == "text":
        raise UserError("--data text holds raw text without prompts: use --mode text with it")
    if config.mode == "classify" and not (task.is_classification or task.name == "columns"):
        raise UserError(
            f"--mode classify needs labelled texts: use --data sst2 or agnews, or a file with "
            f"--prompt-column (the text) and --target-column (the label), not {config.data}"
        )
    if task.is_classification and config.mode != "classify":
        raise UserError(f"--data {config.data} is a classification task: use --mode classify")
    data_path = Path(config.data_path) if config.data_path else None
    records = load_records(task, config.data, data_path, config.split)
    use_template = config.chat_template and has_chat_template(tokenizer)
    stop_ids = stop_token_ids(tokenizer, model.directory)
    if config.mode == "classify":
        examples = examples_from_records(task, records, config.limit)
        requests, plan = classification_requests(
            config,
            model,
            tokenizer,
            examples,
            task.labels,
            context=context,
            use_template=use_template,
        )
        return PreparedDump(model, tokenizer, records, requests, 0, use_template, context, plan)
    if config.mode == "text":
        examples = examples_from_records(task, records, None)
        requests = text_requests(
            [example.prompt or example.references[0] for example in examples],
            tokenizer,
            chunk_tokens=config.chunk_tokens,
            limit=config.limit,
        )
    else:
        examples = examples_from_records(task, records, config.limit)
        requests = prompt_requests(
            examples, tokenizer, mode=config.mode, use_chat_template=use_template, stop_ids=stop_ids
        )
    requests, skipped = check_lengths(
        requests,
        context=context,
        max_new_tokens=config.max_new_tokens,
        mode=config.mode,
        skip_too_long=config.skip_too_long,
    )
    return PreparedDump(model, tokenizer, records, requests, skipped, use_template, context)


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
        "context": prepared.context,
    }


def logprobs_section(config: DumpConfig, classify: bool) -> dict:
    """What the stored values mean."""
    if classify:
        return {
            "mode": "raw_logprobs",
            "meaning": "natural-log probabilities over all labels (temperature 1)",
            "rounding_step": LOGPROB_STEP,
        }
    return {
        "mode": "raw_logprobs",
        "meaning": "natural-log probabilities of the raw logits (temperature 1, no top-p/top-k)",
        "engine_logprobs": config.engine_logprobs,
        "drawn": config.store == "sampled",
        "target_rounding_step": LOGPROB_STEP,
        "padding_ids": "ids >= tokenizer.size are never stored; their mass is part of the tail",
    }


def sampling_section(config: DumpConfig) -> dict | None:
    """How generate mode sampled the completions (None in the other modes)."""
    if config.mode != "generate":
        return None
    return {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "num_samples": config.num_samples,
        "seed": config.seed,
        "per_prompt_seed": "blake2b('<seed>:<source_index>') & 0x7fffffff",
    }


def manifest_header(config: DumpConfig, prepared: PreparedDump) -> dict:
    """Everything the manifest records about the dump, except its shards."""
    tokenizer, records, plan = prepared.tokenizer, prepared.records, prepared.classification
    samples_per_prompt = config.num_samples if config.mode == "generate" else 1
    now = datetime.now(UTC).isoformat(timespec="seconds")
    # The most entries a position holds: every label (classify), the draws (sampled).
    most_entries = (
        len(plan.labels)
        if plan is not None
        else config.draws
        if config.store == "sampled"
        else config.top_k
    )
    header = {
        # Classify dumps keep schema v1's exact all-label layout (schemas.shard).
        "schema_version": SCHEMA_VERSION if plan is None else CLASSIFY_SCHEMA_VERSION,
        "kind": "kd-shards teacher dump",
        "identity": dump_identity(config, prepared),
        "created": now,
        "updated": now,
        "mode": config.mode,
        "teacher": teacher_section(config, prepared),
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "size": len(tokenizer),
            "stop_token_ids": stop_token_ids(tokenizer, prepared.model.directory),
            "chat_template_used": prepared.use_template,
        },
        "top_k": most_entries,
        "logprobs": logprobs_section(config, classify=plan is not None),
        "sampling": sampling_section(config),
        "engine": {"name": "vllm", "version": None, "platform": None},
        "data": {
            "task": config.data,
            "source": records.source,
            "fingerprint": records.fingerprint,
            "split": config.split,
            "prompts": len(prepared.requests),
            "skipped_too_long": prepared.skipped,
            "expected_rows": len(prepared.requests) * samples_per_prompt,
        },
        "config": config_to_dict(config),
        "shards": [],
        "totals": {"shards": 0, "rows": 0, "target_tokens": 0, "bytes": 0},
        "complete": False,
    }
    if plan is not None:
        header["classify"] = manifest_section(config, plan)
    else:
        header["storage"] = config.storage(len(tokenizer)).to_dict()
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
            raise UserError(f"{path} is not a JSON object: {CORRUPT_MANIFEST_FIX}")
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


def rows_for_completions(
    request: DumpRequest, completions, tokenizer, storage: Storage
) -> list[ShardRow]:
    """Rows of one prompt's sampled completions (generate mode)."""
    rows = []
    size = len(tokenizer)
    for index, completion in enumerate(completions):
        token_ids, position_ids, position_logprobs = (
            completion.token_ids,
            completion.position_ids,
            completion.position_logprobs,
        )
        finish_reason = completion.finish_reason
        cut = first_invalid_position(token_ids, size)
        if cut is not None:
            # A sampled padding-row id is not a token: keep the valid prefix only.
            token_ids, position_ids, position_logprobs = (
                token_ids[:cut],
                position_ids[:cut],
                position_logprobs[:cut],
            )
            finish_reason = "invalid_token"
        sample_id = f"{request.source_index}-{index}"
        rows.append(
            make_row(
                sample_id=sample_id,
                source_index=request.source_index,
                completion_index=index,
                prompt_ids=request.prompt_ids,
                target_ids=token_ids,
                position_ids=position_ids,
                position_logprobs=position_logprobs,
                tokenizer_size=size,
                storage=storage,
                finish_reason=finish_reason,
                prompt_text=request.prompt_text,
                target_text=tokenizer.decode(token_ids.tolist(), skip_special_tokens=True),
                references=request.references,
            )
        )
    return rows


def row_for_scored(
    request: DumpRequest, scored, tokenizer, finish_reason: str, storage: Storage
) -> ShardRow:
    """The row of one teacher-forced sequence (score and text modes)."""
    start = len(request.prompt_ids) - 1  # row j-1 predicts token j; targets start at token P
    return make_row(
        sample_id=str(request.source_index),
        source_index=request.source_index,
        completion_index=0,
        prompt_ids=request.prompt_ids,
        target_ids=request.target_ids,
        position_ids=scored.position_ids[start:],
        position_logprobs=scored.position_logprobs[start:],
        tokenizer_size=len(tokenizer),
        storage=storage,
        finish_reason=finish_reason,
        prompt_text=request.prompt_text,
        target_text=tokenizer.decode(request.target_ids.tolist(), skip_special_tokens=True),
        references=request.references,
    )


def run_dump(config: DumpConfig, engine=None) -> dict:
    """Run (or resume) this rank's share of the dump; returns the final manifest.

    `engine` may be an already-built TeacherEngine for the same model (tests reuse one).
    """
    started = time.perf_counter()
    prepared = prepare(config)
    header = manifest_header(config, prepared)
    directory = Folder(config.out)
    open_output(directory, header, config, fingerprints_of(prepared))
    with exclusive_writer(directory, config.rank, config.world_size):
        return dump_remaining(config, prepared, directory, engine, started)


def dump_remaining(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, started: float
) -> dict:
    """This rank's prompts not yet in a shard, through the engine into shards (the caller holds
    the rank's writer lock); returns the final manifest."""
    if directory.is_local:  # object stores have no temporaries
        remove_stale_temporaries(directory.local)
    done = done_source_indices(directory)
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
        if prepared.classification is not None:
            dump = dump_classification_prompts
        elif config.executor == "ray":
            dump = dump_on_ray
        else:
            dump = dump_on_engine
        written_tokens = dump(config, prepared, directory, engine, todo, total=len(mine))
        dump_seconds = time.perf_counter() - dump_started
    manifest = refresh_manifest(directory, [])
    print_summary(
        config, manifest, len(todo), written_tokens, dump_seconds, time.perf_counter() - started
    )
    return manifest


def dump_classification_prompts(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """Classify mode: label distributions of `todo` into shards; returns the rows written."""
    plan = prepared.classification
    own_engine = engine is None
    if engine is None:
        engine = (
            build_classifier_engine(config, prepared.model, prepared.context)
            if plan.teacher_kind == "classifier"
            else build_engine(config, prepared.model)
        )
    entry, classify_updates = engine_record(engine, plan)
    update_manifest(directory, {"engine": entry}, classify_updates, engine.dtype)
    writer = ShardWriter(directory, config.rank, config.world_size, config.rows_per_shard)
    try:
        statistics = dump_classification(config, engine, plan, todo, total=total, writer=writer)
    finally:
        if own_engine:
            engine.close()
    record_classification_statistics(directory, statistics, plan)
    return statistics["rows"]


def dump_on_ray(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """--executor ray: `todo` through Ray's vLLM actors into this process's shards; returns the
    target tokens written. (`engine` is unused: every actor starts its own.)"""
    from teacher_dump.ray_dump import ray_results

    stored_dtype = checkpoint_dtype(prepared.model.config)
    results = ray_results(
        config,
        prepared.model.directory,
        todo,
        on_engine=lambda description: record_engine(directory, description, stored_dtype),
    )
    return write_results(
        config, results, total=total, todo=len(todo), directory=directory,
        vocabulary=len(prepared.tokenizer),
    )  # fmt: skip


def check_engine_fits(config: DumpConfig, engine: TeacherEngine) -> None:
    """A reused engine must give what --store asks of it."""
    if engine.settings.max_logprobs < config.engine_logprobs:
        raise UserError(
            f"--store {config.store} asks the engine for {config.engine_logprobs} logprobs "
            f"per position, above its max_logprobs of {engine.settings.max_logprobs}: build "
            "the engine with max_logprobs >= that"
        )
    wanted = config.store == "sampled"
    if engine.settings.sampled_logprobs != wanted:
        raise UserError(
            f"--store {config.store} needs an engine with sampled_logprobs={wanted}, this "
            f"one has {engine.settings.sampled_logprobs}: build one for this --store"
        )


def dump_on_engine(
    config: DumpConfig, prepared: PreparedDump, directory: Folder, engine, todo, *, total: int
) -> int:
    """The local executor: `todo` through one engine (`engine`, or one started here) into
    shards; returns the target tokens written."""
    own_engine = engine is None
    engine = engine or build_engine(config, prepared.model)
    try:
        check_engine_fits(config, engine)
        record_engine(
            directory, engine_description(engine), checkpoint_dtype(prepared.model.config)
        )
        results = engine_results(config, engine, prepared.tokenizer, todo)
        return write_results(
            config, results, total=total, todo=len(todo), directory=directory,
            vocabulary=len(prepared.tokenizer),
        )  # fmt: skip
    finally:
        if own_engine:
            engine.close()


def build_engine(config: DumpConfig, model: ResolvedModel):
    from shared.engine import EngineSettings, TeacherEngine

    return TeacherEngine(
        EngineSettings(
            model=str(model.directory),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_logprobs=config.engine_logprobs,
            # A verbalizer (classify) needs the exact logprobs of its label words, never draws.
            sampled_logprobs=config.store == "sampled" and config.mode != "classify",
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            trust_remote_code=config.trust_remote_code,
        )
    )


def checkpoint_dtype(model_config: dict) -> str | None:
    """The dtype a model's config.json says its weights are stored in (None if unstated)."""
    return model_config.get("dtype") or model_config.get("torch_dtype")


def engine_description(engine) -> dict:
    """What actually ran, as the manifest records it (known only once the engine is built)."""
    return {
        "dtype": engine.dtype,
        "requested_dtype": engine.settings.dtype,
        "version": engine.vllm_version,
        "platform": engine.platform,
        "arguments": {
            key: value for key, value in engine.engine_arguments.items() if key != "model"
        },
        # --store sampled: how kd-shards' vLLM plugin reached the model runner.
        "draws": (
            None
            if not engine.settings.sampled_logprobs
            else "kd-shards vLLM plugin patched in this process (entry point not installed; "
            "vLLM ran in-process)"
            if getattr(engine, "draws_in_process", False)
            else "kd-shards vLLM plugin loaded by vLLM through its entry point"
        ),
    }


def record_engine(directory: Folder, engine: dict, stored_dtype: str | None) -> None:
    """Note what actually ran in the manifest (known only once the engine is built): vLLM's
    version and platform, its arguments, and the dtype the weights were run in. A float32
    checkpoint run in lower precision gets a warning: its logprobs differ from the model's."""
    if stored_dtype == "float32" and engine["dtype"] != "float32":
        print(
            f"warning: the teacher's weights are float32 but vLLM runs them in {engine['dtype']} "
            f"(--dtype {engine['requested_dtype']}): stored logprobs can differ from a float32 "
            "forward by ~0.1 nats and near-tied ids can swap; pass --dtype float32 for exact values",
            file=sys.stderr,
        )
    with directory.lock():
        manifest = json.loads(directory.read_text(MANIFEST_NAME))
        manifest["teacher"]["dtype"] = engine["dtype"]
        manifest["engine"] = {
            "name": "vllm",
            "version": engine["version"],
            "platform": engine["platform"],
            "arguments": engine["arguments"],
        }
        if engine.get("draws"):
            manifest["engine"]["draws"] = engine["draws"]
        directory.write_json(MANIFEST_NAME, manifest)


def update_manifest(directory: Folder, top_level: dict, classify: dict, dtype: str) -> None:
    """Set top-level manifest entries, entries of its "classify" section and the dtype the
    teacher ran in (under the lock)."""
    with directory.lock():
        manifest = json.loads(directory.read_text(MANIFEST_NAME))
        manifest.update(top_level)
        manifest["teacher"]["dtype"] = dtype
        if classify:
            manifest["classify"].update(classify)
        directory.write_json(MANIFEST_NAME, manifest)


def record_classification_statistics(directory: Folder, statistics: dict, plan) -> None:
    """The hidden-state width and the verbalizer's label-word mass, once known (a resumed
    dump adds its rows to the running sums of the earlier runs)."""
    with directory.lock():
        manifest = json.loads(directory.read_text(MANIFEST_NAME))
        section = manifest["classify"]
        if section.get("hidden") is not None and statistics["hidden_width"] is not None:
            section["hidden"]["width"] = statistics["hidden_width"]
        if plan.teacher_kind == "verbalizer":
            verbalizer = section["verbalizer"]
            verbalizer["label_word_mass_sum"] = (
                verbalizer.get("label_word_mass_sum", 0.0) + statistics["label_word_mass"]
            )
            verbalizer["label_word_mass_rows"] = (
                verbalizer.get("label_word_mass_rows", 0) + statistics["rows"]
            )
            verbalizer["mean_label_word_mass"] = verbalizer["label_word_mass_sum"] / max(
                verbalizer["label_word_mass_rows"], 1
            )
        directory.write_json(MANIFEST_NAME, manifest)


def engine_results(
    config: DumpConfig, engine, tokenizer, todo: list[DumpRequest]
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Stream requests through the engine; yield each prompt's rows (stored as the dump's
    representation, stage 1 of teacher_dump.encoding) as it finishes."""
    storage = config.storage(len(tokenizer))
    if config.mode == "generate":
        stream = engine.generate(
            (
                (
                    request,
                    request.prompt_ids.tolist(),
                    sample_seed(config.seed, request.source_index),
                )
                for request in todo
            ),
            num_samples=config.num_samples,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            top_k=config.engine_logprobs,
            max_in_flight=config.max_in_flight,
        )
        try:
            for request, completions in stream:
                yield request, rows_for_completions(request, completions, tokenizer, storage)
        finally:
            stream.close()  # on an error part-way, the engine drops the requests still in flight
        return
    finish_reason = "reference" if config.mode == "score" else "text"
    stream = engine.score(
        ((request, request.prompt_ids.tolist() + request.target_ids.tolist()) for request in todo),
        top_k=config.engine_logprobs,
        max_in_flight=config.max_in_flight,
    )
    try:
        for request, scored in stream:
            yield request, [row_for_scored(request, scored, tokenizer, finish_reason, storage)]
    finally:
        stream.close()


def write_results(
    config: DumpConfig,
    results: Iterator[tuple[DumpRequest, list[ShardRow]]],
    *,
    total: int,
    todo: int,
    directory: Folder,
    vocabulary: int,
) -> int:
    """Write each prompt's rows into this rank's shards as they come; returns target tokens
    written. `total`: this rank's prompts, `todo`: those not yet dumped (for the progress);
    `vocabulary`: the tokenizer's size (the shard codebook's range)."""
    writer = ShardWriter(
        directory,
        config.rank,
        config.world_size,
        config.rows_per_shard,
        config.storage(vocabulary),
        vocabulary,
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
    try:
        for _, rows in results:
            writer.add_prompt_rows(rows)
            tokens += sum(len(row.target_ids) for row in rows)
            progress.update(1)
            progress.set_postfix_str(
                f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False
            )
        writer.flush()
    finally:
        results.close()
        progress.close()
    return tokens


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
    state = (
        "complete"
        if manifest["complete"]
        else f"{totals['rows']}/{manifest['data']['expected_rows']} rows so far"
    )
    print(
        f"teacher-dump: rank {config.rank}/{config.world_size} dumped {prompts} prompts, {tokens:,} target "
        f"tokens in {dump_seconds:.1f}s ({tokens / max(dump_seconds, 1e-9):,.0f} tok/s; {total_seconds:.0f}s with "
        f"start-up); {config.out}: {state}, "
        f"{totals['shards']} shards, {totals['target_tokens']:,} tokens, {bytes_per_token:.1f} B/token",
        file=sys.stderr,
    )
