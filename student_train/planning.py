"""How long a run is and how it steps: this rank's shard stream, the optimizer step count it
plans (--max-steps, or what --epochs passes take), and AdamW with its warm-up + cosine LR.
"""

from __future__ import annotations

import math

import torch

from kd_shards.shared.shard_reader import LENGTH_COLUMNS, TRAINING_COLUMNS, Dump
from kd_shards.student_train.batches import BatchShape, take_micro_batch
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import Distributed, max_across_ranks
from kd_shards.student_train.shard_stream import DumpFollower, ShardStream, StreamPosition


def learning_rate_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> float:
    """LR / peak LR for optimizer step `step` (0-based): linear warm-up, then cosine to
    min_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def make_optimizer(
    config: TrainConfig, parameters: list[torch.nn.Parameter], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (weight decay on matrices only) with linear warm-up and cosine decay."""
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
    )
    warmup_steps = warmup_steps_of(config.warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_multiplier(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=config.min_lr_ratio
        ),
    )
    return optimizer, scheduler


def training_stream(
    dump: Dump,
    config: TrainConfig,
    context: Distributed,
    *,
    position: StreamPosition | None = None,
    columns: tuple[str, ...] = TRAINING_COLUMNS,
    read_group=None,
    follower: DumpFollower | None = None,
) -> ShardStream:
    """This rank's shuffled stream over the training dump (ends after --epochs, if given;
    follows the dump as it is written with a `follower`)."""
    return ShardStream(
        dump,
        rank=context.rank,
        world_size=context.world_size,
        seed=config.seed,
        shuffle=True,
        buffer_rows=config.shuffle_buffer,
        epochs=int(config.epochs) if config.epochs is not None else None,
        position=position or StreamPosition(),
        columns=columns,
        read_group=read_group,
        # Planning reads only the row lengths and trains on nothing: hashing every shard then
        # would read the whole dump at start-up. Training verifies each shard when it opens it.
        verify=columns != LENGTH_COLUMNS,
        follower=follower,
    )


def plan_steps(
    config: TrainConfig,
    context: Distributed,
    dump: Dump,
    batch_shape: BatchShape,
    read_group=None,
    follower: DumpFollower | None = None,
) -> int:
    """The run's optimizer steps: --max-steps, or what --epochs passes take (counted on the
    row lengths, or for a dump still being written planned from its expected rows)."""
    if config.max_steps:
        return config.max_steps
    if follower is not None:
        return followed_steps(dump.manifest, config, context)
    return count_steps(dump, config, context, batch_shape, read_group)


def followed_steps(manifest: dict, config: TrainConfig, context: Distributed) -> int:
    """Optimizer steps that --epochs passes over a dump still being written take, from the
    manifest's expected row count: with a fixed --micro-batch every micro-batch but a rank's
    last takes exactly that many rows, and rank 0 gets ceil(rows / world size) rows of each
    epoch (the same count count_steps finds on the finished dump)."""
    rows = int(manifest.get("data", {}).get("expected_rows") or 0)
    per_rank = int(config.epochs) * math.ceil(rows / context.world_size)
    return max(1, math.ceil(per_rank / (config.rows_per_micro_batch * config.grad_accum)))


def count_steps(
    dump: Dump, config: TrainConfig, context: Distributed, batch_shape: BatchShape, read_group=None
) -> int:
    """Optimizer steps that --epochs passes take: the same packing as training, run over the
    row lengths only (no top-k decoding), the maximum over ranks."""
    stream = training_stream(dump, config, context, columns=LENGTH_COLUMNS, read_group=read_group)
    steps = 0
    while any([take_micro_batch(stream, batch_shape) for _ in range(config.grad_accum)]):
        steps += 1
    return max(1, max_across_ranks(context, steps))
