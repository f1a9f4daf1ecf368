"""A fuzzed reader (issue 11, item 6): real teacher-dump shards, corrupted at random by hypothesis,
must be refused by both readers with one line naming the shard.

The shards are schema v2 with the exact `topk` representation (tests.conftest.dump_config): per
row, kd_count and kd_tail hold one value per target position, kd_ids and kd_drops the entries
of all positions end to end. (Schema-v1 value defects are tests/test_reader_checks.py's.)

The two readers are student-train's loader (open_dump, then one streamed epoch: exactly what
training reads) and `teacher-dump inspect --validate` (teacher_dump.inspect.validate). Each run
copies the pristine dump, applies one corruption of one kind, and checks both. Content
corruptions rewrite the shard and make its manifest entry agree with the new file, so that the
checksum cannot be what catches them; byte-level corruptions (truncation, flipped bits) keep the
manifest as it was. Once each, the real commands are run on a corrupt dump too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_shards.schemas.shard import TAIL_EMPTY
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import open_dump
from kd_shards.student_train.shard_stream import ShardStream
from kd_shards.teacher_dump.inspect import validate
from tests.conftest import REPO, cli_command
from tests.synthetic_dumps import rewrite_shard

pytestmark = pytest.mark.engine  # the shards come from the real engine

EXAMPLES = int(os.environ.get("KD_SHARDS_FUZZ_EXAMPLES", "12"))
"""Corruptions tried per kind (~0.1 s each); `make trials` raises it."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRIED: dict[str, int] = {}
"""Corruptions applied per kind in this session (the figures docs/reliability.md quotes)."""


@pytest.fixture(scope="module")
def pristine(text_shards, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("pristine") / "dump"
    shutil.copytree(text_shards, copy)
    assert validate(copy) == []
    return copy


def fresh_copy(pristine: Path) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="fuzz-")) / "dump"
    shutil.copytree(pristine, directory)
    return directory


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def save_manifest(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def assert_refused_by_both(directory: Path, name: str | None, kind: str) -> None:
    """Both readers refuse the dump, in one line that names shard `name` (None: a corruption of
    the whole dump, for which naming any of its shards is right)."""
    TRIED[kind] = TRIED.get(kind, 0) + 1
    names = [name] if name else [entry["name"] for entry in manifest_of(directory)["shards"]]
    with pytest.raises(UserError) as caught:
        for _ in ShardStream(open_dump(directory), epochs=1):
            pass
    message = str(caught.value)
    assert "\n" not in message and any(name in message for name in names), message
    try:
        problems = validate(directory)
    except UserError as error:  # a manifest that cannot be read at all
        problems = [str(error)]
    assert problems, "inspect --validate passed a corrupt dump"
    assert all("\n" not in problem for problem in problems)
    assert any(name in problem for problem in problems for name in names), problems
    shutil.rmtree(directory.parent, ignore_errors=True)


def pick_shard(data, directory: Path) -> str:
    return data.draw(st.sampled_from([entry["name"] for entry in manifest_of(directory)["shards"]]))


def edit_rows(directory: Path, name: str, edit) -> None:
    """Rewrite shard `name` with edit(rows) applied to its rows as Python lists; the manifest
    entry is made to agree with the new file."""
    table = pq.read_table(directory / name)
    rows = table.to_pylist()
    edit(rows)
    # The file's own schema, with its metadata (schema version, storage record).
    rewrite_shard(directory, name, pa.Table.from_pylist(rows, schema=table.schema))


def pick_position(data, rows: list[dict]) -> tuple[dict, int]:
    row = data.draw(st.sampled_from(rows))
    return row, data.draw(st.integers(0, len(row["target_ids"]) - 1))


def entry_slots(row: dict, position: int) -> range:
    """The indices in kd_ids / kd_drops of the entries of target position `position`."""
    start = sum(row["kd_count"][:position])
    return range(start, start + row["kd_count"][position])


@FUZZ
@given(data=st.data())
def test_truncated_shards(pristine, data):
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)
    content = (directory / name).read_bytes()
    keep = data.draw(st.integers(0, len(content) - 1))
    (directory / name).write_bytes(content[:keep])
    assert_refused_by_both(directory, name, "truncated file")


@FUZZ
@given(data=st.data())
def test_flipped_bytes(pristine, data):
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)
    content = bytearray((directory / name).read_bytes())
    offsets = data.draw(st.sets(st.integers(0, len(content) - 1), min_size=1, max_size=3))
    for offset in offsets:
        content[offset] ^= 1 << data.draw(st.integers(0, 7))
    (directory / name).write_bytes(bytes(content))
    assert_refused_by_both(directory, name, "flipped bytes")


WRONG_TYPES = {
    "sample_id": [pa.large_string()],
    "source_index": [pa.int32(), pa.float64()],
    "prompt_ids": [pa.list_(pa.int64()), pa.large_list(pa.int32())],
    "target_ids": [pa.list_(pa.int64()), pa.list_(pa.float32())],
    "target_logprobs": [pa.list_(pa.float64())],
    "kd_count": [pa.list_(pa.int64()), pa.large_list(pa.int32())],
    "kd_ids": [pa.list_(pa.int64()), pa.list_(pa.float32())],
    "kd_drops": [pa.list_(pa.float64())],
    "kd_tail": [pa.list_(pa.int64())],
    "finish_reason": [pa.large_string()],
}


@FUZZ
@given(data=st.data())
def test_wrong_column_types(pristine, data):
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)
    column = data.draw(st.sampled_from(sorted(WRONG_TYPES)))
    wrong = data.draw(st.sampled_from(WRONG_TYPES[column]))
    table = pq.read_table(directory / name)
    index = table.schema.get_field_index(column)
    schema = table.schema.set(index, pa.field(column, wrong, nullable=False))
    rewrite_shard(directory, name, table.cast(schema))
    assert_refused_by_both(directory, name, "wrong column type")


@FUZZ
@given(data=st.data(), value=st.sampled_from([math.nan, math.inf, 0.5, 3e38]))
def test_non_finite_or_positive_logprobs(pristine, data, value):
    # The only float column of a v2 shard; the distribution columns are integers (below).
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)

    def edit(rows):
        row, position = pick_position(data, rows)
        row["target_logprobs"][position] = value

    edit_rows(directory, name, edit)
    assert_refused_by_both(directory, name, "NaN/+inf/positive logprob")


INTEGER_EDITS = {
    "negative first drop (a positive logprob)": ("kd_drops", "first", [-1, -1000]),
    "negative later drop (values out of rank order)": ("kd_drops", "later", [-1, -(2**31)]),
    "negative tail level": ("kd_tail", "position", [-1, -(2**31)]),
    "tail level beyond 65535": ("kd_tail", "position", [TAIL_EMPTY + 1, 2**31 - 1]),
    "zero or negative count": ("kd_count", "position", [0, -1]),
}


@FUZZ
@given(data=st.data(), edit_name=st.sampled_from(sorted(INTEGER_EDITS)))
def test_distribution_values_out_of_their_range(pristine, data, edit_name):
    # What a NaN or a positive logprob is for a float column: integers no writer produces.
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)
    column, where, values = INTEGER_EDITS[edit_name]

    def edit(rows):
        candidates = [
            (row, position)
            for row in rows
            for position in range(len(row["target_ids"]))
            if where != "later" or row["kd_count"][position] > 1
        ]
        row, position = data.draw(st.sampled_from(candidates))
        slots = entry_slots(row, position)
        index = {"first": slots.start, "later": slots.start + 1, "position": position}[where]
        row[column][index] = data.draw(st.sampled_from(values))

    edit_rows(directory, name, edit)
    assert_refused_by_both(directory, name, "distribution value out of range")


@FUZZ
@given(
    data=st.data(),
    column=st.sampled_from(["prompt_ids", "target_ids", "kd_ids"]),
    value=st.sampled_from([500, 511, 512, 10**6, -2, -1, -(2**31)]),
)
def test_ids_out_of_range(pristine, data, column, value):
    # 500 = len(tokenizer); 500..511 are the tiny model's padded embedding rows; -1 (the PAD
    # marker of decoded arrays) is never a stored id: positions hold fewer entries instead.
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)

    def edit(rows):
        row, position = pick_position(data, rows)
        if column == "prompt_ids":
            row[column][data.draw(st.integers(0, len(row[column]) - 1))] = value
        elif column == "target_ids":
            row[column][position] = value
        else:
            row[column][data.draw(st.sampled_from(entry_slots(row, position)))] = value

    edit_rows(directory, name, edit)
    assert_refused_by_both(directory, name, "id out of range")


@FUZZ
@given(data=st.data())
def test_an_id_twice_at_one_position(pristine, data):
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)

    def edit(rows):
        candidates = [
            (row, position)
            for row in rows
            for position in range(len(row["target_ids"]))
            if row["kd_count"][position] > 1
        ]
        row, position = data.draw(st.sampled_from(candidates))
        slots = entry_slots(row, position)
        first, second = data.draw(
            st.lists(st.sampled_from(slots), min_size=2, max_size=2, unique=True)
        )
        row["kd_ids"][second] = row["kd_ids"][first]

    edit_rows(directory, name, edit)
    assert_refused_by_both(directory, name, "an id twice at one position")


LENGTH_EDITS = [
    "drop a per-position count",
    "drop an entry's id",
    "drop an entry's drop",
    "add an entry",
    "count one entry more",
    "drop a target id",
    "add a target logprob",
    "drop a per-position tail",
]


@FUZZ
@given(data=st.data(), edit_name=st.sampled_from(LENGTH_EDITS))
def test_mismatched_list_lengths(pristine, data, edit_name):
    directory = fresh_copy(pristine)
    name = pick_shard(data, directory)

    def edit(rows):
        row, position = pick_position(data, rows)
        slot = data.draw(st.sampled_from(entry_slots(row, position)))
        if edit_name == "drop a per-position count":
            row["kd_count"].pop(position)
        elif edit_name == "drop an entry's id":
            row["kd_ids"].pop(slot)
        elif edit_name == "drop an entry's drop":
            row["kd_drops"].pop(slot)
        elif edit_name == "add an entry":
            row["kd_ids"].insert(slot, 7)
            row["kd_drops"].insert(slot, 3)
        elif edit_name == "count one entry more":
            row["kd_count"][position] += 1
        elif edit_name == "drop a target id":
            row["target_ids"].pop(position)
        elif edit_name == "add a target logprob":
            row["target_logprobs"].insert(position, -1.0)
        else:
            row["kd_tail"].pop(position)

    edit_rows(directory, name, edit)
    assert_refused_by_both(directory, name, "mismatched list lengths")


MANIFEST_EDITS = [
    "rows",
    "target_tokens",
    "bytes",
    "sha256",
    "name of a missing file",
    "entry listed twice",
    "top_k",
    "tokenizer size",
]


@FUZZ
@given(data=st.data(), edit_name=st.sampled_from(MANIFEST_EDITS))
def test_manifest_entries_that_disagree_with_the_file(pristine, data, edit_name):
    directory = fresh_copy(pristine)
    manifest = manifest_of(directory)
    index = data.draw(st.integers(0, len(manifest["shards"]) - 1))
    entry = manifest["shards"][index]
    name = entry["name"]
    delta = data.draw(st.integers(1, 1000)) * data.draw(st.sampled_from([-1, 1]))
    if edit_name in ("rows", "target_tokens", "bytes"):
        entry[edit_name] = max(0, entry[edit_name] + delta)
        if entry[edit_name] == manifest_of(directory)["shards"][index][edit_name]:
            entry[edit_name] += 1
    elif edit_name == "sha256":
        digits = list(entry["sha256"])
        digit = data.draw(st.integers(0, 63))
        digits[digit] = "0" if digits[digit] != "0" else "1"
        entry["sha256"] = "".join(digits)
    elif edit_name == "name of a missing file":
        name = entry["name"] = "part-r00000-w00001-999999.parquet"
    elif edit_name == "entry listed twice":
        manifest["shards"].append(dict(entry))
    elif edit_name == "top_k":
        manifest["top_k"] = data.draw(st.sampled_from([1, 7, 9, 20]))
        name = None  # every shard disagrees with it; the first one read is named
    else:
        # Smaller than an id the shards hold: every shard disagrees with it.
        manifest["tokenizer"]["size"] = data.draw(st.integers(1, 100))
        name = None
    save_manifest(directory, manifest)
    assert_refused_by_both(directory, name, "manifest entry disagreeing with the file")


def test_the_commands_refuse_a_fuzzed_dump_in_one_line(pristine, student_model):
    # A NaN deep in the third shard: `teacher-dump inspect --validate` exits 1 naming it, and
    # `student-train` exits 2 with one line naming it, before writing a checkpoint.
    directory = fresh_copy(pristine)
    name = manifest_of(directory)["shards"][2]["name"]

    def edit(rows):
        rows[5]["target_logprobs"][40] = math.nan

    edit_rows(directory, name, edit)
    inspected = subprocess.run(
        cli_command("inspect", str(directory), "--validate"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert inspected.returncode == 1, inspected.stdout + inspected.stderr
    assert f"INVALID {name}: target logprobs contain NaN" in inspected.stdout
    out = directory.parent / "run"
    trained = subprocess.run(
        [
            sys.executable, "-m", "kd_shards.student_train.cli", "--shards", str(directory),
            "--student", str(student_model), "--out", str(out), "--max-steps", "2",
            "--micro-batch", "4", "--no-progress",
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert trained.returncode == 2, trained.stderr[-2000:]
    lines = trained.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "NaN" in lines[0], trained.stderr[-2000:]
    assert not (out / "checkpoints").exists()
