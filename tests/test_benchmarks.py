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


@pytest.mark.smoke
def test_bench_smoke_on_tiny_models(tiny_model, student_model, text_file, gsm8k_file, tmp_path):
    config = BenchConfig(
        out=str(tmp_path / "bench"),
        data_dir=str(text_file.parent),
        text=text_file.name,
        gsm8k=str(gsm8k_file),
        teacher=str(tiny_model),
        student=str(student_model),
        chunk_tokens=64, windows=6, eval_windows=2, small_k=4, middle_ks=(), large_k=8,
        draws=(8,), storage_train_steps=1, storage_seeds=2, storage_trained=("topk-8", "sampled-8"),
        dump_prompts=4,
        dump_max_new_tokens=8, repeats=2, train_steps=1, online_steps=1, loss_positions=128,
        loss_chunk_tokens=32, loader_copies=2, loader_buffer_rows=8, max_model_len=512,
        scale_windows=4, follow_windows=6, follow_rows_per_shard=2, ray_dumps=False,
        writer_seconds=0.02, writer_zstd_levels=(3,), writer_rows_per_shard=4,
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
    table = measurements["storage_table"]
    names = {"topk-4", "topk-8", "adaptive-parity-8", "adaptive-mass-0.9",
             "adaptive-parity-8-no-codebook", "adaptive-parity-8-zstd19", "sampled-8"}  # fmt: skip
    for dataset in ("wiki", "gsm8k"):
        assert set(table[dataset]) == names
        for name, record in table[dataset].items():
            manifest = json.loads(
                (tmp_path / "bench" / "work" / "storage" / dataset / name / "manifest.json")
                .read_text()
            )  # fmt: skip
            assert manifest["storage"]["representation"] == record["kind"]
            assert record["tokens"] == manifest["totals"]["target_tokens"] == record["positions"]
            assert record["file_bytes"] == pytest.approx(
                manifest["totals"]["bytes"] / record["tokens"]
            )
            assert record["bytes"] <= record["file_bytes"] and record["columns"]
            assert record["neg_log_mass"] >= 0 and record["entries"] >= 1
            assert (record["kl"] is None) == (record["kind"] == "sampled")
    wiki = table["wiki"]
    # exact top-8 and parity with it: parity holds by construction, on both figures
    assert wiki["adaptive-parity-8"]["kl"] <= wiki["topk-8"]["kl"] + 1e-9
    assert wiki["adaptive-parity-8"]["neg_log_mass"] <= wiki["topk-8"]["neg_log_mass"] + 1e-9
    assert len(wiki["topk-8"]["train_kl"]) == 2 and len(wiki["sampled-8"]["train_kl"]) == 1
    assert all(0 < record["speed_ratio"] <= 1 for record in wiki.values())
    assert wiki["topk-8"]["loader_headroom"] > 0 and wiki["sampled-8"]["loader_headroom"] > 0
    assert (tmp_path / "bench" / "storage.png").stat().st_size > 0
    dump = measurements["engines"][0]["dump"]
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
    assert scale["ray"] == {}  # ray_dumps=False: the follow-lag run only
    follow = scale["follow"][0]
    assert follow["shards"] == 3 and len(follow["lags"]) == 3
    assert all(lag > 0 for lag in follow["lags"])  # a shard is trained on after it is published


def test_scale_rows_compare_two_ray_workers_with_one():
    # The Ray row from whole-command runs (the smoke above skips the Ray dumps): tokens/s of
    # each executor and the 2 ÷ 1 ratio per repeat.
    from scripts.bench import scale_rows

    def runs(*seconds):
        return [{"tokens": 600, "seconds": value, "peak_rss_mb": 1.0} for value in seconds]

    scale = {
        "ray": {"local": runs(10.0, 12.0), "ray-1": runs(6.0, 5.0), "ray-2": runs(3.0, 4.0)},
        "follow": [{"lags": [1.0, 3.0, 2.0], "step_seconds": [0.5, 0.7], "shards": 3}],
    }
    ray, follow = scale_rows(BenchConfig(), scale)
    assert "2 workers 175, 1 worker 110, local executor 55 tok/s" in ray.result
    assert ray.ratio == {"median": 1.625, "min": 1.25, "max": 2.0, "repeats": 2}
    assert "first shard 1.0 s, median 2.0 s, max 3.0 s over 3 shards" in follow.result
    assert [row.group for row in scale_rows(BenchConfig(), {**scale, "ray": {}})] == ["scale"]


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
    from kd_shards.shared.config import build_config
    from kd_shards.shared.errors import UserError

    with pytest.raises(UserError):
        build_config(BenchConfig, config_file=None, flags={}, assignments=(assignment,))
