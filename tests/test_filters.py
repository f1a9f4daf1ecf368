"""teacher-dump --filter: the filter functions against independent checks, a filtered dump on
the tiny model, its resume, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kd_shards.shared.errors import UserError
from tests.conftest import QUESTIONS, dump_config

NO_MATCH = "§ never generated §"


def final_answer(text: str) -> str | None:
    """The test's own GSM8K answer: the number after the last '####', else the last number,
    without commas, '$' or a trailing '.0'."""
    marked = re.findall(r"####\s*\$?(-?[\d,]*\.?\d+)", text)
    numbers = marked or re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


ANSWERS = [
    ("Half of 14 is 7.\n#### 7", "Natalia sold 48/2 = 24 clips.\n#### 7"),
    ("She earns $1,000 in total.\n#### $1,000", "12 * 50 = 600\n#### 1000"),
    ("so the answer is 12", "6 + 6 = 12\n#### 12"),
    ("#### 5\nWait, it is 6.", "#### 6"),
    ("no number at all", "#### 3"),
    ("7.0 apples\n#### 7.0", "#### 7"),
    ("It costs -4 dollars\n#### -4", "#### 4"),
]


@pytest.mark.parametrize(("completion", "reference"), ANSWERS)
def test_answer_match_agrees_with_an_independent_extraction(completion, reference):
    from kd_shards.teacher_dump.filters import answer_match_score

    expected = final_answer(completion) is not None and final_answer(completion) == final_answer(
        reference
    )
    assert answer_match_score(completion, [reference]) == (1.0 if expected else 0.0)


def test_answer_match_uses_the_gsm8k_tasks_extraction(monkeypatch):
    """The task's own extraction decides (a change there changes the filter), not a copy."""
    from kd_shards.shared.tasks import gsm8k
    from kd_shards.teacher_dump.filters import answer_match_score

    monkeypatch.setattr(gsm8k, "final_number", lambda text: "1")
    assert answer_match_score("#### 2", ["#### 3"]) == 1.0


def test_rouge_l_is_rouge_score_best_over_references():
    from rouge_score import rouge_scorer

    from kd_shards.teacher_dump.filters import rouge_l_score

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    completion = "the model learns summaries from the teacher's samples"
    references = ["students learn from teacher samples", "the model learns summaries"]
    expected = max(
        scorer.score(reference, completion)["rougeL"].fmeasure for reference in references
    )
    assert rouge_l_score(completion, references) == pytest.approx(expected)
    assert 0 < expected < 1


def test_column_rule_keeps_completions_containing_the_value():
    from kd_shards.teacher_dump.filters import column_score

    assert column_score("the answer is Paris.", " Paris ") == 1.0
    assert column_score("the answer is paris.", "Paris") == 0.0  # case matters


def test_select_rows_threshold_and_keep_best_of():
    from kd_shards.teacher_dump.filters import select_rows

    rows = ["a", "b", "c"]
    assert select_rows(rows, [0.2, 0.5, 0.7], 0.5, False) == (["b", "c"], "kept")
    assert select_rows(rows, [0.2, 0.4, 0.1], 0.5, False) == ([], "none_kept")
    assert select_rows(rows, [0.2, 0.4, 0.4], 0.5, True) == (["b"], "best_kept")  # first of equals
    assert select_rows(rows, [0.2, 0.4, 0.4], 0.5, False) == ([], "none_kept")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(mode="score", filter="answer-match"), "--filter answer-match needs --mode generate"),
        (dict(filter="rouge-l"), "--filter-threshold goes with --filter rouge-l"),
        (dict(filter="answer-match", filter_threshold=0.5), "--filter-threshold goes with"),
        (dict(filter="rouge-l", filter_threshold=1.5), "--filter-threshold must be in [0, 1]"),
        (dict(filter="column"), "--filter-column goes with --filter column"),
        (dict(keep_best_of=True), "--keep-best-of needs a --filter"),
        (dict(filter="regex"), "--filter 'regex' is not one of"),
    ],
)
def test_bad_filter_settings_are_refused(tmp_path, overrides, fragment):
    with pytest.raises(UserError) as caught:
        dump_config(Path("model"), Path("data"), tmp_path, **overrides)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_reference_filter_on_data_without_references_names_the_fix(tiny_model, tmp_path):
    """Refused while preparing, before any engine starts (run_dump gets none here)."""
    from kd_shards.teacher_dump.run import run_dump

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": question}) + "\n" for question, _ in QUESTIONS))
    for name, extra in (("answer-match", {}), ("rouge-l", {"filter_threshold": 0.3})):
        config = dump_config(
            tiny_model, data, tmp_path / name, data=str(data), prompt_column="question",
            filter=name, **extra,
        )  # fmt: skip
        with pytest.raises(UserError) as caught:
            run_dump(config)
        message = str(caught.value)
        assert "\n" not in message
        assert f"--filter {name} needs each prompt's reference" in message
        assert "record 0 has none" in message and "--target-column" in message
    config = dump_config(
        tiny_model, data, tmp_path / "column", data=str(data), prompt_column="question",
        filter="column", filter_column="expect",
    )  # fmt: skip
    with pytest.raises(UserError, match="record 0 has no column 'expect'"):
        run_dump(config)


def shard_rows(directory: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(directory.glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert row["sample_id"] not in rows
            rows[row["sample_id"]] = row
    return rows


SAMPLING = dict(num_samples=2, temperature=1.0, seed=5, limit=6)


@pytest.fixture
def filtered_data(tiny_model, gsm8k_file, engine, tmp_path):
    """A GSM8K file whose `expect` column holds one of the engine's own samples for prompts 0, 2
    and 4 (so they keep it) and a text it never writes for 1, 3 and 5; with the unfiltered
    dump's rows."""
    from kd_shards.teacher_dump.run import run_dump

    run_dump(dump_config(tiny_model, gsm8k_file, tmp_path / "plain", **SAMPLING), engine)
    plain = shard_rows(tmp_path / "plain")
    records = [json.loads(line) for line in gsm8k_file.read_text().splitlines()]
    for index, record in enumerate(records):
        text = plain.get(f"{index}-1", {}).get("target_text", "").strip()
        record["expect"] = text if index % 2 == 0 and text else NO_MATCH
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    kept = {
        sample_id
        for sample_id, row in plain.items()
        if records[row["source_index"]]["expect"].strip() in row["target_text"].strip()
    }
    return data, plain, kept


def filtered_config(tiny_model, data: Path, out: Path, **overrides):
    values = dict(SAMPLING, filter="column", filter_column="expect", rows_per_shard=1)
    return dump_config(tiny_model, data, out, **{**values, **overrides})


@pytest.mark.engine
def test_a_filtered_dump_keeps_the_passing_samples_and_lists_the_rest(
    tiny_model, engine, filtered_data, tmp_path
):
    from kd_shards.teacher_dump.inspect import format_summary, summarize, validate
    from kd_shards.teacher_dump.run import run_dump

    data, plain, kept = filtered_data
    assert kept and len(kept) < len(plain)
    manifest = run_dump(filtered_config(tiny_model, data, tmp_path / "filtered"), engine)
    rows = shard_rows(tmp_path / "filtered")
    assert set(rows) == kept
    for sample_id, row in rows.items():  # a kept row is the unfiltered dump's row, top-k and all
        assert row == plain[sample_id]
    prompts_with_rows = {row["source_index"] for row in rows.values()}
    section = manifest["filter"]
    assert section["none_kept"] == sorted(set(range(6)) - prompts_with_rows)
    assert section["best_kept"] == []
    assert (section["prompts_done"], section["generated"], section["kept"]) == (6, 12, len(kept))
    assert manifest["complete"] and manifest["data"]["expected_rows"] == len(kept)
    assert validate(tmp_path / "filtered") == []
    summary = format_summary(tmp_path / "filtered", summarize(tmp_path / "filtered"))
    assert (
        f"filter          column (column expect): {len(kept)} of 12 samples kept over 6 "
        f"prompts; {len(section['none_kept'])} with none kept, 0 kept their best" in summary
    )

    best = run_dump(filtered_config(tiny_model, data, tmp_path / "best", keep_best_of=True), engine)
    best_rows = shard_rows(tmp_path / "best")
    # Every column sample scores 0 there, so the first of equals is the one kept.
    fallback = {f"{index}-0" for index in section["none_kept"]}
    assert set(best_rows) == kept | fallback
    assert best["filter"]["best_kept"] == section["none_kept"]
    assert best["filter"]["none_kept"] == [] and best["complete"]


@pytest.mark.engine
def test_a_resumed_filtered_dump_keeps_what_an_uninterrupted_one_keeps(
    tiny_model, engine, filtered_data, tmp_path, monkeypatch
):
    from kd_shards.teacher_dump import run
    from kd_shards.teacher_dump.shards import ShardWriter

    data, _, _ = filtered_data
    whole = run.run_dump(filtered_config(tiny_model, data, tmp_path / "whole"), engine)

    out = tmp_path / "resumed"
    real_add = ShardWriter.add_prompt_rows
    calls = []

    def add_then_crash(writer, rows):
        calls.append(len(rows))
        if len(calls) == 5:  # the fifth prompt: the process dies before its rows are written
            raise RuntimeError("killed")
        real_add(writer, rows)

    monkeypatch.setattr(ShardWriter, "add_prompt_rows", add_then_crash)
    with pytest.raises(RuntimeError, match="killed"):  # inline: the patch is this process's
        run.run_dump(filtered_config(tiny_model, data, out, writer="inline"), engine)
    monkeypatch.undo()
    interrupted = json.loads((out / "manifest.json").read_text())
    assert not interrupted["complete"] and interrupted["data"]["expected_rows"] is None
    settled = {row["source_index"] for row in shard_rows(out).values()}
    settled |= set(interrupted["filter"]["none_kept"])

    real_filtered = run.filtered_rows
    judged = []

    def recording(completion_filter, request, rows, data_rows, outcomes):
        judged.append(request.source_index)
        return real_filtered(completion_filter, request, rows, data_rows, outcomes)

    monkeypatch.setattr(run, "filtered_rows", recording)
    resumed = run.run_dump(filtered_config(tiny_model, data, out), engine)
    # The resume samples only the prompts neither in a shard nor listed as judged.
    assert sorted(judged) == sorted(set(range(6)) - settled) and judged
    assert shard_rows(out) == shard_rows(tmp_path / "whole")
    assert resumed["filter"] == whole["filter"] and resumed["complete"]

    judged.clear()
    run.run_dump(filtered_config(tiny_model, data, out), engine)
    assert judged == []  # a finished dump, prompts with nothing kept included, is not resampled
    # The filter is part of the dump's identity: another rule into the same --out is refused
    # (before any engine: none is passed).
    with pytest.raises(UserError, match="filter_column: 'expect' -> 'question'"):
        run.run_dump(filtered_config(tiny_model, data, out, filter_column="question"))
