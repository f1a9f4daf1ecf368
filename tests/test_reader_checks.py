"""The reader refuses what would silently corrupt training, and cannot be steered outside the dump
(issue 11, items 2 and 7).

Every defect is refused by both readers: student-train's loader (open_dump + ShardStream, and once
the real command) and `teacher-dump inspect --validate` (teacher_dump.inspect.validate), each with
one line naming the shard. Defects are placed in a row other than the first, so a check that looks
at the first row only would miss them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kd_shards.shared.shard_reader as shard_reader
from kd_shards.schemas.shard import SCHEMA_V1
from kd_shards.shared.errors import UserError
from kd_shards.shared.shard_reader import checked_columns, open_dump, read_manifest
from kd_shards.student_train.shard_stream import ShardStream
from kd_shards.teacher_dump.inspect import summarize, validate
from tests.synthetic_dumps import rewrite_shard, write_synthetic_dump, write_synthetic_dump_for

TOP_K, VOCABULARY = 4, 50
DEFECT_ROW = 9
"""The row of the first shard that gets the defect (not the first row, not a row-group edge)."""


def make_dump(directory: Path, rows: int = 60, **options) -> Path:
    return write_synthetic_dump(
        directory, rows, rows_per_shard=30, top_k=TOP_K, vocabulary=VOCABULARY, **options
    )


def first_shard(directory: Path) -> str:
    return json.loads((directory / "manifest.json").read_text())["shards"][0]["name"]


def trainer_refusal(directory: Path) -> str:
    """student-train's loader on the dump: open it and stream one epoch; the one-line refusal."""
    with pytest.raises(UserError) as caught:
        for _ in ShardStream(open_dump(directory), shuffle=False, epochs=1):
            pass
    message = str(caught.value)
    assert "\n" not in message
    return message


def validate_refusal(directory: Path) -> str:
    """inspect --validate on the dump: exactly one problem, naming its shard."""
    problems = validate(directory)
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    return problems[0]


def edit_row(directory: Path, edit) -> str:
    """Apply edit(row dict) to row DEFECT_ROW of the first shard, rewrite the shard and make its
    manifest entry agree with the new file (so only the values are wrong). Returns its name."""
    name = first_shard(directory)
    rows = pq.read_table(directory / name).to_pylist()
    edit(rows[DEFECT_ROW])
    rewrite_shard(directory, name, pa.Table.from_pylist(rows, schema=SCHEMA_V1))
    return name


def real_last_slot(row: dict) -> int:
    """A position of the row whose last top-k slot holds a real id (not padding)."""
    return next(t for t, ids in enumerate(row["topk_ids"]) if ids[-1] != -1)


def pad_id_with_a_finite_logprob(row):
    row["topk_ids"][real_last_slot(row)][-1] = -1


def real_id_with_minus_infinity(row):
    row["topk_logprobs"][real_last_slot(row)][-1] = float("-inf")


def one_top_k_list_too_few(row):
    row["topk_ids"].pop()
    row["topk_logprobs"].pop()


def one_target_logprob_too_many(row):
    row["target_logprobs"].append(-1.0)


def one_position_with_k_minus_one_entries(row):
    row["topk_ids"][0].pop()
    row["topk_logprobs"][0].pop()


def prompt_id_beyond_the_tokenizer(row):
    row["prompt_ids"][-1] = VOCABULARY + 3


DEFECTS = {
    pad_id_with_a_finite_logprob: "slots with id -1 and slots with logprob -inf do not coincide",
    real_id_with_minus_infinity: "slots with id -1 and slots with logprob -inf do not coincide",
    one_top_k_list_too_few: "column topk_ids has a different number of positions than target_ids",
    one_target_logprob_too_many: "column target_logprobs has a different number of positions",
    one_position_with_k_minus_one_entries: "column topk_ids has 3 entries at position",
    prompt_id_beyond_the_tokenizer: f"prompt ids outside [0, {VOCABULARY})",
}


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda defect: defect.__name__)
def test_each_value_defect_is_refused_by_the_trainer_and_by_validate(defect, tmp_path):
    directory = make_dump(tmp_path / "dump")
    assert validate(directory) == []
    name = edit_row(directory, defect)
    expected = DEFECTS[defect]
    trainer = trainer_refusal(directory)
    assert name in trainer and expected in trainer and "inspect --validate" in trainer
    problem = validate_refusal(directory)
    assert problem.startswith(f"{name}: ") and expected in problem


def silently_wrong_bit_flip(path: Path) -> tuple[int, pa.Table]:
    """The first single-bit flip of the shard's bytes after which pyarrow still reads a table in
    the schema whose values pass every value check but differ from the original: corruption that
    only a checksum can catch. Writes it; returns (byte offset, the table as read after it)."""
    data = path.read_bytes()
    original = pq.read_table(path)
    manifest = read_manifest(path.parent)
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for offset in range(4, len(data) - footer):
        flipped = bytearray(data)
        flipped[offset] ^= 1
        try:
            parquet = pq.ParquetFile(pa.BufferReader(bytes(flipped)))
            table = parquet.read()
        except Exception:
            continue
        if table.equals(original):
            continue
        if isinstance(checked_columns(table, parquet.metadata, manifest), str):
            continue
        path.write_bytes(bytes(flipped))
        return offset, table
    raise AssertionError("no silent bit flip found")


def test_a_bit_flip_that_parquet_reads_as_valid_values_is_refused_by_its_checksum(tmp_path):
    directory = make_dump(tmp_path / "dump")
    name = first_shard(directory)
    offset, table = silently_wrong_bit_flip(directory / name)
    assert table.num_rows == 30  # a whole, plausible shard with other numbers in it
    trainer = trainer_refusal(directory)
    assert f"shard {name} " in trainer and "sha256" in trainer and "manifest" in trainer
    problem = validate_refusal(directory)
    assert problem.startswith(f"{name}: sha256 differs"), (offset, problem)


def test_a_shard_pyarrow_cannot_decode_is_refused_in_one_line(tmp_path):
    # A damaged page header whose checksum was (wrongly) updated to match: pyarrow's message
    # for it spans lines; both readers still give one line naming the shard.
    directory = make_dump(tmp_path / "dump")
    name = first_shard(directory)
    content = bytearray((directory / name).read_bytes())
    content[4] ^= 1  # the first page header, right after the magic bytes
    with pytest.raises(Exception, match="\n"):
        pq.read_table(pa.BufferReader(bytes(content)))
    rewrite_shard_bytes(directory, name, bytes(content))
    trainer = trainer_refusal(directory)
    assert f"shard {name} " in trainer and "unreadable" in trainer
    assert validate_refusal(directory).startswith(f"{name}: unreadable Parquet")


def rewrite_shard_bytes(directory: Path, name: str, content: bytes) -> None:
    """Replace a shard's bytes and make its manifest entry's size and sha256 agree with them."""
    import hashlib

    (directory / name).write_bytes(content)
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(bytes=len(content), sha256=hashlib.sha256(content).hexdigest())
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_corrupt_shard_is_refused_before_any_of_its_rows_is_returned(tmp_path):
    directory = make_dump(tmp_path / "dump")
    manifest = json.loads((directory / "manifest.json").read_text())
    second = manifest["shards"][1]["name"]
    silently_wrong_bit_flip(directory / second)
    # One row group per window, so the stream reaches the second shard only after the first.
    stream = ShardStream(open_dump(directory), shuffle=False, epochs=1, buffer_rows=1)
    returned = []
    with pytest.raises(UserError, match=f"shard {second} .*sha256"):
        while (row := stream.take()) is not None:
            returned.append(row.sample_id)
    # The first shard (rows 0-29) streams; not one row of the corrupt second shard gets out.
    assert returned == [str(index) for index in range(30)]


def test_checksums_are_verified_lazily_once_per_process_and_again_after_a_change(
    tmp_path, monkeypatch
):
    directory = make_dump(tmp_path / "dump", rows=90)
    hashed: list[str] = []
    real_hash = shard_reader.sha256_of_file
    monkeypatch.setattr(
        shard_reader, "sha256_of_file", lambda path: hashed.append(path.name) or real_hash(path)
    )
    dump = open_dump(directory)
    assert hashed == []  # opening reads footers only, never the whole dump
    planning = ShardStream(dump, epochs=2, columns=("sample_id", "prompt_ids", "target_ids"))
    planning.verify = False  # what count_steps does: lengths only, nothing trained on
    assert sum(1 for _ in planning) == 180 and hashed == []
    assert sum(1 for _ in ShardStream(dump, epochs=2, buffer_rows=10)) == 180
    names = [entry["name"] for entry in dump.manifest["shards"]]
    assert sorted(hashed) == sorted(names)  # each shard once, over two epochs
    assert sum(1 for _ in ShardStream(open_dump(directory), epochs=1)) == 90
    assert len(hashed) == 3  # and once per process, not once per stream
    # A shard rewritten after it was verified is verified again when next read.
    table = pq.read_table(directory / names[2])
    rewrite_shard(directory, names[2], table.slice(0, 29))
    assert sum(1 for _ in ShardStream(open_dump(directory), epochs=1)) == 89
    assert hashed[3:] == [names[2]]


def test_a_manifest_whose_checksum_or_token_count_disagrees_is_refused(tmp_path):
    for key, value, expected in (
        ("sha256", "0" * 64, "sha256"),
        ("target_tokens", 1, "target tokens"),
    ):
        directory = make_dump(tmp_path / key)
        manifest = json.loads((directory / "manifest.json").read_text())
        name = manifest["shards"][1]["name"]
        manifest["shards"][1][key] = value
        (directory / "manifest.json").write_text(json.dumps(manifest))
        trainer = trainer_refusal(directory)
        assert f"shard {name} " in trainer and expected in trainer
        assert validate_refusal(directory).startswith(f"{name}: ")


def test_student_train_refuses_a_silently_corrupt_shard_in_one_line(student_model, tmp_path):
    directory = write_synthetic_dump_for(
        student_model, tmp_path / "dump", 40, rows_per_shard=20, top_k=TOP_K
    )
    name = first_shard(directory)
    silently_wrong_bit_flip(directory / name)
    result = subprocess.run(
        [
            sys.executable, "-m", "kd_shards.student_train.cli", "--shards", str(directory),
            "--student", str(student_model), "--out", str(tmp_path / "out"), "--max-steps", "2",
            "--micro-batch", "4", "--no-progress",
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shard "), result.stderr[-2000:]
    assert name in lines[0] and "sha256" in lines[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


# Item 7: nothing outside the dump directory, no pickle, no remote code without the flag.


@pytest.mark.parametrize(
    "name",
    ["../outside.parquet", "/absolute/outside.parquet", "sub/part.parquet", ".hidden.parquet"],
)
def test_manifest_names_cannot_point_outside_the_dump(name, tmp_path):
    directory = make_dump(tmp_path / "dump")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (directory / "manifest.json").write_text(json.dumps(manifest))
    for read in (open_dump, validate, summarize):
        with pytest.raises(UserError, match="not a plain file name in the dump directory"):
            read(directory)


def test_a_symlinked_shard_leading_outside_the_dump_is_never_read(tmp_path):
    from kd_shards.teacher_dump.shards import done_source_indices

    directory = make_dump(tmp_path / "dump")
    name = first_shard(directory)
    outside = tmp_path / "elsewhere" / "stolen.parquet"
    outside.parent.mkdir()
    (directory / name).rename(outside)  # the same bytes: its checksum still matches
    (directory / name).symlink_to(outside)
    message = trainer_refusal(directory)
    assert f"{name} is a link to {outside.resolve()}, outside the dump directory" in message
    problem = validate_refusal(directory)
    assert problem.startswith(f"{name}: ") and "outside the dump directory" in problem
    assert name in summarize(directory)["unreadable"]
    with pytest.raises(UserError, match="outside the dump directory"):
        done_source_indices(directory)  # what a resumed teacher-dump reads first
    # A link to a file of the dump itself stays readable.
    (directory / name).unlink()
    outside.rename(directory / "moved.parquet")
    (directory / name).symlink_to(directory / "moved.parquet")
    assert sum(1 for _ in ShardStream(open_dump(directory), epochs=1)) == 60


def test_a_symlinked_manifest_leading_outside_the_dump_is_refused(tmp_path):
    directory = make_dump(tmp_path / "dump")
    outside = tmp_path / "manifest-elsewhere.json"
    (directory / "manifest.json").rename(outside)
    (directory / "manifest.json").symlink_to(outside)
    with pytest.raises(UserError, match="manifest.json is a link to .*outside the dump"):
        read_manifest(directory)


class RunsCodeWhenUnpickled:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_marker_pickle_does_run_code_when_loaded(tmp_path):
    # The control for the two tests below: loading this payload with pickle creates the marker.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    assert marker.exists()


def test_a_checkpoint_state_that_runs_code_is_refused_without_running_it(tmp_path):
    from kd_shards.student_train.checkpoints import META_NAME, STATE_NAME, read_checkpoint

    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / META_NAME).write_text(json.dumps({"step": 1}))
    marker = tmp_path / "ran"
    import torch

    torch.save({"optimizer": RunsCodeWhenUnpickled(marker)}, checkpoint / STATE_NAME)
    with pytest.raises(UserError) as caught:
        read_checkpoint(checkpoint)
    assert "\n" not in str(caught.value)
    assert "step-00000001: training_state.pt is not a plain tensor state" in str(caught.value)
    assert not marker.exists()


class PickledExtension(pa.ExtensionType):
    """An Arrow extension type under the name pyarrow once used for pickled Python types: its
    serialized form, stored in the Parquet footer, is a pickle, which its deserializer loads (as
    pyarrow's own did when auto-loading was on)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        super().__init__(pa.list_(pa.int32()), "arrow.py_extension_type")

    def __arrow_ext_serialize__(self) -> bytes:
        return self.payload

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        pickle.loads(serialized)
        return cls(serialized)


def test_a_shard_carrying_a_pickled_type_is_refused_without_running_it(tmp_path):
    from kd_shards.teacher_dump.shards import describe_shard, done_source_indices

    directory = make_dump(tmp_path / "dump")
    name = first_shard(directory)
    marker = tmp_path / "ran"
    payload = pickle.dumps(RunsCodeWhenUnpickled(marker))
    table = pq.read_table(directory / name)
    storage = table["prompt_ids"].combine_chunks()
    column = pa.ExtensionArray.from_storage(PickledExtension(payload), storage)
    table = table.set_column(table.schema.get_field_index("prompt_ids"), "prompt_ids", column)
    rewrite_shard(directory, name, table)
    # Control: with a pickle-loading type registered, merely reading the footer runs the code.
    pa.register_extension_type(PickledExtension(b""))
    try:
        pq.read_schema(directory / name)
    finally:
        pa.unregister_extension_type("arrow.py_extension_type")
    assert marker.exists()
    marker.unlink()
    # kd-shards registers no such type: its readers never run the payload, and refuse the shard.
    trainer = trainer_refusal(directory)
    expected = "column prompt_ids declares the Arrow extension type 'arrow.py_extension_type'"
    assert name in trainer and expected in trainer
    problem = validate_refusal(directory)
    assert problem.startswith(f"{name}: ") and expected in problem
    for read in (
        lambda: summarize(directory),
        lambda: describe_shard(directory / name),
        lambda: done_source_indices(directory),
    ):
        with contextlib.suppress(UserError):  # refusing it is fine; running its code is not
            read()
    assert not marker.exists()


def package_sources() -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    packages = ("schemas", "shared", "teacher_dump", "student_train", "kd_eval", "scripts")
    return sorted(path for package in packages for path in (root / package).rglob("*.py"))


def pickle_loads_in(source: str) -> list[str]:
    """Calls in `source` that can load a pickle: pickle/dill/joblib loads, torch.load without
    weights_only=True, numpy loads with allow_pickle=True, pandas read_pickle, and model
    from_pretrained calls that do not insist on safetensors (gguf conversions excepted)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        text = ast.unparse(node.func)
        keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
        if (
            text in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "read_pickle")
            or text.endswith(".read_pickle")
            or (text == "torch.load" and keywords.get("weights_only") != "True")
            or (text in ("np.load", "numpy.load") and keywords.get("allow_pickle") == "True")
            or (
                text.endswith(".from_pretrained")
                and "Model" in text
                and keywords.get("use_safetensors") != "True"
                and "gguf_file" not in keywords
            )
        ):
            found.append(ast.unparse(node)[:80])
    return found


def test_no_package_code_can_load_a_pickle():
    found = {path.name: pickle_loads_in(path.read_text()) for path in package_sources()}
    assert {name: calls for name, calls in found.items() if calls} == {}


def test_the_pickle_scan_finds_what_it_looks_for():
    source = (
        "import torch, pickle\n"
        "a = torch.load(path)\n"
        "b = torch.load(path, weights_only=True)\n"
        "c = pickle.loads(data)\n"
        "d = AutoModelForCausalLM.from_pretrained(path)\n"
        "e = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)\n"
    )
    assert pickle_loads_in(source) == [
        "torch.load(path)",
        "pickle.loads(data)",
        "AutoModelForCausalLM.from_pretrained(path)",
    ]


@pytest.fixture(scope="module")
def model_with_custom_code(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama plus an auto_map to a modeling file of its own that, when imported,
    creates a marker file. Returns (model directory, marker path)."""
    from scripts.tiny_models import build_tiny_llama

    directory = build_tiny_llama(tmp_path_factory.mktemp("custom-code"))
    marker = directory.parent / "custom-code-ran"
    (directory / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n"
        "    pass\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


def test_the_custom_code_marker_works(model_with_custom_code, tmp_path):
    import runpy

    directory, marker = model_with_custom_code
    copy = tmp_path / "modeling_custom.py"
    copy.write_text((directory / "modeling_custom.py").read_text().replace(str(marker), str(tmp_path / "ran")))  # fmt: skip
    runpy.run_path(str(copy))
    assert (tmp_path / "ran").exists()


def init_student_error(teacher: Path, out: Path) -> None:
    """`student-train init-student` (its click command): raise its one-line error as UserError."""
    from click.testing import CliRunner

    from kd_shards.student_train.cli import main

    result = CliRunner().invoke(
        main, ["init-student", "--teacher", str(teacher), "--layers", "1", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    raise UserError(result.output.strip().removeprefix("error: "))


def test_remote_code_runs_only_with_trust_remote_code(model_with_custom_code, gsm8k_file, tmp_path):
    from kd_shards.kd_eval.evaluation import EvalConfig, run_evaluation
    from kd_shards.shared.models import resolve_model
    from kd_shards.student_train.families.causal_lm import load_student
    from kd_shards.teacher_dump.run import prepare
    from tests.conftest import dump_config

    directory, marker = model_with_custom_code
    manifest = {"tokenizer": {"fingerprint": "x", "size": 500}}
    attempts = {
        "teacher-dump": lambda: prepare(dump_config(directory, gsm8k_file, tmp_path / "out")),
        "student-train": lambda: load_student(
            str(directory), manifest=manifest, trust_remote_code=False
        ),
        "kd-eval": lambda: run_evaluation(
            EvalConfig(
                data="gsm8k", models=(f"m={directory}",), data_path=str(gsm8k_file), split="train"
            )
        ),
        "init-student": lambda: init_student_error(directory, tmp_path / "student"),
    }
    for command, attempt in attempts.items():
        with pytest.raises(UserError) as caught:
            attempt()
        message = str(caught.value)
        assert "ships its own Python code (auto_map: AutoModelForCausalLM)" in message, command
        assert "--trust-remote-code" in message and "\n" not in message
    assert not marker.exists()
    # With the flag the model resolves (its code is then the user's explicit choice).
    assert resolve_model(str(directory), trust_remote_code=True).directory == directory.resolve()
