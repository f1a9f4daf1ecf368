"""The interface between the training loop and a family of student models.

A family (student_train/families/) knows one kind of model: how to load it (optionally with
LoRA, and from a checkpoint to resume), which shard columns it reads, how rows become a batch,
and the forward that yields its logits (and any hidden states) at the positions that carry
loss. What it hands the loop is an `Objective`: loss SUMS per micro-batch, the divisor of a
step, the evaluation on --eval-shards and any trained module besides the student. The loop in
student_train/train.py, the optimizer, checkpoints and the losses' math are the same for every
family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kd_shards.shared.shard_reader import Dump, TrainingRow
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed
from kd_shards.student_train.student import Student

SUMS_WIDTH = 4
"""A batch's loss sums: [total, ce, kd, hidden] (hidden: a family's representation loss, 0 when
it has none)."""


class Batch(Protocol):
    """What the loop reads of a family's micro-batch."""

    @property
    def rows(self) -> int: ...

    @property
    def target_tokens(self) -> int:
        """The batch's share of the step's divisor (target tokens, or examples)."""
        ...

    sample_ids: tuple[str, ...]


class Objective(Protocol):
    """What one training step computes for a family's student."""

    unit: str
    """What the step's sums are divided by, in words ("target tokens", "examples")."""
    modules: list[torch.nn.Module]
    """Trained modules besides the student (their parameters join the optimizer)."""

    def batch(self, rows: list[TrainingRow]) -> Batch:
        """Collate stream rows into a micro-batch (pure: no model, no device)."""
        ...

    def sums(self, model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        """(SUMS_WIDTH,) loss sums of one micro-batch, with gradients."""
        ...

    def evaluation_sums(
        self,
        model: torch.nn.Module,
        batches: Iterable[list[TrainingRow]],
        device: torch.device,
        bf16: bool,
    ) -> torch.Tensor:
        """Sums over held-out rows (summed over ranks by the caller), without gradients."""
        ...

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        """The eval_* metrics from the summed evaluation_sums."""
        ...

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trained modules besides the student, by file name, saved beside its weights."""
        ...


@dataclass(frozen=True)
class FamilySetup:
    """A loaded student and what training it needs."""

    student: Student
    objective: Objective
    columns: tuple[str, ...]
    """The shard columns the objective reads."""


@dataclass(frozen=True)
class StudentFamily:
    """One family of student models, as plain functions."""

    name: str
    accepts: Callable[[dict], bool]
    """Whether a model (its config.json) belongs to this family."""
    reads_class_dumps: bool
    """Trains on classify dumps (class distributions) rather than token dumps."""
    shardable: bool
    """Supports --parallel fsdp (its model has a decoder.layers list to shard)."""
    setup: Callable[[TrainConfig, Distributed, Dump, Dump | None, Path | None], FamilySetup]
    """(config, context, dump, eval dump, checkpoint to resume or None) -> the loaded student,
    its objective and columns; refuses a student or dump it cannot train on."""
    reads_masked_lm_dumps: bool = False
    """Trains on masked-LM dumps (teacher-dump --mode mlm) rather than causal token dumps."""

    def reads(self, manifest: dict) -> bool:
        """Whether this family trains on the kind of dump `manifest` describes."""
        if manifest.get("mode") == "classify":
            return self.reads_class_dumps
        if manifest.get("mode") == "mlm":
            return self.reads_masked_lm_dumps
        return not self.reads_class_dumps and not self.reads_masked_lm_dumps
