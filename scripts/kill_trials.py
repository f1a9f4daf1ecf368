"""`make trials`: kill -9 trials, a full disk and concurrent starts, on tiny local models.

What docs/reliability.md promises about crashes, checked by doing them:
1. teacher-dump trials: the real command is killed with SIGKILL (its whole process group: the CLI
   and vLLM's engine processes) at a seeded random moment, then the dump is resumed. After each:
   every sample id exactly once, `teacher-dump inspect --validate` passes, and every row equals
   the row of an uninterrupted dump.
2. student-train trials: the real command is killed at a seeded random moment, then rerun with
   --resume. After each: the losses in metrics.jsonl and the final weights equal those of an
   uninterrupted run bit for bit.
3. disk full (a real one: a tiny tmpfs in a private mount namespace, `unshare -rm`, where the
   system allows it): teacher-dump runs out of space during a shard write and student-train
   during a checkpoint write. Each must stop with a one-line error and leave no file that looks
   complete but is not; after the space is enlarged, the rerun finishes with the same result.
4. concurrent starts into one --out: two dumps with different configs (one is refused), and the
   same rank twice (one is refused).

Kill moments: a seeded share of the kills (start_up_share) lands uniformly in the start-up (from
launch to the first shard or metrics line of an uninterrupted run), the rest uniformly in the
working phase after the first shard or metrics line appears. Figures go to OUT/results.json
and OUT/results.md; the exit status is 1 if any trial failed.

    python -m scripts.kill_trials [--dump-trials N] [--train-trials N] [--seed S] [--out DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from kd_shards.shared.config import build_config, config_options
from kd_shards.shared.errors import UserError, check_all, exit_with
from kd_shards.shared.files import atomic_write_text

REPOSITORY = Path(__file__).resolve().parent.parent
ENVIRONMENT = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
}


@dataclass(frozen=True)
class TrialsConfig:
    out: str = "trials"
    """results.json and results.md go here; work/ (emptied each run) holds the runs."""
    dump_trials: int = 20
    """teacher-dump runs killed with SIGKILL and resumed."""
    train_trials: int = 20
    """student-train runs killed with SIGKILL and resumed."""
    seed: int = 0
    """Seed of every kill moment (trial i draws from (seed, kind, i))."""
    start_up_share: float = 0.2
    """Share of kills drawn in the start-up rather than in the working phase."""
    prompts: int = 160
    """Prompts of the dump (generate mode, one sampled completion each): about 15 s of dumping
    on 2 CPU cores, so that kills land among many shard writes."""
    max_new_tokens: int = 48
    """Tokens sampled per prompt."""
    rows_per_shard: int = 4
    """Small shards, so kills land between and during many shard writes."""
    train_steps: int = 60
    """Optimizer steps of the training runs (a checkpoint every save_every)."""
    save_every: int = 3
    disk_full: bool = True
    """Run the full-disk checks (needs `unshare -rm` and tmpfs; skipped where unavailable)."""
    concurrent: int = 2
    """Repetitions of each concurrent-start check."""

    def __post_init__(self):
        check_all(
            [
                (self.dump_trials >= 0 and self.train_trials >= 0, "trial counts must be >= 0"),
                (0.0 <= self.start_up_share <= 1.0, "--set start_up_share must be in [0, 1]"),
                (self.prompts >= 2 * self.rows_per_shard, "--set prompts: at least two shards"),
                (self.train_steps >= 2 * self.save_every, "--set train_steps: two checkpoints"),
            ]
        )


# Workloads: the same settings for the killed command, its resume and the reference.


def write_prompts(path: Path, count: int) -> Path:
    """Arithmetic questions in the gsm8k task's format (question, answer ending in #### n)."""
    lines = []
    for index in range(count):
        first, second = 3 + index % 17, 2 + (index * 7) % 23
        question = f"Sam has {first} apples and buys {second} more. How many apples now?"
        answer = f"{first}+{second}={first + second}.\n#### {first + second}"
        lines.append(json.dumps({"question": question, "answer": answer}))
    path.write_text("\n".join(lines) + "\n")
    return path


def dump_settings(teacher: Path, data: Path, config: TrialsConfig) -> dict:
    """teacher-dump's config (as a --config file): sampled completions, small shards."""
    return {
        "model": str(teacher),
        "data": "gsm8k",
        "data_path": str(data),
        "top_k": 8,
        "max_new_tokens": config.max_new_tokens,
        "temperature": 1.0,
        "seed": 5,
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "rows_per_shard": config.rows_per_shard,
        "max_in_flight": 8,
        "progress": False,
    }


def train_settings(shards: Path, student: Path, config: TrialsConfig) -> dict:
    """student-train's config (as a --config file)."""
    return {
        "shards": str(shards),
        "student": str(student),
        "max_steps": config.train_steps,
        "save_every": config.save_every,
        "micro_batch": 4,
        "grad_accum": 2,
        "lr": 3e-3,
        "loss": "fkl",
        "alpha": 0.5,
        "shuffle_buffer": 16,
        "chunk_tokens": 50,
        "progress": False,
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def dump_command(settings_file: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "kd_shards.teacher_dump.cli", "--config", str(settings_file), "--out", str(out),
    ]  # fmt: skip


def train_command(settings_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "kd_shards.student_train.cli", "--config", str(settings_file),
        "--out", str(out), *extra,
    ]  # fmt: skip


# What a directory holds.


def finished_shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def dump_rows(directory: Path) -> tuple[dict[str, dict], list[str]]:
    """(rows by sample id, sample ids seen more than once) over the finished shards. A row is
    its plain columns as stored plus the teacher's distributions as the trainer's reader
    decodes them: adaptive dumps renumber ids per shard, so only the decoded values can be
    compared between dumps whose shards hold different rows."""
    import pyarrow.parquet as pq

    from kd_shards.schemas.shard import PAD_ID
    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    rows: dict[str, dict] = {}
    duplicates = []
    for path in finished_shards(directory):
        columns = ["sample_id", "prompt_ids", "target_ids", "target_logprobs"]
        for row in pq.read_table(path, columns=columns).to_pylist():
            if row["sample_id"] in rows:
                duplicates.append(row["sample_id"])
            rows[row["sample_id"]] = row
    for row in iterate_rows(open_dump(directory, allow_incomplete=True)):
        tail = row.topk_log_tail
        # A row group pads every row to its widest position: keep this row's own width.
        width = int((row.topk_ids != PAD_ID).sum(axis=1).max(initial=0))
        rows[row.sample_id].update(
            topk_ids=row.topk_ids[:, :width].tolist(),
            topk_logprobs=row.topk_logprobs[:, :width].tolist(),
            # NaN (no stored tail, schema v1) would never compare equal to itself.
            topk_log_tail=None if tail is None or np.isnan(tail).any() else tail.tolist(),
        )
    return rows, duplicates


def dump_state(directory: Path) -> dict:
    """What a killed dump left: finished shards, temporaries, what the manifest lists."""
    manifest_file = Path(directory) / "manifest.json"
    listed = None
    if manifest_file.is_file():
        try:
            listed = len(json.loads(manifest_file.read_text())["shards"])
        except (json.JSONDecodeError, KeyError):
            listed = "unreadable"
    return {
        "shards": len(finished_shards(directory)),
        "temporaries": len(list(Path(directory).glob(".tmp-*"))),
        "manifest_shards": listed,
    }


def train_state(out: Path) -> dict:
    """What a killed training run left: complete checkpoints, temporaries, metrics lines."""
    from kd_shards.student_train.checkpoints import complete_checkpoints
    from kd_shards.student_train.reporting import read_metrics

    checkpoints = Path(out) / "checkpoints"
    temporaries = list(checkpoints.glob(".tmp-*")) if checkpoints.is_dir() else []
    return {
        "checkpoints": [path.name for path in complete_checkpoints(out)],
        "temporaries": len(temporaries),
        "metrics_lines": len(read_metrics(Path(out) / "metrics.jsonl")),
        "final": (Path(out) / "final").is_dir(),
    }


def training_result(out: Path) -> tuple[list[tuple[int, float]], dict]:
    """(step losses from metrics.jsonl, final weights) of a finished run."""
    from safetensors.torch import load_file

    from kd_shards.student_train.reporting import read_metrics

    losses = [
        (line["step"], line["loss"])
        for line in read_metrics(Path(out) / "metrics.jsonl")
        if "loss" in line
    ]
    return losses, load_file(Path(out) / "final" / "model.safetensors")


def same_weights(first: dict, second: dict) -> bool:
    import torch

    return first.keys() == second.keys() and all(
        torch.equal(first[name], second[name]) for name in first
    )


def validate_command(directory: Path) -> tuple[int, str]:
    """`teacher-dump inspect DIR --validate`: (exit status, its last line)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_shards.teacher_dump.cli",
            "inspect",
            str(directory),
            "--validate",
        ],
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        timeout=300,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode, lines[-1] if lines else ""


# Killing.


@dataclass(frozen=True)
class Phases:
    """An uninterrupted run's timeline (seconds after launch) and its units of work."""

    start_up: float
    """Until the first unit of work was done."""
    working: float
    """From then to the end of the process."""
    units: int
    """Units of work: finished shards (dump) or logged steps (training)."""


@dataclass(frozen=True)
class KillMoment:
    """When a trial's SIGKILL lands. In the start-up: `seconds` after launch. In the working
    phase: once `unit` units are done, plus `fraction` of the time the last unit took in this
    run, so that the kill lands about inside the next unit whatever the machine's load (units
    differ in length: a step that also saves a checkpoint takes longer)."""

    phase: str
    seconds: float = 0.0
    unit: int = 0
    fraction: float = 0.0


def kill_moment(seed: int, kind: str, trial: int, phases: Phases, share: float) -> KillMoment:
    """Trial `trial`'s kill moment, drawn from (seed, kind, trial): with probability `share`
    uniform over the reference's start-up, else after a uniform unit 1..units, at a uniform
    fraction of a unit."""
    rng = np.random.default_rng([seed, {"dump": 1, "train": 2}[kind], trial])
    if rng.random() < share:
        return KillMoment("start-up", seconds=float(rng.uniform(0.0, phases.start_up)))
    unit = int(rng.integers(1, phases.units + 1))
    return KillMoment("working", unit=unit, fraction=float(rng.uniform(0.0, 1.0)))


def progress(kind: str, out: Path) -> int:
    """Units of work done so far: finished shards (dump) or logged steps (training)."""
    if kind == "dump":
        return len(finished_shards(out))
    metrics = Path(out) / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line)


def run_until_killed(
    command: list[str], kind: str, out: Path, moment: KillMoment, reference: Phases, log: Path
) -> dict:
    """Start `command` and kill its process group with SIGKILL at `moment`; returns when it
    landed, how much work was done by then, and whether the run had already ended."""
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, env=ENVIRONMENT, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPOSITORY,
        )  # fmt: skip
    launched = time.monotonic()
    if moment.phase == "start-up":
        deadline = launched + moment.seconds
    else:
        # When the count of units last changed, and the change before: the last unit's length.
        seen, changed, changed_before = 0, None, None
        while process.poll() is None and seen < moment.unit:
            done = progress(kind, out)
            if done > seen:
                seen, changed_before, changed = done, changed, time.monotonic()
            time.sleep(0.002)
        if changed is not None and changed_before is not None:
            unit_seconds = changed - changed_before
        else:  # no unit timed yet in this run: the reference's mean
            unit_seconds = reference.working / max(reference.units, 1)
        deadline = time.monotonic() + moment.fraction * unit_seconds
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.002)
    finished = process.poll() is not None
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {
        **asdict(moment),
        "killed_at_s": round(time.monotonic() - launched, 3),
        "units_done_at_kill": progress(kind, out),
        "killed": not finished,
        "exit_status": process.returncode,
    }


def timed_run(command: list[str], kind: str, out: Path, log: Path) -> Phases:
    """Run `command` to the end; its phases and units of work (fails if it fails)."""
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, env=ENVIRONMENT, stdout=handle, stderr=subprocess.STDOUT, cwd=REPOSITORY
        )
    launched = time.monotonic()
    working_from = None
    while process.poll() is None:
        if working_from is None and progress(kind, out) >= 1:
            working_from = time.monotonic()
        time.sleep(0.01)
    ended = time.monotonic()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: see {log}")
    working_from = working_from or ended
    return Phases(
        start_up=working_from - launched, working=ended - working_from, units=progress(kind, out)
    )


# Trials.


@dataclass
class Trial:
    kind: str
    index: int
    kill: dict = field(default_factory=dict)
    state_at_kill: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def check_dump(out: Path, reference: dict[str, dict], trial: Trial) -> None:
    """Every sample exactly once, inspect --validate passes, every row as in the reference."""
    rows, duplicates = dump_rows(out)
    missing = sorted(set(reference) - set(rows))
    extra = sorted(set(rows) - set(reference))
    differing = [key for key in reference if key in rows and rows[key] != reference[key]]
    status, last_line = validate_command(out)
    trial.checks.update(
        rows=len(rows),
        duplicates=len(duplicates),
        missing=len(missing),
        unexpected=len(extra),
        rows_differing_from_uninterrupted=len(differing),
        validate_exit_status=status,
        temporaries_left=len(list(out.glob(".tmp-*"))),
    )
    if duplicates or missing or extra:
        trial.failures.append(
            f"{len(duplicates)} duplicate, {len(missing)} missing, {len(extra)} unexpected sample ids"
        )
    if differing:
        fields = sorted(
            {
                name
                for key in differing
                for name in reference[key]
                if rows[key].get(name) != reference[key][name]
            }
        )
        trial.failures.append(
            f"{len(differing)} rows differ from the uninterrupted dump (in {', '.join(fields)})"
        )
    if status != 0:
        trial.failures.append(f"inspect --validate exited {status}: {last_line}")
    if trial.checks["temporaries_left"]:
        trial.failures.append("temporary files were left behind")


def dump_trial(
    index: int,
    *,
    settings_file: Path,
    work: Path,
    reference: dict[str, dict],
    phases: Phases,
    seed: int,
    start_up_share: float,
    engine,
) -> Trial:
    """Kill a teacher-dump run at a seeded moment, resume it (in this process, with `engine`: the
    same code as rerunning the command, without a second engine start), check the dump."""
    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.run import run_dump

    trial = Trial("dump", index)
    out = work / f"dump-{index:03d}"
    shutil.rmtree(out, ignore_errors=True)
    moment = kill_moment(seed, "dump", index, phases, start_up_share)
    trial.kill = run_until_killed(
        dump_command(settings_file, out),
        "dump",
        out,
        moment,
        phases,
        work / f"dump-{index:03d}.log",
    )
    trial.state_at_kill = dump_state(out)
    config = build_config(DumpConfig, config_file=settings_file, flags={"out": str(out)})
    try:
        run_dump(config, engine)
    except UserError as error:
        trial.failures.append(f"resume refused: {error}")
        return trial
    check_dump(out, reference, trial)
    if trial.passed:
        shutil.rmtree(out, ignore_errors=True)
    return trial


def train_trial(
    index: int,
    *,
    settings_file: Path,
    work: Path,
    reference: tuple[list, dict],
    phases: Phases,
    seed: int,
    start_up_share: float,
) -> Trial:
    """Kill a student-train run at a seeded moment, rerun it with --resume, compare with the
    uninterrupted run bit for bit."""
    trial = Trial("train", index)
    out = work / f"train-{index:03d}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"train-{index:03d}.log"
    moment = kill_moment(seed, "train", index, phases, start_up_share)
    trial.kill = run_until_killed(
        train_command(settings_file, out), "train", out, moment, phases, log
    )
    trial.state_at_kill = train_state(out)
    with open(log, "a") as handle:
        resumed = subprocess.run(
            train_command(settings_file, out, "--resume"), env=ENVIRONMENT, stdout=handle,
            stderr=subprocess.STDOUT, cwd=REPOSITORY, timeout=900,
        )  # fmt: skip
    if resumed.returncode != 0:
        trial.failures.append(f"--resume exited {resumed.returncode}: see {log}")
        return trial
    losses, weights = training_result(out)
    expected_losses, expected_weights = reference
    trial.checks.update(
        steps=len(losses),
        losses_equal=losses == expected_losses,
        weights_equal=same_weights(weights, expected_weights),
        temporaries_left=train_state(out)["temporaries"],
    )
    if not trial.checks["losses_equal"]:
        trial.failures.append("losses differ from the uninterrupted run")
    if not trial.checks["weights_equal"]:
        trial.failures.append("final weights differ from the uninterrupted run")
    if trial.checks["temporaries_left"]:
        trial.failures.append("temporary checkpoints were left behind")
    if trial.passed:
        shutil.rmtree(out, ignore_errors=True)
    return trial


def concurrent_start_trial(
    index: int, *, settings_file: Path, work: Path, different: bool
) -> Trial:
    """Start two teacher-dumps into one --out at once: with different configs (top_k 8 vs 4), or
    the same config and rank twice. Exactly one must be refused, in one line; the other is
    stopped once the refusal is in (it would only go on dumping)."""
    trial = Trial("concurrent-different-config" if different else "concurrent-same-rank", index)
    out = work / f"concurrent-{trial.kind}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    settings = json.loads(settings_file.read_text())
    files = [settings_file]
    if different:
        files.append(write_config(work / "settings-top-k-4.json", {**settings, "top_k": 4}))
    else:
        files.append(settings_file)
    logs = [work / f"concurrent-{trial.kind}-{index}-{which}.log" for which in (0, 1)]
    processes = []
    for file, log in zip(files, logs, strict=True):
        with open(log, "w") as handle:  # a file, not a pipe: vLLM's logs would fill a pipe
            processes.append(
                subprocess.Popen(
                    dump_command(file, out),
                    env=ENVIRONMENT,
                    stdout=subprocess.DEVNULL,
                    stderr=handle,
                    start_new_session=True,
                    cwd=REPOSITORY,
                )  # fmt: skip
            )
    deadline = time.monotonic() + 600
    refused = None
    while refused is None and time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                refused = process
                break
        time.sleep(0.05)
    for process in processes:
        if process is not refused and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    message = logs[processes.index(refused)].read_text().strip() if refused else ""
    lines = message.splitlines()
    expected = "different config (top_k: " if different else "another teacher-dump with --rank 0"
    trial.checks.update(
        refused_exit_status=refused.returncode if refused else None,
        message=lines[-1] if lines else "",
        still_running_when_refused=sum(1 for p in processes if p is not refused),
    )
    if refused is None or refused.returncode != 2 or len(lines) != 1 or expected not in message:
        trial.failures.append(f"expected one refusal with {expected!r}, got {message[-300:]!r}")
    return trial


# Disk full: a real tmpfs in a private mount namespace.


def private_tmpfs_available() -> bool:
    """Whether this system lets an unprivileged process mount a tmpfs in its own namespace."""
    import tempfile

    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as mount:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
            capture_output=True,
        )
    return probe.returncode == 0


def on_tiny_tmpfs(mount: Path, size_bytes: int, arguments: list[str]) -> list[str]:
    """A command that runs `python -m scripts.kill_trials ARGUMENTS` in a new user and mount
    namespace with a `size_bytes` tmpfs mounted at `mount` (it vanishes with the namespace)."""
    inner = " ".join(
        [f"mount -t tmpfs -o size={size_bytes} tmpfs {mount} &&", "exec", sys.executable]
        + ["-m", "scripts.kill_trials", *[f"'{argument}'" for argument in arguments]]
    )
    return ["unshare", "-rm", "sh", "-c", inner]


def remount(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)


def error_report(finished: subprocess.CompletedProcess) -> dict:
    """A failed command's exit status, its error line(s) and how many there were."""
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error: ")]
    return {
        "exit_status": finished.returncode,
        "message": errors[-1] if errors else finished.stderr.strip()[-300:],
        "error_lines": len(errors),
    }


def left_dump_problems(out: Path) -> list[str]:
    """What is wrong with the files a stopped dump left, beyond being unfinished: every file
    that looks complete (a part-*.parquet shard, the manifest) must be complete. A finished
    shard that the manifest does not list yet (the disk filled up while the manifest was being
    rewritten after the shard's rename) is whole; the rerun lists it, so it is not a problem
    here once it passes every check on its own."""
    from kd_shards.shared.storage import as_folder
    from kd_shards.teacher_dump.inspect import validate, validate_shard
    from kd_shards.teacher_dump.shards import describe_shard

    manifest = json.loads((out / "manifest.json").read_text())
    problems = []
    for problem in validate(out):
        name = problem.split(":", 1)[0]
        if problem.endswith(
            "on disk but not in the manifest (rerun the dump command to refresh it)"
        ):
            entry = describe_shard(out / name)
            own = validate_shard(as_folder(out), entry, manifest, set())
            if own is None:
                continue
            problem = f"{name}: {own}"
        problems.append(problem)
    return problems


def disk_full_dump_worker(mount: Path, settings_file: Path, report: Path, reference: Path) -> None:
    """Inside the namespace: dump onto the full tmpfs, check what is left, enlarge, resume."""
    out = mount / "dump"
    result = {}
    failed = subprocess.run(
        dump_command(settings_file, out), env=ENVIRONMENT, capture_output=True, text=True,
        cwd=REPOSITORY,
    )  # fmt: skip
    result.update(error_report(failed))
    result["left"] = dump_state(out)
    result["left_problems"] = left_dump_problems(out)
    remount(mount, 512 << 20)
    resumed = subprocess.run(
        dump_command(settings_file, out), env=ENVIRONMENT, capture_output=True, text=True,
        cwd=REPOSITORY,
    )  # fmt: skip
    result["resume_exit_status"] = resumed.returncode
    reference_rows = json.loads(reference.read_text())
    trial = Trial("disk-full-dump", 0)
    check_dump(out, reference_rows, trial)
    result["checks"] = trial.checks
    result["check_failures"] = trial.failures
    report.write_text(json.dumps(result))


def disk_full_train_worker(mount: Path, settings_file: Path, report: Path, reference: Path) -> None:
    """Inside the namespace: train onto the full tmpfs, check what is left, enlarge, resume."""
    from safetensors.torch import load_file

    out = mount / "train"
    result = {}
    failed = subprocess.run(
        train_command(settings_file, out), env=ENVIRONMENT, capture_output=True, text=True,
        cwd=REPOSITORY,
    )  # fmt: skip
    result.update(error_report(failed))
    result["left"] = train_state(out)
    result["checkpoints_loadable"] = all(
        bool(load_file(out / "checkpoints" / name / "model.safetensors"))
        for name in result["left"]["checkpoints"]
    )
    remount(mount, 512 << 20)
    resumed = subprocess.run(
        train_command(settings_file, out, "--resume"), env=ENVIRONMENT, capture_output=True,
        text=True, cwd=REPOSITORY,
    )  # fmt: skip
    result["resume_exit_status"] = resumed.returncode
    if resumed.returncode == 0:
        losses, weights = training_result(out)
        expected_losses, expected_weights = training_result(reference)
        result["losses_equal"] = losses == expected_losses
        result["weights_equal"] = same_weights(weights, expected_weights)
    report.write_text(json.dumps(result))


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def disk_full_trials(
    work: Path, dump_settings_file: Path, train_settings_file: Path, reference_dump: Path,
    reference_train: Path,
) -> list[Trial]:  # fmt: skip
    """The two full-disk runs, each in its own namespace; their reports become Trials."""
    trials = []
    rows, _ = dump_rows(reference_dump)
    rows_file = work / "reference-rows.json"
    rows_file.write_text(json.dumps(rows))
    # Half the finished dump's bytes: the disk fills part-way through the shards.
    dump_size = max(64 << 10, directory_bytes(reference_dump) // 2)
    # Room for the run's small files and two checkpoints, not for a third one beside them.
    checkpoint = reference_train / "checkpoints"
    one = directory_bytes(sorted(checkpoint.glob("step-*"))[0])
    train_size = 2 * one + one // 2 + (64 << 10)
    for kind, size, worker, reference in (
        ("disk-full-dump", dump_size, "disk-full-dump-worker", rows_file),
        ("disk-full-train", train_size, "disk-full-train-worker", reference_train),
    ):
        trial = Trial(kind, 0)
        mount = work / f"{kind}-mount"
        mount.mkdir(exist_ok=True)
        report = work / f"{kind}.json"
        report.unlink(missing_ok=True)
        settings_file = dump_settings_file if kind == "disk-full-dump" else train_settings_file
        command = on_tiny_tmpfs(
            mount, size, [worker, str(mount), str(settings_file), str(report), str(reference)]
        )
        finished = subprocess.run(
            command, capture_output=True, text=True, cwd=REPOSITORY, env=ENVIRONMENT
        )
        if not report.is_file():
            trial.failures.append(f"the worker did not report: {finished.stderr[-500:]}")
            trials.append(trial)
            continue
        result = json.loads(report.read_text())
        trial.checks = {"tmpfs_bytes": size, **result}
        if result["exit_status"] != 2 or result["error_lines"] != 1:
            trial.failures.append(f"expected exit 2 with one error line: {result['message']!r}")
        if "no space left" not in result["message"]:
            trial.failures.append(f"the error does not say the disk is full: {result['message']!r}")
        if result["left"].get("temporaries"):
            trial.failures.append("temporary files were left behind")
        if kind == "disk-full-dump":
            trial.failures += [f"left behind: {problem}" for problem in result["left_problems"]]
            trial.failures += result["check_failures"]
        else:
            if not result["left"]["checkpoints"] or not result["checkpoints_loadable"]:
                trial.failures.append("no complete, loadable checkpoint was left")
            if not (result.get("losses_equal") and result.get("weights_equal")):
                trial.failures.append("the resumed run differs from the uninterrupted one")
        if result["resume_exit_status"] != 0:
            trial.failures.append(f"the rerun exited {result['resume_exit_status']}")
        trials.append(trial)
    return trials


# Bit flips: what a checksum catches that nothing else does.


def bit_flip_census(dump: Path, work: Path, trainer_checks: int = 20) -> dict:
    """Flip bit 0 of every byte of one real shard's pages (the footer excluded), one at a time,
    and sort the results: unreadable, refused by a value check, read back unchanged, or silent
    (a whole shard with other numbers in it that passes every value check). Then hand the first
    `trainer_checks` silent ones to the trainer's loader: each must be refused by its checksum."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd_shards.shared.shard_reader import checked_columns, open_dump
    from kd_shards.student_train.shard_stream import ShardStream

    manifest = json.loads((dump / "manifest.json").read_text())
    name = manifest["shards"][0]["name"]
    data = (dump / name).read_bytes()
    original = pq.read_table(dump / name)
    footer = int.from_bytes(data[-8:-4], "little") + 8
    counts = {"unreadable": 0, "refused_by_value_checks": 0, "unchanged": 0, "silent": 0}
    silent = []
    for offset in range(4, len(data) - footer):
        flipped = bytearray(data)
        flipped[offset] ^= 1
        try:
            parquet = pq.ParquetFile(pa.BufferReader(bytes(flipped)))
            table = parquet.read()
        except Exception:
            counts["unreadable"] += 1
            continue
        if table.equals(original):
            counts["unchanged"] += 1
            continue
        if isinstance(checked_columns(table, parquet.metadata, manifest), str):
            counts["refused_by_value_checks"] += 1
            continue
        counts["silent"] += 1
        silent.append(offset)
    refused = 0
    for offset in silent[:trainer_checks]:
        copy = work / "bit-flip"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(dump, copy)
        flipped = bytearray(data)
        flipped[offset] ^= 1
        (copy / name).write_bytes(bytes(flipped))
        try:
            for _ in ShardStream(open_dump(copy), epochs=1):
                pass
        except UserError as error:
            refused += "sha256" in str(error) and name in str(error)
    shutil.rmtree(work / "bit-flip", ignore_errors=True)
    return {
        "shard_bytes": len(data),
        "flips": sum(counts.values()),
        **counts,
        "silent_given_to_the_trainer": min(trainer_checks, len(silent)),
        "refused_by_the_checksum": refused,
    }


# The whole run.


def build_models(models: Path) -> tuple[Path, Path]:
    """The tiny teacher and student of the test suite (a BPE tokenizer trained on the Python
    docs, 2-layer Llamas whose embedding is padded past the tokenizer), built once."""
    from scripts.tiny_models import build_tiny_llama  # test assets, also used by these trials

    teacher, student = models / "teacher", models / "student"
    if not (teacher / "config.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        build_tiny_llama(teacher)
    if not (student / "config.json").is_file():
        shutil.rmtree(student, ignore_errors=True)
        build_tiny_llama(student, seed=1)
    return teacher, student


def run_trials(config: TrialsConfig) -> dict:
    """Every trial of `config`; returns the results (also written to OUT/)."""
    from kd_shards.teacher_dump.config import DumpConfig
    from kd_shards.teacher_dump.modes.tokens import build_engine
    from kd_shards.teacher_dump.run import prepare

    out = Path(config.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (out / "trials.jsonl").unlink(missing_ok=True)
    teacher, student = build_models(out / "models")
    data = write_prompts(work / "prompts.jsonl", config.prompts)
    dump_file = write_config(work / "dump.json", dump_settings(teacher, data, config))
    started = time.monotonic()

    print("kill trials: uninterrupted teacher-dump (reference)", file=sys.stderr)
    reference_dump = work / "reference-dump"
    dump_phases = timed_run(
        dump_command(dump_file, reference_dump), "dump", reference_dump, work / "reference-dump.log"
    )
    reference_rows, _ = dump_rows(reference_dump)
    train_file = write_config(work / "train.json", train_settings(reference_dump, student, config))
    print("kill trials: uninterrupted student-train (reference)", file=sys.stderr)
    reference_train = work / "reference-train"
    train_phases = timed_run(
        train_command(train_file, reference_train), "train", reference_train,
        work / "reference-train.log",
    )  # fmt: skip
    reference_training = training_result(reference_train)

    trials: list[Trial] = []
    if config.dump_trials:
        dump_config = build_config(DumpConfig, config_file=dump_file, flags={"out": str(work)})
        engine = build_engine(
            dump_config,
            prepare(dump_config).model,
            sampled_logprobs=dump_config.store == "sampled",
        )
        try:
            for index in range(config.dump_trials):
                trial = dump_trial(
                    index, settings_file=dump_file, work=work, reference=reference_rows,
                    phases=dump_phases, seed=config.seed, start_up_share=config.start_up_share,
                    engine=engine,
                )  # fmt: skip
                record(trial, out)
                trials.append(trial)
        finally:
            engine.close()
    for index in range(config.train_trials):
        trial = train_trial(
            index, settings_file=train_file, work=work, reference=reference_training,
            phases=train_phases, seed=config.seed, start_up_share=config.start_up_share,
        )  # fmt: skip
        record(trial, out)
        trials.append(trial)
    for index in range(config.concurrent):
        for different in (True, False):
            trial = concurrent_start_trial(
                index, settings_file=dump_file, work=work, different=different
            )
            record(trial, out)
            trials.append(trial)
    skipped = None
    if config.disk_full and private_tmpfs_available():
        for trial in disk_full_trials(work, dump_file, train_file, reference_dump, reference_train):
            record(trial, out)
            trials.append(trial)
    elif config.disk_full:
        skipped = "unshare -rm with a tmpfs is not permitted here"
    census = bit_flip_census(reference_dump, work)
    print(f"kill trials: bit flips {census}", file=sys.stderr)
    results = {
        "config": asdict(config),
        "bit_flips": census,
        "seconds": round(time.monotonic() - started, 1),
        "phases": {"dump": asdict(dump_phases), "train": asdict(train_phases)},
        "reference": {"dump_rows": len(reference_rows), "train_steps": len(reference_training[0])},
        "disk_full_skipped": skipped,
        "trials": [asdict(trial) | {"passed": trial.passed} for trial in trials],
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", summary_table(results))
    return results


def record(trial: Trial, out: Path) -> None:
    """Print a trial's outcome and append it to OUT/trials.jsonl as soon as it is known."""
    report_trial(trial)
    with open(out / "trials.jsonl", "a") as handle:
        handle.write(json.dumps(asdict(trial) | {"passed": trial.passed}) + "\n")


def report_trial(trial: Trial) -> None:
    verdict = "ok" if trial.passed else "FAILED: " + "; ".join(trial.failures)
    kill = trial.kill
    when = ""
    if kill and kill["phase"] == "start-up":
        when = f" killed {kill['seconds']:.1f}s into the start-up"
    elif kill:
        when = (
            f" killed after unit {kill['unit']} + {kill['fraction']:.2f} of one "
            f"({kill['units_done_at_kill']} done at the kill)"
        )
    if kill and not kill["killed"]:
        when += " (it had finished)"
    print(f"  {trial.kind} #{trial.index}{when}: {verdict}", file=sys.stderr)


def summary_table(results: dict) -> str:
    """Per kind: trials, kills by phase, what the kills left, outcomes."""
    lines = [
        "| trials | kills (start-up / working / after it ended) | left at the kill | passed |",
        "|---|---|---|---|",
    ]
    kinds: dict[str, list[dict]] = {}
    for trial in results["trials"]:
        kinds.setdefault(trial["kind"], []).append(trial)
    for kind, trials in kinds.items():
        kills = [trial["kill"] for trial in trials if trial["kill"]]
        landed = [kill for kill in kills if kill["killed"]]
        phases = (
            f"{sum(k['phase'] == 'start-up' for k in landed)} / "
            f"{sum(k['phase'] == 'working' for k in landed)} / {len(kills) - len(landed)}"
            if kills
            else "—"
        )
        left = describe_left(kind, trials)
        passed = sum(trial["passed"] for trial in trials)
        lines.append(f"| {kind}: {len(trials)} | {phases} | {left} | {passed} of {len(trials)} |")
    census = results.get("bit_flips")
    if census:
        lines.append(
            f"\nSingle-bit flips of one {census['shard_bytes']:,}-byte shard: {census['flips']:,} "
            f"tried, {census['unreadable']:,} unreadable, {census['refused_by_value_checks']:,} "
            f"refused by a value check, {census['unchanged']:,} unchanged, {census['silent']:,} "
            f"silent (other numbers that pass every value check); of "
            f"{census['silent_given_to_the_trainer']} silent ones given to the trainer, "
            f"{census['refused_by_the_checksum']} refused by the checksum."
        )
    if results.get("disk_full_skipped"):
        lines.append(f"\nDisk-full runs skipped: {results['disk_full_skipped']}.")
    return "\n".join(lines) + "\n"


def describe_left(kind: str, trials: list[dict]) -> str:
    states = [trial["state_at_kill"] for trial in trials if trial["state_at_kill"]]
    if kind == "dump" and states:
        shards = [state["shards"] for state in states]
        temporaries = sum(state["temporaries"] > 0 for state in states)
        lagging = sum(
            isinstance(state["manifest_shards"], int) and state["manifest_shards"] < state["shards"]
            for state in states
        )
        return (
            f"{min(shards)}-{max(shards)} finished shards; a half-written temporary in "
            f"{temporaries}; the manifest behind the shards in {lagging}"
        )
    if kind == "train" and states:
        counts = [len(state["checkpoints"]) for state in states]
        temporaries = sum(state["temporaries"] > 0 for state in states)
        return (
            f"{min(counts)}-{max(counts)} complete checkpoints; a half-written checkpoint in "
            f"{temporaries}"
        )
    return "—"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default=None, help="Results and work directory [trials].")
@click.option("--dump-trials", type=int, default=None, help="teacher-dump kill trials [20].")
@click.option("--train-trials", type=int, default=None, help="student-train kill trials [20].")
@click.option("--seed", type=int, default=None, help="Seed of the kill moments [0].")
@config_options
def main(out, dump_trials, train_trials, seed, config_file, assignments) -> None:
    """Kill -9 trials, a full disk and concurrent starts (see the module docstring)."""
    flags = {"out": out, "dump_trials": dump_trials, "train_trials": train_trials, "seed": seed}
    try:
        config = build_config(
            TrialsConfig, config_file=config_file, flags=flags, assignments=assignments
        )
        results = run_trials(config)
    except UserError as error:
        exit_with(error)
    print(summary_table(results))
    failed = [trial for trial in results["trials"] if not trial["passed"]]
    print(f"{len(results['trials']) - len(failed)} of {len(results['trials'])} trials passed")
    sys.exit(1 if failed else 0)


def worker_main(arguments: list[str]) -> None:
    """Entry of the processes started inside a private mount namespace (disk-full runs)."""
    name, mount, settings_file, report, reference = arguments
    worker = {
        "disk-full-dump-worker": disk_full_dump_worker,
        "disk-full-train-worker": disk_full_train_worker,
    }[name]
    worker(Path(mount), Path(settings_file), Path(report), Path(reference))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].endswith("-worker"):
        worker_main(sys.argv[1:])
    else:
        main()
