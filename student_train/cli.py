"""`student-train`: the command line of the cheap half (reference: docs/student-train.md).

Runs alone or under `torchrun --nproc-per-node N -m student_train.cli ...` (or the
`student-train` script path) unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import click

from kd_shards.shared.config import build_config, config_flags, config_options
from kd_shards.shared.errors import UserError, exit_with
from kd_shards.shared.files import disk_full_exit
from kd_shards.shared.model_preparation import LayerChoice
from kd_shards.student_train.config import TrainConfig

FLAGS = (
    "shards", "eval_shards", "student", "out", "loss", "alpha", "beta", "temperature", "tail",
    "max_steps", "epochs", "micro_batch", "batch_tokens", "grad_accum", "lr", "warmup", "seed",
    "lora_r", "lora_alpha", "lora_target", "rslora", "merge_lora", "eval_every", "save_every",
    "stop_at_step", "max_length", "chunk_tokens", "bf16", "resume", "trust_remote_code",
    "progress", "data", "data_path", "split", "limit", "more_shards", "teacher_weights",
    "hidden_weight", "student_hidden_layer", "follow", "masked_lm_weights",
    "parallel", "cross_tokenizer",
)  # fmt: skip
"""The TrainConfig fields that have a flag; every field can be set with --set or --config."""
NEGATED = {"progress": "--no-progress"}
"""Flags that turn off a field that is on by default."""


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@config_flags(TrainConfig, FLAGS, negated=NEGATED)
@config_options
@click.pass_context
def main(context, config_file, assignments, **flags) -> None:
    """Train a student from teacher-dump shards (sequence-level and logit KD, no teacher), or
    a classifier from class shards or from labels.

    \b
    student-train --shards DIR --student MODEL --out DIR (--max-steps N | --epochs E) [options]
    student-train --data sst2 --data-path DIR --student MODEL --loss ce --out DIR ...
    torchrun --nproc-per-node N -m student_train.cli ...   (data parallel)
    student-train init-student --teacher DIR --layers N --out DIR
    """
    if context.invoked_subcommand is not None:
        return
    try:
        config = build_config(
            TrainConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        from transformers.utils import logging as transformers_logging

        from kd_shards.student_train.train import run_training

        # Our own bar shows progress; transformers' per-load/save bars would only add noise.
        transformers_logging.disable_progress_bar()

        summary = run_training(config)
    except UserError as error:
        exit_with(error)
    except Exception as error:
        disk_full = disk_full_exit(
            error, "free space there and rerun the same command with --resume"
        )
        if disk_full is None:
            raise
        exit_with(disk_full)
    if summary is not None and summary.get("final"):
        print_summary(summary)


def print_summary(summary: dict) -> None:
    """Where the artefacts are, and the last numbers (rank 0 only)."""
    out = Path(summary["out"])
    train = summary.get("train") or {}
    lines = [f"trained {summary['steps']} steps, {summary['tokens']:,} {summary['unit']}"]
    if train:
        lines.append(
            f"last train loss {train['loss']:.4f} (ce {train['ce']:.4f}, kd {train['kd']:.4f})"
        )
    if summary.get("eval"):
        evaluation = summary["eval"]
        lines.append(
            f"eval: ce {evaluation['eval_ce']:.4f}, KL to teacher {evaluation['eval_kl']:.4f}, "
            f"top-1 agreement {evaluation['eval_top1']:.3f}"
        )
    lines += [
        f"student      {summary['final']}",
        f"checkpoint   {summary['checkpoint']}",
        f"metrics      {out / 'metrics.jsonl'}",
        f"curve        {out / 'curve.png'}",
    ]
    click.echo("\n".join(lines))
    sys.stdout.flush()


@main.command("init-student")
@click.option("--teacher", required=True, help="Teacher model directory.")
@click.option(
    "--layers",
    required=True,
    type=int,
    help="Decoder or encoder layers to keep (an encoder-decoder: its encoder's).",
)
@click.option(
    "--decoder-layers",
    type=int,
    default=None,
    help="An encoder-decoder teacher (T5, BART): decoder layers to keep [default: --layers].",
)
@click.option(
    "--keep",
    type=click.Choice(get_args(LayerChoice)),
    default="evenly",
    show_default=True,
    help="evenly: spread over the stack; ends: first and last layers, one middle block dropped.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New model directory.")
@click.option(
    "--labels",
    default="",
    help="Give a bare encoder a classification head with these labels (a,b,...), seed 0.",
)
@click.option("--trust-remote-code", is_flag=True, default=False)
def init_student(
    teacher: str,
    layers: int,
    decoder_layers: int | None,
    keep: str,
    out: Path,
    labels: str,
    trust_remote_code: bool,
) -> None:
    """Make a student from a teacher by keeping some of its layers (DistilBERT-style init)."""
    from kd_shards.shared.model_preparation import derive_student
    from kd_shards.shared.models import resolve_model

    try:
        directory = resolve_model(
            teacher, flag="--teacher", trust_remote_code=trust_remote_code
        ).directory
        names = tuple(name.strip() for name in labels.split(",") if name.strip())
        derive_student(
            directory, layers, out, keep=keep, trust_remote_code=trust_remote_code, labels=names,
            decoder_layers=decoder_layers,
        )  # fmt: skip
    except UserError as error:
        exit_with(error)
    click.echo(str(out))


if __name__ == "__main__":
    main()
