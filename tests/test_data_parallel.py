"""teacher-dump --data-parallel-size: 2 child processes, each a real vLLM engine on the tiny
model on its own CPU core. The reference is the session engine's single-engine dump of the same
prompts: the same rows. A dump started on one engine is finished by two, and one stopped on two
is finished by one (the identity ignores the number of engines). Bad input: more engines than
devices, a child that fails to start.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd_shards.shared.errors import UserError
from kd_shards.teacher_dump import data_parallel
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.inspect import validate
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.run import identity_of, run_dump
from tests.conftest import dump_config
from tests.dump_comparison import assert_same_rows, read_rows

SHARDS = 6
"""12 gsm8k prompts x 2 samples, 4 rows per shard."""


def options(**overrides) -> dict:
    # Sampled generation (each prompt's own seed), 2 prompts per batch.
    values = dict(
        mode="generate", temperature=1.0, num_samples=2, rows_per_shard=4, max_in_flight=2,
    )  # fmt: skip
    values.update(overrides)
    return values


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def watch_children(monkeypatch) -> list[int]:
    """The pids of the children the executor stops (each leads its own process group)."""
    pids, stop = [], data_parallel.stop
    monkeypatch.setattr(
        data_parallel,
        "stop",
        lambda children: (pids.extend(c.pid for c in children), stop(children)),
    )
    return pids


def remove_logs(message: str) -> None:
    """The children's logs are kept after a failure, for the user: the error names them."""
    logs = Path(message.split("(its log: ")[1].split(")")[0]).parent
    assert logs.is_dir()
    shutil.rmtree(logs)


def assert_all_gone(pids: list[int]) -> None:
    """No process is left in any child's group (its engine's processes included)."""
    assert pids
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("teacher-dump")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.engine
@pytest.mark.long
def test_two_engines_finish_and_hand_back_the_rows_of_one_engine(
    tiny_model, gsm8k_file, engine, tmp_path, capfd, monkeypatch
):
    children = watch_children(monkeypatch)
    # One test, as each data-parallel run costs two engine starts. The reference: one engine.
    out = tmp_path / "out"
    run_dump(dump_config(tiny_model, gsm8k_file, out, **options()), engine)
    reference = read_rows(out)
    assert len(reference) == 24 and len(shard_paths(out)) == SHARDS
    # That dump stopped after 2 shards (the others lost), finished by two engines.
    for path in shard_paths(out)[2:]:
        path.unlink()
    config = dump_config(tiny_model, gsm8k_file, out, **options(data_parallel_size=2))
    manifest = run_dump(config)
    assert manifest["complete"] and manifest["totals"]["rows"] == 24
    assert manifest["engine"]["version"] and manifest["teacher"]["dtype"] == "float32"
    assert_same_rows(read_rows(out), reference)
    assert validate(out) == []
    # Each engine had its own core (2 cores: one each), and none outlives the dump.
    err = capfd.readouterr().err
    assert (
        "teacher-dump: 2 data-parallel engines (rank 0: {'VLLM_CPU_OMP_THREADS_BIND': '0'}; "
        "rank 1: {'VLLM_CPU_OMP_THREADS_BIND': '1'}" in err
    )
    assert_all_gone(children)
    # Stopped with two engines (its last 2 shards lost), finished by one.
    for path in shard_paths(out)[-2:]:
        path.unlink()
    manifest = run_dump(dump_config(tiny_model, gsm8k_file, out, **options()), engine)
    assert manifest["complete"] and manifest["totals"]["rows"] == 24
    assert_same_rows(read_rows(out), reference)


@pytest.mark.engine
@pytest.mark.long
def test_a_child_that_cannot_start_its_engine_fails_the_dump_naming_its_rank(
    tiny_model, gsm8k_file, tmp_path, monkeypatch
):
    children = watch_children(monkeypatch)
    # vLLM refuses the memory fraction in each child, after the parent's checks passed.
    config = dump_config(
        tiny_model, gsm8k_file, tmp_path / "out",
        **options(data_parallel_size=2, gpu_memory_utilization=1.5),
    )  # fmt: skip
    with pytest.raises(UserError) as caught:
        run_dump(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "data-parallel rank" in message and "could not start the teacher engine" in message
    assert "gpu_memory_utilization" in message
    assert_all_gone(children)
    assert shard_paths(tmp_path / "out") == []
    remove_logs(message)


def test_more_engines_than_visible_gpus_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(data_parallel, "visible_gpus", lambda: ["3", "5", "6"])
    wide = DumpConfig(
        model="m", data="gsm8k", out=str(tmp_path), data_parallel_size=2, tensor_parallel_size=2
    )
    with pytest.raises(UserError, match="needs 4 GPUs, 3 are visible"):
        run_dump(wide)  # before the model is even resolved
    fitting = DumpConfig(model="m", data="gsm8k", out=str(tmp_path), data_parallel_size=3)
    assert data_parallel.rank_environments(fitting) == [
        {"CUDA_VISIBLE_DEVICES": gpu} for gpu in ("3", "5", "6")
    ]


def test_cpu_engines_get_their_own_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(data_parallel, "visible_gpus", lambda: [])
    monkeypatch.setattr(data_parallel.os, "sched_getaffinity", lambda _: set(range(8)))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)

    def bindings(ranks: int, width: int = 1) -> list[str]:
        config = DumpConfig(
            model="m", data="gsm8k", out=str(tmp_path),
            data_parallel_size=ranks, tensor_parallel_size=width,
        )  # fmt: skip
        return [
            each["VLLM_CPU_OMP_THREADS_BIND"] for each in data_parallel.rank_environments(config)
        ]

    assert bindings(2) == ["0-3", "4-7"]
    assert bindings(3) == ["0-1", "2-3", "4-5"]
    assert bindings(2, width=2) == ["0-1|2-3", "4-5|6-7"]
    with pytest.raises(UserError, match="needs at least 9 CPU cores, this process may use 8"):
        bindings(9)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0,2|1,3")
    assert bindings(2) == ["0,2", "1,3"]
    with pytest.raises(UserError, match="holds 2 CPU lists"):
        bindings(4)


def test_data_parallel_size_is_not_part_of_the_identity_and_needs_a_local_token_dump(tmp_path):
    base = dict(model="m", data="gsm8k", out=str(tmp_path))
    assert identity_of(DumpConfig(**base, data_parallel_size=4)) == identity_of(DumpConfig(**base))
    with pytest.raises(UserError, match="with --executor ray use --ray-workers"):
        DumpConfig(**base, data_parallel_size=2, executor="ray")
    with pytest.raises(UserError, match="--data-parallel-size 1 for --mode classify"):
        DumpConfig(**base, data_parallel_size=2, mode="classify")
    with pytest.raises(UserError, match="at least 1"):
        DumpConfig(**base, data_parallel_size=0)


class DiesOnArrival:
    """A plan whose unpickling ends the child at once (a crash before it can say a word)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_child_that_dies_without_a_word_fails_the_dump_naming_its_rank(monkeypatch, tmp_path):
    children = watch_children(monkeypatch)
    monkeypatch.setattr(data_parallel, "visible_gpus", lambda: [])
    config = DumpConfig(
        model="m", data="gsm8k", out=str(tmp_path), data_parallel_size=2, max_in_flight=1
    )
    todo = [
        DumpRequest(index, np.array([1, 2], dtype=np.int32), None, "prompt", ())
        for index in range(3)
    ]
    results = data_parallel.data_parallel_results(
        config, tmp_path, DiesOnArrival(), todo, on_engine=lambda description: None
    )
    with pytest.raises(UserError) as caught:
        next(results)
    assert re.fullmatch(
        r"data-parallel rank [01] failed: it exited without a message .*", str(caught.value)
    )
    assert_all_gone(children)
    remove_logs(str(caught.value))
