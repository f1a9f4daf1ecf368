"""`make bench --only writer`: does teacher-dump keep up with a fast (GPU) engine?

A synthetic engine stands in for vLLM: it hands the text mode's rows loop the objects
TeacherEngine.score hands it (ScoredSequence: (T, K+1) int32 ids and float32 logprobs, column 0
the target token), of real shape (T = chunk_tokens positions, K = the entries the
representation asks the engine for, ids of the teacher's vocabulary), at a set rate in tokens/s.
It is paced like vLLM's engine core, which runs in its own process: requests finish one after
another at the rate while the loop is busy, up to max_in_flight requests ahead of the loop
(PacedClock). The dump (the real write_results: rows, encoding, Parquet, manifest) is timed
from its first request to its last shard; dump rate ÷ engine rate is the row's figure, for
--writer inline (the work on the engine's loop), thread, process (beside it) and process:N
(with --set encoding_processes=N).

The distributions are drawn, not computed by a model (Zipf-like ranks and id frequencies), so
bytes per token differ from a real teacher's; the work per token has the real shape.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np


@dataclass
class PacedClock:
    """When each request of a paced engine finishes: one after another at `rate` tokens/s
    (None: at once), each starting no earlier than it entered the engine. Request i enters when
    the loop has taken result i - window (the engine holds at most `window` requests)."""

    rate: float | None
    window: int
    start: float
    finished: float = 0.0

    def __post_init__(self):
        self.finished = self.start
        self.taken: deque[float] = deque()
        """When the loop came back for more after each result (the oldest `window` kept)."""

    def finish_time(self, index: int, tokens: int) -> float:
        """The finish time of request `index` (asked in order) of `tokens` tokens."""
        entered = self.start if index < self.window else self.taken[index - self.window]
        work = 0.0 if self.rate is None else tokens / self.rate
        self.finished = max(self.finished, entered) + work
        return self.finished

    def took(self, index: int, when: float) -> None:
        """The loop came back for more after result `index` at `when`."""
        self.taken.append(when)


class PacedEngine:
    """A TeacherEngine stand-in for teacher-dump's score and text modes: the top-k of `pool`
    (one (T, K) ids and logprobs pair per request, in turn, cut to the request's targets; T at
    least the longest) at the pace of a PacedClock. `settings`: what check_engine_fits and
    the manifest read (max_logprobs, sampled_logprobs, dtype)."""

    def __init__(self, pool: list[tuple[np.ndarray, np.ndarray]], rate: float | None, settings):
        self.pool, self.rate, self.settings = pool, rate, settings
        self.vllm_version, self.platform, self.dtype = "synthetic", "synthetic", "float32"
        self.engine_arguments = {}

    def score(self, sequences, *, top_k: int, max_in_flight: int, prompt_lengths=None):
        # prompt_lengths: what an encoder-decoder engine needs; a causal engine ignores it
        from kd_shards.shared.engine import ScoredSequence

        clock = PacedClock(self.rate, max_in_flight, time.perf_counter())
        for index, (key, token_ids) in enumerate(sequences):
            target = np.asarray(token_ids[1:], dtype=np.int32)[:, None]
            ids, logprobs = (part[: len(target)] for part in self.pool[index % len(self.pool)])
            ready = clock.finish_time(index, len(target))
            while (wait := ready - time.perf_counter()) > 0:
                time.sleep(wait)
            yield (
                key,
                ScoredSequence(
                    position_ids=np.concatenate([target, ids[:, :top_k]], axis=1),
                    position_logprobs=np.concatenate(
                        [logprobs[:, :1], logprobs[:, :top_k]], axis=1
                    ),
                ),
            )
            clock.took(index, time.perf_counter())

    def close(self) -> None:
        """Nothing to stop."""


def drawn_top_k(
    generator: np.random.Generator, positions: int, width: int, vocabulary: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, width) distinct ids in rank order and their logprobs: Zipf-like ranks at a
    random temperature per position, 70-99.9% of the mass in the top `width`, ids drawn with
    Zipf-like frequencies (so that a shard's codebook has frequent ids, as text has)."""
    ranks = np.arange(1, width + 1)
    temperature = generator.uniform(0.3, 1.6, size=(positions, 1))
    p = np.exp(-2.0 * np.log(ranks)[None, :] / temperature)
    p = p / p.sum(axis=1, keepdims=True) * generator.uniform(0.7, 0.999, size=(positions, 1))
    ids = np.empty((positions, width), dtype=np.int32)
    for position in range(positions):
        candidates = np.unique((generator.zipf(1.15, size=6 * width) - 1) % vocabulary)
        if len(candidates) < width:
            candidates = np.union1d(candidates, generator.choice(vocabulary, 3 * width))
        ids[position] = generator.permutation(candidates)[:width]
    return ids, np.log(p).astype(np.float32)


def draws_of(
    generator: np.random.Generator, ids: np.ndarray, logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`ids.shape[1]` draws with replacement per position from the drawn top-k (renormalized):
    what --store sampled's engine returns, repeats included."""
    p = np.exp(logprobs.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    picks = (generator.random(ids.shape)[..., None] > np.cumsum(p, axis=1)[:, None, :]).sum(-1)
    picks = np.minimum(picks, ids.shape[1] - 1)
    return np.take_along_axis(ids, picks, 1), np.take_along_axis(logprobs, picks, 1)


def measure_writer(
    teacher: str,
    out: str,
    rates: list[float | None],
    stores: list[str],
    zstd_levels: list[int],
    writers: list[str],
    chunk_tokens: int,
    seconds: float,
    rows_per_shard: int,
    repeats: int,
    pool_size: int = 8,
) -> dict:
    """Every (store, zstd level, writer, rate): the dump's tokens and seconds through the text
    mode's rows loop on a PacedEngine, `repeats` times; each run has about `seconds` of engine
    time (an infinitely fast engine: as many tokens as the 50k tokens/s run)."""
    import shutil
    from pathlib import Path

    from kd_shards.shared.storage import Folder
    from kd_shards.shared.tokenizer import load_tokenizer
    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.modes import scoring
    from kd_shards.teacher_dump.modes.tokens import TokenTeacher
    from kd_shards.teacher_dump.requests import DumpRequest
    from kd_shards.teacher_dump.run import write_results

    # `writers`: --writer values; "process:N" adds N encoding processes.
    tokenizer = load_tokenizer(Path(teacher))
    vocabulary = len(tokenizer)
    generator = np.random.default_rng(0)
    results: dict = {"vocabulary": vocabulary, "chunk_tokens": chunk_tokens, "runs": []}
    for store in stores:
        config = DumpConfig(
            model=teacher, data="text", out=out, mode="text", store=store,
            rows_per_shard=rows_per_shard, progress=False,
        )  # fmt: skip
        width = config.engine_logprobs
        pool = [drawn_top_k(generator, chunk_tokens, width, vocabulary) for _ in range(pool_size)]
        if store == "sampled":
            pool = [draws_of(generator, ids, logprobs) for ids, logprobs in pool]
        for zstd_level in zstd_levels:
            for writer in writers:
                for rate in rates:
                    tokens_wanted = (rate or 50_000) * seconds
                    prompts = max(8, math.ceil(tokens_wanted / chunk_tokens))
                    requests = [
                        DumpRequest(
                            source_index=index,
                            prompt_ids=pool[index % pool_size][0][:1, 0].copy(),
                            target_ids=pool[index % pool_size][0][:, 0].copy(),
                            prompt_text="",
                            references=(),
                        )
                        for index in range(prompts)
                    ]
                    place, _, encoders = writer.partition(":")
                    run_config = replace(
                        config, zstd_level=zstd_level, writer=place,
                        encoding_processes=int(encoders or 0),
                    )  # fmt: skip
                    for repeat in range(repeats):
                        shutil.rmtree(out, ignore_errors=True)
                        Path(out).mkdir(parents=True)
                        # What refresh_manifest keeps in step (the rest is run_dump's).
                        manifest = {"shards": [], "data": {"expected_rows": prompts}}
                        (Path(out) / "manifest.json").write_text(json.dumps(manifest))
                        engine = PacedEngine(pool, rate, settings=None)
                        teacher_run = TokenTeacher(
                            run_config, engine, tokenizer, False,
                            lambda teacher, todo: scoring.forced_rows(teacher, todo, "text"),
                        )  # fmt: skip
                        began = time.perf_counter()
                        tokens = write_results(
                            run_config, teacher_run.rows(requests), total=prompts,
                            todo=prompts, directory=Folder(out), vocabulary=vocabulary,
                        )  # fmt: skip
                        seconds_taken = time.perf_counter() - began
                        shard_bytes = sum(
                            path.stat().st_size for path in Path(out).glob("*.parquet")
                        )
                        results["runs"].append(
                            {"store": store, "zstd_level": zstd_level, "writer": writer,
                             "rate": rate, "repeat": repeat, "tokens": tokens,
                             "seconds": seconds_taken, "bytes": shard_bytes,
                             "engine_logprobs": width}
                        )  # fmt: skip
    return results


def writer_rows(config, raw: dict, row_type) -> list:
    """The writer group's rows (one per representation and zstd level), from measure_writer's
    runs: dump rate ÷ engine rate per --writer and engine rate, and each writer's own maximum
    (the infinitely fast engine)."""
    import statistics

    runs = raw["runs"]

    def ratios(store, level, writer, rate) -> list[float]:
        return [
            run["tokens"] / run["seconds"] / rate
            for run in runs
            if (run["store"], run["zstd_level"], run["writer"], run["rate"])
            == (store, level, writer, rate)
        ]

    def maximum(store, level, writer) -> float:
        return statistics.median(
            run["tokens"] / run["seconds"]
            for run in runs
            if (run["store"], run["zstd_level"], run["writer"], run["rate"])
            == (store, level, writer, None)
        )

    from kd_shards.teacher_dump.config import DumpConfig

    default_level = DumpConfig.zstd_level
    rates = [rate for rate in config.writer_rates if rate]
    rows = []
    for store in config.writer_stores:
        for level in config.writer_zstd_levels:
            figures = []
            for writer in config.writer_places:
                by_rate = ", ".join(
                    f"{rate / 1000:.0f}k {statistics.median(ratios(store, level, writer, rate)):.3f}"
                    for rate in rates
                )
                figures.append(
                    f"{writer}: {by_rate}; alone {maximum(store, level, writer):,.0f} tok/s"
                )
            measured = [run for run in runs if (run["store"], run["zstd_level"]) == (store, level)]
            width = measured[0]["engine_logprobs"]
            size = statistics.median(run["bytes"] / run["tokens"] for run in measured)
            ratio = spread_of(ratios(store, level, "process", 50_000))
            goal = store in ("topk", "adaptive") and level == default_level
            own = 1e6 / maximum(store, level, "inline")
            rows.append(
                row_type(
                    "writer",
                    f"teacher-dump (text mode, --store {store}, zstd {level}, --writer process) "
                    f"÷ a synthetic engine at 50k tokens/s; {raw['chunk_tokens']}-token rows, "
                    f"{width} engine entries per position, vocabulary {raw['vocabulary']:,}, "
                    f"{config.writer_rows_per_shard}-row shards",
                    "; ".join(figures),
                    ratio,
                    "≥ 0.98" if goal else "—",
                    ratio["median"] >= 0.98 if goal else None,
                    f"the dump's own work is {own:.1f} µs/token on one core (inline, engine "
                    f"infinitely fast; {size:.1f} B/token on drawn distributions): a writer "
                    f"process keeps up with an engine up to about that rate, and "
                    f"{math.ceil(50_000 * own / 1e6)} core(s) of it are needed at 50k tokens/s",
                )
            )
    return rows


def spread_of(values: list[float]) -> dict:
    import statistics

    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
    }
