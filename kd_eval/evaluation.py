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

from kd_eval.config import EvalConfig, parse_model
from kd_eval.report import write_outputs
from shared.config import config_to_dict
from shared.errors import UserError
from shared.models import AUXILIARY_WEIGHTS, ResolvedModel, context_length, resolve_model
from shared.records import LoadedRecords
from shared.scoring import (
    bleu_score,
    final_number,
    gsm8k_correct,
    language_model_metrics,
    language_model_sums,
    rouge_per_sample,
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

LM_TOP_K = 5
"""lm: the top-k each position is scored with (acc@5 needs 5)."""
FIDELITY_BATCH_ROWS = 8
"""Rows of --teacher-shards per forward pass when measuring fidelity (file order)."""


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
        if path.name in AUXILIARY_WEIGHTS:
            continue
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
        sampled_logprobs=False,  # kd-eval scores with the exact top-k
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
    check_prompts_fit(prompt_ids, engine_context(config, directory), config, directory)
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
    metrics, predictions = score_answers(config.task, texts, inputs.references)
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
        "predictions": predictions,
    }


def score_answers(
    task: str, texts: list[str], references: list[list[str]]
) -> tuple[dict, list[dict]]:
    """(metrics, one prediction record per answer): GSM8K final-answer accuracy, or ROUGE-1/2/L
    and BLEU against the references."""
    if task == "gsm8k":
        correct = [
            gsm8k_correct(text, sample_references[0])
            for text, sample_references in zip(texts, references, strict=True)
        ]
        metrics = {"accuracy": float(np.mean(correct)), "correct": int(sum(correct))}
        predictions = [
            {
                "sample_id": str(index),
                "reference": references[index][0],
                "prediction": text,
                "extracted_answer": final_number(text),
                "expected_answer": final_number(references[index][0]),
                "correct": bool(correct[index]),
            }
            for index, text in enumerate(texts)
        ]
    else:
        per_sample = rouge_per_sample(texts, references)
        metrics = {
            name: float(np.mean([sample[name] for sample in per_sample])) if per_sample else 0.0
            for name in ("rouge1", "rouge2", "rougeL")
        }
        metrics["bleu"] = bleu_score(texts, references)
        predictions = [
            {
                "sample_id": str(index),
                "references": list(references[index]),
                "prediction": text,
                **per_sample[index],
            }
            for index, text in enumerate(texts)
        ]
    return metrics, predictions


def check_prompts_fit(
    prompt_ids: list[list[int]], context: int, config: EvalConfig, directory: Path
) -> None:
    """Refuse prompts that leave no room for --max-new-tokens (vLLM would fail mid-batch)."""
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
    per_window: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    for index, scored in engine.score(
        ((index, chunk.tolist()) for index, chunk in enumerate(chunks)),
        top_k=LM_TOP_K,
        max_in_flight=config.max_in_flight,
    ):
        target_ids = chunks[index][1:]
        per_window[index] = language_model_sums(
            target_ids, scored.position_logprobs[:, 0], scored.position_ids[:, 1:]
        )
        sums += per_window[index]
    seconds = time.perf_counter() - started
    metrics = language_model_metrics(sums)
    predictions = []
    for index in range(len(chunks)):
        window = language_model_metrics(per_window[index])
        predictions.append(
            {
                "sample_id": str(index),
                "first_tokens": chunks[index][:8].tolist(),
                "tokens": window["tokens"],
                "nll": float(per_window[index][0] / max(window["tokens"], 1)),
                "perplexity": window["perplexity"],
                "acc@1": window["acc@1"],
                "acc@5": window["acc@5"],
            }
        )
    return {
        "metrics": {**metrics, "samples": len(chunks)},
        "cost": {
            "seconds": seconds,
            "ms_per_sample": 1000.0 * seconds / max(len(chunks), 1),
            "scored_tokens": metrics["tokens"],
            "tokens_per_second": metrics["tokens"] / max(seconds, 1e-9),
        },
        "prompt_ids_sha256": _sha256_of_arrays(chunks),
        "predictions": predictions,
    }


def measure_fidelity(config: EvalConfig, directory: Path, tokenizer) -> dict:
    """KL(teacher || model) and top-1 agreement on --teacher-shards (None if tokenizers differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from schemas.manifest import storage_of_manifest
    from shared.causal_lm import output_logits_function
    from shared.fidelity import fidelity_metrics, fidelity_sums_over_batches
    from shared.shard_reader import iterate_rows, open_dump

    dump = open_dump(config.teacher_shards, flag="--teacher-shards")
    if tokenizer_fingerprint(tokenizer) != dump.manifest["tokenizer"]["fingerprint"]:
        return {"skipped": "the model's tokenizer differs from the teacher's"}
    storage = storage_of_manifest(dump.manifest)
    if storage is not None and storage.representation == "sampled":
        # Draws estimate the teacher's distribution without bias only inside a loss's gradient;
        # a KL to the draws is not the KL to the teacher.
        return {"skipped": "the teacher shards hold sampled draws (--store sampled)"}
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
    if config.task == "cls":
        return run_classification_evaluation(config, engines)
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


def run_classification_evaluation(config: EvalConfig, engines: dict | None = None) -> dict:
    """kd-eval --task cls: every classifier on the same texts (kd_eval/classification.py)."""
    from kd_eval.classification import (
        classification_fidelity,
        load_classification_inputs,
        run_classifier,
        teacher_log_probabilities,
        with_labels,
    )
    from shared.classification import is_sequence_classifier, model_labels

    inputs = load_classification_inputs(config)
    models = []
    for name, reference in (parse_model(text) for text in config.models):
        resolved = resolve_model(reference, flag="--model")
        if not is_sequence_classifier(resolved.config):
            architecture = ", ".join(resolved.config.get("architectures") or ["unknown"])
            raise UserError(
                f"--model {name}={reference} is a {architecture}, not a sequence classifier: "
                "kd-eval --task cls needs *ForSequenceClassification models (give a bare "
                "encoder a head with student-train init-student --labels)"
            )
        tokenizer = load_tokenizer(resolved.directory, trust_remote_code=config.trust_remote_code)
        models.append((name, resolved, tokenizer))
    if inputs.labels is None:
        inputs = with_labels(inputs, model_labels(models[0][1].config))
    teacher = teacher_log_probabilities(config, inputs) if config.teacher_shards else None
    results = {}
    for name, resolved, tokenizer in models:
        if config.progress:
            print(f"kd-eval: {name} ({resolved.reference}) on cls...", file=sys.stderr)
        result = run_classifier(
            config, name, resolved, tokenizer, inputs, (engines or {}).get(name)
        )
        log_probabilities = result.pop("log_probabilities")
        result = {
            "path": str(resolved.directory),
            "parameters": count_parameters(resolved.directory),
            **result,
        }
        if teacher is not None:
            result["fidelity"] = classification_fidelity(teacher, log_probabilities)
        results[name] = result
    report = {
        "task": "cls",
        "settings": {
            "config": config_to_dict(config),
            "data": {
                "source": inputs.source,
                "fingerprint": inputs.fingerprint,
                "samples": len(inputs.texts),
                "labels": list(inputs.labels),
            },
            "decoding": {"classify_backend": config.classify_backend},
        },
        "models": results,
    }
    if config.out:
        write_outputs(Path(config.out), report)
    return report
