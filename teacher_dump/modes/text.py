"""teacher-dump --mode text: raw text cut into --chunk-tokens chunks, every position scored
(task-agnostic LM distillation); each chunk's first token is its prompt, the rest its target."""

from __future__ import annotations

from kd_shards.shared.errors import UserError
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task, examples_from_records
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import scoring, tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import check_lengths, text_requests

NAME = "text"
OWN_FIELDS = frozenset({"chunk_tokens"})
manifest_entries = scoring.manifest_entries
rows_per_prompt = scoring.rows_per_prompt
storage = tokens.storage
record_engine = tokens.record_engine


def check_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    tokens.check_vocabulary(config, inputs)
    tokens.check_token_teacher(config, inputs, raw_text=True)
    if task.name not in ("text", "columns"):
        raise UserError(
            f"--mode text needs raw text: use --data text (or a file with --prompt-column), not {config.data}"
        )


def requests(
    config: DumpConfig, task: Task, records: LoadedRecords, inputs: TeacherInputs
) -> ModeRequests:
    examples = examples_from_records(task, records, None)
    chunks = text_requests(
        [example.prompt or example.references[0] for example in examples],
        inputs.tokenizer,
        chunk_tokens=config.chunk_tokens,
        limit=config.limit,
    )
    # Scoring generates one throw-away token after the sequence.
    kept, skipped = check_lengths(
        chunks, context=inputs.context, new_tokens=1, skip_too_long=config.skip_too_long
    )
    return ModeRequests(kept, skipped)


def start(config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None):
    return scoring.start(config, inputs, engine, finish_reason="text")
