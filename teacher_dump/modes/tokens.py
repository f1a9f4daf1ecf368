"""What the token modes (generate, score, text) share: the checks of --top-k against the
teacher, the manifest entries of a token dump, the vLLM engine and its record, and the
Teacher that streams requests through it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kd_shards.schemas.shard import LOGPROB_STEP, SCHEMA_VERSION, Storage
from kd_shards.shared.encoder_decoder import is_encoder_decoder, is_encoder_only
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import ResolvedModel
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task, examples_from_records
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import DumpRequest, check_lengths, prompt_requests
from kd_shards.teacher_dump.rows import ShardRow


def check_vocabulary(config: DumpConfig, inputs: TeacherInputs) -> None:
    """Exact top-k storage cannot hold more ids than the teacher has tokens."""
    if config.store != "sampled" and config.top_k > len(inputs.tokenizer):
        raise UserError(
            f"--top-k {config.top_k} is above the vocabulary size {len(inputs.tokenizer)}: lower it"
        )


def check_token_teacher(config: DumpConfig, inputs: TeacherInputs, *, raw_text: bool) -> None:
    """A token mode needs a model that continues text: a decoder, or (with prompts, not
    `raw_text`) an encoder-decoder, whose encoder reads the prompt."""
    model_config = inputs.model.config
    names = ", ".join(model_config.get("architectures") or ["unknown"])
    if is_encoder_only(model_config):
        raise UserError(
            f"--model {config.model} is a {names}, an encoder with no decoder to generate or "
            f"score with: --mode {config.mode} needs a causal LM or an encoder-decoder model "
            "(T5, BART); use --mode classify for a sequence classifier"
        )
    if raw_text and is_encoder_decoder(model_config):
        raise UserError(
            f"--model {config.model} is an encoder-decoder model ({names}), which gives no "
            "distribution over raw text without a prompt: use --mode generate or score"
        )


def check_prompted_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    """The prompted modes (generate, score) need prompts, not raw text or labelled texts."""
    check_vocabulary(config, inputs)
    check_token_teacher(config, inputs, raw_text=False)
    if task.name == "text":
        raise UserError("--data text holds raw text without prompts: use --mode text with it")
    if task.is_classification:
        raise UserError(f"--data {config.data} is a classification task: use --mode classify")
    if task.kind == "choice":
        raise UserError(
            f"--data {config.data} is a multiple-choice task, which kd-eval scores by option "
            "likelihood: to dump a teacher on its questions, pass them as a file with "
            "--prompt-column (and --target-column), or use --data aqua-rat-letter"
        )


def prompted_requests(
    config: DumpConfig,
    task: Task,
    records: LoadedRecords,
    inputs: TeacherInputs,
    *,
    with_targets: bool,
    new_tokens: int,
) -> ModeRequests:
    """The prompted modes' requests: each example's prompt (`with_targets`: and its reference
    as the target), checked to fit the context with the `new_tokens` the engine adds."""
    rendered = prompt_requests(
        examples_from_records(task, records, config.limit),
        inputs.tokenizer,
        use_chat_template=inputs.use_template,
        stop_ids=inputs.stop_ids,
        with_targets=with_targets,
    )
    kept, skipped = check_lengths(
        rendered, context=inputs.context, new_tokens=new_tokens, skip_too_long=config.skip_too_long
    )
    return ModeRequests(kept, skipped)


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, sampling: dict | None) -> dict:
    """A token dump's manifest entries (teacher_dump.modes.interface.TeacherMode)."""
    return {
        "schema_version": SCHEMA_VERSION,
        # The most entries a position holds: the draws (sampled), else the top-k.
        "top_k": config.draws if config.store == "sampled" else config.top_k,
        "logprobs": {
            "mode": "raw_logprobs",
            "meaning": "natural-log probabilities of the raw logits (temperature 1, no top-p/top-k)",
            "engine_logprobs": config.engine_logprobs,
            "drawn": config.store == "sampled",
            "target_rounding_step": LOGPROB_STEP,
            "padding_ids": "ids >= tokenizer.size are never stored; their mass is part of the tail",
        },
        "sampling": sampling,
        "storage": storage(config, len(inputs.tokenizer)).to_dict(),
    }


def storage(config: DumpConfig, vocabulary: int) -> Storage:
    return config.storage(vocabulary)


def build_engine(config: DumpConfig, model: ResolvedModel, *, sampled_logprobs: bool):
    """The token engine of a dump (`sampled_logprobs`: --store sampled's draws): vLLM, or
    transformers for an encoder-decoder teacher (shared.seq2seq_engine)."""
    from kd_shards.shared.engine import EngineSettings
    from kd_shards.shared.seq2seq_engine import start_token_engine

    return start_token_engine(
        EngineSettings(
            model=str(model.directory),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_logprobs=config.engine_logprobs,
            sampled_logprobs=sampled_logprobs,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            trust_remote_code=config.trust_remote_code,
        ),
        model.config,
    )


def check_engine_fits(config: DumpConfig, engine) -> None:
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


def engine_description(engine) -> dict:
    """What actually ran, as the manifest records it (known only once the engine is built)."""
    return {
        "name": getattr(engine, "backend", "vllm"),
        # Set for an encoder-decoder teacher only: a decoder's dump records none.
        "architecture": getattr(engine, "architecture", None),
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
            else "drawn by kd-shards' transformers backend (shared.seq2seq_engine)"
            if getattr(engine, "backend", "vllm") == "transformers"
            else "kd-shards vLLM plugin patched in this process (entry point not installed; "
            "vLLM ran in-process)"
            if getattr(engine, "draws_in_process", False)
            else "kd-shards vLLM plugin loaded by vLLM through its entry point"
        ),
    }


def record_engine(manifest: dict, engine: dict) -> None:
    """Note what actually ran: vLLM's version and platform, its arguments, and the dtype the
    weights were run in. A float32 checkpoint run in lower precision gets a warning: its
    logprobs differ from the model's."""
    if manifest["teacher"]["checkpoint_dtype"] == "float32" and engine["dtype"] != "float32":
        print(
            f"warning: the teacher's weights are float32 but the engine runs them in {engine['dtype']} "
            f"(--dtype {engine['requested_dtype']}): stored logprobs can differ from a float32 "
            "forward by ~0.1 nats and near-tied ids can swap; pass --dtype float32 for exact values",
            file=sys.stderr,
        )
    manifest["teacher"]["dtype"] = engine["dtype"]
    if engine.get("architecture"):
        manifest["teacher"]["architecture"] = engine["architecture"]
    manifest["engine"] = {
        "name": engine.get("name", "vllm"),
        "version": engine["version"],
        "platform": engine["platform"],
        "arguments": engine["arguments"],
    }
    if engine.get("draws"):
        manifest["engine"]["draws"] = engine["draws"]


RowStream = Callable[
    ["TokenTeacher", list[DumpRequest]], Iterator[tuple[DumpRequest, list[ShardRow]]]
]
"""A token mode's engine call and row conversion: its requests through `teacher.engine`."""


@dataclass
class TokenTeacher:
    """A token mode's Teacher (teacher_dump.modes.interface): one vLLM engine and the mode's
    RowStream over it."""

    config: DumpConfig
    engine: object
    tokenizer: object
    owns_engine: bool
    stream: RowStream

    def description(self) -> dict:
        return engine_description(self.engine)

    def rows(self, todo: list[DumpRequest]) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
        return self.stream(self, todo)

    def record_rows(self, manifest: dict) -> None:
        """Token rows teach the manifest nothing beyond their shards."""

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()


def start(config: DumpConfig, inputs: TeacherInputs, engine, stream: RowStream) -> TokenTeacher:
    """A TokenTeacher on `engine` (checked to fit --store) or on one started here."""
    if engine is not None:
        check_engine_fits(config, engine)
        return TokenTeacher(config, engine, inputs.tokenizer, False, stream)
    built = build_engine(config, inputs.model, sampled_logprobs=config.store == "sampled")
    return TokenTeacher(config, built, inputs.tokenizer, True, stream)


def closing(stream):
    """Yield from an engine stream; on an error part-way (or an early close), close it so that
    the engine drops the requests still in flight."""
    try:
        yield from stream
    finally:
        stream.close()
