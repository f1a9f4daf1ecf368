"""What a training run leaves for people to read: metrics.jsonl and curve.png.

metrics.jsonl holds one JSON object per line: training lines ({"step", "loss", "ce", "kd",
"lr", "grad_norm", "tokens", "tokens_per_second", ...}) and eval lines ({"step", "eval_ce",
"eval_kl", "eval_top1", ...}). On --resume, lines after the checkpoint's step are dropped so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd_shards.shared.files import atomic_write, atomic_write_text

METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "curve.png"


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return lines


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (the checkpoint a resume starts from)."""
    kept = [line for line in read_metrics(path) if line.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in kept))


def append_metrics(path: Path, values: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(values) + "\n")
        handle.flush()


def plot_curve(metrics_path: Path, image_path: Path) -> None:
    """Training loss, eval KL to the teacher and eval top-1 agreement against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(metrics_path)
    train = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_kl" in line]
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([line["step"] for line in train], [line["loss"] for line in train], lw=1)
    loss_axis.set(xlabel="step", ylabel="train loss", title="training loss")
    loss_axis.grid(alpha=0.3)
    if evals:
        steps = [line["step"] for line in evals]
        eval_axis.plot(steps, [line["eval_kl"] for line in evals], "o-", color="C1")
        eval_axis.set(xlabel="step", ylabel="KL(teacher || student), nats")
        agreement_axis = eval_axis.twinx()
        agreement_axis.plot(steps, [line["eval_top1"] for line in evals], "s--", color="C2")
        agreement_axis.set_ylabel("top-1 agreement with teacher")
        eval_axis.set_title("held-out fidelity (KL circles, top-1 squares)")
    else:
        eval_axis.text(0.5, 0.5, "no --eval-shards", ha="center", va="center")
        eval_axis.set_axis_off()
    eval_axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(image_path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
