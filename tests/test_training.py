"""student-train end to end on real teacher-dump shards of the tiny model: KD lowers the eval KL,
resume equals uninterrupted training (stop; kill -9 in test_kill_trials.py), torchrun on 2 CPU processes sees every
sample once per epoch, LoRA saves an adapter and a merged model, and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from kd_shards.shared.errors import UserError
from kd_shards.student_train.config import TrainConfig
from kd_shards.student_train.reporting import read_metrics
from kd_shards.student_train.train import run_training
from tests.conftest import torchrun_student_train
from tests.conftest import train_config as shared_train_config

pytestmark = pytest.mark.engine  # the shards come from the real engine

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def train_config(shards: Path, student: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(max_steps=8, micro_batch=2, grad_accum=2, shuffle_buffer=10)
    return shared_train_config(shards, student, out, **{**values, **overrides})


def student_train(*arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_shards.student_train.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENVIRONMENT,
    )


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [
        (line["step"], line["loss"])
        for line in read_metrics(out / "metrics.jsonl")
        if "loss" in line
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_kd_training_lowers_the_eval_kl_to_the_teacher(
    text_shards, eval_text_shards, student_model, tmp_path
):
    out = tmp_path / "run"
    result = student_train(
        "--shards", str(text_shards), "--eval-shards", str(eval_text_shards),
        "--student", str(student_model), "--out", str(out), "--max-steps", "16",
        "--lr", "3e-3", "--micro-batch", "4", "--eval-every", "8", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [line for line in read_metrics(out / "metrics.jsonl") if "eval_kl" in line]
    assert [line["step"] for line in evals] == [0, 8, 16]
    assert evals[-1]["eval_kl"] < 0.9 * evals[0]["eval_kl"]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert 0.0 <= evals[-1]["eval_top1"] <= 1.0
    for name in ("metrics.jsonl", "curve.png", "train_config.json", "final", "checkpoints"):
        assert (out / name).exists(), name
        assert str(out / name) in result.stdout or name in ("train_config.json", "checkpoints")
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert len(tokenizer) == 500 and model.config.vocab_size == 512
    checkpoint = out / "checkpoints" / "step-00000016"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 16 and meta["config"]["loss"] == "fkl"
    assert meta["loader_positions"][0]["epoch"] >= 1  # 16 steps x 4 rows > 32 rows
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)


def test_a_student_with_another_tokenizer_is_refused(text_shards, tmp_path):
    from scripts.tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", tokenizer_size=400)
    result = student_train(
        "--shards", str(text_shards), "--student", str(other), "--out", str(tmp_path / "out"),
        "--max-steps", "2",
    )  # fmt: skip
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr
    manifest = json.loads((text_shards / "manifest.json").read_text())
    assert "tokenizer mismatch" in message[0]
    assert manifest["tokenizer"]["fingerprint"][:16] in message[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.fixture(scope="module")
def uninterrupted(text_shards, student_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_training(train_config(text_shards, student_model, out))
    return out


def test_resume_after_a_stop_equals_uninterrupted_training(
    text_shards, student_model, uninterrupted, tmp_path
):
    out = tmp_path / "stopped"
    summary = run_training(train_config(text_shards, student_model, out, stop_at_step=4))
    assert summary["stopped_early"] and summary["steps"] == 4
    assert not (out / "final").exists()
    with pytest.raises(UserError, match="pass --resume"):
        run_training(train_config(text_shards, student_model, out))
    with pytest.raises(UserError, match=r"different config \(lr 0.003 -> 0.001\)"):
        run_training(train_config(text_shards, student_model, out, resume=True, lr=1e-3))
    run_training(train_config(text_shards, student_model, out, resume=True))
    expected = train_losses(uninterrupted)
    assert [step for step, _ in expected] == list(range(1, 9))
    assert train_losses(out) == expected
    got, want = final_weights(out), final_weights(uninterrupted)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.long
def test_torchrun_two_processes_see_each_sample_once_per_epoch(
    text_shards, student_model, tmp_path
):
    out = tmp_path / "ddp"
    result = torchrun_student_train(
        "--shards", str(text_shards), "--student", str(student_model), "--out", str(out),
        "--epochs", "1", "--micro-batch", "3", "--lr", "1e-3",
        "--set", "log_samples=true", "--set", "shuffle_buffer=10", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        lines = read_metrics(out / f"samples-rank{rank}.jsonl")
        seen[rank] = [sample for line in lines for sample in line["samples"]]
    written = []
    for path in sorted(text_shards.glob("part-*.parquet")):
        written += pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()
    assert len(written) == 32
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(written)  # each exactly once
    steps = [line for line in read_metrics(out / "metrics.jsonl") if "loss" in line]
    assert len(steps) == 6  # 16 rows per rank in micro-batches of 3
    manifest = json.loads((text_shards / "manifest.json").read_text())
    assert steps[-1]["tokens"] == manifest["totals"]["target_tokens"]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "ce"},
        {"loss": "rkl", "tail": "renormalize", "temperature": 2.0},
        {"loss": "jsd", "beta": 0.3, "alpha": 0.5},
        {"loss": "skew-kl", "batch_tokens": 200, "micro_batch": None},
        {"loss": "tvd", "bf16": True},
        {"loss": "fkl", "epochs": 1, "max_steps": None, "grad_accum": 3},
    ],
)
def test_every_loss_and_batching_mode_trains(
    text_shards, eval_text_shards, student_model, tmp_path, options
):
    options = {"max_steps": 3, **options}
    summary = run_training(
        train_config(
            text_shards, student_model, tmp_path / "out", eval_shards=str(eval_text_shards),
            eval_limit=5, **options,
        )
    )  # fmt: skip
    lines = read_metrics(tmp_path / "out" / "metrics.jsonl")
    steps = [line for line in lines if "loss" in line]
    if options.get("epochs"):
        assert len(steps) == summary["total_steps"] == 6  # 32 rows, 2 rows x 3 micro-batches
        assert steps[-1]["tokens"] == 32 * 63
    else:
        assert len(steps) == 3
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in steps)
    if options["loss"] == "ce":
        assert all(line["kd"] == 0 and line["loss"] == line["ce"] for line in steps)
    evals = [line for line in lines if "eval_kl" in line]
    assert evals[0]["eval_tokens"] == 5 * 63
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_lora_saves_an_adapter_and_a_merged_model(text_shards, student_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = student_train(
        "--shards", str(text_shards), "--student", str(student_model), "--out", str(out),
        "--max-steps", "3", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
        "--lora-target", "q_proj,v_proj", "--rslora", "--merge-lora", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-00000003"
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["use_rslora"] is True
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # an adapter, not a full copy

    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(student_model)
    adapted = PeftModel.from_pretrained(base, out / "final" / "adapter")
    input_ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
        adapted_logits = adapted(input_ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(student_model)(input_ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter learned something

    # A stopped and resumed LoRA run ends with the same adapter.
    lora = dict(
        max_steps=3, lr=1e-2, micro_batch=8, grad_accum=1, shuffle_buffer=1024, chunk_tokens=512,
        lora_r=4, lora_alpha=8.0, lora_target=("q_proj", "v_proj"), rslora=True, merge_lora=True,
    )  # fmt: skip
    resumed = tmp_path / "lora-resumed"
    run_training(train_config(text_shards, student_model, resumed, stop_at_step=2, **lora))
    run_training(train_config(text_shards, student_model, resumed, resume=True, **lora))
    got = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    want = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_bad_training_input_is_refused_with_one_line(text_shards, student_model, tmp_path):
    cases = [
        ((), "pass exactly one of --max-steps N or --epochs E"),
        (("--max-steps", "2", "--loss", "kl"), "Invalid value for '--loss'"),
        (("--max-steps", "2", "--set", "learning_rate=1"), "unknown key(s) learning_rate"),
        (("--max-steps", "2", "--micro-batch", "2", "--batch-tokens", "64"), "not both"),
    ]
    for extra, expected in cases:
        result = student_train(
            "--shards", str(text_shards), "--student", str(student_model),
            "--out", str(tmp_path / "out"), *extra,
        )  # fmt: skip
        assert result.returncode == 2, (extra, result.stderr)
        assert expected in result.stderr, (extra, result.stderr)
    with pytest.raises(UserError, match="--shards .*no such directory"):
        run_training(train_config(tmp_path / "missing", student_model, tmp_path / "a"))
    with pytest.raises(UserError, match="--student .*no such directory"):
        run_training(train_config(text_shards, tmp_path / "nothing", tmp_path / "b"))
