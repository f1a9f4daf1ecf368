"""teacher-dump --mode score: the teacher is forced on each prompt's reference answer (a
dataset's target); the row holds the teacher's distribution at every target position."""

from __future__ import annotations

from functools import partial

from shared.tasks import Task, examples_from_records
from teacher_dump.config import DumpConfig
from teacher_dump.modes import tokens
from teacher_dump.modes.interface import ModeRequests, TeacherInputs
from teacher_dump.modes.scoring import forced_rows
from teacher_dump.requests import check_lengths, prompt_requests

NAME = "score"
OWN_FIELDS = frozenset()
record_engine = tokens.record_engine
storage = tokens.storage


def check_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    tokens.check_vocabulary(config, inputs)
    tokens.refuse_raw_text_and_classes(config, task)


def requests(config: DumpConfig, task: Task, records, inputs: TeacherInputs) -> ModeRequests:
    rendered = prompt_requests(
        examples_from_records(task, records, config.limit),
        inputs.tokenizer,
        use_chat_template=inputs.use_template,
        stop_ids=inputs.stop_ids,
        with_targets=True,
    )
    # Scoring generates one throw-away token after the sequence.
    kept, skipped = check_lengths(
        rendered, context=inputs.context, new_tokens=1, skip_too_long=config.skip_too_long
    )
    return ModeRequests(kept, skipped)


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    return tokens.manifest_entries(config, inputs, sampling=None)


def rows_per_prompt(config: DumpConfig) -> int:
    return 1


def start(config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None):
    return tokens.start(config, inputs, engine, partial(forced_rows, finish_reason="reference"))
