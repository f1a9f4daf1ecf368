"""The classification benchmark's data: each dataset cut into a teacher's labelled rows, the
students' transfer set (N gold labels + M texts whose labels are hidden) and a test split,
written as working files in the benchmark's output folder (never into the repository); and
the hard pseudo-label file built from a teacher's dump of the transfer set.

The cut is fixed and disjoint: the teacher's rows come first, the transfer set follows
(its first N rows keep their gold labels), so the teacher's distributions on the transfer set
are predictions on texts it never trained on. The raw files are read from the data folder
(../shared/data) as published; Financial PhraseBank (CC BY-NC-SA) has no split, so it is
shuffled once with a fixed seed before the cut.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_shards.shared.errors import UserError

LabelledText = tuple[str, str]
"""(text, label name)."""


@dataclass(frozen=True)
class DatasetSpec:
    """How the benchmark reads one dataset and names it to the kd-shards commands."""

    name: str
    """The benchmark's name for the dataset (its output subfolder)."""
    folder: str
    """Its folder under the data folder."""
    labels: tuple[str, ...]
    """Label names in the task's order (the student's head order)."""
    task: str | None
    """The built-in kd-shards task (--data TASK --data-path FILE), or None: the working files
    are then passed as --data FILE with `text` and `label` columns."""
    text_column: str
    """Column of the working files holding the text."""
    read_pool: Callable[[Path], list[LabelledText]]
    """The rows the teacher and the transfer set are cut from, in their published order."""
    read_test: Callable[[Path], list[LabelledText]] | None
    """The held-out rows; None: the first rows of the shuffled pool are the test split."""


def read_tsv(path: Path, header: bool, to_label: Callable[[str], str]) -> list[LabelledText]:
    """(text, label) from a `text<TAB>label` file (GLUE's quoting: none)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[1:] if header else rows
    return [(text.strip(), to_label(label.strip())) for text, label in rows if text.strip()]


def read_phrasebank(path: Path) -> list[LabelledText]:
    """(sentence, label) from Financial PhraseBank's `sentence@label` lines."""
    encoding = "utf-8" if "AllAgree" in path.name else "latin-1"
    rows = []
    for line in path.read_text(encoding=encoding).splitlines():
        text, separator, label = line.rpartition("@")
        if separator and text.strip():
            rows.append((text.strip(), label.strip()))
    return rows


def sst2_label(raw: str) -> str:
    return ("negative", "positive")[int(raw)]


DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec(
        "sst2", "sst2_alps", ("negative", "positive"), "sst2", "sentence",
        lambda folder: read_tsv(folder / "train.tsv", True, sst2_label),
        lambda folder: read_tsv(folder / "test.tsv", True, sst2_label),
    ),
    "agnews": DatasetSpec(
        "agnews", "agnews_alps", ("World", "Sports", "Business", "Sci/Tech"), "agnews", "text",
        lambda folder: read_tsv(folder / "dev.tsv", False, str),
        lambda folder: read_tsv(folder / "test.tsv", False, str),
    ),
    "phrasebank": DatasetSpec(
        "phrasebank", "financial_phrasebank", ("negative", "neutral", "positive"), None, "text",
        lambda folder: read_phrasebank(folder / "Sentences_50Agree.txt"),
        None,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """How many rows each part of one dataset's cut holds."""

    unlabelled: int
    """M: transfer-set rows whose labels are hidden (the teacher labels them)."""
    gold: int
    """The largest N: transfer-set rows whose gold labels the students see (a smaller N takes
    the first N of them)."""
    teacher: int
    """The largest number of labelled rows a teacher is fine-tuned on (a smaller teacher takes
    the first of them)."""
    test: int | None
    """Held-out rows evaluated (None: all of the test split; without a published test split,
    a fifth of the rows)."""


@dataclass(frozen=True)
class Cut:
    """One dataset's parts, disjoint."""

    unlabelled: list[LabelledText]
    gold: list[LabelledText]
    teacher: list[LabelledText]
    test: list[LabelledText]


def cut_dataset(
    pool: list[LabelledText], test: list[LabelledText] | None, sizes: Sizes, seed: int
) -> Cut:
    """In order from `pool`: M unlabelled rows, then the gold block, then the teacher's rows
    (so a different N or teacher size moves no other part). `test` as given, or (None) the
    first rows of `pool` shuffled with `seed`, the rest being the pool. Refuses a cut that
    needs more rows than there are, naming the sizes."""
    if test is None:
        order = np.random.default_rng(seed).permutation(len(pool))
        shuffled = [pool[i] for i in order]
        held = sizes.test if sizes.test is not None else len(pool) // 5
        test, pool = shuffled[:held], shuffled[held:]
    elif sizes.test is not None:
        test = test[: sizes.test]
    needed = sizes.unlabelled + sizes.gold + sizes.teacher
    if needed > len(pool):
        raise UserError(
            f"unlabelled {sizes.unlabelled} + gold {sizes.gold} + teacher {sizes.teacher} = "
            f"{needed} rows, but the training pool holds {len(pool)}: lower one of them"
        )
    gold_end = sizes.unlabelled + sizes.gold
    return Cut(
        unlabelled=pool[: sizes.unlabelled],
        gold=pool[sizes.unlabelled : gold_end],
        teacher=pool[gold_end:needed],
        test=list(test),
    )


def write_rows(path: Path, rows: list[LabelledText], text_column: str, hide_from: int) -> None:
    """JSON lines {text_column: text, "label": name}; rows from index `hide_from` on get an
    empty label (no label: teacher-dump stores NO_LABEL, student-train adds no CE)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({text_column: text, "label": label if index < hide_from else ""})
        for index, (text, label) in enumerate(rows)
    ]
    temporary = path.with_suffix(".partial")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)


def transfer_rows(cut: Cut, gold: int) -> list[LabelledText]:
    """The transfer set for N = `gold`: the first N gold rows (labelled), then the M
    unlabelled ones. Row i of it is sample id i of the teacher's dump."""
    return cut.gold[:gold] + cut.unlabelled


def pseudo_labelled(
    transfer: list[LabelledText],
    gold: int,
    teacher_probabilities: dict[str, np.ndarray],
    labels: tuple[str, ...],
) -> list[LabelledText]:
    """The self-training baseline's rows: the first `gold` transfer rows with their gold label,
    every other row with the teacher's argmax. teacher_probabilities: sample id (the row's
    index in the transfer file) -> (L,) probabilities in `labels` order."""
    rows = []
    for index, (text, label) in enumerate(transfer):
        if index < gold:
            rows.append((text, label))
            continue
        probabilities = teacher_probabilities.get(str(index))
        if probabilities is None:
            raise UserError(
                f"the teacher's dump has no row for transfer row {index}: rerun its dump "
                "(delete the dump folder) so it covers the whole transfer set"
            )
        rows.append((text, labels[int(np.argmax(probabilities))]))
    return rows
