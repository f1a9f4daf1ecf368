"""student-train --parallel fsdp (torch's FSDP2) on 2 CPU processes (gloo).

The reference is the data-parallel path (--parallel ddp) on the same data and ranks: same loss
trajectory within float32 summation-order noise, same samples per rank. Resume is compared
with an uninterrupted FSDP2 run, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_shards.student_train.reporting import read_metrics
from tests.conftest import torchrun_student_train
from tests.synthetic_dumps import write_synthetic_dump_for

pytestmark = pytest.mark.long  # torchrun: two training processes per test

RELATIVE_TOLERANCE = 1e-4
"""FSDP2 reduce-scatters and gathers in another order than DDP's all-reduce: float32 sums
differ in their last bits, and 6 AdamW steps carry that forward (measured: 1.1e-7)."""


def steps(out: Path) -> list[dict]:
    return [line for line in read_metrics(out / "metrics.jsonl") if "loss" in line]


@pytest.fixture(scope="module")
def shards(student_model, tmp_path_factory) -> Path:
    # 41 rows: rank 0 gets 21 per epoch, rank 1 20, so with micro-batches of 4 rank 1 has no
    # rows at the 6th step (FSDP2 must still run its collectives there).
    directory = tmp_path_factory.mktemp("fsdp") / "shards"
    return write_synthetic_dump_for(student_model, directory, 41, rows_per_shard=10)


def common(shards: Path, student: Path, out: Path) -> list[str]:
    return [
        "--shards", str(shards), "--student", str(student), "--out", str(out),
        "--micro-batch", "4", "--lr", "3e-3", "--set", "shuffle_buffer=8",
        "--set", "log_samples=true",
    ]  # fmt: skip


def test_fsdp_gives_the_ddp_loss_trajectory_and_sees_each_sample_once(
    shards, student_model, tmp_path
):
    runs = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        result = torchrun_student_train(
            *common(shards, student_model, out), "--epochs", "1", "--parallel", parallel
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[parallel] = out
    ddp, fsdp = steps(runs["ddp"]), steps(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 6
    for reference, sharded in zip(ddp, fsdp, strict=True):
        assert sharded["tokens"] == reference["tokens"]  # the same normalization
        for key in ("loss", "kd", "grad_norm"):
            assert sharded[key] == pytest.approx(reference[key], rel=RELATIVE_TOLERANCE), key
    seen = []
    for rank in (0, 1):
        ddp_samples = read_metrics(runs["ddp"] / f"samples-rank{rank}.jsonl")
        fsdp_samples = read_metrics(runs["fsdp"] / f"samples-rank{rank}.jsonl")
        assert [line["samples"] for line in fsdp_samples] == [
            line["samples"] for line in ddp_samples
        ]
        seen += [sample for line in fsdp_samples for sample in line["samples"]]
    assert sorted(seen, key=int) == [str(index) for index in range(41)]
    # final/ holds the full model (gathered from the shards), loadable by transformers.
    got = load_file(runs["fsdp"] / "final" / "model.safetensors")
    want = load_file(runs["ddp"] / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)
    checkpoint = runs["fsdp"] / "checkpoints" / "step-00000006"
    assert sorted(path.name for path in (checkpoint / "sharded").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def test_fsdp_resume_is_exact(shards, student_model, tmp_path):
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    arguments = ("--max-steps", "6", "--parallel", "fsdp", "--grad-accum", "2")
    result = torchrun_student_train(*common(shards, student_model, uninterrupted), *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun_student_train(
        *common(shards, student_model, stopped), *arguments, "--stop-at-step", "3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(steps(stopped)) == 3 and not (stopped / "final").exists()
    result = torchrun_student_train(*common(shards, student_model, stopped), *arguments, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(line["step"], line["loss"]) for line in steps(stopped)] == [
        (line["step"], line["loss"]) for line in steps(uninterrupted)
    ]
    got = load_file(stopped / "final" / "model.safetensors")
    want = load_file(uninterrupted / "final" / "model.safetensors")
    for name in want:
        assert torch.equal(got[name], want[name]), name
