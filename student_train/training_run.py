"""The state of one student-train run: what the loop reads and updates, step by step.

Built by student_train.train.setup, advanced by its loop, saved and restored by
student_train.training_state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd_shards.shared.shard_reader import Dump
from kd_shards.student_train.batches import BatchShape
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.family import Objective
from kd_shards.student_train.reporting import METRICS_NAME, append_metrics
from kd_shards.student_train.shard_stream import ShardStream
from kd_shards.student_train.sharding import ShardedStudent
from kd_shards.student_train.student import Student


@dataclass
class TrainingRun:
    """Everything the loop reads and updates; built by `setup`, advanced by `loop`."""

    config: TrainConfig
    context: Distributed
    out: Path
    dump: Dump
    eval_dump: Dump | None
    student: Student
    objective: Objective
    """What a step computes: the objective of the student's family (student_train/family.py)."""
    read_group: object
    """Reads one row group for the stream (None: from the dump's shards)."""
    columns: tuple[str, ...]
    """The shard columns the objective reads."""
    batch_shape: BatchShape
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: ShardStream
    total_steps: int
    progress: object
    sharded: ShardedStudent | None = None
    """The FSDP2 root around the student (--parallel fsdp), else None."""
    step: int = 0
    tokens_seen: int = 0
    checkpoint: Path | None = None
    """The newest checkpoint written or resumed from."""
    saved_step: int | None = None
    """The step of `checkpoint` (None: nothing saved in this run or the one it resumes)."""
    last_train: dict = field(default_factory=dict)
    last_eval: dict | None = None
    stopped_early: bool = False
    training_seconds: float = 0.0
    tokens_at_start: int = 0

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_NAME

    def log(self, values: dict) -> None:
        if self.context.is_main:
            append_metrics(self.metrics_path, values)
