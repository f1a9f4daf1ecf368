"""teacher-dump --mode rescore: a second teacher onto an existing dump. Teacher B is forced on
exactly the rows of the token dump --data names (dump A: its prompts and targets, e.g. A's
sampled answers); the new dump keeps A's sample ids, so that student-train can combine the two
(--more-shards, same tokenizer) or align them (another tokenizer).

With B's tokenizer equal to A's, B is scored on A's token ids themselves. Otherwise A's texts
are re-tokenized: the prompt text through B's chat template (as A's prompts were, when A used
one), the target text in B's tokens, ending with B's stop token where A's target ended with
one of A's. A row's source_index is its place in A (manifest order), which resume keys on.
The manifest's `rescore` section points at A (directory, identity, teacher, tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.parquet as pq

from kd_shards.schemas.manifest import is_classify
from kd_shards.shared.errors import UserError
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.shard_reader import Dump, iterate_rows, open_dump
from kd_shards.shared.tasks import Task
from kd_shards.shared.token_alignment import dump_tokenizer
from kd_shards.shared.tokenizer import render_prompt, tokenizer_fingerprint
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import tokens
from kd_shards.teacher_dump.modes.interface import ModeRequests, TeacherInputs
from kd_shards.teacher_dump.requests import DumpRequest, check_lengths
from kd_shards.teacher_dump.rows import ScoredTarget, ShardRow, make_row

NAME = "rescore"
OWN_FIELDS = frozenset()
storage = tokens.storage
record_engine = tokens.record_engine
ROW_COLUMNS = ("sample_id", "prompt_ids", "target_ids", "prompt_text", "target_text")
"""What a re-scored row is made from (through the checked reader)."""
KEPT_COLUMNS = ("completion_index", "finish_reason", "references")
"""What it keeps of A's row as it is."""


@dataclass(frozen=True)
class SourceRow:
    """What a re-scored row keeps of A's row."""

    sample_id: str
    completion_index: int
    finish_reason: str


@dataclass(frozen=True)
class RescorePlan:
    """A's rows by their source_index in the new dump (their place in A)."""

    rows: dict[int, SourceRow]


def check_task(config: DumpConfig, task: Task, inputs: TeacherInputs) -> None:
    """Nothing to check: rescore's data is a dump (load_source)."""


def source_dump(config: DumpConfig) -> Dump:
    """Dump A, refused unless it is a finished token dump."""
    flag = "--data"
    dump = open_dump(config.data, allow_incomplete=True, flag=flag)
    if not dump.complete:
        totals = dump.manifest.get("totals", {})
        expected = dump.manifest.get("data", {}).get("expected_rows") or "?"
        raise UserError(
            f"--mode rescore --data {config.data}: the dump to re-score is incomplete "
            f"({totals.get('rows', 0)} of {expected} rows): finish it first (rerun its "
            "teacher-dump command), then re-score it"
        )
    if is_classify(dump.manifest):
        raise UserError(
            f"--mode rescore --data {config.data} is a classify dump: re-score token dumps "
            "(generate, score, text, rescore); for several classifiers, dump each with --mode "
            "classify and train with --more-shards"
        )
    return dump


def load_source(config: DumpConfig, inputs: TeacherInputs) -> tuple[None, LoadedRecords]:
    """(no task, A's rows as records): the rows in A's order with what rescore needs of each;
    the fingerprint is A's identity and shard checksums (a changed A refuses the resume)."""
    tokens.check_vocabulary(config, inputs)
    dump = source_dump(config)
    rows = []
    kept = kept_columns(dump)
    for index, row in enumerate(iterate_rows(dump, columns=ROW_COLUMNS)):
        if config.limit is not None and index >= config.limit:
            break
        rows.append(
            {
                "sample_id": row.sample_id,
                "prompt_ids": row.prompt_ids,
                "target_ids": row.target_ids,
                "prompt_text": row.text,
                "target_text": row.target_text,
                **kept[index],
            }
        )
    blob = json.dumps(
        {
            "identity": dump.manifest.get("identity"),
            "shards": [entry["sha256"] for entry in dump.manifest["shards"]],
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    return None, LoadedRecords(rows=rows, source=f"dump:{dump.directory}", fingerprint=fingerprint)


def kept_columns(dump: Dump) -> list[dict]:
    """KEPT_COLUMNS of every row of A, in the reader's order (row groups in manifest order)."""
    kept: list[dict] = []
    for group in dump.row_groups:
        with group.shard.readable() as source:
            table = pq.ParquetFile(source).read_row_group(group.index, columns=list(KEPT_COLUMNS))
        kept += table.to_pylist()
    return kept


def requests(
    config: DumpConfig, task: Task | None, records: LoadedRecords, inputs: TeacherInputs
) -> ModeRequests:
    """One request per row of A: its ids (B shares A's tokenizer) or its texts in B's tokens."""
    dump = source_dump(config)
    same = tokenizer_fingerprint(inputs.tokenizer) == dump.manifest["tokenizer"]["fingerprint"]
    source_tokenizer = None if same else dump_tokenizer(dump)
    source_stops = set(dump.manifest["tokenizer"].get("stop_token_ids") or [])
    use_template = inputs.use_template and bool(
        dump.manifest["tokenizer"].get("chat_template_used")
    )
    built, plan = [], {}
    for index, row in enumerate(records.rows):
        if same:
            prompt_ids, target_ids = row["prompt_ids"], row["target_ids"]
        else:
            prompt_ids, target_ids = retokenized(
                row, inputs, source_tokenizer, source_stops, use_template, config.data
            )
        if len(prompt_ids) == 0 or len(target_ids) == 0:
            continue  # nothing to score (A's row had an empty target)
        built.append(
            DumpRequest(
                source_index=index,
                prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                target_ids=np.asarray(target_ids, dtype=np.int32),
                prompt_text=row["prompt_text"],
                references=tuple(row.get("references") or ()),
            )
        )
        plan[index] = SourceRow(
            row["sample_id"], int(row.get("completion_index") or 0), row.get("finish_reason", "")
        )
    # Scoring generates one throw-away token after the sequence.
    kept, skipped = check_lengths(
        built, context=inputs.context, new_tokens=1, skip_too_long=config.skip_too_long
    )
    return ModeRequests(kept, skipped + len(records.rows) - len(built), RescorePlan(plan))


def retokenized(row, inputs: TeacherInputs, source_tokenizer, source_stops, use_template, where):
    """(prompt ids, target ids) of A's row in B's tokens, from its texts."""
    tokenizer = inputs.tokenizer
    text = row["target_text"]
    ends_with_stop = len(row["target_ids"]) > 0 and int(row["target_ids"][-1]) in source_stops
    if not text and len(row["target_ids"]) > int(ends_with_stop):
        raise UserError(
            f"--data {where}: sample {row['sample_id']} has target tokens but no target_text, and "
            "this teacher's tokenizer is not the dump's: re-scoring across tokenizers re-tokenizes "
            "the texts; redo the dump with its texts stored"
        )
    if row["prompt_text"]:
        prompt = render_prompt(tokenizer, row["prompt_text"], use_chat_template=use_template)
    else:  # a text-mode row: its prompt is its first tokens, decoded with A's tokenizer
        if source_tokenizer is None:
            raise UserError(
                f"--data {where} keeps no tokenizer to decode its text-mode prompts: redo it "
                "with this teacher-dump, which stores its tokenizer beside the manifest"
            )
        decoded = source_tokenizer.decode(
            [int(token_id) for token_id in row["prompt_ids"]], skip_special_tokens=True
        )
        prompt = list(tokenizer(decoded, add_special_tokens=True)["input_ids"]) if decoded else []
        if not prompt and tokenizer.bos_token_id is not None:
            prompt = [tokenizer.bos_token_id]
    target = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if ends_with_stop and inputs.stop_ids:
        target.append(inputs.stop_ids[0])
    return prompt, target


def manifest_entries(config: DumpConfig, inputs: TeacherInputs, planned: ModeRequests) -> dict:
    dump = source_dump(config)
    entries = tokens.manifest_entries(config, inputs, sampling=None)
    entries["rescore"] = {
        "source": str(dump.directory),
        "source_identity": dump.manifest.get("identity"),
        "source_mode": dump.manifest.get("mode"),
        "source_teacher": dump.manifest.get("teacher", {}).get("model"),
        "source_tokenizer": dump.manifest["tokenizer"]["fingerprint"],
        "same_tokenizer": tokenizer_fingerprint(inputs.tokenizer)
        == dump.manifest["tokenizer"]["fingerprint"],
    }
    return entries


def rows_per_prompt(config: DumpConfig) -> int:
    return 1


def rescored_rows(
    teacher: tokens.TokenTeacher, todo: list[DumpRequest], plan: RescorePlan
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Each request's one row, under A's sample id."""
    config, tokenizer = teacher.config, teacher.tokenizer
    stream = teacher.engine.score(
        ((request, request.prompt_ids.tolist() + request.target_ids.tolist()) for request in todo),
        top_k=config.engine_logprobs,
        max_in_flight=config.max_in_flight,
    )
    storage = config.storage(len(tokenizer))
    for request, scored in tokens.closing(stream):
        source = plan.rows[request.source_index]
        start = len(request.prompt_ids) - 1  # row j-1 predicts token j; targets start at token P
        target = ScoredTarget(
            sample_id=source.sample_id,
            completion_index=source.completion_index,
            target_ids=request.target_ids,
            position_ids=scored.position_ids[start:],
            position_logprobs=scored.position_logprobs[start:],
            finish_reason=source.finish_reason,
            target_text=tokenizer.decode(request.target_ids.tolist(), skip_special_tokens=True),
        )
        yield request, [make_row(request, target, len(tokenizer), storage)]


def start(config: DumpConfig, inputs: TeacherInputs, plan: object, engine=None):
    return tokens.start(config, inputs, engine, partial(rescored_rows, plan=plan))
