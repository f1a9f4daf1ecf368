"""teacher-dump --executor ray: the same dump as a Ray Data pipeline. The only module that
imports ray.

    this rank's remaining prompts ──ray.data──► N actors, one vLLM engine each (TeacherWorker)
        ──rows as Arrow tables──► this process ──ShardWriter──► the same shards and manifest

Ray places the engines (one per GPU, or per --tensor-parallel-size GPUs), feeds them batches
of prompts and restarts what fails; kd-shards schedules nothing itself. The process that runs
teacher-dump stays the only writer, so shards, the manifest, resume (a rerun skips the prompts
already in shards) and the shard contract are those of the local executor: rows depend only on
the prompt and its seed, not on which engine ran it. A batch's rows are written when it comes
back, so a killed run loses at most the batches in flight. --rank/--world-size still split the
prompts between independent runs (one Ray job per Slurm array task, say).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from kd_shards.shared.config import config_to_dict
from kd_shards.teacher_dump.config import DumpConfig
from kd_shards.teacher_dump.modes import MODES
from kd_shards.teacher_dump.modes.interface import resolve_teacher
from kd_shards.teacher_dump.requests import DumpRequest
from kd_shards.teacher_dump.rows import ShardRow, rows_from_table
from kd_shards.teacher_dump.shards import rows_to_transfer_table

ENGINE_COLUMN = "engine"
"""An extra column of each batch the actors return: their engine's description (JSON)."""


class TeacherWorker:
    """A Ray Data actor: the mode's Teacher (teacher_dump.modes.interface) on one vLLM engine;
    maps a batch of prompts to the Arrow table of their rows
    (teacher_dump.shards.rows_to_transfer_table) plus ENGINE_COLUMN."""

    def __init__(self, config_values: dict, model_directory: str, plan: object):
        values = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in config_values.items()
        }
        # The driver resolved the model already: actors load that directory.
        self.config = replace(DumpConfig(**values), model=model_directory, revision=None)
        inputs = resolve_teacher(self.config)
        self.teacher = MODES[self.config.mode].start(self.config, inputs, plan)
        self.description = json.dumps(self.teacher.description())

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        requests = [
            DumpRequest(
                source_index=int(batch["source_index"][index]),
                prompt_ids=np.asarray(batch["prompt_ids"][index], dtype=np.int32),
                target_ids=(
                    np.asarray(batch["target_ids"][index], dtype=np.int32)
                    if batch["has_target"][index]
                    else None
                ),
                prompt_text=str(batch["prompt_text"][index]),
                references=tuple(str(text) for text in batch["references"][index]),
            )
            for index in range(len(batch["source_index"]))
        ]
        rows = [row for _, prompt_rows in self.teacher.rows(requests) for row in prompt_rows]
        # Stage 1 of the encoding only: the writer's shard decides the shard-level coding.
        vocabulary = len(self.teacher.tokenizer)
        table = rows_to_transfer_table(rows, self.config.storage(vocabulary), vocabulary)
        return table.append_column(ENGINE_COLUMN, pa.array([self.description] * len(rows)))


def request_item(request: DumpRequest) -> dict:
    """One prompt as a Ray Data item (plain lists and strings)."""
    target = request.target_ids.tolist() if request.target_ids is not None else []
    return {
        "source_index": request.source_index,
        "prompt_ids": request.prompt_ids.tolist(),
        "target_ids": target,
        "has_target": request.target_ids is not None,
        "prompt_text": request.prompt_text,
        "references": list(request.references),
    }


def ray_results(
    config: DumpConfig,
    model_directory: Path,
    plan: object,
    todo: list[DumpRequest],
    *,
    on_engine: Callable[[dict], None],
) -> Iterator[tuple[DumpRequest, list[ShardRow]]]:
    """Each prompt of `todo` with its rows, as the actors return them (in no fixed order);
    `plan`: the mode's (ModeRequests.plan), sent to every actor; `on_engine(description)` is
    called once, with the first engine's description."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=config.ray_address,
            num_cpus=None if config.ray_address else config.ray_workers + 1,
            include_dashboard=False,
            log_to_driver=False,
            # The actors import this same kd-shards, wherever the driver imports it from.
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
        )
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        dataset = ray.data.from_items([request_item(request) for request in todo])
        rows = dataset.map_batches(
            TeacherWorker,
            fn_constructor_kwargs={
                "config_values": config_to_dict(config),
                "model_directory": str(model_directory),
                "plan": plan,
            },
            # No more engines than batches: an actor still starting its engine when the dump
            # ends has been seen to outlive the local cluster's shutdown.
            concurrency=min(config.ray_workers, math.ceil(len(todo) / config.max_in_flight)),
            batch_size=config.max_in_flight,
            batch_format="numpy",
            num_gpus=config.tensor_parallel_size if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
        by_index = {request.source_index: request for request in todo}
        recorded = False
        for table in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            if not table.num_rows:
                continue
            if not recorded:
                on_engine(json.loads(table[ENGINE_COLUMN][0].as_py()))
                recorded = True
            prompt_rows: dict[int, list[ShardRow]] = {}
            for row in rows_from_table(table.drop_columns([ENGINE_COLUMN])):
                prompt_rows.setdefault(row.source_index, []).append(row)
            for source_index, each in prompt_rows.items():
                yield by_index[source_index], sorted(each, key=lambda row: row.completion_index)
    finally:
        if started_here:
            ray.shutdown()
            print("teacher-dump: the local Ray cluster was shut down", file=sys.stderr)
