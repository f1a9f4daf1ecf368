"""teacher-dump --data-parallel-size N: N vLLM engines on this node, one child process each (one
engine process per DP rank, as vLLM recommends for offline work), without Ray.

    this rank's remaining prompts ──queue of --max-in-flight batches──► N child processes, each
        the mode's Teacher on its own engine (its own GPUs or CPU cores)
        ──rows as Arrow IPC bytes──► this process ──ShardWriter──► the same shards and manifest

A child takes the next batch when it has finished its last, so a faster engine takes more. This
process stays the only writer: shards, the manifest, resume and the shard contract are those of
the local executor, and rows depend only on the prompt and its seed, not on the engine that ran
it. Each child gets its devices in its environment before it imports vLLM: on CUDA its slice of
--tensor-parallel-size visible GPUs (CUDA_VISIBLE_DEVICES), on CPU its slice of this process's
cores (VLLM_CPU_OMP_THREADS_BIND). A child that fails stops the dump with an error naming its
rank and its last error line; the rows written until then stay (a rerun resumes).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from kd_shards.shared.errors import UserError, one_line
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ShardRow

POLL_SECONDS = 1.0
"""How often a waiting process looks whether the other side is still alive."""

CLOSE_SECONDS = 30.0
"""How long the children may take to close their engines once every row is in."""

CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use (CUDA_VISIBLE_DEVICES' entries when it is set);
    [] without CUDA (a CPU build of vLLM)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]
    return [str(index) for index in range(count)]


def rank_environments(config: DumpConfig) -> list[dict[str, str]]:
    """Each data-parallel rank's device variables, set before its child imports vLLM."""
    ranks, width = config.data_parallel_size, config.tensor_parallel_size
    flags = f"--data-parallel-size {ranks} x --tensor-parallel-size {width}"
    gpus = visible_gpus()
    if gpus:
        if ranks * width > len(gpus):
            raise UserError(
                f"{flags} needs {ranks * width} GPUs, {len(gpus)} are visible: lower "
                "--data-parallel-size (or use --executor ray or Slurm --rank/--world-size "
                "across nodes)"
            )
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(gpus[rank * width : (rank + 1) * width])}
            for rank in range(ranks)
        ]
    return [{CPU_BIND: binding} for binding in cpu_bindings(ranks, width, flags)]


def cpu_bindings(ranks: int, width: int, flags: str) -> list[str]:
    """Each rank's VLLM_CPU_OMP_THREADS_BIND: its own contiguous slice of this process's cores
    ('|' between its tensor-parallel workers). A user's value of N x TP '|'-separated lists is
    split the same way; 'nobind' is kept for every rank."""
    given = os.environ.get(CPU_BIND, "auto")
    if given == "nobind":
        return [given] * ranks
    if given != "auto":
        lists = given.split("|")
        if len(lists) != ranks * width:
            raise UserError(
                f"{CPU_BIND}={given} holds {len(lists)} CPU lists, {flags} needs "
                f"{ranks * width} ('|'-separated, one per engine worker): fix it or unset it"
            )
        return ["|".join(lists[rank * width : (rank + 1) * width]) for rank in range(ranks)]
    cpus = sorted(os.sched_getaffinity(0))
    if ranks * width > len(cpus):
        raise UserError(
            f"{flags} needs at least {ranks * width} CPU cores, this process may use "
            f"{len(cpus)}: lower --data-parallel-size"
        )
    share = len(cpus) // (ranks * width)
    workers = [cpus[index * share : (index + 1) * share] for index in range(ranks * width)]
    return [
        "|".join(cpu_list(cores) for cores in workers[rank * width : (rank + 1) * width])
        for rank in range(ranks)
    ]


def cpu_list(cores: list[int]) -> str:
    """Core ids as vLLM reads them: '4' or '4-7' (contiguous) or '1,3,6'."""
    if cores == list(range(cores[0], cores[-1] + 1)):
        return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"
    return ",".join(str(core) for core in cores)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while a child is started (a spawned child inherits it)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(rank: int, config: DumpConfig, plan: object, log: str, tasks, results) -> None:
    """A child's life: its own session and log, the mode's Teacher on its own engine, then
    batches of requests from `tasks` until None, each answered on `results` as Arrow IPC bytes
    (or one ("failed", rank, line) message)."""
    os.setsid()  # the parent stops this child and its engine's processes as one group
    with open(log, "ab", buffering=0) as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    parent = os.getppid()
    try:
        from kd_shards.teacher_dump.modes import MODES
        from kd_shards.teacher_dump.modes.interface import resolve_teacher

        teacher = MODES[config.mode].start(config, resolve_teacher(config), plan)
        results.put(("ready", rank, json.dumps(teacher.description())))
        try:
            while (batch := next_batch(tasks, parent)) is not None:
                results.put(("rows", rank, batch_bytes(teacher, batch)))
        finally:
            teacher.close()
    except BaseException as error:
        traceback.print_exc()
        line = str(error) if isinstance(error, UserError) else one_line(error, 300)
        results.put(("failed", rank, line))
        results.close()
        results.join_thread()
        sys.exit(1)
    results.put(("done", rank, None))


def next_batch(tasks, parent: int) -> list[DumpRequest] | None:
    """The next batch of requests; None when there are no more or the parent has gone."""
    while True:
        try:
            return tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def batch_bytes(teacher, batch: list[DumpRequest]) -> bytes:
    """The rows of `batch` as one Arrow IPC stream (teacher_dump.shards.rows_to_transfer_table)."""
    import pyarrow as pa

    from kd_shards.teacher_dump.shards import rows_to_transfer_table

    rows = [row for _, prompt_rows in teacher.rows(batch) for row in prompt_rows]
    vocabulary = len(teacher.tokenizer)
    table = rows_to_transfer_table(rows, teacher.config.storage(vocabulary), vocabulary)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def rows_of(payload: bytes) -> dict[int, list[ShardRow]]:
    """A child's answer back as each prompt's rows (by source index, in completion order)."""
    import pyarrow as pa

    from kd_shards.teacher_dump.rows import rows_from_table

    prompt_rows: dict[int, list[ShardRow]] = {}
    for row in rows_from_table(pa.ipc.open_stream(payload).read_all()):
        prompt_rows.setdefault(row.source_index, []).append(row)
    return {
        index: sorted(rows, key=lambda row: row.completion_index)
        for index, rows in prompt_rows.items()
    }


def data_parallel_results(
    config: DumpConfig,
    model_directory: Path,
    plan: object,
    todo: list[DumpRequest],
    *,
    on_engine: Callable[[dict], None],
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Each prompt of `todo` with its rows, as the children return them (in no fixed order);
    `plan`: the mode's (ModeRequests.plan), sent to every child; `on_engine(description)` is
    called once, with the first engine's description."""
    environments = rank_environments(config)
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    tasks.cancel_join_thread()  # batches no child took are dropped when the dump fails
    size = config.max_in_flight
    batches = [todo[start : start + size] for start in range(0, len(todo), size)]
    ranks = min(config.data_parallel_size, len(batches))  # no more engines than batches
    for batch in [*batches, *[None] * ranks]:
        tasks.put(batch)
    # The children load the directory this process resolved.
    child_config = replace(config, model=str(model_directory), revision=None)
    logs = Path(tempfile.mkdtemp(prefix="teacher-dump-ranks-"))
    children = []
    print(
        f"teacher-dump: {ranks} data-parallel engines ("
        + "; ".join(f"rank {rank}: {environments[rank]}" for rank in range(ranks))
        + f"; their logs: {logs})",
        file=sys.stderr,
    )
    failed = True
    try:
        for rank in range(ranks):
            with environment(environments[rank]):
                child = context.Process(
                    target=serve,
                    args=(rank, child_config, plan, str(logs / f"rank-{rank}.log"), tasks, results),
                    name=f"teacher-dump-rank-{rank}",
                )
                child.start()
            children.append(child)
        by_index = {request.source_index: request for request in todo}
        pending, recorded = len(batches), False
        while pending:
            kind, rank, payload = next_message(results, children, logs)
            if kind == "ready" and not recorded:
                on_engine(json.loads(payload))
                recorded = True
            elif kind == "rows":
                pending -= 1
                for source_index, rows in rows_of(payload).items():
                    yield by_index[source_index], rows
        # Every row is in: the children close their engines, or are killed after a while (one
        # still starting its engine would only close it).
        deadline = time.monotonic() + CLOSE_SECONDS
        for child in children:
            child.join(timeout=max(deadline - time.monotonic(), 0))
        failed = False
    finally:
        stop(children)
        tasks.close()
        if not failed:
            shutil.rmtree(logs, ignore_errors=True)


def next_message(results, children: list, logs: Path) -> tuple[str, int, object]:
    """The next message of a child; UserError when one failed or died without a word."""
    while True:
        try:
            kind, rank, payload = results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            check_alive(children, logs)
            continue
        if kind == "failed":
            raise UserError(failure(rank, payload, logs))
        return kind, rank, payload


def check_alive(children: list, logs: Path) -> None:
    """UserError for the first child that died without a message (a crash, a kill)."""
    for rank, child in enumerate(children):
        if child.exitcode is not None and child.exitcode != 0:
            raise UserError(failure(rank, last_line(logs / f"rank-{rank}.log"), logs))


def failure(rank: int, line: str, logs: Path) -> str:
    return (
        f"data-parallel rank {rank} failed: {line} (its log: {logs / f'rank-{rank}.log'}); "
        "fix the cause and rerun the same command: it resumes from the shards written"
    )


def last_line(path: Path) -> str:
    """The last non-empty line of a child's log (what it printed before dying)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip()[:300] if lines else "it exited without a message"


GROUP_EXIT_SECONDS = 20.0
"""How long stop waits for a killed child's process group to be gone."""


def stop(children: list) -> None:
    """Kill what is left of each child's process group (its engine's processes included)."""
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.kill()  # one killed before its setsid has no group yet
        child.join(timeout=30)
    # The group's other processes (the engine's) are reaped by init, not by us: wait until they
    # are gone, so that no engine process outlives the dump that started it.
    deadline = time.monotonic() + GROUP_EXIT_SECONDS
    for child in children:
        while time.monotonic() < deadline:
            try:
                os.killpg(child.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
