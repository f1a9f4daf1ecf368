"""teacher-dump --executor ray: a local Ray cluster, 2 actors each with a real vLLM engine on the
tiny model. The reference is the single-process dump (the local executor) of the same prompts:
the same rows. A run killed with SIGKILL mid-dump resumes (on 2 actors) to the same rows, none
twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from kd_shards.teacher_dump.inspect import validate
from kd_shards.teacher_dump.run import run_dump
from tests.conftest import REPO, cli_command, dump_config
from tests.dump_comparison import assert_same_rows, read_rows

pytest.importorskip("ray")
pytestmark = [pytest.mark.engine, pytest.mark.long]

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

CHUNKS = 96
"""Enough chunks that the killed 1-actor run cannot finish between two polls for its first
shard: with 12, a quiet machine wrote all of them within one 0.2 s poll."""


def published_shards(out) -> int:
    """How many shards the dump's manifest lists: a part file on disk is not yet published (the
    manifest is written after it), so killing at its first sight can leave no rows to resume."""
    try:
        return len(json.loads((out / "manifest.json").read_text()).get("shards", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def ray_options(**overrides) -> dict:
    # Text mode, 2 prompts per actor call and per shard.
    options = dict(
        data="text", mode="text", chunk_tokens=64, limit=CHUNKS, rows_per_shard=2,
        executor="ray", ray_workers=2, max_in_flight=2,
    )  # fmt: skip
    options.update(overrides)
    return options


@pytest.fixture(scope="module")
def reference(tiny_model, text_file, engine, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("local")
    options = ray_options(executor="local")
    run_dump(dump_config(tiny_model, text_file, out, **options), engine)
    return read_rows(out)


def test_a_killed_ray_dump_resumes_to_the_rows_of_the_single_process_dump(
    tiny_model, text_file, reference, tmp_path
):
    # One test for both acceptance items, as each Ray start costs its engines (minutes on 2
    # cores): a 1-actor run is SIGKILLed after its first shard, then 2 actors finish the dump
    # in-process; the rows must be the single-process dump's, none twice.
    out = tmp_path / "ray"
    arguments = [
        "--model", str(tiny_model), "--data", "text", "--mode", "text",
        "--data-path", str(text_file), "--chunk-tokens", "64", "--limit", str(CHUNKS),
        "--rows-per-shard", "2", "--store", "topk", "--top-k", "8", "--dtype", "float32",
        "--max-model-len", "512",
        "--enforce-eager", "--max-new-tokens", "12", "--out", str(out), "--no-progress",
        "--executor", "ray",
        "--ray-workers", "1", "--set", "max_in_flight=2",
    ]  # fmt: skip
    process = subprocess.Popen(
        cli_command(*arguments), cwd=REPO, env=ENVIRONMENT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    try:
        while not published_shards(out) and time.monotonic() < deadline:
            assert process.poll() is None, "the dump ended before it could be killed"
            time.sleep(0.02)
    finally:
        # The whole session: the driver and the Ray cluster it started (its actors included).
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    partial = read_rows(out)
    assert len(reference) == CHUNKS  # the text holds that many chunks
    assert 0 < len(partial) < CHUNKS  # killed part-way
    manifest = run_dump(dump_config(tiny_model, text_file, out, **ray_options()))
    assert manifest["complete"] and manifest["totals"]["rows"] == CHUNKS
    assert manifest["engine"]["version"] and manifest["teacher"]["dtype"] == "float32"
    assert_same_rows(read_rows(out), reference)
    assert validate(out) == []
