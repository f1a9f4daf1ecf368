"""kd-eval: every model on the same prompts with the same decoding, side by side.

For each `--model NAME=PATH`, in order: build the vLLM engine (shared/engine.py, the same wrapper
teacher-dump uses, with the same settings for every model), run the task (greedy generation for
gsm8k/summ, teacher-forced scoring for lm), score it with shared/scoring.py, close the engine;
then, with --teacher-shards, load the model in transformers and measure its fidelity to the
teacher on those shards (student_train/fidelity.py, the numbers student-train reports).
Prompts come from shared/tasks.py and are rendered by shared/tokenizer.py, as in teacher-dump.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import config_to_dict
from shared.errors import UserError, check_all
from shared.files import atomic_write, atomic_write_json, atomic_write_text
from shared.models import ResolvedModel, context_length, resolve_model
from shared.records import LoadedRecords
from shared.scoring import (
    bleu_score,
    gsm8k_correct,
    language_model_metrics,
    language_model_sums,
    rouge_scores,
)
from shared.tasks import TASKS, examples_from_records, load_records
from shared.tokenizer import (
    chunk_text,
    has_chat_template,
    load_tokenizer,
    render_prompt,
    stop_token_ids,
    tokenizer_fingerprint,
)

EVAL_TASKS = ("gsm8k", "summ", "lm", "cls")
HEADLINE = {
    "gsm8k": ("accuracy", "GSM8K exact-match accuracy"),
    "summ": ("rougeL", "ROUGE-L F1"),
    "lm": ("perplexity", "perplexity (lower is better)"),
}
"""Per task: the metric plotted in the bar chart and its label."""
LM_TOP_K = 5
"""lm: the top-k each position is scored with (acc@5 needs 5)."""
FIDELITY_BATCH_ROWS = 8
"""Rows of --teacher-shards per forward pass when measuring fidelity (file order)."""


@dataclass(frozen=True)
class EvalConfig:
    task: str
    """gsm8k (greedy, final-number exact match), summ (ROUGE/BLEU), lm (perplexity, acc@1/5),
    cls (not available yet)."""
    models: tuple[str, ...]
    """NAME=PATH pairs (PATH: a local model directory with safetensors, or a hub id)."""
    data_path: str | None = None
    """Local data file or directory (else the task's hub dataset, which needs network)."""
    split: str = "test"
    """Split to read (the file name stem when --data-path is a directory)."""
    limit: int | None = None
    """Evaluate on the first N examples (lm: N chunks)."""
    teacher_shards: str | None = None
    """A teacher-dump directory: adds KL(teacher || model) and top-1 agreement per model."""
    fidelity_limit: int | None = None
    """Use at most this many rows of --teacher-shards."""
    max_new_tokens: int = 256
    """gsm8k/summ: the longest generated answer."""
    chunk_tokens: int = 512
    """lm: tokens per scored window."""
    chat_template: bool = True
    """Render prompts with each model's chat template when it has one (as teacher-dump does)."""
    out: str | None = None
    """Directory for results.json, the chart and per-model predictions (default: print only)."""
    dtype: str = "auto"
    """Engine dtype for every model (use float32 on CPU)."""
    max_model_len: int | None = None
    """Engine context length for every model (default: each model's)."""
    gpu_memory_utilization: float | None = None
    """Fraction of accelerator memory per engine; default 0.9 on GPU, 0.1 on CPU."""
    enforce_eager: bool = False
    """Skip vLLM compilation (tiny models, tests)."""
    trust_remote_code: bool = False
    """Allow Python code shipped with a model/tokenizer to run."""
    max_in_flight: int = 256
    """Requests handed to each engine at once."""
    seed: int = 0
    """Engine seed (decoding is greedy, so results do not depend on it)."""
    progress: bool = True
    """Print one progress line per model stage on stderr."""

    def __post_init__(self):
        if self.task not in EVAL_TASKS:
            raise UserError(f"--task {self.task!r} is not one of {', '.join(EVAL_TASKS)}")
        if self.task == "cls":
            raise UserError(
                "kd-eval --task cls: sequence-classification models are not supported yet (they "
                "come with the classification work); use gsm8k, summ or lm"
            )
        if not self.models:
            raise UserError("pass at least one --model NAME=PATH")
        names = [parse_model(text)[0] for text in self.models]
        if len(set(names)) != len(names):
            raise UserError(f"--model names must be unique, got {', '.join(names)}")
        checks = [
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.chunk_tokens >= 2, "--chunk-tokens must be at least 2"),
            (self.max_in_flight >= 1, "--max-in-flight must be at least 1"),
            (
                self.fidelity_limit is None or self.fidelity_limit >= 1,
                "--fidelity-limit must be at least 1",
            ),
        ]
        check_all(checks)


def parse_model(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its last component."""
    name, separator, path = text.partition("=")
    if not separator:
        path = text
        name = Path(text.rstrip("/")).name or text
    if not name or not path:
        raise UserError(f"--model {text!r}: write NAME=PATH, e.g. --model student=out/final")
    return name, path


@dataclass(frozen=True)
class TaskInputs:
    """What every model is given: prompt texts with references (gsm8k/summ) or raw texts (lm)."""

    prompts: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...]
    source: str
    fingerprint: str


def load_task_inputs(config: EvalConfig) -> TaskInputs:
    """Read the task's data once; every model then sees exactly these inputs."""
    task = TASKS["text" if config.task == "lm" else config.task]
    data_path = Path(config.data_path) if config.data_path else None
    records: LoadedRecords = load_records(task, task.name, data_path, config.split)
    if not records.rows:
        raise UserError(
            f"the {config.task} data at {records.source} is empty: pass a file with records"
        )
    if config.task == "lm":
        texts = tuple(str(row.get("text", "")) for row in records.rows)
        return TaskInputs((), (), texts, records.source, records.fingerprint)
    examples = examples_from_records(task, records, config.limit)
    for example in examples:
        if not example.prompt.strip():
            raise UserError(
                f"record {example.index} of {records.source} has an empty prompt: fix or remove it"
            )
        if not example.references:
            raise UserError(
                f"record {example.index} of {records.source} has no reference answer, which "
                f"{config.task} scoring needs: pass data with references"
            )
    return TaskInputs(
        prompts=tuple(example.prompt for example in examples),
        references=tuple(example.references for example in examples),
        texts=(),
        source=records.source,
        fingerprint=records.fingerprint,
    )


def _sha256_of_arrays(arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.asarray(array, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def count_parameters(directory: Path) -> int:
    """Parameters stored in a model directory's safetensors files (read from headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                total += int(np.prod(handle.get_slice(key).get_shape()))
    return total


def engine_settings(config: EvalConfig, directory: Path, max_logprobs: int):
    from shared.engine import EngineSettings

    return EngineSettings(
        model=str(directory),
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_logprobs=max_logprobs,
        tensor_parallel_size=1,
        gpu_memory_utilization=config.gpu_memory_utilization,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        trust_remote_code=config.trust_remote_code,
    )


def evaluate_model(
    config: EvalConfig, resolved: ResolvedModel, tokenizer, inputs: TaskInputs, engine=None
) -> dict:
    """One model: task metrics, cost and (with --teacher-shards) fidelity."""
    result: dict = {
        "path": str(resolved.directory),
        "parameters": count_parameters(resolved.directory),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    owns_engine = engine is None
    if owns_engine:
        from shared.engine import TeacherEngine

        engine = TeacherEngine(engine_settings(config, resolved.directory, LM_TOP_K))
    try:
        if config.task == "lm":
            result.update(run_language_model(config, engine, tokenizer, inputs))
        else:
            result.update(run_generation(config, engine, tokenizer, inputs, resolved.directory))
    finally:
        if owns_engine:
            engine.close()
    if config.teacher_shards:
        result["fidelity"] = measure_fidelity(config, resolved.directory, tokenizer)
    return result


def run_generation(
    config: EvalConfig, engine, tokenizer, inputs: TaskInputs, directory: Path
) -> dict:
    """Greedy answers to every prompt, scored; cost measured over the whole batch."""
    use_template = config.chat_template and has_chat_template(tokenizer)
    prompt_ids = [
        render_prompt(tokenizer, prompt, use_chat_template=use_template)
        for prompt in inputs.prompts
    ]
    context = engine_context(config, directory)
    too_long = [
        index for index, ids in enumerate(prompt_ids) if len(ids) + config.max_new_tokens > context
    ]
    if too_long:
        first = too_long[0]
        raise UserError(
            f"{len(too_long)} prompt(s) do not fit {directory.name}'s context of {context} tokens "
            f"with --max-new-tokens {config.max_new_tokens} (first: record {first}, "
            f"{len(prompt_ids[first])} prompt tokens): lower --max-new-tokens, raise "
            "--max-model-len, or use shorter inputs"
        )
    stop_ids = stop_token_ids(tokenizer, directory)
    requests = ((index, ids, 0) for index, ids in enumerate(prompt_ids))
    answers: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    for index, completions in engine.generate(
        requests,
        num_samples=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        top_k=1,
        max_in_flight=config.max_in_flight,
    ):
        answers[index] = completions[0].token_ids
    seconds = time.perf_counter() - started
    texts = [
        tokenizer.decode(
            [t for t in answers[index].tolist() if t not in stop_ids], skip_special_tokens=True
        )
        for index in range(len(prompt_ids))
    ]
    generated = int(sum(len(answers[index]) for index in answers))
    if config.task == "gsm8k":
        correct = [
            gsm8k_correct(text, references[0])
            for text, references in zip(texts, inputs.references, strict=True)
        ]
        metrics = {"accuracy": float(np.mean(correct)), "correct": int(sum(correct))}
    else:
        metrics = rouge_scores(texts, inputs.references)
        metrics["bleu"] = bleu_score(texts, inputs.references)
    return {
        "metrics": {**metrics, "samples": len(texts)},
        "cost": {
            "seconds": seconds,
            "ms_per_sample": 1000.0 * seconds / max(len(texts), 1),
            "generated_tokens": generated,
            "tokens_per_second": generated / max(seconds, 1e-9),
        },
        "prompt_ids_sha256": _sha256_of_arrays(prompt_ids),
        "chat_template": use_template,
        "predictions": texts,
    }


def engine_context(config: EvalConfig, directory: Path) -> int:
    """The context length the engine runs with: --max-model-len, else the model's."""
    if config.max_model_len:
        return config.max_model_len
    return context_length(json.loads((directory / "config.json").read_text())) or 1 << 30


def run_language_model(config: EvalConfig, engine, tokenizer, inputs: TaskInputs) -> dict:
    """Perplexity and next-token accuracy over the text's windows (teacher-forced)."""
    chunks = chunk_text(
        list(inputs.texts), tokenizer, chunk_tokens=config.chunk_tokens, limit=config.limit
    )
    sums = np.zeros(4, dtype=np.float64)
    started = time.perf_counter()
    for index, scored in engine.score(
        ((index, chunk.tolist()) for index, chunk in enumerate(chunks)),
        top_k=LM_TOP_K,
        max_in_flight=config.max_in_flight,
    ):
        target_ids = chunks[index][1:]
        sums += language_model_sums(
            target_ids, scored.position_logprobs[:, 0], scored.position_ids[:, 1:]
        )
    seconds = time.perf_counter() - started
    metrics = language_model_metrics(sums)
    return {
        "metrics": {**metrics, "samples": len(chunks)},
        "cost": {
            "seconds": seconds,
            "ms_per_sample": 1000.0 * seconds / max(len(chunks), 1),
            "scored_tokens": metrics["tokens"],
            "tokens_per_second": metrics["tokens"] / max(seconds, 1e-9),
        },
        "prompt_ids_sha256": _sha256_of_arrays(chunks),
    }


def measure_fidelity(config: EvalConfig, directory: Path, tokenizer) -> dict:
    """KL(teacher || model) and top-1 agreement on --teacher-shards (None if tokenizers differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.causal_lm import output_logits_function
    from shared.fidelity import fidelity_metrics, fidelity_sums_over_batches
    from shared.shard_reader import iterate_rows, open_dump

    dump = open_dump(config.teacher_shards, flag="--teacher-shards")
    if tokenizer_fingerprint(tokenizer) != dump.manifest["tokenizer"]["fingerprint"]:
        return {"skipped": "the model's tokenizer differs from the teacher's"}
    model = AutoModelForCausalLM.from_pretrained(
        str(directory),
        dtype=torch.float32,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
    )
    rows = iter(itertools.islice(iterate_rows(dump), config.fidelity_limit))
    batches = iter(lambda: list(itertools.islice(rows, FIDELITY_BATCH_ROWS)), [])
    sums = fidelity_sums_over_batches(
        model,
        output_logits_function(model, len(tokenizer)),
        batches,
        chunk_tokens=512,
        device=torch.device("cpu"),
    )
    metrics = fidelity_metrics(sums)
    return {
        "kl": metrics["eval_kl"],
        "top1_agreement": metrics["eval_top1"],
        "ce": metrics["eval_ce"],
        "tokens": metrics["eval_tokens"],
    }


def run_evaluation(config: EvalConfig, engines: dict | None = None) -> dict:
    """Evaluate every model; write results.json, the chart and predictions when --out is given.

    `engines` maps a model NAME to an already running TeacherEngine to reuse (tests)."""
    inputs = load_task_inputs(config)
    # Every model and tokenizer is checked before the first engine starts: bad input fails in
    # seconds, not after minutes of evaluating the models before it.
    models = []
    for name, reference in (parse_model(text) for text in config.models):
        resolved = resolve_model(
            reference, flag="--model", trust_remote_code=config.trust_remote_code
        )
        tokenizer = load_tokenizer(resolved.directory, trust_remote_code=config.trust_remote_code)
        models.append((name, resolved, tokenizer))
    results = {}
    for name, resolved, tokenizer in models:
        if config.progress:
            print(f"kd-eval: {name} ({resolved.reference}) on {config.task}...", file=sys.stderr)
        engine = (engines or {}).get(name)
        results[name] = evaluate_model(config, resolved, tokenizer, inputs, engine)
    report = {
        "task": config.task,
        "settings": {
            "config": config_to_dict(config),
            "data": {
                "source": inputs.source,
                "fingerprint": inputs.fingerprint,
                "samples": len(inputs.prompts) or None,
            },
            "decoding": {"temperature": 0.0, "max_new_tokens": config.max_new_tokens}
            if config.task != "lm"
            else {"teacher_forced": True, "chunk_tokens": config.chunk_tokens},
        },
        "models": results,
    }
    if config.out:
        write_outputs(Path(config.out), report)
    return report


def markdown_table(report: dict) -> str:
    """One row per model: params, the task's metrics, fidelity and cost."""
    task = report["task"]
    metric_columns = {
        "gsm8k": [("accuracy", "accuracy", "{:.3f}")],
        "summ": [
            ("rouge1", "ROUGE-1", "{:.4f}"),
            ("rouge2", "ROUGE-2", "{:.4f}"),
            ("rougeL", "ROUGE-L", "{:.4f}"),
            ("bleu", "BLEU", "{:.2f}"),
        ],
        "lm": [
            ("perplexity", "perplexity", "{:.2f}"),
            ("acc@1", "acc@1", "{:.3f}"),
            ("acc@5", "acc@5", "{:.3f}"),
        ],
    }[task]
    fidelity = any("fidelity" in result for result in report["models"].values())
    header = ["model", "params"] + [label for _, label, _ in metric_columns]
    if fidelity:
        header += ["KL to teacher", "top-1 agreement"]
    header += ["ms/sample", "tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in report["models"].items():
        millions = result["parameters"] / 1e6
        row = [name, f"{millions:.1f}M" if millions >= 10 else f"{millions:.2f}M"]
        row += [form.format(result["metrics"][key]) for key, _, form in metric_columns]
        if fidelity:
            values = result.get("fidelity") or {}
            if "kl" in values:
                row += [f"{values['kl']:.4f}", f"{values['top1_agreement']:.3f}"]
            else:
                row += ["n/a", "n/a"]
        row += [
            f"{result['cost']['ms_per_sample']:.1f}",
            f"{result['cost']['tokens_per_second']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, report: dict) -> None:
    """results.json, chart.png and predictions-NAME.jsonl in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    compact = {**report, "models": {}}
    for name, result in report["models"].items():
        predictions = result.get("predictions")
        if predictions is not None:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            lines = "".join(json.dumps({"prediction": text}) + "\n" for text in predictions)
            atomic_write_text(out / f"predictions-{safe}.jsonl", lines)
        compact["models"][name] = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_json(out / "results.json", compact)
    plot_headline(out / "chart.png", report)


def plot_headline(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = HEADLINE[report["task"]]
    names = list(report["models"])
    values = [report["models"][name]["metrics"][key] for name in names]
    figure, axis = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.5))
    bars = axis.bar(names, values, color=[f"C{index}" for index in range(len(names))])
    axis.bar_label(bars, fmt="%.3g")
    axis.set_ylabel(label)
    axis.set_title(f"kd-eval {report['task']}: {label}")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
