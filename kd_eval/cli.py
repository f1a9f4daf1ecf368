"""`kd-eval`: teacher, baselines and distilled students on one task, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from kd_shards.kd_eval.config import EvalConfig
from kd_shards.shared.config import build_config, config_flags, config_options
from kd_shards.shared.errors import UserError, exit_with
from kd_shards.shared.files import disk_full_exit
from kd_shards.shared.tasks import RENAMED

FLAGS = (
    "data", "data_path", "split", "limit", "teacher_shards", "max_new_tokens", "chunk_tokens",
    "out", "dtype", "max_model_len", "enforce_eager", "chat_template", "trust_remote_code",
    "progress", "classify_backend",
)  # fmt: skip
"""The EvalConfig fields that have a flag (plus --model); any field can be set with --set."""
NEGATED = {"chat_template": "--no-chat-template", "progress": "--no-progress"}
"""Flags that turn off a field that is on by default."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model", "models", multiple=True, metavar="NAME=PATH", help="A model to evaluate (repeat)."
)
@config_flags(
    EvalConfig,
    FLAGS,
    negated=NEGATED,
)
@click.option(
    "--task",
    "task",
    metavar="NAME",
    help="The same as --data: the task (one name per task in every command).",
)
@config_options
def main(config_file, assignments, models, task, **flags) -> None:
    """Evaluate models on a task with identical prompts and decoding; print a table.

    \b
    kd-eval --task TASK|FILE --model NAME=PATH [--model NAME=PATH ...]
            [--data-path P] [--split S] [--limit N] [--teacher-shards DIR] [--max-new-tokens N]
            [--out DIR]

    \b
    TASK: gsm8k, summ, text, triviaqa, aqua-rat-letter (generation or text); sst2, agnews,
    mrpc, rte, qqp, cola, phrasebank, phrasebank-allagree (classification); winogrande,
    social-iqa, aqua-rat (multiple choice)
    """
    if task is not None:
        if task in RENAMED:
            exit_with(UserError(f"--task {task} is not a task name: use --task {RENAMED[task]}"))
        if flags.get("data") not in (None, task):
            exit_with(UserError(f"--task {task} and --data {flags['data']} disagree: pass one"))
        flags["data"] = task
    if models:
        flags["models"] = tuple(models)
    try:
        from transformers.utils import logging as transformers_logging

        from kd_shards.kd_eval.evaluation import run_evaluation
        from kd_shards.kd_eval.report import markdown_table

        transformers_logging.disable_progress_bar()

        config = build_config(
            EvalConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        report = run_evaluation(config)
    except UserError as error:
        exit_with(error)
    except Exception as error:
        disk_full = disk_full_exit(error, "free space there and rerun the same command")
        if disk_full is None:
            raise
        exit_with(disk_full)
    click.echo(markdown_table(report))
    if config.out:
        click.echo(
            f"\nresults: {Path(config.out) / 'results.json'}  chart: {Path(config.out) / 'chart.png'}"
        )


if __name__ == "__main__":
    main()
