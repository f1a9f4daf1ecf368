"""Teacher forcing, shared by the score and text modes: each request's prompt + target in one
prefill; the row is the target with the teacher's distribution at each of its positions. The
modes differ in their requests (and the finish reason their rows carry) only."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ScoredTarget, ShardRow, make_row


def forced_rows(
    teacher: tokens.TokenTeacher, todo: list[DumpRequest], finish_reason: str
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Each request's one row, `finish_reason` naming where its target came from."""
    config, tokenizer = teacher.config, teacher.tokenizer
    stream = teacher.engine.score(
        ((request, request.prompt_ids.tolist() + request.target_ids.tolist()) for request in todo),
        top_k=config.engine_logprobs,
        max_in_flight=config.max_in_flight,
        prompt_lengths=(len(request.prompt_ids) for request in todo),
    )
    for request, scored in tokens.closing(stream):
        start = len(request.prompt_ids) - 1  # row j-1 predicts token j; targets start at token P
        target = ScoredTarget(
            sample_id=str(request.source_index),
            completion_index=0,
            target_ids=request.target_ids,
            position_ids=scored.position_ids[start:],
            position_logprobs=scored.position_logprobs[start:],
            finish_reason=finish_reason,
            target_text=tokenizer.decode(request.target_ids.tolist(), skip_special_tokens=True),
        )
        # The entries are encoded by the shard writer, off the engine's loop.
        yield request, [make_row(request, target, len(tokenizer))]


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    return tokens.manifest_entries(config, inputs, sampling=None)


def rows_per_prompt(config: DumpConfig) -> int:
    return 1


def start(
    config: DumpConfig, inputs: TeacherInputs, engine, *, finish_reason: str
) -> tokens.TokenTeacher:
    """A TokenTeacher whose rows carry `finish_reason`."""
    return tokens.start(config, inputs, engine, partial(forced_rows, finish_reason=finish_reason))
