"""The training loop of student-train: setup, one explicit loop, finish.

    shards ──ShardStream──► micro-batches ──family's collation──► batch ──family's forward + loss
           (SUM)──► ÷ target tokens (or examples) of the whole step (all ranks)
           ──backward, sum gradients over ranks, clip, AdamW, warm-up + cosine──► checkpoint

The teacher is never loaded: its signal is what the shards store. `setup` builds a
`TrainingRun` (everything the loop reads and updates), `loop` trains it step by step, and
`finish` publishes the student. What a step computes is the objective of the student's family
(student_train/families/: a causal LM on token dumps, a sequence classifier on class dumps or
gold labels), chosen once at setup; the loop is the same for every family.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kd_shards.schemas.manifest import check_dump_kind, classify_labels, storage_of_manifest
from kd_shards.schemas.shard import HIDDEN_COLUMN
from kd_shards.shared.config import config_to_dict
from kd_shards.shared.errors import UserError
from kd_shards.shared.files import atomic_write_json, directory_lock
from kd_shards.shared.shard_reader import Dump, open_dump
from kd_shards.student_train.batches import BatchShape, take_micro_batch
from kd_shards.student_train.classify_data import labels_only_source
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.distributed import (
    Distributed,
    barrier,
    start_distributed,
    stop_distributed,
    sum_across_ranks,
    sum_gradients,
)
from kd_shards.student_train.families import family_of
from kd_shards.student_train.family import SUMS_WIDTH, Objective, StudentFamily
from kd_shards.student_train.planning import make_optimizer, plan_steps, training_stream
from kd_shards.student_train.reporting import (
    CURVE_NAME,
    METRICS_NAME,
    append_metrics,
    plot_curve,
    truncate_metrics,
)
from kd_shards.student_train.shard_stream import DumpFollower, ShardStream, StreamPosition
from kd_shards.student_train.sharding import ShardedStudent, shard_student
from kd_shards.student_train.student import Student
from kd_shards.student_train.training_run import TrainingRun
from kd_shards.student_train.training_state import (
    existing_checkpoint,
    publish_student,
    restore,
    save_training_state,
)

CONFIG_NAME = "train_config.json"
UNLIMITED_LENGTH = 1 << 30


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
    dump, read_group, follower = training_source(config, context)
    family = family_of(config.student, dump.manifest)
    where = f"--data {config.data}" if config.data is not None else f"--shards {config.shards}"
    kind = {"classify": family.reads_class_dumps, "masked_lm": family.reads_masked_lm_dumps}
    check_dump_kind(dump.manifest, where=where, **kind)
    eval_dump = open_dump(config.eval_shards, flag="--eval-shards") if config.eval_shards else None
    if eval_dump is not None:
        where = f"--eval-shards {config.eval_shards}"
        check_dump_kind(eval_dump.manifest, where=where, **kind)
    check_representations(config, dump, eval_dump)
    # One trainer at a time per output directory; a previous run is only continued with --resume.
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
        run = setup(config, context, out, family, dump, eval_dump, read_group, follower)
        loop(run)
        return finish(run)


def training_source(
    config: TrainConfig, context: Distributed
) -> tuple[Dump, object, DumpFollower | None]:
    """(the training dump, its row-group reader or None, a follower or None): gold labels
    (--data), a dump still being written (--follow), or a finished dump."""
    if config.data is not None:
        dump, read_group = labels_only_source(config)
        return dump, read_group, None
    if config.follow:
        follower = DumpFollower.open(
            config.shards,
            poll_seconds=config.follow_poll,
            timeout_seconds=config.follow_timeout,
            announce=context.is_main,
        )
        return follower.dump, None, follower
    return open_dump(config.shards, allow_incomplete=config.allow_incomplete), None, None


def check_representations(config: TrainConfig, dump: Dump, eval_dump: Dump | None) -> None:
    """Refuse settings under which a sampled (RS-KD) dump would give a biased signal.

    Its stored weights are an unbiased estimate of the teacher's distribution only inside
    forward KL at temperature 1 with the bucket tail (student_train.losses.loss_sums); other
    divergences, temperatures, renormalizing and cutting entries are non-linear in them, and
    an evaluation KL on draws is not the KL to the teacher."""
    storage = storage_of_manifest(dump.manifest)
    if storage is not None and storage.representation == "sampled":
        options = config.loss_options()
        unbiased = (
            options.loss in ("fkl", "ce")
            and options.tail == "bucket"
            and options.temperature == 1.0
            and config.teacher_top_k is None
        )
        if not unbiased:
            raise UserError(
                f"--shards {dump.directory} holds sampled teacher draws (RS-KD), which train "
                f"without bias only with --loss fkl, --tail bucket, --temperature 1 and no "
                f"teacher_top_k (got --loss {options.loss}, --tail {options.tail}, "
                f"--temperature {options.temperature}): use those, or a topk/adaptive dump"
            )
    if eval_dump is not None:
        storage = storage_of_manifest(eval_dump.manifest)
        if storage is not None and storage.representation == "sampled":
            raise UserError(
                f"--eval-shards {eval_dump.directory} holds sampled teacher draws, which give no "
                "KL to the teacher: dump the held-out data with --store topk or adaptive"
            )


def setup(
    config: TrainConfig,
    context: Distributed,
    out: Path,
    family: StudentFamily,
    dump: Dump,
    eval_dump: Dump | None,
    read_group=None,
    follower: DumpFollower | None = None,
) -> TrainingRun:
    """Load the student through its family (which gives the objective), build the optimizer,
    schedule and stream, and restore a checkpoint. With a `follower` (--follow) the dump is
    still being written."""
    checkpoint, meta, state = existing_checkpoint(config, context, out)
    loaded = family.setup(config, context, dump, eval_dump, checkpoint)
    student, objective, columns = loaded.student, loaded.objective, loaded.columns
    batch_shape = BatchShape(
        rows=config.rows_per_micro_batch,
        batch_tokens=config.batch_tokens,
        max_length=config.max_length or student.context or UNLIMITED_LENGTH,
        teacher_top_k=config.teacher_top_k,
    )
    sharded = shard_if_asked(config, context, family, student, objective)
    parameters = [parameter for parameter in student.model.parameters() if parameter.requires_grad]
    parameters += [parameter for module in objective.modules for parameter in module.parameters()]
    total_steps = plan_steps(config, context, dump, batch_shape, read_group, follower)
    optimizer, scheduler = make_optimizer(config, parameters, total_steps)
    step, tokens_seen, position = 0, 0, StreamPosition()
    if meta is not None:
        step, tokens_seen, position = restore(
            meta, state, optimizer, scheduler, context, sharded, checkpoint
        )
    stream = training_stream(
        dump, config, context, position=position, columns=columns, read_group=read_group,
        follower=follower,
    )  # fmt: skip
    if config.log_samples:
        truncate_metrics(out / f"samples-rank{context.rank}.jsonl", step)
    if context.is_main:
        truncate_metrics(out / METRICS_NAME, step)
        atomic_write_json(out / CONFIG_NAME, run_description(config, dump, student, total_steps))
        if meta is not None:
            print(f"resuming from {checkpoint} (step {step} of {total_steps})", file=sys.stderr)
    return TrainingRun(
        config=config,
        context=context,
        out=out,
        dump=dump,
        eval_dump=eval_dump,
        student=student,
        objective=objective,
        read_group=read_group,
        columns=columns,
        batch_shape=batch_shape,
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        total_steps=total_steps,
        progress=make_progress_bar(total_steps, step, enabled=context.is_main and config.progress),
        sharded=sharded,
        step=step,
        tokens_seen=tokens_seen,
        checkpoint=checkpoint,
        saved_step=step if meta is not None else None,
        tokens_at_start=tokens_seen,
    )


def shard_if_asked(
    config: TrainConfig,
    context: Distributed,
    family: StudentFamily,
    student: Student,
    objective: Objective,
) -> ShardedStudent | None:
    """--parallel fsdp: the student sharded over the ranks (FSDP2); else None."""
    if config.parallel != "fsdp":
        return None
    if not family.shardable:
        raise UserError(
            f"--parallel fsdp does not shard a {family.name} student: use --parallel ddp"
        )
    return shard_student(student.model, objective, context)


def loop(run: TrainingRun) -> None:
    """Optimizer steps until total_steps, the end of the data (--epochs) or --stop-at-step."""
    config = run.config
    if run.eval_dump is not None and run.step == 0:
        run.last_eval = evaluate(run)
        run.log({"step": 0, **run.last_eval})
    run.student.model.train()
    while run.step < run.total_steps:
        started = time.perf_counter()
        micro_batches = [
            run.objective.batch(take_micro_batch(run.stream, run.batch_shape))
            for _ in range(config.grad_accum)
        ]
        totals = accumulate_gradients(
            run.student.model,
            micro_batches,
            objective=run.objective,
            bf16=config.bf16,
            context=run.context,
            sharded=run.sharded,
        )
        if totals.rows == 0:
            break  # every rank's stream has ended (--epochs)
        if config.log_samples:
            samples = [sample for batch in micro_batches for sample in batch.sample_ids]
            path = run.out / f"samples-rank{run.context.rank}.jsonl"
            append_metrics(path, {"step": run.step + 1, "time": time.time(), "samples": samples})
        grad_norm, learning_rate = optimizer_step(run)
        run.step += 1
        run.tokens_seen += totals.tokens
        # Throughput counts training steps only (loading, forward, backward, optimizer), not
        # evals and checkpoints.
        run.training_seconds += time.perf_counter() - started
        run.last_train = step_metrics(run, totals, grad_norm, learning_rate)
        is_last = run.step == run.total_steps
        run.stopped_early = config.stop_at_step == run.step and not is_last

        # Log: every log_every steps and the last.
        if run.step % config.log_every == 0 or is_last:
            run.log(run.last_train)
        run.progress.update(1)
        run.progress.set_postfix(
            loss=f"{run.last_train['loss']:.4f}",
            tok_s=f"{run.last_train['tokens_per_second']:.0f}",
        )
        # Eval: every eval_every steps and after the last.
        if run.eval_dump is not None and (
            is_last or (config.eval_every and run.step % config.eval_every == 0)
        ):
            run.last_eval = evaluate(run)
            run.log({"step": run.step, **run.last_eval})
            if run.context.is_main:
                plot_curve(run.metrics_path, run.out / CURVE_NAME)
        # Checkpoint: every save_every steps, the last step, and --stop-at-step.
        if (
            is_last
            or config.stop_at_step == run.step
            or (config.save_every and run.step % config.save_every == 0)
        ):
            save_training_state(run)
        if run.stopped_early:
            break
    run.progress.close()


def finish(run: TrainingRun) -> dict:
    """Save the last step if it is not saved yet, plot, publish OUT/final/; the summary."""
    if run.saved_step != run.step:
        # --epochs: every stream ended before the planned step count (rows without targets)
        save_training_state(run)
    summary = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "tokens": run.tokens_seen,
        "unit": run.objective.unit,
        "train": run.last_train,
        "eval": run.last_eval,
        "stopped_early": run.stopped_early,
        "checkpoint": str(run.checkpoint) if run.checkpoint is not None else None,
        "out": str(run.out),
    }
    if run.context.is_main:
        plot_curve(run.metrics_path, run.out / CURVE_NAME)
        if not run.stopped_early and run.checkpoint is not None:
            summary["final"] = str(publish_student(run, summary))
    barrier(run.context)
    return summary


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step, added over its micro-batches and all ranks."""

    sums: torch.Tensor
    """(4,) float64 [total, ce, kd, hidden] loss sums."""
    tokens: int
    """Target tokens (classification: examples): the one divisor of the step's loss."""
    rows: int
    """Rows (0 when every rank's stream has ended)."""


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list,
    *,
    objective: Objective,
    bf16: bool,
    context: Distributed,
    sharded: ShardedStudent | None = None,
) -> StepTotals:
    """Forward and backward over one optimizer step's micro-batches (this rank's share).

    The loss sums are divided once, by the target tokens (classification: examples) of the
    whole step across every micro-batch and rank, so the step's gradient equals that of one big
    batch however it is split. The gradients are left in .grad, not yet summed over ranks
    (a `sharded` student's are: FSDP2 reduce-scatters their sums in each backward, so every
    rank runs every micro-batch, an empty one as its last real one with weight 0).
    """
    local = [
        sum(batch.target_tokens for batch in micro_batches),
        sum(b.rows for b in micro_batches),
    ]
    step_tokens, step_rows = (
        int(value) for value in sum_across_ranks(context, torch.tensor(local, dtype=torch.float64))
    )
    device = context.device
    sums = torch.zeros(SUMS_WIDTH, dtype=torch.float64, device=device)
    for batch in micro_batches:
        weight = 1.0
        if sharded is not None and step_rows > 0:
            batch, weight = sharded.batch_to_run(batch)
        elif batch.target_tokens == 0:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if sharded is not None:
                batch_sums = sharded(batch, device)
            else:
                batch_sums = objective.sums(model, batch, device)
        (batch_sums[0] * weight / max(step_tokens, 1)).backward()
        sums += batch_sums.detach().double() * weight
    return StepTotals(sum_across_ranks(context, sums), step_tokens, step_rows)


def optimizer_step(run: TrainingRun) -> tuple[float, float]:
    """Sum gradients over ranks, clip, step AdamW and the schedule; (grad norm, LR used)."""
    if run.sharded is None:  # FSDP2 has already summed them, shard by shard
        sum_gradients(run.context, run.parameters)
    clip = run.config.grad_clip if run.config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.parameters, clip)
    if hasattr(grad_norm, "full_tensor"):  # the norm over a sharded student's gradients
        grad_norm = grad_norm.full_tensor()
    learning_rate = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), learning_rate


def step_metrics(
    run: TrainingRun, totals: StepTotals, grad_norm: float, learning_rate: float
) -> dict:
    """One metrics.jsonl line for the step just taken."""
    total, ce, kd, hidden = (totals.sums / max(totals.tokens, 1)).tolist()
    extra = {"hidden_mse": hidden} if run.config.hidden_weight > 0 else {}
    if run.stream.follower is not None:
        extra["waited_seconds"] = run.stream.follower.waited_seconds
    return {
        "step": run.step,
        "epoch": run.stream.position.epoch,
        "loss": total,
        "ce": ce,
        "kd": kd,
        **extra,
        "lr": learning_rate,
        "grad_norm": grad_norm,
        "tokens": run.tokens_seen,
        "tokens_per_second": (run.tokens_seen - run.tokens_at_start)
        / max(run.training_seconds, 1e-9),
    }


def evaluate(run: TrainingRun) -> dict:
    """CE, KL(teacher || student) and top-1 agreement on held-out shards (ranks share them)."""
    config, context = run.config, run.context
    limit = None
    if config.eval_limit is not None:
        limit = config.eval_limit // context.world_size
        limit += 1 if context.rank < config.eval_limit % context.world_size else 0
    stream = ShardStream(
        run.eval_dump,
        rank=context.rank,
        world_size=context.world_size,
        shuffle=False,
        buffer_rows=config.shuffle_buffer,
        epochs=1,
        # Evaluation compares outputs only: held-out dumps need no hidden states.
        columns=tuple(column for column in run.columns if column != HIDDEN_COLUMN),
    )

    def batches():
        taken = 0
        # The held-out KL is always against everything the eval dump stores.
        shape = replace(run.batch_shape, teacher_top_k=None)
        while rows := take_micro_batch(stream, shape):
            if limit is not None:
                rows = rows[: max(0, limit - taken)]
            if not rows:
                return
            taken += len(rows)
            yield rows

    sums = run.objective.evaluation_sums(run.student.model, batches(), context.device, config.bf16)
    return run.objective.evaluation_metrics(sum_across_ranks(context, sums))


def run_description(config: TrainConfig, dump: Dump, student: Student, total_steps: int) -> dict:
    """train_config.json: the resolved config plus what it resolved against."""
    return {
        "config": config_to_dict(config),
        "total_steps": total_steps,
        "shards": {
            "directory": str(dump.directory),
            "identity": dump.manifest.get("identity"),
            "mode": dump.manifest.get("mode"),
            "labels": classify_labels(dump.manifest) or None,
            "teacher": dump.manifest.get("teacher", {}).get("model"),
            "top_k": dump.manifest.get("top_k"),
            "storage": dump.manifest.get("storage"),
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
