"""teacher-dump --mode score: the teacher is forced on each prompt's reference answer (a
dataset's target); the row holds the teacher's distribution at every target position."""

from __future__ import annotations

from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import scoring, tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs

NAME = "score"
OWN_FIELDS = frozenset()
check_task = tokens.check_prompted_task
manifest_entries = scoring.manifest_entries
rows_per_prompt = scoring.rows_per_prompt
storage = tokens.storage
record_engine = tokens.record_engine


def requests(
    config: DumpConfig, task: Task, records: LoadedRecords, inputs: TeacherInputs
) -> ModeRequests:
    # Scoring generates one throw-away token after the sequence.
    return tokens.prompted_requests(config, task, records, inputs, with_targets=True, new_tokens=1)


def start(config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None):
    return scoring.start(config, inputs, engine, finish_reason="reference")
