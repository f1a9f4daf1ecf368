"""The classification benchmark's arithmetic and plan (scripts/classify_*.py), without models:
its statistics against independent computations, the data cut, the pseudo-label file, the
report from planted predictions, and the commands a dry run plans."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kd_shards.shared.errors import UserError
from scripts.classify_statistics import gap_closed, mcnemar_exact, mean_and_spread, paired_bootstrap
from scripts.classify_transfer import Sizes, cut_dataset, pseudo_labelled, transfer_rows


def two_sided_binomial_p(b: int, c: int) -> float:
    """Exact two-sided p of b successes in b + c fair trials: the probability of every outcome
    at least as far from the middle as b (the definition, summed over all outcomes)."""
    n = b + c
    far = abs(Fraction(b) - Fraction(n, 2))
    total = sum(
        Fraction(math.comb(n, k), 2**n)
        for k in range(n + 1)
        if abs(Fraction(k) - Fraction(n, 2)) >= far
    )
    return float(min(total, Fraction(1)))


def paired(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    first = [True] * b + [False] * c + [True] * both + [False] * neither
    second = [False] * b + [True] * c + [True] * both + [False] * neither
    return np.asarray(first), np.asarray(second)


@pytest.mark.parametrize("b, c", [(10, 2), (2, 10), (5, 5), (0, 7), (38, 23), (1, 0), (300, 250)])
def test_mcnemar_exact_equals_the_binomial_definition(b, c):
    result = mcnemar_exact(*paired(b, c, both=40, neither=9))
    assert (result["b"], result["c"]) == (b, c)
    assert result["p_value"] == pytest.approx(two_sided_binomial_p(b, c), rel=1e-12)


def test_mcnemar_textbook_value_and_no_discordant_pairs():
    # b = 10, c = 2: 2 · (1 + 12 + 66) / 4096.
    assert mcnemar_exact(*paired(10, 2, 5, 5))["p_value"] == pytest.approx(158 / 4096)
    assert mcnemar_exact(*paired(0, 0, 5, 5))["p_value"] == 1.0


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution_of_a_tiny_case():
    first, second = np.array([1, 1, 0, 1]), np.array([0, 1, 1, 0])
    difference = first - second
    # All 4^4 resamples are equally likely: the exact share with mean difference <= 0.
    means = [np.mean(difference[list(i)]) for i in itertools.product(range(4), repeat=4)]
    exact = np.mean(np.asarray(means) <= 0)
    result = paired_bootstrap(first, second, resamples=200_000, seed=1)
    assert result["difference"] == pytest.approx(0.25)
    assert result["share_not_above_zero"] == pytest.approx(exact, abs=0.004)
    assert result["low"] == pytest.approx(np.quantile(means, 0.025), abs=1e-9)
    assert result["high"] == pytest.approx(np.quantile(means, 0.975), abs=1e-9)


def test_paired_bootstrap_interval_matches_the_normal_approximation_on_many_texts():
    generator = np.random.default_rng(0)
    first = generator.random(3000) < 0.83
    second = np.where(generator.random(3000) < 0.85, first, ~first)
    difference = first.astype(float) - second.astype(float)
    half = 1.959964 * difference.std(ddof=1) / math.sqrt(difference.size)
    result = paired_bootstrap(first, second, resamples=20_000, seed=2)
    assert result["low"] == pytest.approx(difference.mean() - half, abs=0.0015)
    assert result["high"] == pytest.approx(difference.mean() + half, abs=0.0015)


def test_paired_bootstrap_averages_seeds_per_text_and_refuses_unpaired_arrays():
    seeds = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 1, 1]])
    baseline = np.array([[1, 0, 0, 1]])
    result = paired_bootstrap(seeds, baseline, resamples=500, seed=0)
    assert result["difference"] == pytest.approx(np.mean(seeds) - np.mean(baseline))
    assert paired_bootstrap(seeds[0], seeds[0], resamples=100)["low"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap(np.ones(4), np.ones(5))


def test_mean_and_spread_and_gap_closed_by_hand():
    values = [0.81, 0.83, 0.80]
    summary = mean_and_spread(values)
    assert summary["mean"] == pytest.approx(statistics.mean(values))
    assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert (summary["min"], summary["max"], summary["n"]) == (0.80, 0.83, 3)
    assert mean_and_spread([0.7])["std"] == 0.0
    # The goal: 0.79 -> 0.83 of a 0.86 teacher closes 4/7 of the gap.
    assert gap_closed(0.83, 0.79, 0.86) == pytest.approx(4 / 7)
    assert math.isnan(gap_closed(0.83, 0.79, 0.79))


def rows(prefix: str, count: int) -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", "positive" if i % 2 else "negative") for i in range(count)]


def test_cut_is_disjoint_in_order_and_refuses_too_few_rows():
    pool = rows("p", 30)
    cut = cut_dataset(pool, rows("t", 9), Sizes(unlabelled=10, gold=5, teacher=12, test=4), seed=0)
    assert cut.unlabelled == pool[:10] and cut.gold == pool[10:15] and cut.teacher == pool[15:27]
    assert cut.test == rows("t", 4)
    assert transfer_rows(cut, 3) == pool[10:13] + pool[:10]
    with pytest.raises(UserError, match="= 31 rows, but the training pool holds 30"):
        cut_dataset(pool, None, Sizes(unlabelled=10, gold=5, teacher=16, test=0), seed=0)


def test_cut_without_a_test_split_holds_out_a_seeded_shuffle():
    pool = rows("p", 50)
    first = cut_dataset(pool, None, Sizes(unlabelled=20, gold=5, teacher=10, test=10), seed=3)
    again = cut_dataset(pool, None, Sizes(unlabelled=20, gold=5, teacher=10, test=10), seed=3)
    assert first == again and len(first.test) == 10
    parts = first.test + first.unlabelled + first.gold + first.teacher
    assert len(set(parts)) == len(parts) == 45 and set(parts) <= set(pool)
    assert first.test != pool[:10]


def test_pseudo_labels_keep_gold_rows_and_take_the_teacher_argmax_elsewhere():
    transfer = [("a", "negative"), ("b", "neutral"), ("c", ""), ("d", "")]
    probabilities = {str(i): np.array(p) for i, p in enumerate(
        [[0.1, 0.2, 0.7], [0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])}  # fmt: skip
    labels = ("negative", "neutral", "positive")
    assert pseudo_labelled(transfer, 2, probabilities, labels) == [
        ("a", "negative"), ("b", "neutral"), ("c", "neutral"), ("d", "negative")]  # fmt: skip
    del probabilities["3"]
    with pytest.raises(UserError, match="no row for transfer row 3"):
        pseudo_labelled(transfer, 2, probabilities, labels)


def test_verbalizer_prompt_keeps_braces_of_its_examples():
    from scripts.classify_bench import verbalizer_prompt

    prompt = verbalizer_prompt([("a {weird} text", "positive")], {"positive": "good"})
    filled = prompt.format(text="new text", labels="bad, good")
    assert "Text: a {weird} text\nLabel: good" in filled
    assert filled.endswith("Text: new text\nAnswer with the label only.")


def write_predictions(folder: Path, name: str, correct) -> None:
    (folder / name).mkdir(parents=True)
    lines = [json.dumps({"sample_id": str(i), "correct": bool(c)}) for i, c in enumerate(correct)]
    (folder / name / f"predictions-{name}.jsonl").write_text("\n".join(lines) + "\n")
    result = {"models": {name: {"cost": {"ms_per_sample": 1.0}}}}
    (folder / name / "results.json").write_text(json.dumps(result))


def test_report_from_planted_predictions(tmp_path):
    from scripts.classify_bench import ClassifyBenchConfig
    from scripts.classify_report import write_report

    config = ClassifyBenchConfig(out=str(tmp_path), datasets=("sst2",), sst2_teacher=100,
                                 seeds=(0, 1), gold_labels=(50,), bootstrap_resamples=500)  # fmt: skip
    evaluations = tmp_path / "sst2" / "eval"
    teacher = [1] * 9 + [0]
    labels = {0: [1] * 6 + [0] * 4, 1: [1] * 5 + [0] * 5}
    kd = {0: [1] * 8 + [0] * 2, 1: [0] + [1] * 8 + [0]}
    write_predictions(evaluations, "teacher-100", teacher)
    for seed in (0, 1):
        write_predictions(evaluations, f"labels-n50-s{seed}", labels[seed])
        write_predictions(evaluations, f"kd-n50-s{seed}", kd[seed])
    write_report(config, 1.0)
    results = json.loads((tmp_path / "results.json").read_text())["datasets"]["sst2"]
    by_row = {row["row"]: row for row in results["rows"]}
    # Means 0.55 (labels), 0.8 (kd) against a 0.9 teacher: (0.8 - 0.55) / (0.9 - 0.55).
    assert by_row["kd"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert by_row["kd"]["gap_closed"] == pytest.approx(0.25 / 0.35)
    (comparison,) = results["comparisons"]
    assert (comparison["first"], comparison["second"]) == ("kd", "labels")
    assert comparison["bootstrap"]["difference"] == pytest.approx(0.25)
    # Seed 1: kd right and labels wrong on texts 5..8 (4), the reverse on text 0 (1).
    assert (comparison["mcnemar"]["1"]["b"], comparison["mcnemar"]["1"]["c"]) == (4, 1)
    markdown = (tmp_path / "results.md").read_text()
    assert "| kd − labels | 50 | +25.00 pt |" in markdown
    assert (tmp_path / "accuracy-vs-labels.png").stat().st_size > 1000


def test_dry_run_plans_every_row_from_one_init_for_the_same_steps(tmp_path):
    from scripts.classify_bench import main

    data = tmp_path / "data" / "sst2_alps"
    data.mkdir(parents=True)
    header = "sentence\tlabel\n"
    (data / "train.tsv").write_text(header + "".join(f"text {i}\t{i % 2}\n" for i in range(60)))
    (data / "test.tsv").write_text(header + "".join(f"held {i}\t{i % 2}\n" for i in range(8)))
    arguments = ["out=" + str(tmp_path / "out"), "data_dir=" + str(tmp_path / "data"),
                 "encoder=" + str(tmp_path / "encoder"), "datasets=sst2", "dry_run=true",
                 "sst2_teacher=20", "sst2_unlabelled=30", "gold_labels=10", "micro_batch=8"]  # fmt: skip
    result = CliRunner().invoke(main, [item for a in arguments for item in ("--set", a)])
    assert result.exit_code == 0, result.output
    trains = [line for line in result.output.splitlines()
              if line.startswith("$ student-train") and "--max-steps" in line]  # fmt: skip
    assert len(trains) == 9  # labels, pseudo, kd x 3 seeds
    steps = math.ceil(2.0 * (10 + 30) / 8)
    student = str(tmp_path / "out" / "sst2" / "models" / "student-3-layers")
    for line in trains:
        assert f"--max-steps {steps} " in line and f"--student {student} " in line
    assert sum("--seed 2 " in line for line in trains) == 3
    transfer = (tmp_path / "out" / "sst2" / "data" / "transfer-10.jsonl").read_text().splitlines()
    assert len(transfer) == 40
    assert [json.loads(line)["label"] != "" for line in transfer] == [True] * 10 + [False] * 30
    # Finished stages are reused by name: a rerun whose cut moves rows is refused.
    moved = [item for a in arguments for item in ("--set", a)] + ["--set", "gold_labels=8"]
    refused = CliRunner().invoke(main, moved)
    assert refused.exit_code != 0 and "was cut as" in refused.output
