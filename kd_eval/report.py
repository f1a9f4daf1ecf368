"""What kd-eval leaves for people to read: the markdown table, results.json, the chart and one
predictions file per model (one JSON line per sample: its id, the reference, what the model
produced, what was extracted from it and the sample's score). The table's and the chart's metrics
are the task's (report["metric_columns"], from shared/tasks/), so a new task needs nothing here."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kd_shards.shared.files import atomic_write, atomic_write_json, atomic_write_text

LOG_SCALE_SPAN = 10.0
"""A panel whose positive values span more than this factor is drawn on a log scale, so that a
model orders of magnitude off does not flatten the others into invisible bars."""
NUMERICAL_ZERO = 1e-6
"""Values below this are drawn as 0 (the teacher's KL to itself is ~1e-8 from the rounding of
stored logprobs): they are not a scale to show."""
PANELS_PER_ROW = 3


def markdown_table(report: dict) -> str:
    """One row per model: params, the task's metrics, fidelity and cost."""
    metric_columns = report["metric_columns"]
    per_sample = report["kind"] in ("classify", "choice")
    fidelity = any("fidelity" in result for result in report["models"].values())
    header = ["model", "params"] + [column["label"] for column in metric_columns]
    if fidelity:
        header += ["KL to teacher", "top-1 agreement"]
    # Generation shows both speeds: tokens per second, and questions per second (TriviaQA).
    both = report["kind"] == "generate"
    header += ["ms/sample", "samples/s" if per_sample else "tok/s"] + (
        ["samples/s"] if both else []
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in report["models"].items():
        millions = result["parameters"] / 1e6
        row = [name, f"{millions:.1f}M" if millions >= 10 else f"{millions:.2f}M"]
        row += [
            column["format"].format(result["metrics"][column["key"]]) for column in metric_columns
        ]
        if fidelity:
            values = result.get("fidelity") or {}
            if "kl" in values:
                row += [f"{values['kl']:.4f}", f"{values['top1_agreement']:.3f}"]
            else:
                row += ["n/a", "n/a"]
        speed = "samples_per_second" if per_sample else "tokens_per_second"
        row += [f"{result['cost']['ms_per_sample']:.2f}", f"{result['cost'][speed]:.0f}"]
        if both:
            row.append(f"{result['cost'].get('samples_per_second', float('nan')):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, report: dict) -> None:
    """results.json, chart.png and predictions-NAME.jsonl in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    compact = {**report, "models": {}}
    for name, result in report["models"].items():
        predictions = result.get("predictions")
        if predictions is not None:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            lines = "".join(json.dumps(sample) + "\n" for sample in predictions)
            atomic_write_text(out / f"predictions-{safe}.jsonl", lines)
        compact["models"][name] = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_json(out / "results.json", compact)
    plot_chart(out / "chart.png", report)


def chart_panels(report: dict) -> list[tuple[str, list[float], bool]]:
    """(title, one value per model (nan where absent), log scale?) for each panel: the task's
    charted metrics, then fidelity (when measured) and ms/sample."""
    models = list(report["models"].values())
    panels = [
        ("metrics", column["key"], column["chart_title"])
        for column in report["metric_columns"]
        if column["chart_title"]
    ]
    if any("kl" in (result.get("fidelity") or {}) for result in models):
        panels += [
            ("fidelity", "kl", "KL(teacher ‖ model)"),
            ("fidelity", "top1_agreement", "top-1 agreement with the teacher"),
        ]
    panels.append(("cost", "ms_per_sample", "ms per sample"))
    result = []
    for section, key, title in panels:
        values = [float((model.get(section) or {}).get(key, math.nan)) for model in models]
        values = [0.0 if abs(value) < NUMERICAL_ZERO else value for value in values]
        positive = [value for value in values if value > 0 and math.isfinite(value)]
        log_scale = bool(positive) and max(positive) / min(positive) > LOG_SCALE_SPAN
        result.append((title + (" (log scale)" if log_scale else ""), values, log_scale))
    return result


def plot_chart(path: Path, report: dict) -> None:
    """One bar panel per metric, models side by side; values written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    panels = chart_panels(report)
    width = max(3.2, 0.9 * len(names) + 1.5)
    columns = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, 3.8 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (title, values, log_scale) in zip(axes.flat, panels, strict=False):
        shown = [value if math.isfinite(value) else 0.0 for value in values]
        bars = axis.bar(names, shown, color=[f"C{index}" for index in range(len(names))])
        if log_scale:
            axis.set_yscale("log")
        labels = [f"{value:.3g}" if math.isfinite(value) else "n/a" for value in values]
        axis.bar_label(bars, labels=labels, fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"kd-eval {report['task']}")
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
