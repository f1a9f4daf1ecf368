"""teacher-dump --mode generate: the teacher samples completions of each prompt (sequence-level
KD data); each completion is a row with its tokens' logprobs and the teacher's distribution at
every position."""

from __future__ import annotations

from collections.abc import Iterator

from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.tasks import Task
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import DumpRequest, sample_seed
from kd_shards.teacher_dump.rows import ScoredTarget, ShardRow, first_invalid_position, make_row

NAME = "generate"
OWN_FIELDS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "num_samples",
        "filter",
        "filter_threshold",
        "filter_column",
        "keep_best_of",
    }
)
record_engine = tokens.record_engine
storage = tokens.storage


check_task = tokens.check_prompted_task


def requests(
    config: DumpConfig, task: Task, records: LoadedRecords, inputs: TeacherInputs
) -> ModeRequests:
    return tokens.prompted_requests(
        config, task, records, inputs, with_targets=False, new_tokens=config.max_new_tokens
    )


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    sampling = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "num_samples": config.num_samples,
        "seed": config.seed,
        "per_prompt_seed": "blake2b('<seed>:<source_index>') & 0x7fffffff",
    }
    return tokens.manifest_entries(config, inputs, sampling)


def rows_per_prompt(config: DumpConfig) -> int:
    return config.num_samples


def start(config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None):
    return tokens.start(config, inputs, engine, sampled_rows)


def sampled_rows(
    teacher: tokens.TokenTeacher, todo: list[DumpRequest]
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Each prompt's completions, sampled with its own seed, as rows."""
    config = teacher.config
    stream = teacher.engine.generate(
        (
            (request, request.prompt_ids.tolist(), sample_seed(config.seed, request.source_index))
            for request in todo
        ),
        num_samples=config.num_samples,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        top_k=config.engine_logprobs,
        max_in_flight=config.max_in_flight,
    )
    for request, completions in tokens.closing(stream):
        yield request, completion_rows(request, completions, teacher.tokenizer)


def completion_rows(request: DumpRequest, completions, tokenizer) -> list[ShardRow]:
    """Rows of one prompt's sampled completions (their entries encoded by the shard writer)."""
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
        target = ScoredTarget(
            sample_id=f"{request.source_index}-{index}",
            completion_index=index,
            target_ids=token_ids,
            position_ids=position_ids,
            position_logprobs=position_logprobs,
            finish_reason=finish_reason,
            target_text=tokenizer.decode(token_ids.tolist(), skip_special_tokens=True),
        )
        rows.append(make_row(request, target, size))
    return rows
