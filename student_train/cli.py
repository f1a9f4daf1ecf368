"""`student-train`: the command line of the cheap half (see README for the reference).

Runs alone or under `torchrun --nproc-per-node N -m student_train.cli ...` (or the
`student-train` script path) unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shared.config import build_config, config_options
from shared.errors import UserError, exit_with
from student_train.config import TrainConfig


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shards", help="teacher-dump output directory to train on.")
@click.option("--eval-shards", help="Held-out teacher-dump directory for periodic eval.")
@click.option("--student", help="Student: local causal-LM directory (safetensors) or hub id.")
@click.option("--out", help="Output directory (checkpoints/, final/, metrics.jsonl, curve.png).")
@click.option(
    "--loss",
    type=click.Choice(["ce", "fkl", "rkl", "jsd", "skew-kl", "tvd"]),
    default=None,
    help="ce (sequence KD) or a logit-KD loss [fkl].",
)
@click.option("--alpha", type=float, default=None, help="CE weight: α·CE + (1−α)·KD [0].")
@click.option("--beta", type=float, default=None, help="jsd mixture β [0.5] / skew-kl skew [0.1].")
@click.option("--temperature", type=float, default=None, help="Distillation temperature [1].")
@click.option(
    "--tail",
    type=click.Choice(["renormalize", "bucket"]),
    default=None,
    help="Teacher mass outside the top-k [bucket].",
)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to train.")
@click.option("--epochs", type=float, default=None, help="Whole passes over the shards.")
@click.option("--micro-batch", type=int, default=None, help="Rows per micro-batch [8].")
@click.option("--batch-tokens", type=int, default=None, help="Pack micro-batches to N tokens.")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per step [1].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [5e-5].")
@click.option("--warmup", type=float, default=None, help="Warm-up: fraction (<1) or steps [0.03].")
@click.option("--seed", type=int, default=None, help="Data order and init seed [0].")
@click.option("--lora-r", type=int, default=None, help="LoRA rank (0: full fine-tune) [0].")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha [16].")
@click.option("--lora-target", default=None, help="Comma-separated modules for LoRA [all-linear].")
@click.option("--rslora", is_flag=True, default=None, help="Rank-stabilized LoRA scaling.")
@click.option("--merge-lora", is_flag=True, default=None, help="Save final/ with LoRA merged.")
@click.option("--eval-every", type=int, default=None, help="Eval every N steps [start and end].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps [end].")
@click.option("--stop-at-step", type=int, default=None, help="Checkpoint and stop after step N.")
@click.option("--max-length", type=int, default=None, help="Longest sequence [student's context].")
@click.option("--chunk-tokens", type=int, default=None, help="Positions per logits chunk [512].")
@click.option("--bf16", is_flag=True, default=None, help="bfloat16 autocast for the forward.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the latest checkpoint.")
@click.option(
    "--trust-remote-code", is_flag=True, default=None, help="Allow model-shipped Python code."
)
@click.option(
    "--no-progress", "no_progress", is_flag=True, default=False, help="Hide the progress bar."
)
@config_options
@click.pass_context
def main(context, config_file, assignments, no_progress, lora_target, **flags) -> None:
    """Train a student from teacher-dump shards (sequence-level and logit KD, no teacher).

    \b
    student-train --shards DIR --student MODEL --out DIR (--max-steps N | --epochs E) [options]
    torchrun --nproc-per-node N -m student_train.cli ...   (data parallel)
    student-train init-student --teacher DIR --layers N --out DIR
    """
    if context.invoked_subcommand is not None:
        return
    if no_progress:
        flags["progress"] = False
    if lora_target is not None:
        flags["lora_target"] = tuple(
            part.strip() for part in lora_target.split(",") if part.strip()
        )
    try:
        config = build_config(
            TrainConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        from transformers.utils import logging as transformers_logging

        from student_train.train import run_training

        # Our own bar shows progress; transformers' per-load/save bars would only add noise.
        transformers_logging.disable_progress_bar()

        summary = run_training(config)
    except UserError as error:
        exit_with(error)
    if summary is not None and summary.get("final"):
        print_summary(summary)


def print_summary(summary: dict) -> None:
    """Where the artefacts are, and the last numbers (rank 0 only)."""
    out = Path(summary["out"])
    train = summary.get("train") or {}
    lines = [f"trained {summary['steps']} steps, {summary['tokens']:,} target tokens"]
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
@click.option("--layers", required=True, type=int, help="Decoder layers to keep (evenly spaced).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New model directory.")
@click.option("--trust-remote-code", is_flag=True, default=False)
def init_student(teacher: str, layers: int, out: Path, trust_remote_code: bool) -> None:
    """Make a student from a teacher by keeping some of its layers (DistilBERT-style init)."""
    from shared.model_preparation import derive_student
    from shared.models import resolve_model

    try:
        directory = resolve_model(teacher, flag="--teacher").directory
        derive_student(directory, layers, out, trust_remote_code=trust_remote_code)
    except UserError as error:
        exit_with(error)
    click.echo(str(out))


if __name__ == "__main__":
    main()
