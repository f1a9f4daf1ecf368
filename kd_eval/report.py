"""What kd-eval leaves for people to read: the markdown table, results.json, the chart and one
predictions file per model."""

from __future__ import annotations

import json
from pathlib import Path

from shared.files import atomic_write, atomic_write_json, atomic_write_text

HEADLINE = {
    "gsm8k": ("accuracy", "GSM8K exact-match accuracy"),
    "summ": ("rougeL", "ROUGE-L F1"),
    "lm": ("perplexity", "perplexity (lower is better)"),
}
"""Per task: the metric plotted in the bar chart and its label."""


def markdown_table(report: dict) -> str:
    """One row per model: params, the task's metrics, fidelity and cost."""
    task = report["task"]
    metric_columns = {
        "gsm8k": [("accuracy", "accuracy", "{:.3f}")],
        "summ": [
            ("rouge1", "ROUGE-1", "{:.4f}"),
            ("rouge2", "ROUGE-2", "{:.4f}"),
            ("rougeL", "ROUGE-L", "{:.4f}"),
            ("bleu", "BLEU", "{:.2f}"),
        ],
        "lm": [
            ("perplexity", "perplexity", "{:.2f}"),
            ("acc@1", "acc@1", "{:.3f}"),
            ("acc@5", "acc@5", "{:.3f}"),
        ],
    }[task]
    fidelity = any("fidelity" in result for result in report["models"].values())
    header = ["model", "params"] + [label for _, label, _ in metric_columns]
    if fidelity:
        header += ["KL to teacher", "top-1 agreement"]
    header += ["ms/sample", "tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in report["models"].items():
        millions = result["parameters"] / 1e6
        row = [name, f"{millions:.1f}M" if millions >= 10 else f"{millions:.2f}M"]
        row += [form.format(result["metrics"][key]) for key, _, form in metric_columns]
        if fidelity:
            values = result.get("fidelity") or {}
            if "kl" in values:
                row += [f"{values['kl']:.4f}", f"{values['top1_agreement']:.3f}"]
            else:
                row += ["n/a", "n/a"]
        row += [
            f"{result['cost']['ms_per_sample']:.1f}",
            f"{result['cost']['tokens_per_second']:.0f}",
        ]
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
            lines = "".join(json.dumps({"prediction": text}) + "\n" for text in predictions)
            atomic_write_text(out / f"predictions-{safe}.jsonl", lines)
        compact["models"][name] = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_json(out / "results.json", compact)
    plot_headline(out / "chart.png", report)


def plot_headline(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = HEADLINE[report["task"]]
    names = list(report["models"])
    values = [report["models"][name]["metrics"][key] for name in names]
    figure, axis = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.5))
    bars = axis.bar(names, values, color=[f"C{index}" for index in range(len(names))])
    axis.bar_label(bars, fmt="%.3g")
    axis.set_ylabel(label)
    axis.set_title(f"kd-eval {report['task']}: {label}")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
