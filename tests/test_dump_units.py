"""Pure pieces of the dump: padding-id removal, rounding, tasks, rendering, chunking, writing."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kd_shards.schemas.shard import (
    LOGPROB_STEP,
    PAD_ID,
    Storage,
    max_rounding_error,
    round_logprobs,
    schema_version_of,
    shard_schema,
    storage_of,
)
from kd_shards.shared.tasks import TASKS, column_task
from kd_shards.teacher_dump.rows import drop_padding_ids


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.int32, st.tuples(st.integers(1, 6), st.integers(1, 8)), elements=st.integers(0, 60))
)
def test_drop_padding_ids_keeps_valid_entries_in_rank_order(ids):
    size = 50
    logprobs = -np.arange(ids.size, dtype=np.float32).reshape(ids.shape) / 4
    cleaned_ids, cleaned_logprobs, dropped = drop_padding_ids(ids, logprobs, size)
    assert dropped == int((ids >= size).sum())
    for row in range(ids.shape[0]):
        valid = ids[row] < size
        count = int(valid.sum())
        np.testing.assert_array_equal(cleaned_ids[row, :count], ids[row][valid])
        np.testing.assert_array_equal(cleaned_logprobs[row, :count], logprobs[row][valid])
        assert (cleaned_ids[row, count:] == PAD_ID).all()
        assert np.isneginf(cleaned_logprobs[row, count:]).all()


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 50), elements=st.floats(-80, 1e-6)))
def test_rounding_error_is_at_most_half_a_step(values):
    rounded = round_logprobs(values)
    assert rounded.dtype == np.float32 and (rounded <= 0).all()
    assert np.abs(rounded - np.minimum(values, 0)).max() <= max_rounding_error() + 1e-5
    np.testing.assert_allclose(np.round(rounded / LOGPROB_STEP) * LOGPROB_STEP, rounded)


def test_task_records():
    scitldr = {"source": ["First sentence.", "Second one."], "target": ["tl;dr a", "tl;dr b"]}
    example = TASKS["summ"].to_example(scitldr, 3)
    assert example.index == 3 and "First sentence. Second one." in example.prompt
    assert example.references == ("tl;dr a", "tl;dr b")
    plain = TASKS["summ"].to_example({"document": "Doc.", "summary": "Sum."}, 0)
    assert plain.references == ("Sum.",)
    gsm = TASKS["gsm8k"].to_example({"question": "1+1?", "answer": "2\n#### 2"}, 0)
    assert gsm.prompt.endswith("1+1?") and gsm.references == ("2\n#### 2",)
    custom = column_task("q", "a").to_example({"q": "hi", "a": ["x", "y"]}, 1)
    assert (custom.prompt, custom.references) == ("hi", ("x", "y"))


def test_render_target_is_the_reply_up_to_end_of_turn(tiny_model):
    from kd_shards.shared.tokenizer import (
        load_tokenizer,
        render_prompt,
        render_target,
        stop_token_ids,
    )

    tokenizer = load_tokenizer(tiny_model)
    prompt_ids = render_prompt(tokenizer, "Question?", use_chat_template=True)
    stops = stop_token_ids(tokenizer, tiny_model)
    target = render_target(
        tokenizer, "Question?", prompt_ids, "The answer.", use_chat_template=True, stop_ids=stops
    )
    assert tokenizer.decode(target) == "The answer.<|im_end|>"
    plain_prompt = render_prompt(tokenizer, "Question?", use_chat_template=False)
    assert tokenizer.decode(plain_prompt) == "Question?"
    plain_target = render_target(
        tokenizer, "Question?", plain_prompt, "Yes.", use_chat_template=False, stop_ids=stops
    )
    assert tokenizer.decode(plain_target) == "Yes.<|im_end|>"


def test_text_chunks_cover_the_token_stream(tiny_model):
    from kd_shards.shared.tokenizer import load_tokenizer
    from kd_shards.teacher_dump.requests import text_requests

    tokenizer = load_tokenizer(tiny_model)
    texts = ["alpha beta gamma " * 40, "delta epsilon " * 30]
    requests = text_requests(texts, tokenizer, chunk_tokens=32, limit=None)
    stream = np.concatenate([np.concatenate([r.prompt_ids, r.target_ids]) for r in requests])
    expected = tokenizer("".join(t + "\n\n" for t in texts), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(stream, expected)
    assert all(len(r.prompt_ids) == 1 for r in requests)
    assert [r.source_index for r in requests] == list(range(len(requests)))
    assert len(text_requests(texts, tokenizer, chunk_tokens=32, limit=2)) == 2


def test_sample_seeds_are_stable_and_distinct():
    from kd_shards.teacher_dump.requests import sample_seed

    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(0, index) for index in range(1000)}) == 1000
    assert sample_seed(1, 5) != sample_seed(0, 5)


def test_written_shard_follows_the_schema_and_its_manifest_entry(tmp_path):
    from kd_shards.shared.files import sha256_of_file
    from kd_shards.teacher_dump.requests import DumpRequest
    from kd_shards.teacher_dump.rows import ScoredTarget, make_row
    from kd_shards.teacher_dump.shards import describe_shard, write_shard

    rows = [
        make_row(
            DumpRequest(index, np.array([1, 2]), None, prompt_text="p", references=("r",)),
            ScoredTarget(
                sample_id=f"{index}-0",
                completion_index=0,
                target_ids=np.array([3, 4, 5]),
                position_ids=np.array([[3, 3, 60], [4, 9, 4], [5, 70, 5]]),
                position_logprobs=np.log(
                    np.array([[0.5, 0.5, 0.2], [0.1, 0.6, 0.1], [0.3, 0.4, 0.3]])
                ),
                finish_reason="stop",
                target_text="t",
            ),
            tokenizer_size=50,
            storage=Storage("topk", top_k=2),
        )
        for index in range(3)
    ]
    path = tmp_path / "part-r00000-w00001-000000.parquet"
    storage = Storage("topk", top_k=2)
    entry = write_shard(path, rows, storage, 50)
    table = pq.read_table(path)
    assert table.schema.equals(shard_schema(storage), check_metadata=False)
    assert storage_of(table.schema) == storage and schema_version_of(table.schema) == 2
    assert entry == describe_shard(path)
    assert entry["sha256"] == sha256_of_file(path)
    assert (entry["rows"], entry["target_tokens"], entry["padded_topk_entries"]) == (3, 9, 6)
    first = table.slice(0, 1).to_pylist()[0]
    # padding-row ids (60, 70) are left out: 1, 2, 1 entries in rank order
    assert first["kd_count"] == [1, 2, 1]
    assert first["kd_ids"] == [3, 9, 4, 5]
    level = [round(-np.log(p) / LOGPROB_STEP) for p in (0.5, 0.6, 0.1, 0.3)]
    assert first["kd_drops"] == [level[0], level[1], level[2] - level[1], level[3]]
    # the tail: everything but the stored ids, on the 2^-6 grid of -ln(mass)
    assert first["kd_tail"] == [round(-np.log(1 - p) * 64) for p in (0.5, 0.7, 0.3)]
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_mode_holds_the_whole_interface_and_the_run_names_none():
    """Each --mode value is one module of teacher_dump/modes/ with every TeacherMode member;
    the run and the Ray executor drive them without naming any (and without importing each
    other)."""
    import ast
    import typing
    from pathlib import Path

    from kd_shards.teacher_dump.config import Mode
    from kd_shards.teacher_dump.modes import MODES
    from kd_shards.teacher_dump.modes.interface import TeacherMode

    assert sorted(MODES) == sorted(typing.get_args(Mode))
    members = set(TeacherMode.__annotations__) | {
        name for name in vars(TeacherMode) if not name.startswith("_")
    }
    assert {"NAME", "OWN_FIELDS", "start", "requests", "check_task"} <= members
    for name, mode in MODES.items():
        missing = sorted(member for member in members if not hasattr(mode, member))
        assert not missing, f"mode {name} lacks {missing}"
        assert name == mode.NAME
    root = Path(__file__).resolve().parents[1] / "teacher_dump"
    imports = {}
    for module in ("run.py", "ray_dump.py"):
        tree = ast.parse((root / module).read_text())
        literals = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & set(MODES), f"{module} names a mode"
        imports[module] = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }
    assert "kd_shards.teacher_dump.run" not in imports["ray_dump.py"]
