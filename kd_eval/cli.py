"""`kd-eval`: teacher, baselines and distilled students on one task, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from shared.config import build_config, config_options
from shared.errors import UserError, exit_with
from shared.files import disk_full_exit


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--task",
    type=click.Choice(["gsm8k", "summ", "lm", "cls"]),
    default=None,
    help="gsm8k | summ | lm | cls.",
)
@click.option(
    "--model", "models", multiple=True, metavar="NAME=PATH", help="A model to evaluate (repeat)."
)
@click.option("--data-path", default=None, help="Local data file or directory.")
@click.option("--split", default=None, help="Split to read [test].")
@click.option("--limit", type=int, default=None, help="First N examples (lm: N windows).")
@click.option(
    "--teacher-shards", default=None, help="teacher-dump dir: adds KL and top-1 agreement."
)
@click.option("--max-new-tokens", type=int, default=None, help="Longest answer [256].")
@click.option("--chunk-tokens", type=int, default=None, help="lm: tokens per window [512].")
@click.option("--out", default=None, help="Write results.json, chart.png and predictions here.")
@click.option("--dtype", default=None, help="Engine dtype for every model [auto; CPU: float32].")
@click.option("--max-model-len", type=int, default=None, help="Engine context length.")
@click.option("--enforce-eager", is_flag=True, default=None, help="Skip vLLM compilation.")
@click.option("--no-chat-template", "no_chat_template", is_flag=True, default=False)
@click.option("--trust-remote-code", is_flag=True, default=None)
@click.option("--no-progress", "no_progress", is_flag=True, default=False)
@config_options
def main(config_file, assignments, no_chat_template, no_progress, models, **flags) -> None:
    """Evaluate models on a task with identical prompts and decoding; print a table.

    \b
    kd-eval --task gsm8k|summ|lm --model NAME=PATH [--model NAME=PATH ...] [--data-path P]
            [--split S] [--limit N] [--teacher-shards DIR] [--max-new-tokens N] [--out DIR]
    """
    if models:
        flags["models"] = tuple(models)
    if no_chat_template:
        flags["chat_template"] = False
    if no_progress:
        flags["progress"] = False
    try:
        from transformers.utils import logging as transformers_logging

        from kd_eval.evaluation import EvalConfig, markdown_table, run_evaluation

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
