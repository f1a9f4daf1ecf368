"""A handful of the kill -9 trials of `make trials` (scripts/kill_trials.py), seeded, in the suite:
the real commands killed with SIGKILL at a random moment and resumed must lose and duplicate
nothing, validate, and (training) equal the uninterrupted run bit for bit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scripts.kill_trials import (
    Phases,
    TrialsConfig,
    dump_rows,
    dump_settings,
    dump_trial,
    timed_run,
    train_command,
    train_settings,
    train_trial,
    training_result,
    write_config,
    write_prompts,
)

pytestmark = [pytest.mark.engine, pytest.mark.long]

SEED = 11
TRIALS = TrialsConfig(prompts=48, max_new_tokens=48, rows_per_shard=4, train_steps=12)


@pytest.fixture(scope="module")
def reference_dump(tiny_model, engine, tmp_path_factory) -> tuple[Path, Path, dict, float]:
    """(settings file, dump, its rows, seconds the engine worked on it): the uninterrupted dump,
    made in this process with the session's engine."""
    from kd_shards.shared.config import build_config
    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.run import run_dump

    work = tmp_path_factory.mktemp("kill-trials")
    data = write_prompts(work / "prompts.jsonl", TRIALS.prompts)
    settings = write_config(work / "dump.json", dump_settings(tiny_model, data, TRIALS))
    out = work / "reference-dump"
    started = time.monotonic()
    run_dump(build_config(DumpConfig, config_file=settings, flags={"out": str(out)}), engine)
    rows, duplicates = dump_rows(out)
    assert len(rows) == TRIALS.prompts and not duplicates
    return settings, out, rows, time.monotonic() - started


@pytest.mark.parametrize("index", [0, 1])
def test_teacher_dump_killed_at_a_random_moment_resumes_to_the_same_dump(
    reference_dump, engine, tmp_path, index
):
    settings, _, rows, working = reference_dump
    trial = dump_trial(
        index,
        settings_file=settings,
        work=tmp_path,
        reference=rows,
        phases=Phases(start_up=0.0, working=working, units=TRIALS.prompts // TRIALS.rows_per_shard),
        seed=SEED,
        start_up_share=0.0,  # the start-up is the cheap case: aim every kill at the writing
        engine=engine,
    )
    assert trial.passed, (trial.failures, trial.kill, trial.state_at_kill, trial.checks)
    assert trial.checks["rows"] == TRIALS.prompts


@pytest.fixture(scope="module")
def reference_training(reference_dump, student_model, tmp_path_factory):
    """(settings file, phases, losses and weights) of an uninterrupted student-train command."""
    _, dump, _, _ = reference_dump
    work = tmp_path_factory.mktemp("kill-trials-train")
    settings = write_config(work / "train.json", train_settings(dump, student_model, TRIALS))
    out = work / "reference"
    phases = timed_run(train_command(settings, out), "train", out, work / "reference.log")
    return settings, phases, training_result(out)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_student_train_killed_at_a_random_moment_resumes_bit_for_bit(
    reference_training, tmp_path, index
):
    settings, phases, reference = reference_training
    trial = train_trial(
        index,
        settings_file=settings,
        work=tmp_path,
        reference=reference,
        phases=phases,
        seed=SEED,
        start_up_share=TRIALS.start_up_share,
    )
    assert trial.passed, (trial.failures, trial.kill, trial.state_at_kill, trial.checks)
    assert trial.checks["steps"] == TRIALS.train_steps
