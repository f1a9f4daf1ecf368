"""The shard writer beside the engine (teacher_dump.pipeline): the same bytes from every --writer,
errors that fail the dump instead of hanging it, a bounded queue; and the synthetic engine of
`make bench --only writer` (scripts/bench_writer.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kd_shards.shared.errors import UserError
from scripts.bench_writer import PacedClock, PacedEngine, drawn_top_k, draws_of
from tests.conftest import dump_config


def paced_engine(config, vocabulary: int, positions: int = 64) -> PacedEngine:
    """An infinitely fast synthetic engine of drawn distributions for `config`'s --store."""
    generator = np.random.default_rng(5)
    width = config.engine_logprobs
    pool = [drawn_top_k(generator, positions, width, vocabulary) for _ in range(3)]
    if config.store == "sampled":
        pool = [draws_of(generator, ids, logprobs) for ids, logprobs in pool]
    settings = SimpleNamespace(
        max_logprobs=width, sampled_logprobs=config.store == "sampled", dtype="float32"
    )
    return PacedEngine(pool, None, settings)


def text_config(tiny_model, text_file, out, **overrides):
    values = dict(data="text", mode="text", chunk_tokens=48, limit=20, rows_per_shard=3)
    return dump_config(tiny_model, text_file, out, **{**values, **overrides})


def comparable(manifest: dict) -> dict:
    """A manifest without what differs between two --out directories and two runs: the
    timestamps, --out and the writer's settings, and the identity (a hash over --out)."""
    local = ("out", "writer", "encoding_processes")
    config = {key: value for key, value in manifest["config"].items() if key not in local}
    skipped = ("created", "updated", "identity", "config")
    return {
        **{key: value for key, value in manifest.items() if key not in skipped},
        "config": config,
    }


@pytest.mark.parametrize("store", ["topk", "adaptive", "sampled"])
def test_every_writer_writes_the_same_shard_bytes_and_manifest(
    tiny_model, text_file, tmp_path, store
):
    from kd_shards.shared.tokenizer import load_tokenizer
    from kd_shards.teacher_dump.run import run_dump

    vocabulary = len(load_tokenizer(tiny_model))
    dumps = {}
    for writer, encoders in (("inline", 0), ("thread", 0), ("process", 0), ("process", 2)):
        out = tmp_path / f"{writer}-{encoders}"
        config = text_config(
            tiny_model, text_file, out, store=store, top_k=8, writer=writer,
            encoding_processes=encoders,
        )  # fmt: skip
        manifest = run_dump(config, paced_engine(config, vocabulary))
        assert manifest["complete"] and manifest["totals"]["shards"] > 2
        shards = {path.name: path.read_bytes() for path in sorted(out.glob("part-*.parquet"))}
        dumps[writer, encoders] = (shards, comparable(manifest))
    assert dumps["thread", 0] == dumps["inline", 0]
    assert dumps["process", 0] == dumps["inline", 0]
    assert dumps["process", 2] == dumps["inline", 0]


def writer_spec(out: Path, rows_per_shard: int = 2):
    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.pipeline import WriterSpec

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"shards": [], "data": {"expected_rows": 99}}))
    storage = DumpConfig(model="m", data="text", out=str(out), store="adaptive").storage(500)
    return WriterSpec(str(out), 0, 1, rows_per_shard, storage, 500, False)


def prompt_rows(index: int, positions: int = 6, broken: bool = False):
    """One prompt's row with the engine's entries (`broken`: logprobs of the wrong shape, which
    only the writer's encoding trips over)."""
    from kd_shards.teacher_dump.rows import EngineEntries, ShardRow

    ids, logprobs = drawn_top_k(np.random.default_rng(index), positions, 40, 500)
    if broken:
        logprobs = logprobs[:-1]
    return [
        ShardRow(
            sample_id=str(index),
            source_index=index,
            completion_index=0,
            prompt_ids=np.array([1], np.int32),
            target_ids=ids[:, 0].copy(),
            target_logprobs=np.round(logprobs[:, 0], 2),
            entries=EngineEntries(ids, logprobs),
            finish_reason="text",
            prompt_text="",
            target_text="",
            references=(),
            padded_topk_entries=0,
        )  # fmt: skip
    ]


def shard_sources(out: Path) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(
        index
        for path in out.glob("part-*.parquet")
        for index in pq.read_table(path, columns=["source_index"])["source_index"].to_pylist()
    )


@pytest.mark.parametrize("encoders", [0, 2])
def test_an_error_in_the_writer_process_fails_the_dump_and_keeps_the_shards_before_it(
    tmp_path, encoders
):
    from kd_shards.teacher_dump.pipeline import QueuedWriter
    from kd_shards.teacher_dump.shards import done_source_indices

    out = tmp_path / "out"
    writer = QueuedWriter(writer_spec(out), "process", encoders=encoders)
    with pytest.raises(ValueError):  # the child's own error, re-raised here
        try:
            for index in range(12):
                writer.put(prompt_rows(index, broken=index == 5), None)
            writer.finish()
        finally:
            writer.close()
    assert not any(worker.is_alive() for worker in writer.workers)
    written = shard_sources(out)
    manifest = json.loads((out / "manifest.json").read_text())
    # Only complete shards of two prompts each, all listed, from the prompts before the broken
    # one; what was still queued is not written (the rerun redoes it).
    assert written == sorted(done_source_indices(out)) == list(range(len(written)))
    assert [entry["rows"] for entry in manifest["shards"]] == [2] * (len(written) // 2)
    assert not list(out.glob(".tmp-*"))
    if encoders == 0:  # the writer itself trips on prompt 5: 0-3 are written, 4 was buffered
        assert written == [0, 1, 2, 3]


def test_a_user_error_in_the_writer_process_arrives_as_one_line(tmp_path):
    from kd_shards.teacher_dump.pipeline import QueuedWriter

    out = tmp_path / "out"
    spec = writer_spec(out)
    # Another rank's corrupt shard: the writer's manifest refresh refuses it.
    (out / "part-r00001-w00002-000000.parquet").write_bytes(b"not parquet")
    writer = QueuedWriter(spec, "process")
    with pytest.raises(UserError) as caught:
        try:
            for index in range(6):
                writer.put(prompt_rows(index), None)
            writer.finish()
        finally:
            writer.close()
    message = str(caught.value)
    assert "\n" not in message and "part-r00001-w00002-000000.parquet is unreadable" in message


def test_a_killed_writer_process_fails_the_dump_instead_of_hanging_it(tmp_path):
    from kd_shards.teacher_dump.pipeline import QueuedWriter

    writer = QueuedWriter(writer_spec(tmp_path / "out"), "process", queue_prompts=2)
    writer.put(prompt_rows(0), None)
    os.kill(writer.worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="shard writer stopped without a word"):
        try:
            for index in range(1, 50):  # more than the queue holds: put would block forever
                writer.put(prompt_rows(index), None)
            writer.finish()
        finally:
            writer.close()


def test_the_queue_is_bounded_and_the_loop_waits_for_a_writer_behind(tmp_path, monkeypatch):
    from kd_shards.teacher_dump import pipeline

    release = threading.Event()
    real_add = pipeline.PromptWriter.add

    def add_when_released(writer, rows, judged):
        release.wait()
        real_add(writer, rows, judged)

    monkeypatch.setattr(pipeline.PromptWriter, "add", add_when_released)
    out = tmp_path / "out"
    writer = pipeline.QueuedWriter(writer_spec(out), "thread", queue_prompts=2)
    handed = []

    def loop():
        for index in range(10):
            writer.put(prompt_rows(index), None)
            handed.append(index)
        writer.finish()

    feeder = threading.Thread(target=loop)
    feeder.start()
    deadline = time.monotonic() + 60
    while not (writer.items.full() and len(handed) == 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    # One prompt with the (stuck) writer, two in the queue; the fourth waits to be queued.
    assert writer.items.full() and handed == [0, 1, 2]
    feeder.join(0.5)
    assert feeder.is_alive() and handed == [0, 1, 2]
    release.set()
    feeder.join()
    assert handed == list(range(10)) and shard_sources(out) == list(range(10))


def test_the_paced_clock_finishes_requests_at_the_rate_within_its_window():
    clock = PacedClock(rate=1000.0, window=2, start=10.0)
    # Requests 0 and 1 enter at the start and run one after the other: 100 tokens = 0.1 s.
    assert clock.finish_time(0, 100) == pytest.approx(10.1)
    clock.took(0, 10.15)
    assert clock.finish_time(1, 50) == pytest.approx(10.15)
    clock.took(1, 10.9)  # the loop was busy: request 3 cannot enter before 10.9
    # Request 2 entered when result 0 was taken (10.15) and starts once request 1 is done.
    assert clock.finish_time(2, 100) == pytest.approx(10.25)
    clock.took(2, 10.95)
    assert clock.finish_time(3, 100) == pytest.approx(11.0)
    fast = PacedClock(rate=None, window=1, start=3.0)
    assert fast.finish_time(0, 10**6) == 3.0
    fast.took(0, 4.0)
    assert fast.finish_time(1, 10**6) == 4.0


def test_text_chunks_with_a_limit_tokenize_only_the_blocks_they_need(tiny_model):
    from kd_shards.shared.tokenizer import TEXT_BLOCK_CHARACTERS, chunk_text, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    lines = [
        f"line {index} of the text, word {index * 7 % 13} and more\n" for index in range(40_000)
    ]
    text = "".join(lines)  # about 11 blocks
    asked = []

    class Counting:
        """The tokenizer, counting the characters it is asked to tokenize."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, blocks, **options):
            asked.append(sum(map(len, blocks)))
            return tokenizer(blocks, **options)

    everything = chunk_text([text], tokenizer, chunk_tokens=64, limit=None)
    first = chunk_text([text], Counting(), chunk_tokens=64, limit=20)
    assert len(everything) > 1000 and len(first) == 20
    assert all(np.array_equal(a, b) for a, b in zip(first, everything[:20], strict=True))
    assert sum(asked) <= 4 * TEXT_BLOCK_CHARACTERS + 1000 < len(text) / 2
