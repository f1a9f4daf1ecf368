"""The measurements behind `make bench`, each run in a fresh Python process.

`scripts.bench` starts one process per measurement (`python -m scripts.bench_measurements
NAME JSON`), so that every peak RSS belongs to one configuration alone, and reads the JSON line
it prints. Nothing here decides pass or miss: these functions only measure.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def peak_rss_megabytes() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- teacher engine: storage, decoded-vs-original KL, dump overhead ---------------------------


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
    """Hands out recorded generate() results at once, converting them from the flat Python lists
    vLLM returns as TeacherEngine does: teacher-dump run on it costs only its own work."""

    def __init__(self, recording: RecordingEngine):
        self.results = {
            key.source_index: [
                (
                    completion.token_ids.tolist(),
                    completion.position_ids.ravel().tolist(),
                    completion.position_logprobs.ravel().tolist(),
                    completion.finish_reason,
                )
                for completion in completions
            ]
            for key, completions in recording.records
        }
        self.settings = recording.settings
        self.vllm_version = recording.vllm_version
        self.platform = recording.platform
        self.engine_arguments = recording.engine_arguments
        self.dtype = recording.dtype

    def generate(self, prompts, *, top_k, **options):
        from shared.engine import Completion, positions_to_arrays

        for request, _, _ in prompts:
            completions = []
            for token_ids, flat_ids, flat_logprobs, finish_reason in self.results[
                request.source_index
            ]:
                ids, values = positions_to_arrays(
                    flat_ids, flat_logprobs, len(token_ids), top_k + 1
                )
                completions.append(
                    Completion(np.asarray(token_ids, dtype=np.int32), ids, values, finish_reason)
                )
            yield request, completions


def decoding_kl(original: np.ndarray, decoded: np.ndarray, tail: str = "bucket") -> np.ndarray:
    """KL(original || decoded) per position, between the teacher distributions the trainer builds
    from each (shared.distributions.teacher_log_distribution: the k outcomes and, with the
    bucket tail, the mass outside them, where tails under its noise level count as empty).

    Args:
        original, decoded: (N, K) natural-log probabilities (-inf in freed slots).
    Returns:
        (N,) float64 nats.
    """
    import torch

    from shared.distributions import teacher_log_distribution

    log_p, valid = teacher_log_distribution(
        torch.from_numpy(original).double(), temperature=1.0, tail=tail
    )
    log_q, _ = teacher_log_distribution(
        torch.from_numpy(decoded).double(), temperature=1.0, tail=tail
    )
    terms = torch.where(valid, log_p.exp() * (log_p - log_q), 0.0)
    return terms.sum(-1).double().numpy()


def encoding_estimates(topk_ids: np.ndarray, topk_logprobs: np.ndarray, step: float) -> dict:
    """Bytes per position other encodings of the same top-k would take (zstd level 3 on raw
    arrays), to say how far the stored format is from what is possible.

    Args:
        topk_ids: (N, K) int ids in rank order (< 65536 for the uint16 variants).
        topk_logprobs: (N, K) float, sorted descending, on the storage grid `step`.
    Returns:
        {name: bytes per position}.
    """
    import pyarrow as pa

    codec = pa.Codec("zstd", compression_level=3)
    positions = len(topk_ids)

    def packed(array: np.ndarray) -> float:
        # Byte planes (all low bytes, then all high bytes) let zstd see the mostly-zero high bytes.
        values = np.ascontiguousarray(array, dtype=np.uint16)
        planes = np.stack([values & 0xFF, values >> 8]).astype(np.uint8)
        return len(codec.compress(planes.tobytes(), asbytes=True)) / positions

    estimates = {}
    if topk_ids.max() < 1 << 16 and topk_ids.min() >= 0:
        estimates["ids_uint16_rank_order"] = packed(topk_ids)
        # Sorting loses the rank order (it would have to be stored too): a floor for any
        # per-position coding of the id sets.
        ordered = np.sort(topk_ids, axis=1)
        estimates["ids_sorted_delta_no_order"] = packed(np.diff(ordered, axis=1, prepend=0))
    if np.isfinite(topk_logprobs).all():
        units = np.round(np.maximum(topk_logprobs, -60.0) / step).astype(np.int64)
        drops = -np.diff(units, axis=1, prepend=0)  # first: -units[0]; then rank-to-rank drops
        if drops.max() < 1 << 16:
            estimates["logprobs_rank_deltas"] = packed(drops)
    return estimates


def column_bytes(directory: Path) -> dict[str, int]:
    """Compressed bytes of each top-level column over every shard of a dump (Parquet footers)."""
    import pyarrow.parquet as pq

    manifest = json.loads((directory / "manifest.json").read_text())
    totals: dict[str, int] = {}
    for entry in manifest["shards"]:
        metadata = pq.ParquetFile(directory / entry["name"]).metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                chunk = row_group.column(index)
                name = chunk.path_in_schema.split(".")[0]
                totals[name] = totals.get(name, 0) + chunk.total_compressed_size
    return totals


def decoded_topk(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sample_id -> (topk_ids, topk_logprobs) as the trainer's reader gets them back."""
    from shared.shard_reader import iterate_rows, open_dump

    return {
        row.sample_id: (row.topk_ids, row.topk_logprobs)
        for row in iterate_rows(open_dump(directory))
    }


def measure_storage(engine, base: dict, top_k: int, out: Path) -> dict:
    """One text-mode dump at `top_k`: bytes per target token, per column, and how far the
    stored top-k logprobs are from the engine's original float32 values."""
    from schemas.shard import LOGPROB_STEP
    from teacher_dump.config import DumpConfig
    from teacher_dump.rows import drop_padding_ids
    from teacher_dump.run import run_dump

    recording = RecordingEngine(engine)
    config = DumpConfig(**base, mode="text", top_k=top_k, out=str(out))
    started = time.perf_counter()
    manifest = run_dump(config, recording)
    seconds = time.perf_counter() - started
    decoded = decoded_topk(out)
    size = manifest["tokenizer"]["size"]
    divergences, errors, originals_kept, decoded_kept = [], [], [], []
    for request, scored in recording.records:
        start = len(request.prompt_ids) - 1
        # The same lossless reordering teacher-dump applies (padding-row ids move to the end).
        original_ids, original, _ = drop_padding_ids(
            scored.position_ids[start:, 1:], scored.position_logprobs[start:, 1:], size
        )
        ids, logprobs = decoded[str(request.source_index)]
        if not np.array_equal(ids, original_ids):
            raise RuntimeError(
                f"row {request.source_index}: stored top-k ids differ from the engine's"
            )
        divergences.append(decoding_kl(original, logprobs))
        originals_kept.append(original)
        decoded_kept.append(logprobs)
        finite = np.isfinite(original)
        errors.append(np.abs(original[finite].astype(np.float64) - logprobs[finite]).max())
    kl = np.concatenate(divergences)
    originals = np.concatenate(originals_kept)
    decodeds = np.concatenate(decoded_kept)
    worst = int(np.argmax(kl))

    def tail_mass(logprobs: np.ndarray) -> float:
        return float(1.0 - np.exp(logprobs.astype(np.float64)).sum())

    all_ids = np.concatenate([ids for ids, _ in decoded.values()])
    all_logprobs = np.concatenate([logprobs for _, logprobs in decoded.values()])
    estimates = encoding_estimates(all_ids, all_logprobs, LOGPROB_STEP)
    return {
        "encoding_estimates": {
            name: value * len(all_ids) / manifest["totals"]["target_tokens"]
            for name, value in estimates.items()
        },
        "top_k": top_k,
        "target_tokens": manifest["totals"]["target_tokens"],
        "rows": manifest["totals"]["rows"],
        "file_bytes": manifest["totals"]["bytes"],
        "column_bytes": column_bytes(out),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "compared_positions": int(kl.size),
        "worst_position_tail": {
            "original": tail_mass(originals[worst]),
            "decoded": tail_mass(decodeds[worst]),
        },
        "max_abs_logprob_error": float(max(errors)),
        "seconds": seconds,
    }


def bare_generate(engine, requests, *, top_k, temperature, max_new_tokens, seed, style) -> dict:
    """vLLM's own `LLM.generate` over the same prompts and per-prompt seeds as teacher-dump
    (see TeacherEngine.generate_batch for the styles)."""
    from teacher_dump.requests import sample_seed

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


def measure_dump_overhead(engine, base: dict, gsm8k: str, settings: dict, out: Path) -> dict:
    """teacher-dump end to end (engine already started) against bare LLM.generate loops on the
    same prompts; each repeat runs every variant, in a rotated order so drift hits all alike."""
    from shared.storage import Folder
    from teacher_dump.config import DumpConfig
    from teacher_dump.run import (
        engine_results,
        manifest_header,
        open_output,
        prepare,
        run_dump,
        write_results,
    )

    repeats = settings["repeats"]
    config = DumpConfig(
        **base,
        data="gsm8k",
        data_path=gsm8k,
        mode="generate",
        limit=settings["prompts"],
        max_new_tokens=settings["max_new_tokens"],
        top_k=settings["top_k"],
        temperature=1.0,
        out=str(out / "unused"),
    )
    requests = prepare(config).requests
    options = {
        "top_k": config.top_k,
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

    # teacher-dump's own work: its run (the same steps run_dump takes) fed by recorded engine
    # results, timed apart: reading and tokenizing the data once per run, then the per-token
    # work (flat lists to arrays, rows, Parquet, manifest).
    replay = ReplayEngine(recording)
    host = []
    for repeat in range(repeats):
        run_config = replace(config, out=str(out / f"replay-{repeat}"))
        began = time.perf_counter()
        prepared = prepare(run_config)
        open_output(Folder(run_config.out), manifest_header(run_config, prepared), run_config)
        fixed = time.perf_counter() - began
        began = time.perf_counter()
        replayed = engine_results(run_config, replay, prepared.tokenizer, prepared.requests)
        tokens = write_results(
            run_config, replayed, total=len(prepared.requests), todo=len(prepared.requests),
            directory=Folder(run_config.out),
        )  # fmt: skip
        host.append(
            {"tokens": tokens, "seconds": time.perf_counter() - began, "prepare_seconds": fixed}
        )
    return {
        "prompts": len(requests),
        "runs": results,
        "host_only": host,
    }


def measure_engine(
    teacher: str,
    text: str,
    gsm8k: str,
    work: str,
    chunk_tokens: int,
    windows: int,
    top_ks: list[int],
    overhead: dict,
    max_model_len: int,
    enforce_eager: bool,
) -> dict:
    """Start one engine; dump the text at each k (storage); then the dump-overhead runs."""
    from shared.engine import EngineSettings, TeacherEngine

    work_path = Path(work)
    started = time.perf_counter()
    engine = TeacherEngine(
        EngineSettings(
            model=teacher,
            dtype="float32",
            max_model_len=max_model_len,
            max_logprobs=max([*top_ks, overhead["top_k"]]),
            tensor_parallel_size=1,
            gpu_memory_utilization=None,
            seed=0,
            enforce_eager=enforce_eager,
            trust_remote_code=False,
        )
    )
    start_seconds = time.perf_counter() - started
    base = {
        "model": teacher,
        "dtype": "float32",
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "progress": False,
    }
    try:
        storage = [
            measure_storage(
                engine,
                {
                    **base,
                    "data": "text",
                    "data_path": text,
                    "chunk_tokens": chunk_tokens,
                    "limit": windows,
                },
                top_k,
                work_path / f"shards-k{top_k}",
            )  # fmt: skip
            for top_k in top_ks
        ]
        dump = (
            measure_dump_overhead(engine, base, gsm8k, overhead, work_path / "dump-overhead")
            if gsm8k
            else None
        )
    finally:
        engine.close()
    return {"engine_start_seconds": start_seconds, "storage": storage, "dump": dump}


# --- training ------------------------------------------------------------------------------


def fixed_batch(shards: str, micro_batch: int):
    """The first `micro_batch` rows of a dump (file order) as one Batch."""
    from shared.collation import collate
    from shared.shard_reader import open_dump
    from student_train.batches import BatchShape, take_micro_batch
    from student_train.shard_stream import ShardStream

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

    from shared.causal_lm import final_hidden_states, output_logits_function
    from student_train.config import TrainConfig
    from student_train.distributed import Distributed
    from student_train.objectives import LanguageModelObjective
    from student_train.student import load_student
    from student_train.train import accumulate_gradients

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
        return replace(batch, topk_ids=ids, topk_logprobs=values)

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

    from student_train.losses import chunked_loss_sums

    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocabulary, bias=False)
    ids = torch.randint(0, vocabulary, (positions, 20))
    logprobs = torch.log_softmax(torch.randn(positions, 20), -1).sort(-1, descending=True).values
    baseline = peak_rss_megabytes()
    sums = chunked_loss_sums(
        hidden, head, ids[:, 0], ids, logprobs, chunk_tokens=chunk_tokens,
        loss="fkl", alpha=0.0, beta=0.5, temperature=1.0, tail="bucket",
    )  # fmt: skip
    sums[0].backward()
    return {"peak_rss_mb": peak_rss_megabytes(), "baseline_rss_mb": baseline}


def measure_loader(shards: str, micro_batch: int, buffer_rows: int) -> dict:
    """Target tokens/s the loader (read, decode, shuffle, collate) delivers over one epoch, and
    the process's peak RSS, with the trainer's shuffle window."""
    import torch  # noqa: F401  (the trainer's process has it loaded: same baseline RSS)

    from shared.collation import collate
    from shared.shard_reader import open_dump
    from student_train.batches import BatchShape, take_micro_batch
    from student_train.shard_stream import ShardStream

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


MEASUREMENTS = {
    "engine": measure_engine,
    "online": measure_online,
    "loss-memory": measure_loss_memory,
    "loader": measure_loader,
}


if __name__ == "__main__":
    name, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(MEASUREMENTS[name](**arguments)))
