"""The training loop of student-train: one explicit loop, readable top to bottom.

    shards ──ShardStream──► micro-batches ──student decoder──► hidden states at target positions
           ──chunked LM head + loss (SUM)──► ÷ target tokens of the whole step (all ranks)
           ──backward, sum gradients over ranks, clip, AdamW, warm-up + cosine──► checkpoint

The teacher is never loaded: its signal is the top-k stored in the shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from schemas.manifest import check_tokenizer_fingerprint
from shared.config import config_to_dict
from shared.errors import UserError
from shared.files import atomic_write_json, directory_lock
from shared.tokenizer import tokenizer_fingerprint
from student_train.batches import Batch, collate, take_micro_batch
from student_train.checkpoints import (
    FINAL_DIRECTORY,
    latest_checkpoint,
    publish_final,
    publish_merged,
    read_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from student_train.config import RESUMABLE_FIELDS, TrainConfig
from student_train.distributed import (
    Distributed,
    barrier,
    broadcast_object,
    gather_objects,
    max_across_ranks,
    start_distributed,
    stop_distributed,
    sum_across_ranks,
    sum_gradients,
)
from student_train.fidelity import fidelity_metrics, fidelity_sums_on_dump
from student_train.losses import chunked_loss_sums
from student_train.reporting import (
    CURVE_NAME,
    METRICS_NAME,
    append_metrics,
    plot_curve,
    truncate_metrics,
)
from student_train.shard_stream import LENGTH_COLUMNS, Dump, ShardStream, StreamPosition, open_dump
from student_train.student import (
    Student,
    check_output_path,
    final_hidden_states,
    load_student,
    output_logits_function,
)

CONFIG_NAME = "train_config.json"
UNLIMITED_LENGTH = 1 << 30


def learning_rate_multiplier(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float
) -> float:
    """LR / peak LR for optimizer step `step` (0-based): linear warm-up, then cosine to
    min_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def run_training(config: TrainConfig) -> dict:
    """Train as `config` says (one rank of a torchrun job, or alone); returns the summary."""
    context = start_distributed()
    try:
        return train(config, context)
    finally:
        stop_distributed(context)


def train(config: TrainConfig, context: Distributed) -> dict:
    out = Path(config.out)
    torch.manual_seed(config.seed)
    dump = open_dump(config.shards, allow_incomplete=config.allow_incomplete)
    eval_dump = open_dump(config.eval_shards, flag="--eval-shards") if config.eval_shards else None

    # Output directory: one trainer at a time; a previous run is only continued with --resume.
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(context)
    with contextlib.ExitStack() as stack:
        if context.is_main:
            try:
                stack.enter_context(directory_lock(out, ".train-lock", wait=False))
            except BlockingIOError:
                raise UserError(
                    f"--out {out}: another student-train is writing there; wait for it to "
                    "finish or choose another --out"
                ) from None
        return _train_locked(config, context, out, dump, eval_dump)


def _train_locked(
    config: TrainConfig, context: Distributed, out: Path, dump: Dump, eval_dump: Dump | None
) -> dict:
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

    student = load_student(
        config.student,
        manifest=dump.manifest,
        trust_remote_code=config.trust_remote_code,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_target=config.lora_target,
        rslora=config.rslora,
        device=context.device,
        weights_from=checkpoint,
    )
    if eval_dump is not None:
        fingerprint = tokenizer_fingerprint(student.tokenizer)
        check_tokenizer_fingerprint(eval_dump.manifest, fingerprint, "student")
    check_output_path(student, context.device)
    model = student.model
    output_logits = output_logits_function(model, student.vocabulary)
    max_length = config.max_length or student.context or UNLIMITED_LENGTH
    batch_shape = {
        "rows": config.rows_per_micro_batch,
        "batch_tokens": config.batch_tokens,
        "max_length": max_length,
    }
    loss_options = {
        "loss": config.loss,
        "alpha": config.alpha,
        "beta": config.resolved_beta,
        "temperature": config.temperature,
        "tail": config.tail,
    }

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
    )
    epochs = int(config.epochs) if config.epochs is not None else None
    total_steps = config.max_steps or count_steps(dump, config, context, batch_shape)
    warmup_steps = warmup_steps_of(config.warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_multiplier(step, warmup_steps, total_steps, config.min_lr_ratio),
    )

    step, tokens_seen, position = 0, 0, StreamPosition()
    if meta is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][context.rank])
        if context.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][context.rank], context.device)
        step, tokens_seen = meta["step"], meta["tokens_seen"]
        position = StreamPosition.from_dict(meta["loader_positions"][context.rank])
    stream = ShardStream(
        dump,
        rank=context.rank,
        world_size=context.world_size,
        seed=config.seed,
        shuffle=True,
        buffer_rows=config.shuffle_buffer,
        epochs=epochs,
        position=position,
    )

    metrics_path, curve_path = out / METRICS_NAME, out / CURVE_NAME
    if config.log_samples:
        truncate_metrics(out / f"samples-rank{context.rank}.jsonl", step)
    if context.is_main:
        truncate_metrics(metrics_path, step)
        atomic_write_json(out / CONFIG_NAME, run_description(config, dump, student, total_steps))
        if meta is not None:
            print(f"resuming from {checkpoint} (step {step} of {total_steps})", file=sys.stderr)
    progress = make_progress_bar(total_steps, step, enabled=context.is_main and config.progress)

    def log(values: dict) -> None:
        if context.is_main:
            append_metrics(metrics_path, values)

    last_eval = None
    if eval_dump is not None and step == 0:
        last_eval = evaluate(model, eval_dump, context, output_logits, config, batch_shape)
        log({"step": 0, **last_eval})

    def save_checkpoint_now() -> Path:
        return save_training_state(
            out, step, tokens_seen, student, optimizer, scheduler, stream, context, config,
            dump, last_train, last_eval,
        )  # fmt: skip

    saved_step = step if meta is not None else None
    model.train()
    last_train: dict = {}
    stopped_early = False
    training_seconds, tokens_at_start = 0.0, tokens_seen
    while step < total_steps:
        step_started = time.perf_counter()
        # One optimizer step: every rank takes grad_accum micro-batches from its stream; the loss
        # sums are divided by the target tokens of the whole step across ranks, so the gradient
        # equals that of one big batch however it is split.
        micro_batches = [
            collate(take_micro_batch(stream, **batch_shape)) for _ in range(config.grad_accum)
        ]
        local = torch.tensor(
            [sum(b.target_tokens for b in micro_batches), sum(b.rows for b in micro_batches)],
            dtype=torch.float64,
        )
        step_tokens, step_rows = sum_across_ranks(context, local).tolist()
        if step_rows == 0:
            break  # every rank's stream has ended (--epochs)
        sums = torch.zeros(3, dtype=torch.float64, device=context.device)
        for batch in micro_batches:
            if batch.target_tokens == 0:
                continue
            batch_sums = batch_loss_sums(model, batch, output_logits, config, loss_options, context)
            (batch_sums[0] / step_tokens).backward()
            sums += batch_sums.detach().double()
        if config.log_samples:
            samples = [sample for batch in micro_batches for sample in batch.sample_ids]
            append_metrics(
                out / f"samples-rank{context.rank}.jsonl", {"step": step + 1, "samples": samples}
            )
        sum_gradients(context, parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parameters, config.grad_clip if config.grad_clip > 0 else math.inf
        )
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(step_tokens)

        total, ce, kd = (sum_across_ranks(context, sums) / step_tokens).tolist()
        # Throughput counts training steps only (loading, forward, backward, optimizer), not
        # evals and checkpoints.
        training_seconds += time.perf_counter() - step_started
        last_train = {
            "step": step,
            "epoch": stream.position.epoch,
            "loss": total,
            "ce": ce,
            "kd": kd,
            "lr": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens": tokens_seen,
            "tokens_per_second": (tokens_seen - tokens_at_start) / max(training_seconds, 1e-9),
        }
        if step % config.log_every == 0 or step == total_steps:
            log(last_train)
        progress.update(1)
        progress.set_postfix(loss=f"{total:.4f}", tok_s=f"{last_train['tokens_per_second']:.0f}")

        is_last = step == total_steps
        stopped_early = config.stop_at_step == step
        if eval_dump is not None and (
            is_last or (config.eval_every and step % config.eval_every == 0)
        ):
            last_eval = evaluate(model, eval_dump, context, output_logits, config, batch_shape)
            log({"step": step, **last_eval})
            if context.is_main:
                plot_curve(metrics_path, curve_path)
        if is_last or stopped_early or (config.save_every and step % config.save_every == 0):
            checkpoint, saved_step = save_checkpoint_now(), step
        if stopped_early and not is_last:
            break
    progress.close()

    summary = {
        "steps": step,
        "total_steps": total_steps,
        "tokens": tokens_seen,
        "train": last_train,
        "eval": last_eval,
        "stopped_early": stopped_early and step < total_steps,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "out": str(out),
    }
    if saved_step != step:
        # --epochs: every stream ended before the planned step count (rows without targets)
        checkpoint, saved_step = save_checkpoint_now(), step
        summary["checkpoint"] = str(checkpoint)
    if context.is_main:
        plot_curve(metrics_path, curve_path)
        if not summary["stopped_early"] and checkpoint is not None:
            summary["final"] = str(publish_student(out, Path(checkpoint), student, config, summary))
    barrier(context)
    return summary


def check_resumable(config: TrainConfig, meta: dict, context: Distributed) -> None:
    """Refuse to resume with a different training setup (what would silently change results)."""
    saved = meta["config"]
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


def count_steps(dump: Dump, config: TrainConfig, context: Distributed, batch_shape: dict) -> int:
    """Optimizer steps that --epochs passes take: the same packing as training, run over the
    row lengths only (no top-k decoding), the maximum over ranks."""
    stream = ShardStream(
        dump,
        rank=context.rank,
        world_size=context.world_size,
        seed=config.seed,
        shuffle=True,
        buffer_rows=config.shuffle_buffer,
        epochs=int(config.epochs),
        columns=LENGTH_COLUMNS,
    )
    steps = 0
    while True:
        micro_batches = [take_micro_batch(stream, **batch_shape) for _ in range(config.grad_accum)]
        if not any(micro_batches):
            break
        steps += 1
    return max(1, max_across_ranks(context, steps))


def batch_loss_sums(
    model,
    batch: Batch,
    output_logits,
    config: TrainConfig,
    loss_options: dict,
    context: Distributed,
) -> torch.Tensor:
    """(3,) [total, ce, kd] loss sums of one micro-batch (with gradient)."""
    device = context.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        hidden = final_hidden_states(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        selected = hidden[batch.row_index.to(device), batch.position.to(device)]
        return chunked_loss_sums(
            selected,
            output_logits,
            batch.target_ids.to(device),
            batch.topk_ids.to(device),
            batch.topk_logprobs.to(device),
            chunk_tokens=config.chunk_tokens,
            **loss_options,
        )


def evaluate(
    model, dump: Dump, context: Distributed, output_logits, config: TrainConfig, batch_shape: dict
) -> dict:
    """CE, KL(teacher || student) and top-1 agreement on held-out shards (ranks share them)."""
    limit = None
    if config.eval_limit is not None:
        limit = config.eval_limit // context.world_size
        limit += 1 if context.rank < config.eval_limit % context.world_size else 0
    sums = fidelity_sums_on_dump(
        model,
        output_logits,
        dump,
        rank=context.rank,
        world_size=context.world_size,
        batch_shape=batch_shape,
        chunk_tokens=config.chunk_tokens,
        buffer_rows=config.shuffle_buffer,
        limit=limit,
        device=context.device,
        bf16=config.bf16,
    )
    return fidelity_metrics(sum_across_ranks(context, sums))


def save_training_state(
    out: Path,
    step: int,
    tokens_seen: int,
    student: Student,
    optimizer,
    scheduler,
    stream: ShardStream,
    context: Distributed,
    config: TrainConfig,
    dump: Dump,
    last_train: dict,
    last_eval: dict | None,
) -> Path:
    """Checkpoint (rank 0 writes; every rank contributes its RNG state and loader position)."""
    rng_states = gather_objects(context, torch.get_rng_state())
    cuda_states = (
        gather_objects(context, torch.cuda.get_rng_state(context.device))
        if context.device.type == "cuda"
        else []
    )
    positions = gather_objects(context, stream.position.to_dict())
    path = None
    if context.is_main:
        meta = {
            "step": step,
            "tokens_seen": tokens_seen,
            "world_size": context.world_size,
            "loader_positions": positions,
            "config": config_to_dict(config),
            "shards": {
                "directory": str(dump.directory),
                "identity": dump.manifest.get("identity"),
                "tokenizer": dump.manifest["tokenizer"]["fingerprint"],
            },
            "student": student.reference,
            "lora": student.is_lora,
            "train": last_train,
            "eval": last_eval,
            "torch": torch.__version__,
        }
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
            "cuda_rng": cuda_states,
        }
        path = save_checkpoint(
            out,
            step,
            model=student.model,
            tokenizer=student.tokenizer,
            training_state=state,
            meta=meta,
            keep=config.keep_checkpoints,
        )
    path = broadcast_object(context, str(path) if path else None)
    barrier(context)
    return Path(path)


def publish_student(
    out: Path, checkpoint: Path, student: Student, config: TrainConfig, summary: dict
) -> Path:
    """OUT/final/: the trained student, ready for transformers, vLLM and kd-eval."""
    description = {"student": student.reference, "config": config_to_dict(config), **summary}
    existing = out / FINAL_DIRECTORY / "training.json"
    if existing.is_file() and json.loads(existing.read_text()).get("checkpoint") == str(checkpoint):
        return existing.parent  # a rerun of a finished run: final/ is already this checkpoint
    if student.is_lora and config.merge_lora:
        merged = student.model.merge_and_unload()
        return publish_merged(out, merged, student.tokenizer, checkpoint, description)
    return publish_final(out, checkpoint, description)


def run_description(config: TrainConfig, dump: Dump, student: Student, total_steps: int) -> dict:
    """train_config.json: the resolved config plus what it resolved against."""
    return {
        "config": config_to_dict(config),
        "total_steps": total_steps,
        "shards": {
            "directory": str(dump.directory),
            "identity": dump.manifest.get("identity"),
            "mode": dump.manifest.get("mode"),
            "teacher": dump.manifest.get("teacher", {}).get("model"),
            "top_k": dump.manifest.get("top_k"),
            "rows": dump.rows,
        },
        "student": {
            "reference": student.reference,
            "vocabulary": student.vocabulary,
            "lora": student.is_lora,
            "trainable_parameters": sum(
                p.numel() for p in student.model.parameters() if p.requires_grad
            ),
            "parameters": sum(p.numel() for p in student.model.parameters()),
        },
        "torch": torch.__version__,
    }


def make_progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        desc="student-train",
    )
