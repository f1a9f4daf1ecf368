"""The measurements behind `make bench`, each run in a fresh Python process.

`scripts.bench` starts one process per measurement (`python -m scripts.bench_measurements
NAME JSON RESULT_FILE`), so that every peak RSS belongs to one configuration alone, and reads
the JSON it writes to RESULT_FILE. Nothing here decides pass or miss: these functions only measure.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def peak_rss_megabytes() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- teacher engine: storage variants, dump overhead ----------------------------------------


class RecordingEngine:
    """A TeacherEngine that also keeps every result it hands out (the original float arrays,
    before teacher-dump rounds and writes them)."""

    def __init__(self, engine):
        self.wrapped = engine
        self.records: list = []
        self.settings = engine.settings
        self.vllm_version = engine.vllm_version
        self.platform = engine.platform
        self.engine_arguments = engine.engine_arguments
        self.dtype = engine.dtype

    def score(self, sequences, **options):
        for key, scored in self.wrapped.score(sequences, **options):
            self.records.append((key, scored))
            yield key, scored

    def generate(self, prompts, **options):
        for key, completions in self.wrapped.generate(prompts, **options):
            self.records.append((key, completions))
            yield key, completions


class ReplayEngine:
    """Hands out recorded results (score or generate) at once, cut to the width a dump asks for
    and converted from the flat Python lists vLLM returns as TeacherEngine does: teacher-dump run
    on it costs only its own work. A recording at width W replays any narrower request: vLLM's
    top-k is a prefix of its top-W, and the first k of W independent draws are k draws."""

    def __init__(self, recording: RecordingEngine, top_k: int):
        width = top_k + 1
        self.top_k = top_k
        self.generated, self.scored = {}, {}
        for key, result in recording.records:
            if isinstance(result, list):
                self.generated[key.source_index] = [
                    (
                        completion.token_ids.tolist(),
                        completion.position_ids[:, :width].ravel().tolist(),
                        completion.position_logprobs[:, :width].ravel().tolist(),
                        completion.finish_reason,
                    )
                    for completion in result
                ]
            else:
                self.scored[key.source_index] = (
                    result.position_ids[:, :width].ravel().tolist(),
                    result.position_logprobs[:, :width].ravel().tolist(),
                    len(result.position_ids),
                )
        self.settings = recording.settings
        self.vllm_version = recording.vllm_version
        self.platform = recording.platform
        self.engine_arguments = recording.engine_arguments
        self.dtype = recording.dtype

    def generate(self, prompts, *, top_k, **options):
        from kd_shards.shared.engine import Completion, positions_to_arrays

        assert top_k == self.top_k
        for request, _, _ in prompts:
            completions = []
            for token_ids, flat_ids, flat_logprobs, finish_reason in self.generated[
                request.source_index
            ]:
                ids, values = positions_to_arrays(
                    flat_ids, flat_logprobs, len(token_ids), top_k + 1
                )
                completions.append(
                    Completion(np.asarray(token_ids, dtype=np.int32), ids, values, finish_reason)
                )
            yield request, completions

    def score(self, sequences, *, top_k, **options):
        from kd_shards.shared.engine import ScoredSequence, positions_to_arrays

        assert top_k == self.top_k
        for request, _ in sequences:
            flat_ids, flat_logprobs, positions = self.scored[request.source_index]
            ids, values = positions_to_arrays(flat_ids, flat_logprobs, positions, top_k + 1)
            yield request, ScoredSequence(position_ids=ids, position_logprobs=values)


def replay_dump(recording: RecordingEngine, config, repeats: int = 1) -> list[dict]:
    """teacher-dump's own work on recorded engine results, `repeats` times: its run (the same
    steps run_dump takes), timed apart: reading and tokenizing the data once per run
    (prepare_seconds), then the per-token work (flat lists to arrays, rows, encoding, Parquet,
    manifest). The last repeat's dump stays in config.out."""
    import shutil

    from kd_shards.shared.storage import Folder
    from kd_shards.teacher_dump.modes import MODES
    from kd_shards.teacher_dump.run import (
        fingerprints_of,
        manifest_header,
        open_output,
        prepare,
        write_results,
    )

    replay = ReplayEngine(recording, config.engine_logprobs)
    runs = []
    for _ in range(repeats):
        shutil.rmtree(config.out, ignore_errors=True)
        began = time.perf_counter()
        prepared = prepare(config)
        header = manifest_header(config, prepared)
        open_output(Folder(config.out), header, config, fingerprints_of(prepared))
        fixed = time.perf_counter() - began
        began = time.perf_counter()
        teacher = MODES[config.mode].start(config, prepared.inputs, prepared.planned.plan, replay)
        replayed = teacher.rows(prepared.requests)
        tokens = write_results(
            config, replayed, total=len(prepared.requests), todo=len(prepared.requests),
            directory=Folder(config.out), vocabulary=len(prepared.tokenizer),
        )  # fmt: skip
        runs.append(
            {"tokens": tokens, "seconds": time.perf_counter() - began, "prepare_seconds": fixed}
        )
    return runs


def column_bytes(directory: Path) -> dict[str, int]:
    """Compressed bytes of each top-level column over every shard of a dump (Parquet footers)."""
    import pyarrow.parquet as pq

    from kd_shards.teacher_dump.inspect import column_bytes as shard_column_bytes

    manifest = json.loads((Path(directory) / "manifest.json").read_text())
    totals: dict[str, int] = {}
    for entry in manifest["shards"]:
        metadata = pq.ParquetFile(Path(directory) / entry["name"]).metadata
        for name, size in shard_column_bytes(metadata).items():
            totals[name] = totals.get(name, 0) + size
    return totals


def bare_generate(engine, requests, *, top_k, temperature, max_new_tokens, seed, style) -> dict:
    """vLLM's own `LLM.generate` over the same prompts and per-prompt seeds as teacher-dump
    (see TeacherEngine.generate_batch for the styles)."""
    from kd_shards.teacher_dump.requests import sample_seed

    started = time.perf_counter()
    tokens = engine.generate_batch(
        [request.prompt_ids.tolist() for request in requests],
        seeds=[sample_seed(seed, request.source_index) for request in requests],
        top_k=top_k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        style=style,
    )
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def measure_dump_overhead(engine, config, repeats: int, out: Path) -> tuple[dict, object]:
    """teacher-dump end to end (engine already started) against bare LLM.generate loops on the
    same prompts with the same logprobs request; each repeat runs every variant, in a rotated
    order so drift hits all alike. Returns the figures and the last teacher-dump recording."""
    from kd_shards.teacher_dump.run import prepare, run_dump

    requests = prepare(config).requests
    options = {
        "top_k": config.engine_logprobs,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    # Warm-up: the first batches of a fresh engine allocate; no variant should pay for that.
    bare_generate(engine, requests[:8], style="same", **options)

    results: dict[str, list[dict]] = {"teacher_dump": [], "same": [], "none": [], "defaults": []}
    recording = None
    variants = list(results)
    for repeat in range(repeats):
        for variant in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
            if variant == "teacher_dump":
                recording = RecordingEngine(engine)
                run_config = replace(config, out=str(out / f"dump-{repeat}"))
                began = time.perf_counter()
                manifest = run_dump(run_config, recording)
                seconds = time.perf_counter() - began
                results[variant].append(
                    {"tokens": manifest["totals"]["target_tokens"], "seconds": seconds}
                )
            else:
                results[variant].append(bare_generate(engine, requests, style=variant, **options))
    host = replay_dump(recording, replace(config, out=str(out / "replay")), repeats)
    return {"prompts": len(requests), "runs": results, "host_only": host}, recording


def bare_score(engine, sequences: list[list[int]], top_k: int) -> dict:
    """vLLM's own blocking loop teacher-forcing the sequences with prompt_logprobs=top_k."""
    started = time.perf_counter()
    positions = engine.score_batch(sequences, top_k=top_k)
    return {"positions": positions, "seconds": time.perf_counter() - started}


def variant_configs(
    teacher: str,
    text: str,
    gsm8k: str | None,
    work_path: Path,
    chunk_tokens: int,
    windows: int,
    variants: list[dict],
    gsm8k_prompts: int,
    max_new_tokens: int,
    max_model_len: int,
    enforce_eager: bool,
) -> dict:
    """dataset -> variant name -> the teacher-dump config writing that variant's dump."""
    from kd_shards.teacher_dump.config import DumpConfig

    base = {
        "model": teacher, "dtype": "float32", "max_model_len": max_model_len,
        "enforce_eager": enforce_eager, "progress": False,
    }  # fmt: skip
    datasets = {
        "wiki": {"data": "text", "data_path": text, "mode": "text", "chunk_tokens": chunk_tokens,
                 "limit": windows},
    }  # fmt: skip
    if gsm8k:
        datasets["gsm8k"] = {
            "data": "gsm8k", "data_path": gsm8k, "mode": "generate", "limit": gsm8k_prompts,
            "max_new_tokens": max_new_tokens, "temperature": 1.0,
        }  # fmt: skip
    return {
        name: {
            variant["name"]: DumpConfig(
                **base, **settings, **variant["dump"], out=str(work_path / name / variant["name"])
            )
            for variant in variants
        }
        for name, settings in datasets.items()
    }


def measure_dataset(
    engine,
    name: str,
    by_variant: dict,
    widest: str,
    work_path: Path,
    work: Path,
    sampled: bool,
    repeats: int,
    overhead: bool,
    bare_windows: int,
) -> tuple[dict, dict | None]:
    """One dataset on a running engine: the widest variant's dump end to end (recorded; GSM8K
    with `overhead` against bare LLM.generate, whose figures come back second), every variant
    replayed on the recording, and (WikiText) vLLM's bare scoring at each variant's width."""
    from kd_shards.teacher_dump.run import prepare, run_dump

    end_to_end = f"end-to-end-{'draws' if sampled else 'top-k'}"
    record_config = replace(by_variant[widest], out=str(work_path / name / end_to_end))
    dump_figures = None
    if name == "gsm8k" and overhead:
        dump_figures, recording = measure_dump_overhead(
            engine, record_config, repeats, work / "dump-overhead"
        )
        seconds = statistics.median(run["seconds"] for run in dump_figures["runs"]["teacher_dump"])
    else:
        recording = RecordingEngine(engine)
        began = time.perf_counter()
        run_dump(record_config, recording)
        seconds = time.perf_counter() - began
    dataset = {"end_to_end": {"variant": widest, "seconds": seconds}, "variants": {}}
    for variant, config in by_variant.items():
        runs = replay_dump(recording, config, repeats)
        dataset["variants"][variant] = {
            "directory": config.out, "engine_logprobs": config.engine_logprobs, "host": runs,
        }  # fmt: skip
    if name == "wiki":
        sequences = [
            [*request.prompt_ids.tolist(), *request.target_ids.tolist()]
            for request in prepare(record_config).requests
        ]
        bare_score(engine, sequences[:4], 1)  # warm-up
        widths = sorted({config.engine_logprobs for config in by_variant.values()})
        dataset["bare"] = {
            str(width): [
                bare_score(engine, sequences[:bare_windows], width) for _ in range(repeats)
            ]
            for width in widths
        }
    return dataset, dump_figures


def measure_engine(
    teacher: str,
    text: str,
    gsm8k: str | None,
    work: str,
    chunk_tokens: int,
    windows: int,
    variants: list[dict],
    sampled: bool,
    gsm8k_prompts: int,
    max_new_tokens: int,
    repeats: int,
    overhead: bool,
    bare_windows: int,
    max_model_len: int,
    enforce_eager: bool,
) -> dict:
    """One engine (top-k, or draws with `sampled`) for every storage variant of that kind.

    Text: the WikiText windows are scored once by teacher-dump with the widest variant's request
    (end to end, recorded); every variant's dump is then teacher-dump replayed on that recording
    (its own work timed, repeats), and vLLM's bare scoring loop is timed at each variant's
    request on the first `bare_windows` windows (the ratio is per token, so a subset suffices
    and keeps the group's time down). GSM8K: teacher-dump generate end to end with the widest
    request (with `overhead`, the dump-overhead runs against bare LLM.generate), then each
    variant replayed likewise.
    Variant dumps go to WORK/storage/<dataset>/<variant name>."""
    from kd_shards.shared.engine import EngineSettings, TeacherEngine

    work_path = Path(work) / "storage"
    configs = variant_configs(
        teacher, text, gsm8k, work_path, chunk_tokens, windows, variants, gsm8k_prompts,
        max_new_tokens, max_model_len, enforce_eager,
    )  # fmt: skip
    widest = max(variants, key=lambda variant: configs["wiki"][variant["name"]].engine_logprobs)
    started = time.perf_counter()
    engine = TeacherEngine(
        EngineSettings(
            model=teacher, dtype="float32", max_model_len=max_model_len,
            max_logprobs=configs["wiki"][widest["name"]].engine_logprobs,
            sampled_logprobs=sampled, tensor_parallel_size=1, gpu_memory_utilization=None,
            seed=0, enforce_eager=enforce_eager, trust_remote_code=False,
        )
    )  # fmt: skip
    result: dict = {"engine_start_seconds": time.perf_counter() - started, "sampled": sampled}
    try:
        for name, by_variant in configs.items():
            result[name], dump_figures = measure_dataset(
                engine, name, by_variant, widest["name"], work_path, Path(work), sampled,
                repeats, overhead, bare_windows,
            )  # fmt: skip
            if dump_figures is not None:
                result["dump"] = dump_figures
    finally:
        engine.close()
    return result


# --- the teacher's full distribution: storage fidelity, the training figure -------------------


def full_logprobs(model, prompt_ids, target_ids, vocabulary: int):
    """(T, vocabulary) float64 log-distributions that predicted each target token (a transformers
    float32 forward of prompt + target; log-softmax in float64 over the tokenizer's ids)."""
    import torch

    with torch.no_grad():
        sequence = torch.tensor([[*prompt_ids, *target_ids]])
        logits = model(sequence).logits[0, len(prompt_ids) - 1 : -1, :vocabulary]
    return torch.log_softmax(logits.double(), dim=-1)


def fidelity_of_row(full, ids, logprobs, log_tail) -> dict:
    """Both storage fidelity figures per position, summed over a row's positions.

    KL(p || p_hat): p_hat = the stored probabilities on the stored ids, the stored tail (where
    the dump stores none: max(1 - sum q, 0)) spread evenly over the V - n other ids, normalized.
    -log(captured mass): -log of the teacher's true mass on the stored ids (= KL of the stored
    distribution, renormalized, to the teacher).

    Args:
        full: (T, V) float64 torch log-distributions. ids (T, W), logprobs (T, W), log_tail (T,)
            as the trainer's reader hands them out.
    Returns: {"kl", "neg_log_mass", "entries", "positions"} sums.
    """
    import torch

    ids = torch.from_numpy(ids).long()
    valid = ids >= 0
    vocabulary = full.shape[1]
    p = full.exp()
    stored_p = torch.where(valid, p.gather(1, ids.clamp(min=0)), 0.0)
    captured = stored_p.sum(-1)
    q_log = torch.where(valid, torch.from_numpy(logprobs).double(), 0.0)
    q = torch.where(valid, q_log.exp(), 0.0)
    tail = torch.from_numpy(log_tail).double()
    rest = torch.where(tail.isnan(), (1.0 - q.sum(-1)).clamp(min=0.0), tail.exp()).clamp(min=1e-30)
    count = valid.sum(-1)
    normalizer = q.sum(-1) + rest
    outside = (1.0 - captured).clamp(min=0.0)
    kl = (
        (p * full).sum(-1)
        - (stored_p * q_log).sum(-1)
        - outside * (rest.log() - torch.log(vocabulary - count.double()))
        + normalizer.log()
    )
    return {
        "kl": float(kl.sum()),
        "neg_log_mass": float(-captured.log().sum()),
        "entries": int(count.sum()),
        "positions": int(len(ids)),
    }


def measure_fidelity(teacher: str, datasets: dict[str, dict[str, str]]) -> dict:
    """Both fidelity figures of every storage variant against the teacher's FULL distribution.

    Args:
        datasets: {dataset: {variant: dump directory}}. Rows holding the same tokens share one
            forward pass.
    Returns:
        {dataset: {variant: {"kl", "neg_log_mass", "entries" (means per position),
         "positions"}}}; kl is None for sampled dumps (their stored weights are not meant as a
         distribution; they are judged by training).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kd_shards.schemas.manifest import storage_of_manifest
    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    model = AutoModelForCausalLM.from_pretrained(
        teacher, dtype=torch.float32, use_safetensors=True
    ).eval()
    results: dict = {}
    for dataset, variants in datasets.items():
        by_sequence: dict[tuple, list] = {}
        sampled = {}
        for variant, directory in variants.items():
            dump = open_dump(directory)
            vocabulary = int(dump.manifest["tokenizer"]["size"])
            storage = storage_of_manifest(dump.manifest)
            sampled[variant] = storage is not None and storage.representation == "sampled"
            for row in iterate_rows(dump):
                key = (tuple(row.prompt_ids.tolist()), tuple(row.target_ids.tolist()))
                by_sequence.setdefault(key, []).append((variant, row))
        sums = {variant: {"kl": 0.0, "neg_log_mass": 0.0, "entries": 0, "positions": 0}
                for variant in variants}  # fmt: skip
        for (prompt_ids, target_ids), rows in by_sequence.items():
            full = full_logprobs(model, prompt_ids, target_ids, vocabulary)
            for variant, row in rows:
                figures = fidelity_of_row(full, row.topk_ids, row.topk_logprobs, row.topk_log_tail)
                for name, value in figures.items():
                    sums[variant][name] += value
        results[dataset] = {
            variant: {
                "positions": total["positions"],
                "kl": None if sampled[variant] else total["kl"] / total["positions"],
                "neg_log_mass": total["neg_log_mass"] / total["positions"],
                "entries": total["entries"] / total["positions"],
            }
            for variant, total in sums.items()
        }
    return results


def measure_full_kl(
    teacher: str, models: dict[str, str], text: str, chunk_tokens: int, skip: int, windows: int
) -> dict:
    """Mean KL(teacher || model) per position over held-out text windows, both distributions
    full (transformers float32 forwards, log-softmax in float64 over the tokenizer's ids).

    The windows are teacher-dump's text-mode windows number skip .. skip + windows - 1 of the
    text (after the ones the students trained on). Returns {name: KL, "positions": N}."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.run import prepare

    config = DumpConfig(
        model=teacher, data="text", data_path=text, mode="text", out="unused",
        chunk_tokens=chunk_tokens, limit=skip + windows, progress=False,
    )  # fmt: skip
    prepared = prepare(config)
    requests = prepared.requests[skip:]
    vocabulary = len(prepared.tokenizer)
    teacher_model = AutoModelForCausalLM.from_pretrained(
        teacher, dtype=torch.float32, use_safetensors=True
    ).eval()
    teacher_full = [
        full_logprobs(teacher_model, r.prompt_ids.tolist(), r.target_ids.tolist(), vocabulary)
        for r in requests
    ]
    del teacher_model
    result: dict = {"positions": sum(len(full) for full in teacher_full)}
    for name, directory in models.items():
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, use_safetensors=True
        ).eval()
        total = 0.0
        for request, full in zip(requests, teacher_full, strict=True):
            student = full_logprobs(
                model, request.prompt_ids.tolist(), request.target_ids.tolist(), vocabulary
            )
            total += float((full.exp() * (full - student)).sum())
        result[name] = total / result["positions"]
    return result


# --- training ------------------------------------------------------------------------------


def fixed_batch(shards: str, micro_batch: int):
    """The first `micro_batch` rows of a dump (file order) as one Batch."""
    from kd_shards.shared.collation import collate
    from kd_shards.shared.shard_reader import open_dump
    from kd_shards.student_train.batches import BatchShape, take_micro_batch
    from kd_shards.student_train.shard_stream import ShardStream

    dump = open_dump(shards)
    stream = ShardStream(dump, seed=0, shuffle=False)
    rows = take_micro_batch(
        stream, BatchShape(rows=micro_batch, batch_tokens=None, max_length=1 << 30)
    )
    return dump, collate(rows)


def measure_online(
    shards: str, student: str, teacher: str, steps: int, micro_batch: int, top_k: int
) -> dict:
    """Offline vs online KD steps, alternating on one fixed batch in one process.

    Offline: the student's step on the teacher's stored top-k. Online: the same step after a
    forward pass of the teacher (transformers, float32, no grad) that produces that top-k, which
    is what a trainer without dumps does every step. The loss (forward KL, bucket tail) is the
    same, so the difference is the teacher's forward pass and its top-k.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kd_shards.shared.causal_lm import final_hidden_states, output_logits_function
    from kd_shards.student_train.config import TrainConfig
    from kd_shards.student_train.distributed import Distributed
    from kd_shards.student_train.families.causal_lm import LanguageModelObjective, load_student
    from kd_shards.student_train.train import accumulate_gradients

    dump, batch = fixed_batch(shards, micro_batch)
    student_model = load_student(student, manifest=dump.manifest, trust_remote_code=False)
    model = student_model.model
    model.train()
    output_logits = output_logits_function(model, student_model.vocabulary)
    teacher_model = AutoModelForCausalLM.from_pretrained(
        teacher, dtype=torch.float32, use_safetensors=True
    ).eval()
    teacher_logits = output_logits_function(teacher_model, student_model.vocabulary)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    # The trainer's own defaults (chunked LM head, fp32), with forward KL on the bucketed tail.
    settings = TrainConfig(
        shards=shards, student=student, out="unused", max_steps=1, loss="fkl", tail="bucket"
    )
    context = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    objective = LanguageModelObjective(
        output_logits, settings.loss_options(), settings.chunk_tokens
    )

    def teacher_topk():
        with torch.no_grad():
            hidden = final_hidden_states(teacher_model, batch.input_ids, batch.attention_mask)
            selected = hidden[batch.row_index, batch.position]
            logprobs = torch.log_softmax(teacher_logits(selected).float(), dim=-1)
            values, ids = logprobs.topk(top_k, dim=-1)
        # the online top-k has no stored tail: 1 - sum(p), as a v1 dump
        unknown = torch.full(values.shape[:1], float("nan"))
        return replace(batch, topk_ids=ids, topk_logprobs=values, topk_log_tail=unknown)

    def step(online: bool) -> float:
        started = time.perf_counter()
        step_batch = teacher_topk() if online else batch
        accumulate_gradients(
            model,
            [step_batch],
            objective=objective,
            bf16=settings.bf16,
            context=context,
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times: dict[str, list[float]] = {"offline": [], "online": []}
    for index in range(steps):
        for online in (index % 2 == 0, index % 2 == 1):
            times["online" if online else "offline"].append(step(online))
    return {"seconds": times, "tokens_per_step": batch.target_tokens}


def measure_loss_memory(
    positions: int, vocabulary: int, hidden_size: int, chunk_tokens: int
) -> dict:
    """Peak RSS of one forward+backward of the KD loss over `positions` x `vocabulary` logits."""
    import torch

    from kd_shards.student_train.losses import LossOptions, chunked_loss_sums

    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocabulary, bias=False)
    ids = torch.randint(0, vocabulary, (positions, 20))
    logprobs = torch.log_softmax(torch.randn(positions, 20), -1).sort(-1, descending=True).values
    baseline = peak_rss_megabytes()
    options = LossOptions(loss="fkl", alpha=0.0, beta=0.5, temperature=1.0, tail="bucket")
    sums = chunked_loss_sums(
        hidden, head, ids[:, 0], ids, logprobs, options=options, chunk_tokens=chunk_tokens
    )
    sums[0].backward()
    return {"peak_rss_mb": peak_rss_megabytes(), "baseline_rss_mb": baseline}


def measure_loader(shards: str, micro_batch: int, buffer_rows: int) -> dict:
    """Target tokens/s the loader (read, decode, shuffle, collate) delivers over one epoch, and
    the process's peak RSS, with the trainer's shuffle window."""
    import torch  # noqa: F401  (the trainer's process has it loaded: same baseline RSS)

    from kd_shards.shared.collation import collate
    from kd_shards.shared.shard_reader import open_dump
    from kd_shards.student_train.batches import BatchShape, take_micro_batch
    from kd_shards.student_train.shard_stream import ShardStream

    dump = open_dump(shards)
    baseline = peak_rss_megabytes()
    stream = ShardStream(dump, seed=0, epochs=1, buffer_rows=buffer_rows)
    tokens, rows = 0, 0
    started = time.perf_counter()
    shape = BatchShape(rows=micro_batch, batch_tokens=None, max_length=1 << 30)
    while batch_rows := take_micro_batch(stream, shape):
        tokens += collate(batch_rows).target_tokens
        rows += len(batch_rows)
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "rows": rows,
        "peak_rss_mb": peak_rss_megabytes(),
        "baseline_rss_mb": baseline,
    }


def measure_writer(**arguments) -> dict:
    """The writer group (scripts/bench_writer.py)."""
    from scripts.bench_writer import measure_writer as measure

    return measure(**arguments)


MEASUREMENTS = {
    "engine": measure_engine,
    "fidelity": measure_fidelity,
    "full-kl": measure_full_kl,
    "online": measure_online,
    "loss-memory": measure_loss_memory,
    "loader": measure_loader,
    "writer": measure_writer,
}


if __name__ == "__main__":
    # The result goes to its own file: whatever the engine's processes print at exit (leaked
    # semaphore warnings, say) cannot be mistaken for it.
    name, arguments, result_file = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result_file.write_text(json.dumps(MEASUREMENTS[name](**arguments)))
