"""A run's training state on disk: the checkpoint it resumes from (refused when the config
changed), the checkpoints it writes (with every rank's RNG state and loader position), and
the trained student it publishes as OUT/final/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd_shards.shared.config import config_to_dict, field_default
from kd_shards.shared.errors import UserError
from kd_shards.student_train.checkpoints import (
    FINAL_DIRECTORY,
    latest_checkpoint,
    publish_final,
    publish_merged,
    read_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from kd_shards.student_train.config import RESUMABLE_FIELDS, TrainConfig
from kd_shards.student_train.distributed import (
    Distributed,
    barrier,
    broadcast_object,
    gather_objects,
)
from kd_shards.student_train.shard_stream import StreamPosition
from kd_shards.student_train.sharding import (
    ShardedStudent,
    full_model_copy,
    load_sharded,
    save_sharded,
    sharded_state,
)
from kd_shards.student_train.training_run import TrainingRun


def existing_checkpoint(
    config: TrainConfig, context: Distributed, out: Path
) -> tuple[Path | None, dict | None, dict | None]:
    """(checkpoint, meta, training state) to resume from, or Nones for a fresh start; a run
    already in --out is only continued with --resume, and only with a compatible config."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not config.resume:
        raise UserError(
            f"--out {out} already holds a training run (checkpoint {checkpoint.name}): pass "
            "--resume to continue it, or choose another --out"
        )
    meta, state = read_checkpoint(checkpoint) if checkpoint is not None else (None, None)
    if meta is not None:
        check_resumable(config, meta, context)
    if context.is_main:
        remove_temporaries(out)
    return checkpoint, meta, state


def check_resumable(config: TrainConfig, meta: dict, context: Distributed) -> None:
    """Refuse to resume with a different training setup (what would silently change results)."""
    # A field added since the checkpoint was written had its default then.
    saved = {key: field_default(TrainConfig, key) for key in config_to_dict(config)}
    saved.update(meta["config"])
    current = config_to_dict(config)
    changed = sorted(
        key for key in current if key not in RESUMABLE_FIELDS and saved.get(key) != current[key]
    )
    if changed:
        details = ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed)
        raise UserError(
            f"--resume: the checkpoint was trained with a different config ({details}): "
            "use the original settings, or a new --out for a new run"
        )
    if meta["world_size"] != context.world_size:
        raise UserError(
            f"--resume: the checkpoint was written by {meta['world_size']} rank(s), this run has "
            f"{context.world_size}: resume with torchrun --nproc-per-node {meta['world_size']}"
        )


def restore(
    meta: dict,
    state: dict,
    optimizer,
    scheduler,
    context: Distributed,
    sharded: ShardedStudent | None = None,
    checkpoint: Path | None = None,
) -> tuple[int, int, StreamPosition]:
    """Load a checkpoint's optimizer (a sharded student's, with its weights, from the
    checkpoint's shards), schedule and this rank's RNG state; (step, tokens seen, this rank's
    loader position)."""
    if sharded is not None:
        load_sharded(sharded, optimizer, checkpoint)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"][context.rank])
    if context.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"][context.rank], context.device)
    position = StreamPosition.from_dict(meta["loader_positions"][context.rank])
    return meta["step"], meta["tokens_seen"], position


def save_training_state(run: TrainingRun) -> None:
    """Checkpoint the current step (rank 0 writes; every rank contributes its RNG state and
    loader position); updates run.checkpoint and run.saved_step."""
    context = run.context
    rng_states = gather_objects(context, torch.get_rng_state())
    cuda_states = (
        gather_objects(context, torch.cuda.get_rng_state(context.device))
        if context.device.type == "cuda"
        else []
    )
    positions = gather_objects(context, run.stream.position.to_dict())
    model, write_sharded = run.student.model, None
    if run.sharded is not None:
        # Collective: every rank takes part in gathering the full weights and in writing its
        # shards into the directory rank 0 assembles (its name is sent to the others).
        model = full_model_copy(run.sharded, context.is_main)
        shards = sharded_state(run.sharded, run.optimizer)

        def write_sharded(directory: Path) -> None:
            broadcast_object(context, str(directory))
            save_sharded(shards, directory)

        if not context.is_main:
            save_sharded(shards, Path(broadcast_object(context, None)))
    path = None
    if context.is_main:
        meta = {
            "step": run.step,
            "tokens_seen": run.tokens_seen,
            "world_size": context.world_size,
            "loader_positions": positions,
            "config": config_to_dict(run.config),
            "shards": {
                "directory": str(run.dump.directory),
                "identity": run.dump.manifest.get("identity"),
                "tokenizer": run.dump.manifest["tokenizer"]["fingerprint"],
            },
            "student": run.student.reference,
            "lora": run.student.is_lora,
            "train": run.last_train,
            "eval": run.last_eval,
            "torch": torch.__version__,
        }
        state = {
            "scheduler": run.scheduler.state_dict(),
            "rng": rng_states,
            "cuda_rng": cuda_states,
        }
        if run.sharded is None:  # a sharded optimizer is in the checkpoint's shards
            state["optimizer"] = run.optimizer.state_dict()
        path = save_checkpoint(
            run.out,
            run.step,
            model=model,
            tokenizer=run.student.tokenizer,
            training_state=state,
            meta=meta,
            keep=run.config.keep_checkpoints,
            extra_weights=run.objective.extra_weights(),
            write_sharded=write_sharded,
        )
    run.checkpoint = Path(broadcast_object(context, str(path) if path else None))
    run.saved_step = run.step
    barrier(context)


def publish_student(run: TrainingRun, summary: dict) -> Path:
    """OUT/final/: the trained student, ready for transformers, vLLM and kd-eval."""
    student, checkpoint = run.student, run.checkpoint
    description = {"student": student.reference, "config": config_to_dict(run.config), **summary}
    existing = run.out / FINAL_DIRECTORY / "training.json"
    if existing.is_file() and json.loads(existing.read_text()).get("checkpoint") == str(checkpoint):
        return existing.parent  # a rerun of a finished run: final/ is already this checkpoint
    if student.is_lora and run.config.merge_lora:
        merged = student.model.merge_and_unload()
        return publish_merged(run.out, merged, student.tokenizer, checkpoint, description)
    return publish_final(run.out, checkpoint, description)
