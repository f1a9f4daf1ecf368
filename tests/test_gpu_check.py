"""`make gpu-check` without a GPU, and its arithmetic (alignment, dump-speed ratio, table)
against figures computed here. No engine starts: the check itself runs only on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from scripts.gpu_check import (
    ALIGNMENT_BOUNDS,
    alignment_figures,
    alignment_sums,
    markdown_table,
    speed_figures,
    table_rows,
)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_check", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "no CUDA GPU" in lines[0]
    assert "pip install -e '.[vllm]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_alignment_sums_match_a_loop_over_positions():
    generator = np.random.default_rng(0)
    positions, vocabulary, k = 6, 11, 3
    logits = generator.normal(size=(positions, vocabulary))
    reference = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-reference, axis=1)
    ids = order[:, :k].copy()
    ids[1, 0] = order[1, 4]  # a stored top-1 that is not the reference's argmax
    ids[2, 2] = -1  # an empty slot: not compared
    noise = generator.normal(scale=0.001, size=(positions, k))
    logprobs = np.where(ids >= 0, np.take_along_axis(reference, np.maximum(ids, 0), 1), 0) + noise

    errors = []
    agreements = 0
    for position in range(positions):
        agreements += int(ids[position, 0] == int(np.argmax(reference[position])))
        for slot in range(k):
            if ids[position, slot] >= 0:
                stored, true = logprobs[position, slot], reference[position, ids[position, slot]]
                errors.append(abs(stored - true))

    sums = alignment_sums(reference, ids, logprobs)
    assert sums["positions"] == positions
    assert sums["top1_agreements"] == agreements == positions - 1
    assert sums["entries"] == len(errors) == positions * k - 1
    assert sums["abs_sum"] == pytest.approx(sum(errors))
    assert sums["abs_max"] == pytest.approx(max(errors))

    figures = alignment_figures([sums, sums], "float32")
    assert figures["positions"] == 2 * positions
    assert figures["top1_agreement"] == pytest.approx((positions - 1) / positions)
    assert figures["mean_abs"] == pytest.approx(sum(errors) / len(errors))
    # 5 of 6 top-1s agree: below float32's bound of 0.99, so the check fails.
    assert ALIGNMENT_BOUNDS["float32"]["top1_agreement"] > 5 / 6
    assert not figures["passed"]
    assert alignment_figures([{**sums, "top1_agreements": positions}], "float32")["passed"]


def test_speed_ratio_pairs_each_repeat():
    dump = [{"tokens": 1000, "seconds": 2.0}, {"tokens": 1000, "seconds": 1.0}]
    bare = [{"tokens": 1000, "seconds": 1.0}, {"tokens": 1000, "seconds": 0.8}]
    figures = speed_figures(dump, bare)
    # Per repeat: 500/1000 = 0.5 and 1000/1250 = 0.8; median of two = their mean.
    assert figures["ratio"] == pytest.approx(0.65)
    assert figures["ratio_min"] == pytest.approx(0.5)
    assert figures["ratio_max"] == pytest.approx(0.8)
    assert figures["dump_tokens_per_second"] == pytest.approx(750.0)
    assert figures["bare_tokens_per_second"] == pytest.approx(1125.0)


def results_for_table(random_teacher: bool) -> dict:
    alignment = alignment_figures(
        [{"positions": 100, "top1_agreements": 97, "entries": 2000, "abs_sum": 40.0,
          "abs_max": 0.5}],
        "bfloat16",
    )  # fmt: skip
    return {
        "machine": {"device": "Some GPU", "torch": "2.0", "vllm": "0.32"},
        "teacher": "a teacher",
        "random_teacher": random_teacher,
        "dtype": "bfloat16",
        "windows": 4,
        "chunk_tokens": 26,
        "top_k": 20,
        "steps": 20,
        "alignment": alignment,
        "speed": speed_figures(
            [{"tokens": 100, "seconds": 1.0}], [{"tokens": 100, "seconds": 0.5}]
        ),
        "evaluation": {
            "teacher": {"metrics": {"perplexity": 5.0, "acc@1": 0.5}, "fidelity": {"kl": 0.0}},
            "student-kd": {"metrics": {"perplexity": 9.0, "acc@1": 0.3}, "fidelity": None},
        },
        "kd_final_loss": 3.25,
        "stage_seconds": {"dump": 10.0, "alignment": 2.5},
        "total_seconds": 12.5,
    }


def test_table_shows_the_measured_figures():
    table = markdown_table(table_rows(results_for_table(random_teacher=False)))
    lines = table.splitlines()
    assert lines[:2] == ["| figure | measured | note |", "|---|---|---|"]
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    # 97 of 100 top-1s; 40 nats over 2000 entries = 0.02 mean; inside bfloat16's bounds.
    assert "0.9700 over 100 positions" in table
    assert "0.02 / 0.5" in table
    assert ": pass" in table
    # 100 tokens in 1 s vs 100 in 0.5 s.
    assert "0.500 (range 0.500–0.500)" in table
    assert "100 vs 200 tok/s" in table
    assert "perplexity 9, acc@1 0.300" in table
    assert "KL to teacher 0" in table
    assert "| seconds: total | 12.5 |" in table
    assert "mean nothing" not in table


def test_table_says_a_random_teachers_quality_means_nothing():
    table = markdown_table(table_rows(results_for_table(random_teacher=True)))
    quality = [line for line in table.splitlines() if "kd-eval" in line or "KD run" in line]
    assert len(quality) == 3
    assert all("mean nothing" in line for line in quality)
