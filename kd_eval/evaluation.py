"""kd-eval: every model on the same prompts with the same decoding, side by side.

For each `--model NAME=PATH`, in order: build the vLLM engine (shared/engine.py, the same wrapper
teacher-dump uses, with the same settings for every model), run the task as its kind says (greedy
generation, or teacher-forced scoring of raw text), score it with the task's own `score`
(shared/tasks/), close the engine;
then, with --teacher-shards, load the model in transformers and measure its fidelity to the
teacher on those shards (student_train/fidelity.py, the numbers student-train reports).
Prompts come from shared/tasks/ and are rendered by shared/tokenizer.py, as in teacher-dump.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_shards.kd_eval.config import EvalConfig, parse_model
from kd_shards.kd_eval.report import write_outputs
from kd_shards.shared.config import config_to_dict
from kd_shards.shared.encoder_decoder import is_encoder_decoder
from kd_shards.shared.errors import UserError
from kd_shards.shared.models import AUXILIARY_WEIGHTS, ResolvedModel, context_length, resolve_model
from kd_shards.shared.records import LoadedRecords
from kd_shards.shared.scoring import language_model_sums
from kd_shards.shared.tasks import TASKS, examples_from_records, load_records, resolve_task
from kd_shards.shared.tasks.interface import Example, Task
from kd_shards.shared.tokenizer import (
    chunk_text,
    has_chat_template,
    load_tokenizer,
    render_prompt,
    stop_token_ids,
    tokenizer_fingerprint,
)

LM_TOP_K = 5
"""text: the top-k each position is scored with (acc@5 needs 5)."""
FIDELITY_BATCH_ROWS = 8
"""Rows of --teacher-shards per forward pass when measuring fidelity (file order)."""


@dataclass(frozen=True)
class TaskInputs:
    """What every model is given: the task's Examples (generate) or raw texts (text)."""

    examples: tuple[Example, ...]
    texts: tuple[str, ...]
    source: str
    fingerprint: str


def task_kind(data: str) -> str:
    """The kind of the task --data names: a built-in task's, or classify for a file (labelled
    texts); a renamed or unknown name is refused."""
    if data in TASKS:
        return TASKS[data].kind
    resolve_task(data, "text", "label")
    return "classify"


def load_task_inputs(config: EvalConfig, task: Task) -> TaskInputs:
    """Read the task's data once; every model then sees exactly these inputs."""
    data_path = Path(config.data_path) if config.data_path else None
    records: LoadedRecords = load_records(task, task.name, data_path, config.split)
    if not records.rows:
        raise UserError(
            f"the {task.name} data at {records.source} is empty: pass a file with records"
        )
    if task.kind == "text":
        texts = tuple(str(row.get("text", "")) for row in records.rows)
        return TaskInputs((), texts, records.source, records.fingerprint)
    examples = examples_from_records(task, records, config.limit)
    for example in examples:
        if not example.prompt.strip():
            raise UserError(
                f"record {example.index} of {records.source} has an empty prompt: fix or remove it"
            )
        if not example.references:
            raise UserError(
                f"record {example.index} of {records.source} has no reference answer, which "
                f"{task.name} scoring needs: pass data with references"
            )
    return TaskInputs(tuple(examples), (), records.source, records.fingerprint)


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
    from kd_shards.shared.engine import EngineSettings

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
    config: EvalConfig,
    task: Task,
    resolved: ResolvedModel,
    tokenizer,
    inputs: TaskInputs,
    engine=None,
) -> dict:
    """One model: task metrics, cost and (with --teacher-shards) fidelity."""
    result: dict = {
        "path": str(resolved.directory),
        "parameters": count_parameters(resolved.directory),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    owns_engine = engine is None
    if owns_engine:
        from kd_shards.shared.seq2seq_engine import start_token_engine

        # vLLM, or transformers for an encoder-decoder model: the same door as teacher-dump's.
        settings = engine_settings(config, resolved.directory, LM_TOP_K)
        engine = start_token_engine(settings, resolved.config)
    try:
        run = RUNNERS[task.kind]
        result.update(run(config, task, engine, tokenizer, inputs, resolved.directory))
    finally:
        if owns_engine:
            engine.close()
    if config.teacher_shards:
        result["fidelity"] = measure_fidelity(config, resolved.directory, tokenizer)
    return result


def run_generation(
    config: EvalConfig, task: Task, engine, tokenizer, inputs: TaskInputs, directory: Path
) -> dict:
    """Greedy answers to every prompt, scored by the task; cost measured over the whole batch."""
    use_template = config.chat_template and has_chat_template(tokenizer)
    prompt_ids = [
        render_prompt(tokenizer, example.prompt, use_chat_template=use_template)
        for example in inputs.examples
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
    metrics, predictions = task.score(texts, inputs.examples)
    return {
        "metrics": {**metrics, "samples": len(texts)},
        "cost": {
            "seconds": seconds,
            "ms_per_sample": 1000.0 * seconds / max(len(texts), 1),
            "generated_tokens": generated,
            "tokens_per_second": generated / max(seconds, 1e-9),
            "samples_per_second": len(texts) / max(seconds, 1e-9),
        },
        "prompt_ids_sha256": _sha256_of_arrays(prompt_ids),
        "chat_template": use_template,
        "predictions": predictions,
    }


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


def run_language_model(
    config: EvalConfig, task: Task, engine, tokenizer, inputs: TaskInputs, directory: Path
) -> dict:
    """Every window of the text teacher-forced, scored by the task (perplexity, next-token
    accuracy)."""
    chunks = chunk_text(
        list(inputs.texts), tokenizer, chunk_tokens=config.chunk_tokens, limit=config.limit
    )
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
    seconds = time.perf_counter() - started
    metrics, predictions = task.score([per_window[index] for index in range(len(chunks))], chunks)
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

    from kd_shards.schemas.manifest import storage_of_manifest
    from kd_shards.shared.causal_lm import output_logits_function
    from kd_shards.shared.fidelity import fidelity_metrics, fidelity_sums_over_batches
    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    dump = open_dump(config.teacher_shards, flag="--teacher-shards")
    if tokenizer_fingerprint(tokenizer) != dump.manifest["tokenizer"]["fingerprint"]:
        return {"skipped": "the model's tokenizer differs from the teacher's"}
    storage = storage_of_manifest(dump.manifest)
    if storage is not None and storage.representation == "sampled":
        # Draws estimate the teacher's distribution without bias only inside a loss's gradient;
        # a KL to the draws is not the KL to the teacher.
        return {"skipped": "the teacher shards hold sampled draws (--store sampled)"}
    rows = iter(itertools.islice(iterate_rows(dump), config.fidelity_limit))
    batches = iter(lambda: list(itertools.islice(rows, FIDELITY_BATCH_ROWS)), [])
    if is_encoder_decoder(json.loads((directory / "config.json").read_text())):
        sums = encoder_decoder_fidelity(config, directory, len(tokenizer), batches)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=torch.float32,
            trust_remote_code=config.trust_remote_code,
            use_safetensors=True,
        )
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


def encoder_decoder_fidelity(config: EvalConfig, directory: Path, vocabulary: int, batches):
    """(4,) fidelity sums of an encoder-decoder model (shared.encoder_decoder) on `batches`."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from kd_shards.shared import encoder_decoder

    model = AutoModelForSeq2SeqLM.from_pretrained(
        str(directory),
        dtype=torch.float32,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
    )
    start_id = encoder_decoder.decoder_start_id(model.config)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else start_id
    return encoder_decoder.fidelity_sums_over_batches(
        model,
        encoder_decoder.output_logits_function(model, vocabulary),
        batches,
        start_id=start_id,
        pad_id=pad_id,
        chunk_tokens=512,
        device=torch.device("cpu"),
    )


RUNNERS = {"generate": run_generation, "text": run_language_model}
"""How kd-eval runs a model on a task of each kind (classify: run_classification_evaluation;
choice: run_choice_evaluation)."""


def task_section(task: Task, name: str | None = None) -> dict:
    """What results.json says of the task: its name, kind and the metrics its table shows."""
    return {
        "task": name or task.name,
        "kind": task.kind,
        "metric_columns": [dataclasses.asdict(column) for column in task.metrics],
    }


def run_evaluation(config: EvalConfig, engines: dict | None = None) -> dict:
    """Evaluate every model; write results.json, the chart and predictions when --out is given.

    `engines` maps a model NAME to an already running TeacherEngine to reuse (tests)."""
    if task_kind(config.data) == "classify":
        return run_classification_evaluation(config, engines)
    task = TASKS[config.data]
    if task.kind == "choice":
        return run_choice_evaluation(config, task)
    inputs = load_task_inputs(config, task)
    # Every model and tokenizer, and the teacher's shards, are checked before the first engine
    # starts: bad input fails in seconds, not after minutes of evaluating the models before it.
    if config.teacher_shards:
        from kd_shards.schemas.manifest import check_dump_kind
        from kd_shards.shared.shard_reader import open_dump

        dump = open_dump(config.teacher_shards, flag="--teacher-shards")
        check_dump_kind(
            dump.manifest, classify=False, where=f"--teacher-shards {config.teacher_shards}"
        )
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
            print(f"kd-eval: {name} ({resolved.reference}) on {task.name}...", file=sys.stderr)
        engine = (engines or {}).get(name)
        results[name] = evaluate_model(config, task, resolved, tokenizer, inputs, engine)
    report = {
        **task_section(task),
        "settings": {
            "config": config_to_dict(config),
            "data": {
                "source": inputs.source,
                "fingerprint": inputs.fingerprint,
                "samples": len(inputs.examples) or None,
            },
            "decoding": {"temperature": 0.0, "max_new_tokens": config.max_new_tokens}
            if task.kind != "text"
            else {"teacher_forced": True, "chunk_tokens": config.chunk_tokens},
        },
        "models": results,
    }
    if config.out:
        write_outputs(Path(config.out), report)
    return report


def run_classification_evaluation(config: EvalConfig, engines: dict | None = None) -> dict:
    """A classification task: every classifier on the same texts (kd_eval/classification.py)."""
    from kd_shards.kd_eval.classification import (
        classification_fidelity,
        load_classification_inputs,
        run_classifier,
        teacher_log_probabilities,
        with_labels,
    )
    from kd_shards.shared.classification import is_sequence_classifier, model_labels

    inputs = load_classification_inputs(config)
    models = []
    for name, reference in (parse_model(text) for text in config.models):
        resolved = resolve_model(reference, flag="--model")
        if not is_sequence_classifier(resolved.config):
            architecture = ", ".join(resolved.config.get("architectures") or ["unknown"])
            raise UserError(
                f"--model {name}={reference} is a {architecture}, not a sequence classifier: "
                f"kd-eval --data {config.data} needs *ForSequenceClassification models (give a bare "
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
            print(f"kd-eval: {name} ({resolved.reference}) on {config.data}...", file=sys.stderr)
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
        **task_section(inputs.task, name=config.data),
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


def run_choice_evaluation(config: EvalConfig, task: Task) -> dict:
    """A multiple-choice task: every model scores every question's options (kd_eval/choices/:
    a causal LM by option likelihood, an encoder as choices, in transformers), and the task
    scores the best option of each."""
    from kd_shards.kd_eval.choices import ChoiceSettings, scorer_for

    inputs = load_task_inputs(config, task)
    for example in inputs.examples:
        if len(example.choices) < 2:
            raise UserError(
                f"record {example.index} of {inputs.source} has {len(example.choices)} option(s): "
                "a multiple-choice question needs at least two"
            )
    settings = ChoiceSettings(config.batch_size, config.max_model_len, config.trust_remote_code)
    models = []
    for name, reference in (parse_model(text) for text in config.models):
        resolved = resolve_model(
            reference, flag="--model", trust_remote_code=config.trust_remote_code
        )
        scorer = scorer_for(resolved.config, f"--model {name}={reference}")
        tokenizer = load_tokenizer(resolved.directory, trust_remote_code=config.trust_remote_code)
        models.append((name, resolved, scorer, tokenizer))
    results = {}
    for name, resolved, scorer, tokenizer in models:
        if config.progress:
            print(f"kd-eval: {name} ({resolved.reference}) on {task.name}...", file=sys.stderr)
        started = time.perf_counter()
        scores = scorer.score(resolved.directory, tokenizer, inputs.examples, settings)
        seconds = time.perf_counter() - started
        metrics, predictions = task.score(scores, inputs.examples)
        samples = len(inputs.examples)
        results[name] = {
            "path": str(resolved.directory),
            "parameters": count_parameters(resolved.directory),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "metrics": {**metrics, "samples": samples},
            "cost": {
                "seconds": seconds,
                "ms_per_sample": 1000.0 * seconds / max(samples, 1),
                "samples_per_second": samples / max(seconds, 1e-9),
            },
            "backend": {"name": "transformers", "scorer": scorer.name},
            "predictions": predictions,
        }
    report = {
        **task_section(task),
        "settings": {
            "config": config_to_dict(config),
            "data": {
                "source": inputs.source,
                "fingerprint": inputs.fingerprint,
                "samples": len(inputs.examples),
            },
            "decoding": {"teacher_forced": True, "batch_size": config.batch_size},
        },
        "models": results,
    }
    if config.out:
        write_outputs(Path(config.out), report)
    return report
