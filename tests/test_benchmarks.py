"""A smoke run of `make bench`'s code on tiny models (figures are not checked against goals:
benchmarks never fail the build), plus its pure helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from scripts.bench import GROUPS, BenchConfig, run_bench, step_seconds
from scripts.bench_measurements import decoding_kl


def test_decoding_kl_matches_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50))
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-full, axis=-1)[:, :8]  # tails well above the trainer's 1e-3 noise level
    assert np.allclose(decoding_kl(top, top), 0.0, atol=1e-12)
    shifted = top - 0.01
    p = np.concatenate([np.exp(top), 1 - np.exp(top).sum(-1, keepdims=True)], -1)
    q = np.concatenate([np.exp(shifted), 1 - np.exp(shifted).sum(-1, keepdims=True)], -1)
    assert np.allclose(decoding_kl(top, shifted), (p * np.log(p / q)).sum(-1), rtol=1e-9)
    # renormalize: the tail is not an outcome
    p_top, q_top = (
        p[:, :-1] / p[:, :-1].sum(-1, keepdims=True),
        q[:, :-1] / q[:, :-1].sum(-1, keepdims=True),
    )
    assert np.allclose(
        decoding_kl(top, shifted, "renormalize"),
        (p_top * np.log(p_top / q_top)).sum(-1),
        atol=1e-12,
    )
    # A freed slot (-inf on both sides) contributes nothing.
    padded = top.copy()
    padded[:, -1] = -np.inf
    assert np.allclose(decoding_kl(padded, padded), 0.0, atol=1e-12)


def test_step_seconds_from_cumulative_throughput(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval_ce": 1.0}]
    # steps of 2 s, 3 s and 5 s, 100 tokens each
    for step, elapsed in ((1, 2.0), (2, 5.0), (3, 10.0)):
        lines.append(
            {"step": step, "tokens": 100 * step, "tokens_per_second": 100 * step / elapsed}
        )
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seconds, tokens = step_seconds(metrics)
    assert np.allclose(seconds, [2.0, 3.0, 5.0]) and tokens == 100


def test_bench_smoke_on_tiny_models(tiny_model, student_model, text_file, gsm8k_file, tmp_path):
    config = BenchConfig(
        out=str(tmp_path / "bench"),
        data_dir=str(text_file.parent),
        text=text_file.name,
        gsm8k=str(gsm8k_file),
        teacher=str(tiny_model),
        student=str(student_model),
        chunk_tokens=64, windows=6, small_k=8, large_k=16, dump_prompts=4,
        dump_max_new_tokens=8, repeats=2, train_steps=1, online_steps=1, loss_positions=128,
        loss_chunk_tokens=32, loader_copies=2, loader_buffer_rows=8, max_model_len=512,
        scale_windows=4, follow_windows=6, follow_rows_per_shard=2,
    )  # fmt: skip
    report = run_bench(config)

    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["rows"] == report["rows"]
    assert {row["group"] for row in saved["rows"]} == set(GROUPS)
    for row in saved["rows"]:
        assert row["measured"] and row["result"] and row["diagnosis"]
        if row["ratio"] is not None:
            assert math.isfinite(row["ratio"]["median"]) and row["ratio"]["median"] > 0
            assert row["ratio"]["min"] <= row["ratio"]["median"] <= row["ratio"]["max"]
        assert row["passed"] in (True, False, None)
    table = (tmp_path / "bench" / "results.md").read_text()
    for group in GROUPS:
        assert f"--only {group}" in table

    measurements = saved["measurements"]
    for storage in measurements["engine"]["storage"]:
        manifest = json.loads(
            (
                tmp_path / "bench" / "work" / f"shards-k{storage['top_k']}" / "manifest.json"
            ).read_text()
        )
        assert storage["file_bytes"] == manifest["totals"]["bytes"]
        assert sum(storage["column_bytes"].values()) <= storage["file_bytes"]
        # every stored position was compared with the engine's original values
        assert storage["compared_positions"] == manifest["totals"]["target_tokens"]
        assert storage["max_abs_logprob_error"] <= 2.0**-11 + 1e-9
        assert 0 <= storage["kl_mean"] < 1e-5
    dump = measurements["engine"]["dump"]
    assert all(len(runs) == 2 for runs in dump["runs"].values())
    # same prompts and per-prompt seeds: the bare loops sample the same tokens
    bare_tokens = {
        run["tokens"] for name in ("same", "none", "defaults") for run in dump["runs"][name]
    }
    assert len(bare_tokens) == 1
    assert {run["tokens"] for run in dump["host_only"]} == {
        run["tokens"] for run in dump["runs"]["teacher_dump"]
    }
    training = measurements["training"]
    assert len(training["kd"]) == len(training["ce"]) == 2
    assert training["kd"][0]["tokens_per_step"] == training["ce"][0]["tokens_per_step"]
    loader = measurements["loader"]
    assert loader["10x"][0]["rows"] == 2 * loader["1x"][0]["rows"]
    assert loader["1x"][0]["rows"] >= 2 * 8  # 1x holds two shuffle windows
    scale = measurements["scale"]
    # The same dump whoever runs it: every executor wrote every window's target tokens.
    assert len({run["tokens"] for runs in scale["ray"].values() for run in runs}) == 1
    follow = scale["follow"][0]
    assert follow["shards"] == 3 and len(follow["lags"]) == 3
    assert all(lag > 0 for lag in follow["lags"])  # a shard is trained on after it is published


def test_bench_refuses_missing_data(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--out", str(tmp_path / "bench"),
         "--data-dir", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is missing" in lines[0] and "--data-dir" in lines[0]


@pytest.mark.parametrize("assignment", ["only=everything", "repeats=0"])
def test_bench_config_refuses_bad_settings(assignment):
    from shared.config import build_config
    from shared.errors import UserError

    with pytest.raises(UserError):
        build_config(BenchConfig, config_file=None, flags={}, assignments=(assignment,))
