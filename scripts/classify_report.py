"""The classification benchmark's report: results.json, results.md and accuracy-vs-labels.png
from every finished evaluation under the benchmark's folder (kd-eval's per-sample predictions,
and the LLM teacher's test dump), so any part can rebuild it and a missing stage only leaves
its rows out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scripts.classify_statistics import gap_closed, mcnemar_exact, mean_and_spread, paired_bootstrap

STUDENT_ROWS = ("labels", "pseudo", "kd", "kd-hidden", "llm-pseudo", "llm-kd")
COMPARISONS = (
    ("kd", "labels"),
    ("kd", "pseudo"),
    ("pseudo", "labels"),
    ("kd-hidden", "kd"),
    ("llm-kd", "labels"),
    ("llm-kd", "llm-pseudo"),
)
"""(first, second): each reported as first − second where both rows exist."""


def read_correctness(predictions: Path) -> np.ndarray:
    """(n,) bool from a kd-eval predictions-NAME.jsonl, in sample-id order."""
    samples = [json.loads(line) for line in predictions.read_text().splitlines() if line]
    samples.sort(key=lambda sample: int(sample["sample_id"]))
    return np.asarray([sample["correct"] for sample in samples], dtype=bool)


def dump_correctness(shards: Path) -> np.ndarray:
    """(n,) bool: whether a classify dump's most likely label is the row's gold label, in
    sample-id order (the LLM teacher's own test accuracy, read from its dump)."""
    from kd_shards.shared.shard_reader import iterate_rows, open_dump

    rows = sorted(iterate_rows(open_dump(shards, flag="--shards")), key=lambda r: int(r.sample_id))
    return np.asarray([int(row.topk_ids[0][0]) == int(row.target_ids[0]) for row in rows])


def summarize_dataset(
    teacher: np.ndarray | None, students: dict, resamples: int, llm_teacher: float | None = None
) -> dict:
    """Rows and paired comparisons of one dataset.

    teacher: (n,) the students' teacher's correctness, or None; students: (row, N) ->
    {seed: (n,) correctness}; llm_teacher: the LLM teacher's accuracy (the llm- rows' teacher).
    Per row: accuracy mean ± spread over seeds and the gap to its teacher it closes relative
    to the labels row of the same N; per comparison: the paired
    bootstrap of the seed-averaged accuracy difference and McNemar per seed pair."""
    teacher_accuracy = float(np.mean(teacher)) if teacher is not None else None
    rows = []

    def order(item):
        (row, gold), _ = item
        return gold, STUDENT_ROWS.index(row) if row in STUDENT_ROWS else len(STUDENT_ROWS), row

    for (row, gold), by_seed in sorted(students.items(), key=order):
        summary = mean_and_spread(np.mean(correct) for correct in by_seed.values())
        baseline = students.get(("labels", gold))
        closed = None
        reference = llm_teacher if row.startswith("llm-") else teacher_accuracy
        if reference is not None and baseline is not None:
            base = float(np.mean([np.mean(c) for c in baseline.values()]))
            closed = gap_closed(summary["mean"], base, reference)
        rows.append({"row": row, "gold": gold, "seeds": sorted(by_seed), "accuracy": summary,
                     "per_seed": {str(s): float(np.mean(c)) for s, c in by_seed.items()},
                     "gap_closed": closed})  # fmt: skip
    comparisons = []
    for first, second in COMPARISONS:
        for gold in sorted({gold for _, gold in students}):
            a, b = students.get((first, gold)), students.get((second, gold))
            if a is None or b is None:
                continue
            stacked = [np.stack([a[s] for s in sorted(a)]), np.stack([b[s] for s in sorted(b)])]
            per_seed = {str(s): mcnemar_exact(a[s], b[s]) for s in sorted(set(a) & set(b))}
            comparisons.append({"first": first, "second": second, "gold": gold,
                                "bootstrap": paired_bootstrap(*stacked, resamples=resamples),
                                "mcnemar": per_seed})  # fmt: skip
    return {"teacher_accuracy": teacher_accuracy, "rows": rows, "comparisons": comparisons}


def collect_dataset(config, dataset: str) -> dict:
    """Everything finished for one dataset, summarized."""
    out = Path(config.out) / dataset
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    teachers = []
    for size in sorted({getattr(config, f"{dataset}_teacher"), *config.teacher_sweep}):
        name = f"teacher-{size}"
        predictions = out / "eval" / name / f"predictions-{name}.jsonl"
        if predictions.exists():
            result = json.loads((out / "eval" / name / "results.json").read_text())
            teachers.append({"rows": size, "accuracy": float(np.mean(read_correctness(predictions))),
                             "train_seconds": timings.get(name, {}).get("seconds"),
                             "ms_per_sample": result["models"][name]["cost"]["ms_per_sample"]})  # fmt: skip
    main = out / "eval" / f"teacher-{getattr(config, f'{dataset}_teacher')}"
    teacher = next(iter(main.glob("predictions-*.jsonl")), None) if main.is_dir() else None
    students = {}
    for row in STUDENT_ROWS:
        for gold in config.gold_labels:
            by_seed = {}
            for seed in config.seeds:
                name = f"{row}-n{gold}-s{seed}"
                path = out / "eval" / name / f"predictions-{name}.jsonl"
                if path.exists():
                    by_seed[seed] = read_correctness(path)
            if by_seed:
                students[(row, gold)] = by_seed
    llm, llm_summary = out / "shards" / "llm-test", {}
    if (llm / "manifest.json").exists():
        correct = dump_correctness(llm)
        llm_summary = {"accuracy": float(np.mean(correct)), "samples": int(correct.size)}
    summary = summarize_dataset(
        read_correctness(teacher) if teacher else None,
        students,
        config.bootstrap_resamples,
        llm_summary.get("accuracy"),
    )
    if llm_summary:
        summary["llm_teacher"] = llm_summary
    return {**summary, "teachers": teachers, "timings": timings}


def write_report(config, seconds: float) -> Path:
    """results.json, results.md and accuracy-vs-labels.png in the benchmark's folder."""
    out = Path(config.out)
    results = {"datasets": {d: collect_dataset(config, d) for d in config.datasets},
               "seeds": list(config.seeds), "gold_labels": list(config.gold_labels),
               "seconds_this_run": round(seconds, 1)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    plot_accuracy_vs_labels(out / "accuracy-vs-labels.png", results)
    return out / "results.json"


def markdown(results: dict) -> str:
    """The tables: teachers (accuracy/time), the LLM teacher, student rows, paired tests."""
    lines = ["# Classification with a transfer set", ""]
    for dataset, summary in results["datasets"].items():
        lines += [f"## {dataset}", "", "| teacher rows | train s | accuracy | ms/sample |",
                  "|---|---|---|---|"]  # fmt: skip
        for teacher in summary["teachers"]:
            seconds = teacher["train_seconds"]
            lines.append(f"| {teacher['rows']} | {'—' if seconds is None else f'{seconds:.0f}'} "
                         f"| {teacher['accuracy']:.4f} | {teacher['ms_per_sample']:.1f} |")  # fmt: skip
        if "llm_teacher" in summary:
            llm = summary["llm_teacher"]
            lines += ["", f"LLM teacher (verbalizer) on the test split: accuracy "
                      f"{llm['accuracy']:.4f} ({llm['samples']} texts)"]  # fmt: skip
        lines += ["", "| row | N | seeds | accuracy mean ± std | min–max | gap closed |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        if summary["teacher_accuracy"] is not None:
            lines.append(f"| teacher | — | — | {summary['teacher_accuracy']:.4f} | — | 1 |")
        for row in summary["rows"]:
            a, closed = row["accuracy"], row["gap_closed"]
            lines.append(f"| {row['row']} | {row['gold']} | {','.join(map(str, row['seeds']))} | "
                         f"{a['mean']:.4f} ± {a['std']:.4f} | {a['min']:.4f}–{a['max']:.4f} | "
                         f"{'—' if closed is None or closed != closed else f'{closed:.2f}'} |")  # fmt: skip
        lines += ["", "| comparison | N | Δ accuracy | 95% paired bootstrap | McNemar per seed "
                  "(b / c, p) |", "|---|---|---|---|---|"]  # fmt: skip
        for c in summary["comparisons"]:
            b = c["bootstrap"]
            tests = "; ".join(f"s{s}: {t['b']}/{t['c']}, p={t['p_value']:.3g}"
                              for s, t in c["mcnemar"].items())  # fmt: skip
            lines.append(f"| {c['first']} − {c['second']} | {c['gold']} | "
                         f"{100 * b['difference']:+.2f} pt | [{100 * b['low']:+.2f}, "
                         f"{100 * b['high']:+.2f}] | {tests} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_labels(path: Path, results: dict) -> None:
    """One panel per dataset: each student row's accuracy (mean, min–max bar over seeds)
    against N (rows spread a little sideways so that their bars do not hide each other), the
    teachers against the labelled rows they were fine-tuned on, the students' teacher also as
    a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = results["datasets"]
    figure, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4))
    for axis, (dataset, summary) in zip(np.atleast_1d(axes), datasets.items(), strict=False):
        for position, row in enumerate(STUDENT_ROWS):
            points = [r for r in summary["rows"] if r["row"] == row]
            if not points:
                continue
            x = [p["gold"] * 1.04 ** (position - 2) for p in points]
            y = [p["accuracy"]["mean"] for p in points]
            error = [[p["accuracy"]["mean"] - p["accuracy"]["min"] for p in points],
                     [p["accuracy"]["max"] - p["accuracy"]["mean"] for p in points]]  # fmt: skip
            axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=row)
        if summary["teachers"]:
            axis.plot([t["rows"] for t in summary["teachers"]],
                      [t["accuracy"] for t in summary["teachers"]],
                      marker="s", color="black", label="teacher (6 layers) vs its labels")  # fmt: skip
        if summary["teacher_accuracy"] is not None:
            axis.axhline(
                summary["teacher_accuracy"], linestyle="--", color="black", label="teacher"
            )
        if "llm_teacher" in summary:
            axis.axhline(summary["llm_teacher"]["accuracy"], linestyle=":", color="grey",
                         label="LLM teacher")  # fmt: skip
        axis.set(
            title=dataset, xlabel="labelled rows (students: gold labels N)", ylabel="test accuracy"
        )
        axis.set_xscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
