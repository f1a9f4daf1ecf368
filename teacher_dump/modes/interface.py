"""The interface between teacher-dump's run (resume, identity, manifest, writing) and a mode.

A mode is a module of teacher_dump/modes/ that says what the teacher is asked (its requests),
how it is asked (its engine) and how the answers become shard rows. teacher_dump.run drives
any mode through this interface only, and so does the Ray executor's actor
(teacher_dump.ray_dump): neither names a mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from kd_shards.schemas.shard import Storage
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import ResolvedModel, context_length, resolve_model
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task
from kd_shards.shared.tokenizer import has_chat_template, load_tokenizer, stop_token_ids
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ShardRow


@dataclass(frozen=True)
class TeacherInputs:
    """What every mode starts from: the teacher as resolved and checked before any engine."""

    model: ResolvedModel
    tokenizer: object
    context: int
    """The engine's context length."""
    use_template: bool
    """Whether prompts are wrapped in the teacher's chat template."""
    stop_ids: list[int]
    """The teacher's end-of-turn token ids."""


def resolve_teacher(config: DumpConfig) -> TeacherInputs:
    """Resolve the teacher's model and tokenizer and check its context (no engine)."""
    model = resolve_model(config.model, config.revision, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(model.directory, trust_remote_code=config.trust_remote_code)
    model_context = context_length(model.config)
    context = config.max_model_len or model_context
    if context is None:
        raise UserError(
            f"--model {config.model} does not state its context length: pass --max-model-len"
        )
    if model_context is not None and context > model_context:
        raise UserError(
            f"--max-model-len {context} exceeds the model's context of {model_context} tokens: lower it"
        )
    return TeacherInputs(
        model=model,
        tokenizer=tokenizer,
        context=context,
        use_template=config.chat_template and has_chat_template(tokenizer),
        stop_ids=stop_token_ids(tokenizer, model.directory),
    )


@dataclass(frozen=True)
class ModeRequests:
    """A mode's answer to "what will the teacher be asked" (before any engine starts)."""

    requests: list[DumpRequest]
    """Every prompt of the dump (all ranks), in source order."""
    skipped: int = 0
    """Prompts left out because they do not fit the context (--skip-too-long)."""
    plan: object = None
    """What else the mode's rows need (its own type; teacher_dump.run never looks inside)."""


class Teacher(Protocol):
    """A mode's engine, started (or reused) for one run."""

    def description(self) -> dict:
        """What actually ran (JSON), for the mode's record_engine."""

    def rows(self, todo: list[DumpRequest]) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
        """Each request of `todo` with its rows, as the engine finishes it."""

    def record_rows(self, manifest: dict) -> None:
        """Add what the rows produced so far taught about the dump to `manifest` (in place)."""

    def close(self) -> None:
        """Stop the engine if this Teacher started it."""


class TeacherMode(Protocol):
    """What a mode module of teacher_dump/modes/ holds (each module is one of these)."""

    NAME: str
    """--mode's value."""
    OWN_FIELDS: frozenset[str]
    """Config fields that shape this mode's rows only: the other modes leave them out of their
    identity, so that another value of, say, --temperature does not refuse the resume of a
    score dump, whose rows it cannot change."""

    def check_task(self, config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
        """Refuse a task (or a teacher) the mode cannot dump, before its data is read."""

    def requests(
        self, config: DumpConfig, task: Task, records: LoadedRecords, inputs: TeacherInputs
    ) -> ModeRequests:
        """Every request of the dump, checked (e.g. against the context)."""

    def manifest_entries(
        self, config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests
    ) -> dict:
        """The manifest's mode-dependent entries: schema_version, top_k, logprobs, sampling,
        and the mode's own section (storage or classify)."""

    def rows_per_prompt(self, config: DumpConfig) -> int:
        """Rows each request gives."""

    def storage(self, config: DumpConfig, vocabulary: int) -> Storage | None:
        """How the writer codes the rows' distributions (None: rows hold them exactly)."""

    def start(
        self, config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None
    ) -> Teacher:
        """Start the mode's engine (or check and wrap `engine`, one already built)."""

    def record_engine(self, manifest: dict, description: dict) -> None:
        """Note in `manifest` (in place) what ran, from a Teacher's description()."""
